"""Float formats: plain fp16/bf16 storage and the minifloats FP8 (E4M3, E5M2), FP6 (E2M3,
E3M2) and FP4 (E2M1), optionally scaled per tensor, channel or group.

Element encodings are those of the OCP "8-bit Floating Point Specification (OFP8)" rev. 1.0
and the OCP "Microscaling Formats (MX) v1.0" spec §5.3 (FP6/FP4: no Inf, no NaN; E4M3: no
Inf, one NaN mantissa; E5M2: IEEE-like). Casts are done by ``ml_dtypes``, round to nearest
even; values beyond the largest normal saturate to it. A scaled minifloat uses
``s = max|x| / max_normal`` per block (the FP8 recipe of Micikevicius et al., "FP8 Formats for
Deep Learning", 2022, §4.3), stored in ``scale_dtype``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import ml_dtypes
import numpy as np
import torch

from qcompile.errors import ConfigError
from qcompile.formats.base import Format, safe_div, scale_dtype
from qcompile.formats.registry import register_format
from qcompile.ir.quant import Granularity

__all__ = ["Element", "ELEMENTS", "element", "MinifloatFormat", "FloatStorage",
           "encode_elements", "decode_elements"]

ROUNDINGS = ("even", "nearest", "floor")


@dataclass(frozen=True)
class Element:
    """One element type. Floats: ``ebits``/``mbits`` and the ``ml_dtypes`` type. Fixed-point
    integers (the MX INT elements): ``mbits`` fraction bits, two's complement, symmetric
    (``-2^(b-1)`` unused, as in the OCP MX spec's MXINT8)."""

    name: str
    bits: int
    ebits: int
    mbits: int
    emax: int  # exponent of the largest normal (OCP MX Table 1 "emax")
    max_norm: float
    emin: int  # exponent of the smallest normal
    np_dtype: object = None  # ml_dtypes type; None for integers

    @property
    def is_int(self) -> bool:
        return self.np_dtype is None

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)


def _float_element(name: str, np_dtype) -> Element:
    fi = ml_dtypes.finfo(np_dtype)
    return Element(name, fi.bits, fi.nexp, fi.nmant, int(math.floor(math.log2(float(fi.max)))),
                   float(fi.max), int(fi.minexp), np_dtype)


def _int_element(bits: int) -> Element:
    frac = bits - 2
    return Element(f"int{bits}", bits, 0, frac, 0, ((1 << (bits - 1)) - 1) / (1 << frac),
                   -frac, None)


ELEMENTS: dict[str, Element] = {
    "fp8_e4m3": _float_element("fp8_e4m3", ml_dtypes.float8_e4m3fn),
    "fp8_e5m2": _float_element("fp8_e5m2", ml_dtypes.float8_e5m2),
    "fp6_e2m3": _float_element("fp6_e2m3", ml_dtypes.float6_e2m3fn),
    "fp6_e3m2": _float_element("fp6_e3m2", ml_dtypes.float6_e3m2fn),
    "fp4_e2m1": _float_element("fp4_e2m1", ml_dtypes.float4_e2m1fn),
    "int8": _int_element(8), "int6": _int_element(6), "int4": _int_element(4),
}
_ELEMENT_ALIASES = {"e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2", "e2m3": "fp6_e2m3",
                    "e3m2": "fp6_e3m2", "e2m1": "fp4_e2m1", "fp8": "fp8_e4m3",
                    "fp6": "fp6_e2m3", "fp4": "fp4_e2m1"}


def element(name: str) -> Element:
    key = _ELEMENT_ALIASES.get(name.lower(), name.lower())
    if key not in ELEMENTS:
        raise ConfigError(f"unknown element type {name!r}",
                          hint=f"use one of {', '.join(ELEMENTS)}")
    return ELEMENTS[key]


