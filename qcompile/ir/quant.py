"""Typed quantization annotations on IR values.

A value may carry a ``QuantSpec``: the numeric format, the granularity and the names of
the graph constants holding its parameters (scales, zero points, tensor scales, block
metadata). The interpreter fake-quantizes annotated values when they are produced; the
arithmetic lives in ``qcompile.formats``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Mapping

import torch

__all__ = ["Granularity", "QuantSpec", "int_range", "int_code_dtype"]


class Granularity(str, Enum):
    NONE = "none"  # no scale at all: plain fp16/bf16 storage, raw minifloat casts
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"
    PER_TOKEN = "per_token"  # dynamic: scales computed at run time from each row's abs-max


_INT_FMT = re.compile(r"^(u?)int([1-8]|16)$")


def _int_bits(fmt: str) -> tuple[bool, int]:
    m = _INT_FMT.match(fmt)
    if not m:
        from qcompile.errors import ConfigError
        raise ConfigError(f"unknown integer format {fmt!r}",
                          hint="use int1..int8, int16, uint1..uint8 or uint16")
    return not m.group(1), int(m.group(2))


def int_range(fmt: str) -> tuple[int, int]:
    """(qmin, qmax) of an integer format name such as ``int8``, ``uint4`` or ``uint16``."""
    signed, bits = _int_bits(fmt)
    if not signed:
        return 0, 2 ** bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def int_code_dtype(fmt: str) -> str:
    """The IR dtype holding the codes of integer format ``fmt``: ``int8``/``uint8`` up to 8 bits,
    ``int16`` for ``int16`` and ``int32`` for ``uint16`` (its codes 0..65535 do not fit
    ``int16``), as ``qcompile.formats.IntFormat.code_dtype``."""
    signed, bits = _int_bits(fmt)
    if bits > 8:
        return "int16" if signed else "int32"
    return "int8" if signed else "uint8"


@dataclass(frozen=True)
class QuantSpec:
    """How a value is quantized: a format from ``qcompile.formats`` (by name, with
    ``options``), its granularity, the ``axis`` along which elements share a scale (the
    reduction axis; a tuple for per-channel over several axes), the group size, and the names
    of the graph constants holding its parameters. A spec with no ``scale`` constant is
    dynamic: parameters are computed from the value each time it is produced (per-token
    activations, MX activations)."""

    format: str
    granularity: Granularity | None = None  # None: the format's own (MX: per_group of 32)
    axis: int | tuple[int, ...] | None = None
    group_size: int | None = None
    scale: str | None = None
    zero_point: str | None = None
    tensor_scale: str | None = None
    meta: str | None = None
    options: tuple = ()

    def __post_init__(self):
        from qcompile.errors import ConfigError
        if self.granularity is not None:
            object.__setattr__(self, "granularity", Granularity(self.granularity))
        if isinstance(self.axis, list):
            object.__setattr__(self, "axis", tuple(self.axis))
        opts = dict(self.options)
        if self.zero_point is not None and _INT_FMT.match(self.format) and "symmetric" not in opts:
            opts["symmetric"] = False  # a stored zero point means asymmetric codes
        object.__setattr__(self, "options", tuple(sorted(
            (k, tuple(v) if isinstance(v, list) else v) for k, v in opts.items())))
        fmt = self.fmt  # validates format, options and group size
        if self.granularity is None:
            object.__setattr__(self, "granularity", fmt.granularity)
            object.__setattr__(self, "group_size", fmt.group_size)
        if self.scale is None and any(getattr(self, r) for r in ("zero_point", "tensor_scale", "meta")):
            raise ConfigError(f"QuantSpec {self}: parameters other than the scale were given "
                              "without a scale constant", hint="give all of them, or none for a "
                              "dynamic spec")
        extra = [r for r in ("tensor_scale", "meta") if getattr(self, r) and r not in fmt.roles]
        if extra:
            raise ConfigError(f"format {fmt} has no parameter {extra[0]!r}")

    @property
    def fmt(self):
        """The ``qcompile.formats.Format`` this spec quantizes to (``axis`` None means -1)."""
        return _format_of(self.format, self.granularity, self.group_size, self.options)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    @property
    def dynamic(self) -> bool:
        return self.scale is None

    def to_json(self) -> dict:
        d = {"format": self.format, "granularity": self.granularity.value}
        for k in ("axis", "group_size", "scale", "zero_point", "tensor_scale", "meta"):
            v = getattr(self, k)
            if v is not None:
                d[k] = list(v) if isinstance(v, tuple) else v
        if self.options:
            d["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}
        return d

    @staticmethod
    def from_json(d: dict) -> "QuantSpec":
        d = dict(d)
        d["options"] = tuple(sorted(d.get("options", {}).items()))
        return QuantSpec(**d)

    def constants(self) -> list[str]:
        return [n for n in (self.scale, self.zero_point, self.tensor_scale, self.meta)
                if n is not None]

    def params(self, constants: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The stored parameters by role, or None for a dynamic spec."""
        if self.scale is None:
            return None
        out = {r: constants[getattr(self, r)] for r in ("scale", "zero_point", "tensor_scale",
                                                        "meta") if getattr(self, r) is not None}
        if "zero_point" in self.fmt.roles and "zero_point" not in out:
            out["zero_point"] = torch.zeros(())  # ONNX: an omitted zero point is 0
        return out

    def _axis(self):
        return -1 if self.axis is None else self.axis

    def quantize(self, x: torch.Tensor, constants: Mapping[str, torch.Tensor]):
        """``x`` as a ``QuantizedTensor`` of this spec's format and parameters."""
        return self.fmt.quantize(x, self._axis(), params=self.params(constants))

    def fake_quant(self, x: torch.Tensor, constants: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Quantize-dequantize with a straight-through gradient (Bengio et al. 2013)."""
        return self.fmt.fake_quant(x, self._axis(), params=self.params(constants))

    def __str__(self) -> str:
        g = self.granularity.value
        ax = list(self.axis) if isinstance(self.axis, tuple) else self.axis
        if self.granularity == Granularity.PER_GROUP:
            g += f"(axis={ax}, g={self.group_size})"
        elif self.granularity in (Granularity.PER_CHANNEL, Granularity.PER_TOKEN) and ax is not None:
            g += f"(axis={ax})"
        opts = "".join(f" {k}={v}" for k, v in self.options)
        return f"{self.format} {g}{opts}" + (" dynamic" if self.dynamic and
                                             self.granularity != Granularity.PER_TOKEN else "")


@lru_cache(maxsize=512)
def _format_of(name, granularity, group_size, options):
    from qcompile.formats import get
    kw = dict(options)
    if granularity is not None:
        kw["granularity"] = granularity.value
        if group_size is None and granularity != Granularity.PER_GROUP:
            kw["group_size"] = None
    if group_size is not None:
        kw["group_size"] = group_size
    return get(name, **kw)
