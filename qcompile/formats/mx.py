"""OCP Microscaling (MX) formats v1.0: MXINT8, MXFP8 (E4M3, E5M2), MXFP6 (E2M3, E3M2),
MXFP4 (E2M1), and the MXINT6 / MXINT4 targets of Slice-and-Scale.

OCP "Microscaling Formats (MX) Specification" v1.0 (2023), §5 and §6.3:

- a block of k = 32 elements along the reduction axis shares one E8M0 scale X = 2^E
  (code ``E + 127``; ``0xFF`` is NaN);
- ``E = floor(log2 max|V_i|) - emax_elem`` (§6.3 step 1), clamped below at -127; a block
  whose exponent would exceed 127 gets the NaN scale;
- ``P_i = saturate(round(V_i / X))`` in the element type (§6.3 step 2).

Options beyond the spec:

- ``scale_rounding="ceil"`` picks the smallest E with ``max|V| <= max_norm · 2^E`` (the
  "round the scale up" variant some vendors use: nothing saturates), instead of ``"floor"``;
- ``rounding``: ``"even"`` (round to nearest even, the default), ``"nearest"`` (half away
  from zero, microxcaling's default), ``"floor"`` (toward zero);
- an all-zero block gets ``E = max(-126 - emax_elem, -127)``, as in Microsoft's
  microxcaling reference (``amax = 0`` is replaced by the smallest fp32 normal);
- lengths that are not a multiple of 32 are padded with zeros to whole blocks (codes keep the
  padding; ``dequantize`` trims it);
- NaN/Inf policy ``"propagate"``: a block holding NaN or ±Inf gets the NaN scale ``0xFF`` and
  decodes to NaN throughout (the spec's NaN-scale semantics); ``"raise"`` refuses the input.

MXINT elements are two's complement fixed point with ``b - 2`` fraction bits and a symmetric
range ``±(2^(b-1) - 1) / 2^(b-2)`` (MXINT8: ±127/64, emax 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.errors import ConfigError
from qcompile.formats.base import Format
from qcompile.formats.floats import ROUNDINGS, decode_elements, element, encode_elements
from qcompile.formats.registry import register_format

__all__ = ["MXFormat", "E8M0_NAN", "e8m0_exponents"]

E8M0_NAN = 255
_FP32_MIN_NORMAL = 2.0 ** -126


def e8m0_exponents(amax: torch.Tensor, emax: int, max_norm: float, rounding: str) -> torch.Tensor:
    """Shared exponents E (int32; NaN blocks as 128) of blocks with abs-max ``amax``."""
    a = torch.where(amax == 0, torch.tensor(_FP32_MIN_NORMAL), amax.to(torch.float32))
    _, ex = torch.frexp(a)
    e = ex.to(torch.int32) - 1 - emax  # floor(log2 a) exactly, from the float's exponent field
    if rounding == "ceil":
        e = torch.where(a > torch.ldexp(torch.tensor(max_norm), e.to(torch.float32)), e + 1, e)
    e = e.clamp_min(-127)
    return torch.where(e > 127, torch.tensor(128, dtype=torch.int32), e)


@dataclass(frozen=True)
class MXFormat(Format):
    element: str = "fp4_e2m1"
    scale_rounding: str = "floor"
    rounding: str = "even"

    roles = ("scale",)
    pads = True
    block_only = True
    _fixed = ("element",)

    def __post_init__(self):
        super().__post_init__()
        element(self.element)
        if self.scale_rounding not in ("floor", "ceil"):
            raise ConfigError(f"{self.name}: scale_rounding must be 'floor' (OCP MX v1.0) or "
                              f"'ceil' (round the scale up), got {self.scale_rounding!r}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"{self.name}: rounding must be one of {ROUNDINGS}, got "
                              f"{self.rounding!r}")

    @property
    def elem(self):
        return element(self.element)

    @property
    def bits(self) -> int:
        return self.elem.bits

    def param_bits(self, role):
        return 8

    def _encode(self, xb, given):
        e = self.elem
        if given is not None:
            x = given["scale"].to(torch.int32)
            exp = torch.where(x == E8M0_NAN, torch.tensor(128, dtype=torch.int32), x - 127)
        else:
            exp = e8m0_exponents(xb.abs().amax(-1), e.emax, e.max_norm, self.scale_rounding)
        nan = exp == 128
        shift = torch.where(nan, torch.zeros_like(exp), exp).to(torch.float32)
        codes = encode_elements(torch.ldexp(xb, -shift[..., None]), e, self.rounding)
        if nan.any():
            codes = codes.masked_fill(nan[..., None], 0)
        scale = torch.where(nan, torch.tensor(E8M0_NAN, dtype=torch.int32), exp + 127)
        return codes, {"scale": scale.to(torch.uint8)}

    def _decode(self, cb, ps):
        x = ps["scale"].to(torch.int32)
        s = torch.ldexp(torch.ones(()), (x - 127).to(torch.float32))
        s = torch.where(x == E8M0_NAN, torch.tensor(float("nan")), s)
        return decode_elements(cb, self.elem) * s[..., None]

    def _poison(self, codes, ps, bad):
        codes = codes.masked_fill(bad[..., None], 0)
        return codes, {"scale": ps["scale"].masked_fill(bad, E8M0_NAN)}


for _name, _elem, _aliases in (
        ("mxint8", "int8", ()), ("mxint6", "int6", ()), ("mxint4", "int4", ()),
        ("mxfp8_e4m3", "fp8_e4m3", ("mxfp8",)), ("mxfp8_e5m2", "fp8_e5m2", ()),
        ("mxfp6_e2m3", "fp6_e2m3", ("mxfp6",)), ("mxfp6_e3m2", "fp6_e3m2", ()),
        ("mxfp4", "fp4_e2m1", ("mxfp4_e2m1",))):
    register_format(_name, MXFormat, aliases=_aliases, element=_elem, granularity="per_group",
                    group_size=32)
