"""The ``Format`` protocol, ``QuantizedTensor``, and the block layout every format shares.

Conventions (every format follows them):

- ``axis`` is the axis **along which elements share a scale** — the reduction axis of the
  matmul that will consume the tensor. For a ``Linear`` weight ``[out, in]`` that is
  ``axis=-1``: per-group scales run along ``in`` in groups of ``group_size``, and a
  per-channel scale covers a whole row, i.e. one scale per output channel. Per-channel may
  reduce over several axes (``axis=(1, 2, 3)`` for a conv weight ``[O, I, kh, kw]``).
- Codes keep the tensor's layout; along ``axis`` they are padded with zeros to whole blocks
  when the format pads (MX does, by the OCP spec; integer groups only when ``pad=True``).
- Parameters (scales, zero points, block metadata) keep the tensor's rank ("keepdim"):
  per group, ``axis`` holds the number of blocks; per channel, the reduced axes are 1; per
  tensor, a parameter is a 0-d tensor.
- NaN and Inf follow ``nan_policy``: ``"raise"`` (the default) raises ``QuantizationError``
  naming the first bad element; ``"propagate"`` makes every block holding a non-finite value
  decode to NaN (for MX this is the E8M0 NaN scale ``0xFF`` of the OCP spec).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from qcompile.errors import ConfigError, QuantizationError
from qcompile.ir.quant import Granularity

__all__ = ["Format", "QuantizedTensor", "BlockLayout", "ste"]

NAN_POLICIES = ("raise", "propagate")
SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def ste(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` in the forward pass, identity gradient to ``x`` in the backward pass: the
    straight-through estimator (Bengio, Léonard & Courville 2013, §3)."""
    return x + (y - x).detach() if x.requires_grad else y