@lru_cache(maxsize=None)
def _decode_table(name: str) -> torch.Tensor:
    e = ELEMENTS[name]
    return torch.from_numpy(np.arange(1 << e.bits, dtype=np.uint8).view(e.np_dtype)
                            .astype(np.float32))


def round_values(v: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "even":
        return torch.round(v)
    if mode == "nearest":  # half away from zero
        return torch.sign(v) * torch.floor(v.abs() + 0.5)
    return torch.sign(v) * torch.floor(v.abs())  # "floor": toward zero on the magnitude


def round_to_grid(v: torch.Tensor, e: Element, mode: str) -> torch.Tensor:
    """Round ``v`` (float32) onto ``e``'s value grid, saturating at ``±max_norm``. A float's
    step is ``2^(max(floor(log2|v|), emin) - mbits)`` (its private exponent clipped to the
    subnormal range, OCP MX §6.3)."""
    v = v.clamp(-e.max_norm, e.max_norm)
    if e.is_int:
        step_exp = torch.full_like(v, -e.mbits)
    else:
        _, ex = torch.frexp(v)
        step_exp = (ex.to(torch.float32) - 1).clamp_min(e.emin) - e.mbits
    q = torch.ldexp(round_values(torch.ldexp(v, -step_exp), mode), step_exp)
    return q.clamp(-e.max_norm, e.max_norm)


def encode_elements(v: torch.Tensor, e: Element, mode: str = "even") -> torch.Tensor:
    """Codes of ``v`` (already divided by its scale) in element type ``e``: bit patterns in
    ``uint8`` for floats, two's complement ``int8`` fixed-point integers for INT elements.
    Saturating; NaN inputs must be handled by the caller."""
    if e.is_int:
        return round_values(v.clamp(-e.max_norm, e.max_norm) * (1 << e.mbits), mode).to(torch.int8)
    if mode != "even":
        v = round_to_grid(v, e, mode)  # exact on the grid: the cast below does not round
    v = v.clamp(-e.max_norm, e.max_norm)
    arr = v.detach().to(torch.float32).contiguous().numpy().astype(e.np_dtype)
    return torch.from_numpy(arr.view(np.uint8))


def decode_elements(codes: torch.Tensor, e: Element) -> torch.Tensor:
    if e.is_int:
        return codes.to(torch.float32) / (1 << e.mbits)
    return _decode_table(e.name)[codes.to(torch.int64)]


@dataclass(frozen=True)
class MinifloatFormat(Format):
    """A minifloat element type; with granularity ``none`` a raw cast, otherwise scaled by
    ``s = max|x| / max_normal`` per tensor, channel or group."""

    element: str = "fp8_e4m3"
    rounding: str = "even"
    scale_dtype: str = "fp32"
    pad: bool = False

    _fixed = ("element",)

    def __post_init__(self):
        super().__post_init__()
        element(self.element)
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"{self.name}: rounding must be one of {ROUNDINGS}, got "
                              f"{self.rounding!r}")
        scale_dtype(self.scale_dtype, self.name)

    @property
    def elem(self) -> Element:
        return element(self.element)

    @property
    def bits(self) -> int:
        return self.elem.bits

    @property
    def roles(self):
        return () if self.granularity == Granularity.NONE else ("scale",)

    def param_bits(self, role):
        return torch.finfo(scale_dtype(self.scale_dtype, self.name)).bits

    def quantize(self, x, axis=-1, *, params=None):
        if self.granularity == Granularity.NONE and self.nan_policy == "propagate" \
                and not bool(torch.isfinite(x).all()):
            from qcompile.errors import QuantizationError
            from qcompile.formats.base import QuantizedTensor
            if self.elem.bits < 8:
                raise QuantizationError(
                    f"{self.name} has no NaN or Inf encoding, so non-finite values cannot "
                    "propagate through a raw cast", hint="use a scaled granularity (a block "
                    "holding NaN then decodes to NaN) or clean the input")
            arr = x.detach().to(torch.float32).contiguous().numpy()
            arr = np.where(np.isfinite(arr), np.clip(arr, -self.elem.max_norm, self.elem.max_norm),
                           arr).astype(self.elem.np_dtype)
            return QuantizedTensor(self, torch.from_numpy(arr.view(np.uint8)), {},
                                   tuple(x.shape), None, x.dtype)
        return super().quantize(x, axis, params=params)

    def _encode(self, xb, given):
        e = self.elem
        if self.granularity == Granularity.NONE:
            return encode_elements(xb, e, self.rounding), {}
        sdt = scale_dtype(self.scale_dtype, self.name)
        s = given["scale"].to(sdt) if given else (xb.abs().amax(-1) / e.max_norm).to(sdt)
        return encode_elements(safe_div(xb, s.float()[..., None]), e, self.rounding), {"scale": s}

    def _decode(self, cb, ps):
        v = decode_elements(cb, self.elem)
        return v if "scale" not in ps else v * ps["scale"].float()[..., None]

    def _poison(self, codes, ps, bad):
        if self.granularity != Granularity.NONE:
            return super()._poison(codes, ps, bad)
        return codes, ps  # raw casts: see FloatStorage; handled element-wise in quantize


