"""Typed quantization annotations on IR values.

A value may carry a ``QuantSpec``: the numeric format, the granularity and the names of
the graph constants holding its scales and zero points. The interpreter fake-quantizes
annotated values when they are produced. This module implements the integer affine
formats (Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018, eq. 1: r = S(q - Z)); the formats module
adds the rest.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, asdict
from enum import Enum
from typing import Mapping

import torch

__all__ = ["Granularity", "QuantSpec", "int_range"]


class Granularity(str, Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"
    PER_TOKEN = "per_token"  # dynamic: scales computed at run time from each row's abs-max


_INT_FMT = re.compile(r"^(u?)int([1-8])$")


def int_range(fmt: str) -> tuple[int, int]:
    """(qmin, qmax) of an integer format name such as ``int8`` or ``uint4``."""
    m = _INT_FMT.match(fmt)
    if not m:
        from qcompile.errors import ConfigError
        raise ConfigError(f"unknown integer format {fmt!r}", hint="use int1..int8 or uint1..uint8")
    bits = int(m.group(2))
    if m.group(1):
        return 0, 2 ** bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class QuantSpec:
    """How a value is quantized: ``format`` (``int8``, ``uint4``, ...), granularity, the axis
    of channels or groups, the group size, and graph-constant names of scale and zero point."""

    format: str
    granularity: Granularity = Granularity.PER_TENSOR
    axis: int | None = None
    group_size: int | None = None
    scale: str | None = None
    zero_point: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        int_range(self.format)  # validates the format name
        if self.granularity == Granularity.PER_GROUP and not self.group_size:
            from qcompile.errors import ConfigError
            raise ConfigError("a per-group QuantSpec needs group_size")
        if self.granularity != Granularity.PER_TOKEN and self.scale is None:
            from qcompile.errors import ConfigError
            raise ConfigError(f"a {self.granularity.value} QuantSpec needs a scale constant")

    @property
    def bits(self) -> int:
        return int(_INT_FMT.match(self.format).group(2))

    def to_json(self) -> dict:
        d = asdict(self)
        d["granularity"] = self.granularity.value
        return {k: v for k, v in d.items() if v is not None}

    @staticmethod
    def from_json(d: dict) -> "QuantSpec":
        return QuantSpec(**d)

    def constants(self) -> list[str]:
        return [n for n in (self.scale, self.zero_point) if n is not None]

    def _broadcast(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == Granularity.PER_TENSOR:
            return p.reshape(())
        axis = self.axis % x.dim()
        if self.granularity == Granularity.PER_CHANNEL:
            shape = [1] * x.dim()
            shape[axis] = -1
            return p.reshape(shape)
        # per group: p has x's shape with the axis divided by group_size
        return p.repeat_interleave(self.group_size, dim=axis)

    def scale_zero_point(self, x: torch.Tensor, constants: Mapping[str, torch.Tensor]):
        qmin, qmax = int_range(self.format)
        if self.granularity == Granularity.PER_TOKEN:
            amax = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
            return amax / qmax, torch.zeros((), dtype=x.dtype)
        s = self._broadcast(constants[self.scale].to(x.dtype), x)
        if self.zero_point is None:
            z = torch.zeros((), dtype=x.dtype)
        else:
            z = self._broadcast(constants[self.zero_point].to(x.dtype), x)
        return s, z

    def quantize(self, x: torch.Tensor, constants: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Integer codes (as x's float dtype), round half to even, saturated."""
        qmin, qmax = int_range(self.format)
        s, z = self.scale_zero_point(x, constants)
        return torch.clamp(torch.round(x / s) + z, qmin, qmax)

    def fake_quant(self, x: torch.Tensor, constants: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Quantize-dequantize with a straight-through gradient (Bengio et al. 2013)."""
        s, z = self.scale_zero_point(x, constants)
        qmin, qmax = int_range(self.format)
        q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
        y = (q - z) * s
        return x + (y - x).detach() if x.requires_grad else y

    def __str__(self) -> str:
        g = self.granularity.value
        if self.granularity == Granularity.PER_GROUP:
            g += f"(axis={self.axis}, g={self.group_size})"
        elif self.granularity == Granularity.PER_CHANNEL:
            g += f"(axis={self.axis})"
        return f"{self.format} {g}"
