"""Conversions between formats: requantization through float, and Slice-and-Scale.

**Slice-and-Scale** (Xu, Sharify & Mostafa, "MF-QAT", arXiv 2604.00529). One MX "anchor"
checkpoint (MXINT8 or MXFP8) is stored and lower-precision MX formats are derived from its
codes alone, without the float weights. The paper's algorithm text was not available; this is
the working definition of ``reference/passes.md`` §3.4:

- MXINT8 → MXINT(8−k): ``q' = clamp(round(q₈ / 2^k), ±(2^(7−k) − 1))``. In the MX encoding
  the element's implied fraction shrinks by k bits, so the E8M0 block scale is unchanged
  (equivalently, with integer elements, ``E' = E + k``).
- MXFP8 → MXFP6 / MXFP4 (no more mantissa bits than the anchor): ``E' = E + (emax₈ − emax')``
  — exactly the exponent direct quantization would pick, because an anchor element never
  leaves its binade; where the anchor's E was clamped at −127, ``E' = E + floor(log2
  max|v₈|) − emax'`` from the anchor's own elements — then each
  anchor value ``v₈ · 2^(E − E')`` is re-rounded onto the target grid, saturating. All-zero
  blocks get the exponent direct quantization gives them.

Against quantizing the float weights directly, the sliced codes differ by at most one step,
for about a fraction 2^-(k+1) of the elements (double rounding at the ties).
"""
from __future__ import annotations

import torch

from qcompile.errors import ConfigError
from qcompile.formats.base import QuantizedTensor
from qcompile.formats.floats import decode_elements, encode_elements
from qcompile.formats.floats import round_values as round_mode
from qcompile.formats.mx import E8M0_NAN, MXFormat
from qcompile.formats.registry import get

__all__ = ["requantize", "slice_and_scale"]


def requantize(qt: QuantizedTensor, fmt, axis=None, **options) -> QuantizedTensor:
    """``qt`` in another format: decoded to fp32 and quantized again (exact in fp32, since
    every format here decodes to values fp32 holds exactly)."""
    fmt = get(fmt, **options)
    if axis is None:
        axis = qt.axis if qt.axis is not None else -1
    return fmt.quantize(qt.dequantize(torch.float32), axis)


def slice_and_scale(qt: QuantizedTensor, target, **options) -> QuantizedTensor:
    """Derive ``target`` (an MX format with fewer element bits) from an MX anchor's codes."""
    src = qt.format
    dst = get(target, **options)
    if not isinstance(src, MXFormat) or not isinstance(dst, MXFormat):
        raise ConfigError(f"Slice-and-Scale converts between MX formats; got {src} -> {dst}",
                          hint="use requantize() for other pairs")
    if src.group_size != dst.group_size:
        raise ConfigError(f"Slice-and-Scale keeps the blocks: {src} has blocks of "
                          f"{src.group_size}, {dst} of {dst.group_size}")
    se, de = src.elem, dst.elem
    if se.is_int != de.is_int or de.bits >= se.bits or de.mbits > se.mbits:
        raise ConfigError(f"Slice-and-Scale goes from MXINT8 to a narrower MXINT, or from "
                          f"MXFP8 to an MXFP6/MXFP4 with no more mantissa bits; {src} -> {dst} "
                          "is neither",
                          hint="use requantize() for other pairs")
    scale = qt.params["scale"].to(torch.int32)
    nan = scale == E8M0_NAN
    if se.is_int:
        k = se.mbits - de.mbits
        q = round_mode(qt.codes.to(torch.float32) / (1 << k), dst.rounding)
        lim = (1 << (de.bits - 1)) - 1
        codes = q.clamp(-lim, lim).to(torch.int8)
        new_scale = scale
    else:
        lay = qt.layout
        vb = lay.to_blocks(decode_elements(qt.codes, se), padded=True)
        zero = lay.param_from_blocks((vb == 0).all(-1))
        # E' = E + floor(log2 max|v8|) - emax'; equal to E + (emax8 - emax') unless the anchor's
        # exponent was clamped at -127, where the anchor's own elements say how small it is
        _, ex = torch.frexp(vb.abs().amax(-1))
        top = lay.param_from_blocks(ex.to(torch.int32) - 1)
        new_scale = torch.where(nan, scale, (scale + top - de.emax).clamp(0, 254))
        # an all-zero block gets the exponent direct quantization gives it (see mx.py)
        new_scale = torch.where(zero & ~nan, torch.tensor(max(1 - de.emax, 0)), new_scale)
        shift = (scale - new_scale).to(torch.float32)  # E - E'
        sb = lay.param_to_blocks(shift, "scale", dst.name)
        v = torch.ldexp(vb, sb[..., None])
        codes = lay.from_blocks(encode_elements(v, de, dst.rounding), trim=False)
    codes = codes.masked_fill(_expand_blocks(qt, nan), 0)
    return QuantizedTensor(dst, codes.contiguous(), {"scale": new_scale.to(torch.uint8)},
                           qt.shape, qt.axis, qt.dtype)


def _expand_blocks(qt: QuantizedTensor, mask: torch.Tensor) -> torch.Tensor:
    lay = qt.layout
    mb = lay.param_to_blocks(mask, "scale", qt.format.name)
    full = mb[..., None].expand(*mb.shape, lay.block)
    return lay.from_blocks(full, trim=False)
