"""Tensor types of the IR: dtypes, shapes with symbolic dimensions, and ``TensorType``.

A dimension is an ``int`` or a ``str`` holding a symbolic expression over named sizes
(``"batch"``, ``"2*seq"``). Expressions are parsed and simplified with sympy (a torch
dependency), so shape inference can multiply, divide and compare them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence, Union

import sympy
import torch

__all__ = [
    "Dim", "DTYPES", "TensorType", "to_torch_dtype", "from_torch_dtype", "dim_expr", "make_dim",
    "dim_mul", "dim_div", "dims_equal", "eval_dim", "symbols_of", "numel", "is_float",
]

Dim = Union[int, str]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_FROM_TORCH = {v: k for k, v in DTYPES.items()}


def to_torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        from qcompile.errors import UnsupportedOpError
        raise UnsupportedOpError(f"dtype {name!r} is not a qcompile IR dtype",
                                 hint=f"supported dtypes: {', '.join(DTYPES)}") from None


def from_torch_dtype(dtype: torch.dtype) -> str:
    try:
        return _FROM_TORCH[dtype]
    except KeyError:
        from qcompile.errors import UnsupportedOpError
        raise UnsupportedOpError(f"dtype {dtype} is not supported by the qcompile IR",
                                 hint=f"supported dtypes: {', '.join(DTYPES)}") from None


def is_float(dtype: str) -> bool:
    return dtype in ("float32", "float16", "bfloat16", "float64")


@lru_cache(maxsize=4096)
def _parse(text: str) -> sympy.Expr:
    return sympy.sympify(text, locals={})


def dim_expr(d: Dim) -> sympy.Expr:
    """The sympy expression of a dimension."""
    if isinstance(d, (int, sympy.Integer)):
        return sympy.Integer(int(d))
    if isinstance(d, sympy.Expr):
        return d
    return _parse(d)


def make_dim(e) -> Dim:
    """Normalise an int, sympy expression or string into a ``Dim`` (int when constant)."""
    if isinstance(e, bool):
        raise TypeError("a dimension cannot be a bool")
    if isinstance(e, int):
        return e
    e = sympy.simplify(dim_expr(e)) if not isinstance(e, sympy.Expr) else sympy.simplify(e)
    if e.is_Integer:
        return int(e)
    return str(e)


def dim_mul(*dims: Dim) -> Dim:
    if all(isinstance(d, int) for d in dims):
        out = 1
        for d in dims:
            out *= d
        return out
    return make_dim(sympy.Mul(*[dim_expr(d) for d in dims]))


def dim_div(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    return make_dim(dim_expr(a) / dim_expr(b))


def dims_equal(a: Dim, b: Dim) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.simplify(dim_expr(a) - dim_expr(b)) == 0


def symbols_of(d: Dim) -> set[str]:
    if isinstance(d, int):
        return set()
    return {s.name for s in dim_expr(d).free_symbols}


def eval_dim(d: Dim, env: Mapping[str, int]) -> int:
    """Evaluate a dimension with the symbol values bound at run time."""
    if isinstance(d, int):
        return d
    e = dim_expr(d)
    if e.is_Symbol:
        return int(env[e.name])
    return int(e.subs({sympy.Symbol(k): v for k, v in env.items()}))


def numel(shape: Sequence[Dim]) -> Dim:
    return dim_mul(*shape) if shape else 1


@dataclass(frozen=True)
class TensorType:
    """Shape (ints or symbolic expressions) and dtype of a tensor value."""

    shape: tuple
    dtype: str

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(make_dim(d) if not isinstance(d, int) else d
                                                for d in self.shape))
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def same_as(self, other: "TensorType") -> bool:
        return (self.dtype == other.dtype and self.rank == other.rank
                and all(dims_equal(a, b) for a, b in zip(self.shape, other.shape)))

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: dict) -> "TensorType":
        return TensorType(tuple(d["shape"]), d["dtype"])

    @staticmethod
    def of(t: torch.Tensor) -> "TensorType":
        return TensorType(tuple(int(s) for s in t.shape), from_torch_dtype(t.dtype))