@dataclass(frozen=True)
class FloatStorage(Format):
    """Plain fp16 / bf16 / fp32 storage: no scale; NaN and Inf kept element-wise (fp16
    overflow becomes Inf, as an IEEE cast does)."""

    dtype: str = "fp16"

    _fixed = ("dtype",)

    def __post_init__(self):
        super().__post_init__()
        scale_dtype(self.dtype, self.name)
        if self.granularity != Granularity.NONE:
            raise ConfigError(f"{self.name} is plain storage: it has no scales, so granularity "
                              f"must be 'none' (got {self.granularity.value})")

    @property
    def bits(self):
        return torch.finfo(scale_dtype(self.dtype, self.name)).bits

    def param_bits(self, role):
        return 0

    def quantize(self, x, axis=-1, *, params=None):
        if self.nan_policy == "propagate" and x.is_floating_point():
            from qcompile.formats.base import QuantizedTensor
            codes = x.detach().to(scale_dtype(self.dtype, self.name)).contiguous()
            return QuantizedTensor(self, codes, {}, tuple(x.shape), None, x.dtype)
        return super().quantize(x, axis, params=params)

    def _encode(self, xb, given):
        out = xb.to(scale_dtype(self.dtype, self.name))
        if self.nan_policy == "raise" and xb.numel() and not bool(torch.isfinite(out).all()):
            from qcompile.errors import QuantizationError
            big = float(xb.abs().amax())
            raise QuantizationError(
                f"{self.name}: a value of magnitude {big:g} overflows {self.dtype} (max "
                f"{torch.finfo(out.dtype).max:g})", hint="scale the tensor, use bf16, or pass "
                "nan_policy='propagate' to store Inf")
        return out, {}

    def _decode(self, cb, ps):
        return cb.to(torch.float32)


register_format("fp16", FloatStorage, aliases=("float16", "half"), dtype="fp16",
                granularity="none")
register_format("bf16", FloatStorage, aliases=("bfloat16",), dtype="bf16", granularity="none")
register_format("fp32", FloatStorage, aliases=("float32",), dtype="fp32", granularity="none")
for _name, _aliases in (("fp8_e4m3", ("fp8", "e4m3", "float8_e4m3fn")),
                        ("fp8_e5m2", ("e5m2", "float8_e5m2")),
                        ("fp6_e2m3", ("fp6", "e2m3", "float6_e2m3fn")),
                        ("fp6_e3m2", ("e3m2", "float6_e3m2fn")),
                        ("fp4_e2m1", ("fp4", "e2m1", "float4_e2m1fn"))):
    register_format(_name, MinifloatFormat, aliases=_aliases, element=_name)
