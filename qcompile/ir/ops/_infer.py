"""Shared shape/dtype inference helpers for the op definitions."""
from __future__ import annotations

import torch

from qcompile.ir.types import DTYPES, Dim, TensorType, from_torch_dtype

__all__ = ["broadcast_shapes", "promote", "same", "norm_axis", "reduce_shape"]


def broadcast_shapes(*shapes) -> tuple:
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        chosen: Dim = 1
        for d in dims:
            if d == 1:
                continue
            if chosen == 1:
                chosen = d
            elif isinstance(chosen, int) and isinstance(d, int) and chosen != d:
                raise ValueError(f"shapes {[list(s) for s in shapes]} do not broadcast")
            elif isinstance(chosen, str) and isinstance(d, int):
                chosen = d  # a symbol broadcast against a fixed size must equal it
        out.append(chosen)
    return tuple(out)


def promote(*types: TensorType) -> str:
    """torch's promotion, where rank-0 tensors do not promote within a category."""
    dims = [t for t in types if t.rank > 0]
    pool = dims if dims else list(types)
    cat = lambda d: 2 if d.is_floating_point else (0 if d == torch.bool else 1)  # noqa: E731
    ranked = [DTYPES[t.dtype] for t in pool]
    if dims:  # a rank-0 tensor of a higher category still wins the category
        hi = max(cat(DTYPES[t.dtype]) for t in types)
        if hi > max(cat(d) for d in ranked):
            ranked += [DTYPES[t.dtype] for t in types if t.rank == 0 and cat(DTYPES[t.dtype]) == hi]
    out = ranked[0]
    for d in ranked[1:]:
        out = torch.promote_types(out, d)
    return from_torch_dtype(out)


def same(types, attrs) -> TensorType:
    return types[0]


def norm_axis(axis: int, rank: int) -> int:
    if not -max(rank, 1) <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis % max(rank, 1)


def reduce_shape(shape, axes, keepdim) -> tuple:
    if axes is None or len(axes) == 0:
        axes = list(range(len(shape)))
    axes = {norm_axis(a, len(shape)) for a in axes}
    if keepdim:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


