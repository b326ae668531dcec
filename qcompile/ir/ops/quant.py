"""Explicit quantize/dequantize ops (affine integer, per tensor/axis/block), as in ONNX
QuantizeLinear/DequantizeLinear: q = saturate(round(x / s) + z), x' = (q - z) * s
(Jacob et al. 2018, eq. 1)."""
from __future__ import annotations

import torch

from qcompile.ir.quant import int_code_dtype, int_range
from qcompile.ir.registry import Attr, op
from qcompile.ir.types import TensorType, to_torch_dtype

__all__: list[str] = []


def _expand(p: torch.Tensor, x: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    if p.dim() == 0 or p.numel() == 1 and x.dim() == 0:
        return p.reshape(())
    axis %= x.dim()
    if block_size:
        return p.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


_QATTRS = {"axis": Attr("int", 1), "block_size": Attr("int", 0), "format": Attr("str", "int8")}


@op("quantize", inputs=("x", "scale", "zero_point?"), attrs=_QATTRS,
    infer=lambda t, a: TensorType(t[0].shape, int_code_dtype(a["format"])))
def quantize(x, scale, zero_point, axis, block_size, format):
    """Float to integer codes (int8/uint8; int16, or int32 for uint16), round half to even,
    saturating."""
    qmin, qmax = int_range(format)
    s = _expand(scale.to(torch.float32), x, axis, block_size)
    z = 0 if zero_point is None else _expand(zero_point.to(torch.float32), x, axis, block_size)
    q = torch.clamp(torch.round(x.to(torch.float32) / s) + z, qmin, qmax)
    return q.to(to_torch_dtype(int_code_dtype(format)))


@op("dequantize", inputs=("q", "scale", "zero_point?"), attrs=_QATTRS,
    infer=lambda t, a: TensorType(t[0].shape, t[1].dtype))
def dequantize(q, scale, zero_point, axis, block_size, format):
    """Integer codes to float: (q - z) * s."""
    s = _expand(scale, q, axis, block_size)
    z = 0 if zero_point is None else _expand(zero_point.to(scale.dtype), q, axis, block_size)
    return (q.to(scale.dtype) - z) * s
