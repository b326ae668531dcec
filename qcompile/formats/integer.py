"""Integer formats, 1–8 and 16 bits: signed or unsigned codes, symmetric or asymmetric scaling.

Affine quantization (Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018, eq. 1): ``r = s (q - z)``.

- symmetric: ``s = clip · max|x| / (2^(b-1) - 1)``, ``z = 0`` for signed codes and the
  implied ``z = 2^(b-1)`` for unsigned ones (the same grid, offset-binary codes);
- asymmetric: ``s = clip · (max' - min') / (qmax - qmin)`` with ``max' = max(max x, 0)``,
  ``min' = min(min x, 0)`` (so zero is exact), ``z = qmin - round(min'/s)``, stored;
- ``q = clamp(round(x / s) + z, qmin, qmax)``, round half to even (``torch.round``).

With ``full_range=True`` a symmetric format uses all ``2^b`` codes: the element of largest
magnitude ``m`` maps onto ``-2^(b-1)``, ``s = m / -2^(b-1)`` (a signed scale), as in
llama.cpp's ``Q4_0`` and ONNX Runtime's symmetric ``MatMulNBits`` quantizer; the opposite
side then saturates at ``2^(b-1) - 1``.

The 1-bit symmetric format is binary: ``x ≈ s · sign(x)`` with ``s = mean|x|`` per block, the
least-squares optimum (Rastegari et al., "XNOR-Net", ECCV 2016, eq. 3–6); its code is the sign
bit (0 for negative, 1 otherwise).

Code dtypes: ``int8``/``uint8`` up to 8 bits; 16-bit codes in ``int16`` when signed and
``int32`` when unsigned (``uint16`` codes 0..65535 do not fit ``int16``, and ``torch.uint16``
lacks most ops). Zero points are stored in the code dtype. Every code of up to 16 bits is
exact in the fp32 arithmetic of ``_encode``/``_decode`` (integers below ``2^24``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.errors import ConfigError
from qcompile.formats.base import Format, safe_div, scale_dtype
from qcompile.formats.registry import register_format
from qcompile.ir.quant import Granularity

__all__ = ["IntFormat", "INT_BITS"]

#: the element widths of the registered integer formats (``int{b}`` / ``uint{b}``)
INT_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)


@dataclass(frozen=True)
class IntFormat(Format):
    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    scale_dtype: str = "fp32"
    clip_ratio: float = 1.0
    pad: bool = False
    full_range: bool = False

    _fixed = ("bits", "signed")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.bits, int) or self.bits not in INT_BITS:
            raise ConfigError(f"{self.name}: integer formats have 1 to 8 or 16 bits, got "
                              f"{self.bits!r}", hint="use int1..int8, int16, uint1..uint8 or "
                              "uint16")
        if self.granularity == Granularity.NONE:
            raise ConfigError(f"{self.name}: integer formats need a scale; granularity 'none' "
                              "is for plain float storage", hint="use per_tensor, per_channel, "
                              "per_group or per_token")
        scale_dtype(self.scale_dtype, self.name)
        if self.full_range and (not self.symmetric or self.bits < 2):
            raise ConfigError(f"{self.name}: full_range applies to symmetric formats of 2 bits "
                              "or more")
        if not 0 < float(self.clip_ratio) <= 1:
            raise ConfigError(f"{self.name}: clip_ratio must be in (0, 1], got {self.clip_ratio}")

    @property
    def binary(self) -> bool:
        return self.bits == 1 and self.symmetric

    @property
    def qrange(self) -> tuple[int, int]:
        if self.binary:
            return 0, 1
        if self.signed:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    @property
    def roles(self) -> tuple[str, ...]:
        return ("scale",) if self.symmetric else ("scale", "zero_point")

    @property
    def code_dtype(self) -> torch.dtype:
        if self.bits > 8:  # 16 bits: uint16 codes need int32 (see the module docstring)
            return torch.int16 if self.signed else torch.int32
        return torch.int8 if self.signed and not self.binary else torch.uint8

    def param_bits(self, role: str) -> int:
        if role == "zero_point":
            return self.bits
        return torch.finfo(scale_dtype(self.scale_dtype, self.name)).bits

    def _offset(self) -> int:
        """The implied zero point of symmetric unsigned codes."""
        return 0 if self.signed or self.binary else 1 << (self.bits - 1)

    def _encode(self, xb, given):
        qmin, qmax = self.qrange
        sdt = scale_dtype(self.scale_dtype, self.name)
        clip = float(self.clip_ratio)
        if given is not None:
            s = given["scale"].to(sdt)
            z = given["zero_point"].to(torch.float32) if not self.symmetric else None
        elif self.binary:
            s = (xb.abs().mean(-1) * clip).to(sdt)
            z = None
        elif self.symmetric and self.full_range:
            m = xb.gather(-1, xb.abs().argmax(-1, keepdim=True)).squeeze(-1)
            s = (m * clip / -(1 << (self.bits - 1))).to(sdt)
            z = None
        elif self.symmetric:
            s = (xb.abs().amax(-1) * clip / ((1 << (self.bits - 1)) - 1)).to(sdt)
            z = None
        else:
            hi = xb.amax(-1).clamp_min(0) * clip
            lo = xb.amin(-1).clamp_max(0) * clip
            s = ((hi - lo) / (qmax - qmin)).to(sdt)
            z = torch.clamp(qmin - torch.round(safe_div(lo, s.float())), qmin, qmax)
        if self.binary:
            codes = (xb >= 0).to(torch.uint8)
            return codes, {"scale": s}
        zz = self._offset() if z is None else z[..., None]
        q = safe_div(xb, s.float()[..., None]).round_().add_(zz).clamp_(qmin, qmax)
        ps = {"scale": s}
        if z is not None:
            ps["zero_point"] = z.to(self.code_dtype)
        return q.to(self.code_dtype), ps

    def _decode(self, cb, ps):
        s = ps["scale"].float()[..., None]
        if self.binary:
            return (cb.float() * 2 - 1) * s
        z = ps["zero_point"].float()[..., None] if "zero_point" in ps else self._offset()
        return (cb.float() - z) * s


for _b in INT_BITS:
    register_format(f"int{_b}", IntFormat, bits=_b, signed=True, symmetric=True)
    register_format(f"uint{_b}", IntFormat, bits=_b, signed=False, symmetric=False)