# -- layout ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockLayout:
    """How a tensor of ``shape`` is cut into blocks that share parameters.

    ``axes`` are the (non-negative) reduced axes; ``block`` elements share one parameter set
    (``block == n`` for a whole-axis reduction); ``npad`` is the length along the reduced
    axis after padding (single-axis only)."""

    shape: tuple[int, ...]
    axes: tuple[int, ...]
    block: int
    n: int
    npad: int

    @staticmethod
    def make(shape, axis, granularity: Granularity, group_size: int | None, pad: bool,
             fmt_name: str) -> "BlockLayout":
        shape = tuple(int(d) for d in shape)
        rank = len(shape)
        if granularity in (Granularity.PER_TENSOR, Granularity.NONE) or rank == 0:
            axes = tuple(range(rank))
        else:
            axes = _norm_axes(axis, rank, fmt_name)
        n = math.prod(shape[a] for a in axes) if axes else 1
        if granularity == Granularity.PER_GROUP:
            if len(axes) != 1:
                raise ConfigError(f"{fmt_name}: per-group quantization needs a single axis, "
                                  f"got axis={axis}", hint="reshape the tensor to put the "
                                  "grouped elements on one axis")
            g = group_size
            npad = -(-n // g) * g
            if npad != n and not pad:
                raise ConfigError(
                    f"{fmt_name}: group size {g} does not divide axis {axes[0]} of length {n} "
                    f"(shape {list(shape)})",
                    hint=f"choose a group size that divides {n}, or pass pad=True to pad the "
                         "last group with zeros")
            return BlockLayout(shape, axes, g, n, npad)
        return BlockLayout(shape, axes, max(n, 1), n, n)

    @property
    def nblocks(self) -> int:
        return self.npad // self.block if self.block else 0

    @property
    def other(self) -> tuple[int, ...]:
        return tuple(d for i, d in enumerate(self.shape) if i not in self.axes)

    @property
    def code_shape(self) -> tuple[int, ...]:
        """Codes keep the layout; the (single) reduced axis is padded to whole blocks."""
        if len(self.axes) == 1:
            s = list(self.shape)
            s[self.axes[0]] = self.npad
            return tuple(s)
        return self.shape

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Keepdim shape of a per-block parameter."""
        if len(self.axes) == len(self.shape):
            return ()
        s = list(self.shape)
        for a in self.axes:
            s[a] = 1
        if len(self.axes) == 1:
            s[self.axes[0]] = self.nblocks
        return tuple(s)

    def _order(self) -> list[int]:
        return [i for i in range(len(self.shape)) if i not in self.axes] + list(self.axes)

    def to_blocks(self, x: torch.Tensor, *, padded: bool = False) -> torch.Tensor:
        """``x`` (the tensor, or codes when ``padded``) as ``(*other, nblocks, block)``."""
        y = x.permute(self._order()) if x.dim() else x.reshape(1)
        y = y.reshape(*self.other, -1)
        if not padded and self.npad != self.n:
            y = torch.nn.functional.pad(y, (0, self.npad - self.n))
        return y.reshape(*self.other, self.nblocks, self.block)

    def from_blocks(self, y: torch.Tensor, *, trim: bool) -> torch.Tensor:
        """Inverse of ``to_blocks``: the tensor layout, padded (codes) or trimmed (values)."""
        y = y.reshape(*self.other, self.npad)
        if trim and self.npad != self.n:
            y = y[..., : self.n]
        if not self.shape:
            return y.reshape(())
        red = [self.shape[a] for a in self.axes]
        if len(self.axes) == 1 and not trim:
            red = [self.npad]
        y = y.reshape(*self.other, *red)
        inv = [0] * len(self.shape)
        for pos, src in enumerate(self._order()):
            inv[src] = pos
        return y.permute(inv)

    def param_to_blocks(self, p: torch.Tensor, role: str, fmt_name: str) -> torch.Tensor:
        """A stored parameter (keepdim, or any shape with one entry per block) as
        ``(*other, nblocks)``."""
        want = math.prod(self.other) * self.nblocks
        if p.numel() == 1 and want != 1:  # one value for every block
            return p.reshape(()).expand(*self.other, self.nblocks)
        if p.numel() != want:
            raise QuantizationError(
                f"{fmt_name}: parameter {role!r} has {p.numel()} entries (shape "
                f"{list(p.shape)}) but the tensor of shape {list(self.shape)} quantized along "
                f"axis {list(self.axes)} has {want} blocks",
                hint="pass the parameters that quantize() returned for a tensor of this shape "
                     "and axis")
        if p.dim() == len(self.shape) and p.dim() and len(self.axes) == 1:
            # keepdim: the block axis sits where the reduced axis was
            order = [i for i in range(p.dim()) if i != self.axes[0]] + [self.axes[0]]
            p = p.permute(order)
        return p.reshape(*self.other, self.nblocks)

    def param_from_blocks(self, p: torch.Tensor) -> torch.Tensor:
        if not self.param_shape:
            return p.reshape(())
        if len(self.axes) == 1:
            ax = self.axes[0]
            order = [i for i in range(len(self.shape)) if i != ax] + [ax]
            shp = [self.param_shape[i] for i in order]
            inv = [0] * len(order)
            for pos, src in enumerate(order):
                inv[src] = pos
            return p.reshape(shp).permute(inv).contiguous()
        return p.reshape(self.param_shape)


def _norm_axes(axis, rank: int, fmt_name: str) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise ConfigError(f"{fmt_name}: axis {a} is out of range for a rank-{rank} tensor")
        out.append(a % rank)
    if len(set(out)) != len(out) or not out:
        raise ConfigError(f"{fmt_name}: bad axis {axis!r}")
    return tuple(sorted(out))


# -- the quantized tensor ----------------------------------------------------------------------
@dataclass
class QuantizedTensor:
    """A tensor in a quantized format: per-element ``codes``, the parameters that decode them
    (``scale``, ``zero_point``, ``tensor_scale``, ``meta`` — whichever the format has), the
    original ``shape`` and ``dtype``, and the ``axis`` the blocks run along."""

    format: "Format"
    codes: torch.Tensor
    params: dict[str, torch.Tensor]
    shape: tuple[int, ...]
    axis: int | tuple[int, ...] | None
    dtype: torch.dtype = torch.float32

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.format.dequantize(self, dtype=dtype)

    @property
    def layout(self) -> BlockLayout:
        return self.format.layout(self.shape, self.axis)

    def pack(self) -> bytes:
        """The tensor as bytes (layout: ``qcompile.formats.packing``)."""
        from qcompile.formats.packing import pack_tensor
        return pack_tensor(self)

    @staticmethod
    def unpack(data: bytes) -> "QuantizedTensor":
        from qcompile.formats.packing import unpack_tensor
        return unpack_tensor(data)

    @property
    def nbits(self) -> int:
        """Bits of storage: codes at the element width plus every parameter."""
        f = self.format
        total = self.codes.numel() * f.bits
        for role, p in self.params.items():
            total += p.numel() * f.param_bits(role)
        return total

    @property
    def bits_per_element(self) -> float:
        """Storage bits per element of the original tensor, scales and padding included."""
        return self.nbits / max(math.prod(self.shape), 1)

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}{list(v.shape)}" for k, v in self.params.items())
        return (f"QuantizedTensor({self.format}, shape={list(self.shape)}, axis={self.axis}, "
                f"codes={self.codes.dtype}{list(self.codes.shape)}, params=[{ps}])")


# -- the format protocol -----------------------------------------------------------------------
@dataclass(frozen=True)
class Format:
    """Base of every numeric format. Subclasses are frozen dataclasses whose fields are the
    format's options; ``name`` is the registry name they were made from.

    Subclasses implement ``_encode`` / ``_decode`` on blocks ``(*other, nblocks, block)``;
    this class handles layout, padding, parameters given or computed, the NaN policy, dtypes
    and the straight-through fake quantization."""

    name: str
    granularity: Granularity = Granularity.PER_TENSOR
    group_size: int | None = None
    nan_policy: str = "raise"

    #: parameter roles this format stores, in pack order
    roles: ClassVar[tuple[str, ...]] = ()
    #: roles that are one value for the whole tensor rather than one per block
    tensor_roles: ClassVar[tuple[str, ...]] = ()
    #: whether a per-group layout may be padded (MX pads by spec; others on request)
    pads: ClassVar[bool] = False
    #: options fixed by the registry entry (not repeated in to_json)
    _fixed: ClassVar[tuple[str, ...]] = ()
    #: block formats (MX, NVFP4, ...) only exist per group
    block_only: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        if self.block_only and self.granularity != Granularity.PER_GROUP:
            raise ConfigError(f"{self.name} is a block format: granularity must be per_group "
                              f"(blocks of group_size), got {self.granularity.value}")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"{self.name}: nan_policy must be one of {NAN_POLICIES}, "
                              f"got {self.nan_policy!r}")
        if self.granularity == Granularity.PER_GROUP:
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ConfigError(f"{self.name}: per-group quantization needs a positive integer "
                                  f"group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ConfigError(f"{self.name}: group_size={self.group_size} only applies to "
                              f"per_group granularity (got {self.granularity.value})",
                              hint="pass granularity='per_group' or drop group_size")

    # -- description ----------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Bits per element code."""
        raise NotImplementedError

    def param_bits(self, role: str) -> int:
        """Storage bits of one value of parameter ``role``."""
        raise NotImplementedError

    @property
    def bits_per_element(self) -> float:
        """Element bits plus per-block parameter bits spread over the block. Per-channel and
        per-tensor parameters amortise to nothing over a large axis and are not counted here;
        ``QuantizedTensor.bits_per_element`` counts them exactly."""
        if self.granularity != Granularity.PER_GROUP:
            return float(self.bits)
        per_block = sum(self.param_bits(r) for r in self.block_roles())
        return self.bits + per_block / self.group_size

    def block_roles(self) -> tuple[str, ...]:
        return tuple(r for r in self.roles if r not in self.tensor_roles)

    def options(self) -> dict[str, Any]:
        """Options that differ from the registry entry's defaults (JSON-able)."""
        from qcompile.formats.registry import defaults_of
        base = defaults_of(self.name)
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "name" or f.name in self._fixed:
                continue
            v = getattr(self, f.name)
            if f.name in base and base[f.name] == v:
                continue
            out[f.name] = v.value if isinstance(v, Granularity) else (
                list(v) if isinstance(v, tuple) else v)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **self.options()}

    def __str__(self) -> str:
        opts = self.options()
        return self.name + (f"({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")

    def layout(self, shape, axis) -> BlockLayout:
        return BlockLayout.make(shape, axis, self.granularity, self.group_size,
                                self.pads or getattr(self, "pad", False), self.name)

    # -- the three operations -------------------------------------------------------------
    def quantize(self, x: torch.Tensor, axis: int | tuple[int, ...] = -1, *,
                 params: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        """Quantize ``x`` along ``axis``. With ``params`` (a previous result's, or calibrated
        ones) the codes are computed against those parameters instead of fresh ones."""
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"{self.name}.quantize expects a torch.Tensor, got "
                              f"{type(x).__name__}")
        if not x.is_floating_point():
            raise ConfigError(f"{self.name}.quantize expects a floating-point tensor, got {x.dtype}",
                              hint="convert it with .float() first")
        lay = self.layout(x.shape, axis)
        xd = x.detach().to(torch.float32)
        bad = None
        if xd.numel() and not (math.isfinite(float(xd.amax())) and math.isfinite(float(xd.amin()))):
            if self.nan_policy == "raise":
                idx = tuple(int(i) for i in (~torch.isfinite(xd)).nonzero()[0])
                raise QuantizationError(
                    f"{self.name}: the input holds {int((~torch.isfinite(xd)).sum())} NaN/Inf "
                    f"value(s); the first is {float(xd[idx])} at index {list(idx)}",
                    hint="fix the values upstream, or pass nan_policy='propagate' to make "
                         "blocks that hold them decode to NaN")
            bad = ~torch.isfinite(lay.to_blocks(xd)).all(-1)
            xd = torch.where(torch.isfinite(xd), xd, torch.zeros((), dtype=xd.dtype))
        xb = lay.to_blocks(xd)
        given = None
        if params is not None:
            missing = [r for r in self.roles if r not in params and self._required(r)]
            if missing:
                raise QuantizationError(f"{self.name}: params lacks {missing}; it has "
                                        f"{sorted(params)}")
            given = {}
            for r in self.roles:
                if r not in params or params[r] is None:
                    continue
                p = torch.as_tensor(params[r])
                given[r] = p.reshape(()) if r in self.tensor_roles else \
                    lay.param_to_blocks(p, r, self.name)
        codes, ps = self._encode(xb, given)
        if bad is not None and bad.any():
            codes, ps = self._poison(codes, ps, bad)
        out = {r: (p.reshape(()) if r in self.tensor_roles else lay.param_from_blocks(p))
               for r, p in ps.items()}
        return QuantizedTensor(self, lay.from_blocks(codes, trim=False).contiguous(), out,
                               tuple(x.shape), _axis_repr(self, lay), x.dtype)

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        lay = self.layout(qt.shape, qt.axis)
        if tuple(qt.codes.shape) != lay.code_shape:
            raise QuantizationError(f"{self.name}: codes have shape {list(qt.codes.shape)}, "
                                    f"expected {list(lay.code_shape)} for shape {list(qt.shape)}")
        cb = lay.to_blocks(qt.codes, padded=True)
        ps = {r: (p.reshape(()) if r in self.tensor_roles else lay.param_to_blocks(p, r, self.name))
              for r, p in qt.params.items()}
        y = self._decode(cb, ps)
        return lay.from_blocks(y, trim=True).to(dtype or qt.dtype)

    def fake_quant(self, x: torch.Tensor, axis: int | tuple[int, ...] = -1, *,
                   params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``dequantize(quantize(x))`` in ``x``'s dtype, with a straight-through gradient."""
        y = self.dequantize(self.quantize(x, axis, params=params), dtype=x.dtype)
        return ste(x, y)

    # -- block-level access (for algorithms that quantize a tensor piece by piece) -----------
    def block_params(self, xb: torch.Tensor, fixed: Mapping[str, torch.Tensor] | None = None) -> dict:
        """The parameters ``quantize`` would compute for blocks ``xb`` (``(*other, nblocks,
        block)``), in block form ``(*other, nblocks)``; tensor-level roles (NVFP4's tensor
        scale) are taken from ``fixed`` when given, so a tensor quantized group by group (GPTQ)
        keeps one tensor scale."""
        fixed = {r: torch.as_tensor(v).reshape(()) for r, v in (fixed or {}).items()
                 if r in self.tensor_roles}
        return self._encode(xb.to(torch.float32), fixed or None)[1]

    def fake_quant_blocks(self, xb: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Decode(encode(``xb``)) against block-form ``params`` (as ``block_params`` gives)."""
        p = dict(params)
        return self._decode(self._encode(xb.to(torch.float32), p)[0], p)

    # -- for subclasses -------------------------------------------------------------------
    def _required(self, role: str) -> bool:
        return True

    def _encode(self, xb: torch.Tensor, given: dict | None) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def _decode(self, cb: torch.Tensor, ps: dict) -> torch.Tensor:
        raise NotImplementedError

    def _poison(self, codes: torch.Tensor, ps: dict, bad: torch.Tensor):
        """Make blocks flagged in ``bad`` (shape ``(*other, nblocks)``) decode to NaN: by
        default their float scale becomes NaN and their codes zero."""
        codes = codes.masked_fill(bad[..., None], 0)
        s = ps["scale"]
        ps = dict(ps, scale=torch.where(bad, torch.tensor(float("nan"), dtype=s.dtype), s))
        return codes, ps


def _axis_repr(fmt: "Format", lay: BlockLayout):
    if fmt.granularity in (Granularity.PER_TENSOR, Granularity.NONE) or not lay.shape:
        return None
    return lay.axes[0] if len(lay.axes) == 1 else lay.axes


def safe_div(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x / s`` with zero (or NaN) scales treated as 1: their codes come out zero."""
    ok = (s != 0) & torch.isfinite(s)
    return x / torch.where(ok, s, torch.ones((), dtype=s.dtype))


def scale_dtype(name: str, fmt: str) -> torch.dtype:
    if name not in SCALE_DTYPES:
        raise ConfigError(f"{fmt}: scale_dtype must be one of {list(SCALE_DTYPES)}, got {name!r}")
    return SCALE_DTYPES[name]


__all__ += ["safe_div", "scale_dtype"]
