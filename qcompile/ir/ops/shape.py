"""Shape and data-movement ops: reshape, permute, expand, slice, select, concat, take,
gather, index, tril/triu, pad, tile, and the source ops arange and full."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.ir.ops._infer import broadcast_shapes, norm_axis
from qcompile.ir.registry import Attr, op
from qcompile.ir.types import (
    TensorType,
    dim_div,
    dim_expr,
    dims_equal,
    make_dim,
    numel,
    to_torch_dtype,
)

__all__: list[str] = []


def _reshape_infer(t, a):
    shape = list(a["shape"])
    if shape.count(-1) > 1:
        raise ValueError("reshape allows at most one -1")
    if -1 in shape:
        known = [d for d in shape if d != -1]
        shape[shape.index(-1)] = dim_div(numel(t[0].shape), numel(known))
    if not dims_equal(numel(shape), numel(t[0].shape)):
        raise ValueError(f"cannot reshape {list(t[0].shape)} to {list(a['shape'])}")
    return TensorType(tuple(shape), t[0].dtype)


@op("reshape", inputs=("x",), attrs={"shape": Attr("dims")}, infer=_reshape_infer)
def reshape(x, shape):
    return x.reshape(shape)


def _permute_infer(t, a):
    perm = [norm_axis(p, t[0].rank) for p in a["perm"]]
    if sorted(perm) != list(range(t[0].rank)):
        raise ValueError(f"perm {a['perm']} is not a permutation of {t[0].rank} axes")
    return TensorType(tuple(t[0].shape[p] for p in perm), t[0].dtype)


@op("permute", inputs=("x",), attrs={"perm": Attr("ints")}, infer=_permute_infer)
def permute(x, perm):
    return x.permute(perm)


def _expand_infer(t, a):
    shape = list(a["shape"])
    src = t[0].shape
    off = len(shape) - len(src)
    if off < 0:
        raise ValueError(f"cannot expand {list(src)} to fewer dims {shape}")
    out = []
    for i, d in enumerate(shape):
        s = src[i - off] if i >= off else None
        if d == -1:
            if s is None:
                raise ValueError("-1 in a new leading dimension of expand")
            d = s
        elif s is not None and s != 1 and not dims_equal(s, d):
            raise ValueError(f"cannot expand dimension {s} to {d}")
        out.append(d)
    return TensorType(tuple(out), t[0].dtype)


@op("expand", inputs=("x",), attrs={"shape": Attr("dims")}, infer=_expand_infer)
def expand(x, shape):
    return x.expand(shape)


_BIG = 2 ** 62


def _slice_bounds(n, start, end, step):
    """Normalised (start, length) of a slice; symbolic sizes assume in-range bounds."""
    if isinstance(n, int):
        s, e, st = slice(start if isinstance(start, int) else None,
                         end if isinstance(end, int) else None, step).indices(n)
        if isinstance(start, int) and isinstance(end, int):
            return s, max(0, -(-(e - s) // st))
    ne = dim_expr(n)
    se = dim_expr(start) + (ne if isinstance(start, int) and start < 0 else 0)
    if isinstance(end, int) and end >= _BIG:
        ee = ne
    else:
        ee = dim_expr(end) + (ne if isinstance(end, int) and end < 0 else 0)
    length = make_dim((ee - se + step - 1) // step) if step > 1 else make_dim(ee - se)
    return make_dim(se), length


def _slice_infer(t, a):
    x = t[0]
    ax = norm_axis(a["axis"], x.rank)
    if a["step"] < 1:
        raise ValueError("slice step must be >= 1")
    _, length = _slice_bounds(x.shape[ax], a["start"], a["end"], a["step"])
    return TensorType(x.shape[:ax] + (length,) + x.shape[ax + 1:], x.dtype)


@op("slice", inputs=("x",),
    attrs={"axis": Attr("int"), "start": Attr("dim", 0), "end": Attr("dim"), "step": Attr("int", 1)},
    infer=_slice_infer)
def slice_(x, axis, start, end, step):
    """x[..., start:end:step, ...] along ``axis`` (python slice semantics, clamped)."""
    idx = [slice(None)] * x.dim()
    idx[axis] = slice(start, end, step)
    return x[tuple(idx)]


@op("select", inputs=("x",), attrs={"axis": Attr("int"), "index": Attr("dim")},
    infer=lambda t, a: TensorType(tuple(d for i, d in enumerate(t[0].shape)
                                        if i != norm_axis(a["axis"], t[0].rank)), t[0].dtype))
def select(x, axis, index):
    return x.select(axis, index)


def _concat_infer(t, a):
    ax = norm_axis(a["axis"], t[0].rank)
    total = make_dim(sum((dim_expr(x.shape[ax]) for x in t), dim_expr(0)))
    for x in t[1:]:
        if x.rank != t[0].rank:
            raise ValueError("concat inputs differ in rank")
    dtype = t[0].dtype
    return TensorType(t[0].shape[:ax] + (total,) + t[0].shape[ax + 1:], dtype)


@op("concat", inputs=("*xs",), attrs={"axis": Attr("int")}, infer=_concat_infer)
def concat(*xs, axis):
    return torch.cat(xs, axis)


def _take_infer(t, a):
    x, idx = t
    ax = norm_axis(a["axis"], x.rank)
    return TensorType(x.shape[:ax] + idx.shape + x.shape[ax + 1:], x.dtype)


@op("take", inputs=("x", "indices"), attrs={"axis": Attr("int", 0)}, infer=_take_infer)
def take(x, indices, axis):
    """Gather whole slices along ``axis`` (ONNX Gather): out shape x[:axis] + idx + x[axis+1:]."""
    axis %= x.dim()
    idx = torch.where(indices < 0, indices + x.shape[axis], indices)
    out = torch.index_select(x, axis, idx.reshape(-1).to(torch.int64))
    return out.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1:])


@op("gather", inputs=("x", "indices"), attrs={"axis": Attr("int")},
    infer=lambda t, a: TensorType(t[1].shape, t[0].dtype))
def gather(x, indices, axis):
    """Element gather along ``axis`` (torch.gather / ONNX GatherElements)."""
    return torch.gather(x, axis, indices.to(torch.int64))


def _index_infer(t, a):
    x, idx = t[0], t[1:]
    axes = [norm_axis(ax, x.rank) for ax in a["axes"]]
    if len(axes) != len(idx):
        raise ValueError("index needs one axis per index tensor")
    b = broadcast_shapes(*[i.shape for i in idx])
    rest = [d for i, d in enumerate(x.shape) if i not in axes]
    if axes == list(range(axes[0], axes[0] + len(axes))):
        first = axes[0]
        return TensorType(tuple(x.shape[:first]) + b + tuple(x.shape[first + len(axes):]), x.dtype)
    return TensorType(b + tuple(rest), x.dtype)


@op("index", inputs=("x", "*indices"), attrs={"axes": Attr("ints")}, infer=_index_infer)
def index(x, *indices, axes):
    """numpy advanced indexing: x[..., i0, ..., i1, ...] with index tensors on ``axes``."""
    axes = [ax % x.dim() for ax in axes]  # as the shape rule does
    key: list = [slice(None)] * (max(axes) + 1 if axes else 0)
    for ax, i in zip(axes, indices):
        key[ax] = i if i.dtype == torch.bool else i.to(torch.int64)
    return x[tuple(key)]


@op("tril", inputs=("x",), attrs={"diagonal": Attr("int", 0)}, infer=lambda t, a: t[0])
def tril(x, diagonal):
    return torch.tril(x, diagonal)


@op("triu", inputs=("x",), attrs={"diagonal": Attr("int", 0)}, infer=lambda t, a: t[0])
def triu(x, diagonal):
    return torch.triu(x, diagonal)


def _pad_infer(t, a):
    pads = a["pads"]  # torch order: last axis first, (before, after) pairs
    shape = list(t[0].shape)
    for i in range(len(pads) // 2):
        ax = len(shape) - 1 - i
        shape[ax] = make_dim(dim_expr(shape[ax]) + pads[2 * i] + pads[2 * i + 1])
    return TensorType(tuple(shape), t[0].dtype)


@op("pad", inputs=("x",), attrs={"pads": Attr("ints"), "mode": Attr("str", "constant"),
                                 "value": Attr("float", 0.0)}, infer=_pad_infer)
def pad(x, pads, mode, value):
    """Pad with torch.nn.functional.pad order: (last-axis before, after, previous axis ...)."""
    return F.pad(x, pads, mode=mode, value=value if mode == "constant" else None)


def _tile_infer(t, a):
    reps, shape = list(a["repeats"]), tuple(t[0].shape)
    n = max(len(reps), len(shape))  # the shorter one is padded with leading 1s, as torch.tile
    reps, shape = [1] * (n - len(reps)) + reps, (1,) * (n - len(shape)) + shape
    return TensorType(tuple(make_dim(dim_expr(d) * r) for d, r in zip(shape, reps)), t[0].dtype)


@op("tile", inputs=("x",), attrs={"repeats": Attr("ints")}, infer=_tile_infer)
def tile(x, repeats):
    return x.repeat(repeats) if len(repeats) >= x.dim() else x.tile(repeats)


def _arange_infer(t, a):
    start, end, step = a["start"], a["end"], a["step"]
    if isinstance(start, int) and isinstance(end, int):
        n = max(0, -(-(end - start) // step))
    else:
        n = make_dim((dim_expr(end) - dim_expr(start) + step - 1) // step) if step != 1 \
            else make_dim(dim_expr(end) - dim_expr(start))
    return TensorType((n,), a["dtype"])


@op("arange", inputs=(), attrs={"start": Attr("dim", 0), "end": Attr("dim"), "step": Attr("int", 1),
                                "dtype": Attr("dtype", "int64")}, infer=_arange_infer)
def arange(start, end, step, dtype):
    return torch.arange(start, end, step, dtype=to_torch_dtype(dtype))


@op("full", inputs=(), attrs={"shape": Attr("dims"), "value": Attr("any"), "dtype": Attr("dtype")},
    infer=lambda t, a: TensorType(tuple(a["shape"]), a["dtype"]))
def full(shape, value, dtype):
    return torch.full(shape, value, dtype=to_torch_dtype(dtype))


@op("shape_of", inputs=("x",), attrs={"axis": Attr("int", None, True)},
    infer=lambda t, a: TensorType(() if a["axis"] is not None else (t[0].rank,), "int64"))
def shape_of(x, axis):
    """The run-time shape of x as an int64 tensor (one dimension when ``axis`` is set)."""
    if axis is not None:
        return torch.tensor(x.shape[axis], dtype=torch.int64)
    return torch.tensor(list(x.shape), dtype=torch.int64)
