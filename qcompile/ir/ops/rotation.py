"""Rotation ops: the blockwise Hadamard transform of QuaRot-style online rotations."""
from __future__ import annotations

from qcompile.errors import ConfigError
from qcompile.hadamard import base_order, fwht
from qcompile.ir.registry import Attr, op
from qcompile.ir.types import is_float

__all__: list[str] = []


def _hadamard_infer(t, a):
    x, size = t[0], a["size"]
    if x.rank == 0 or not isinstance(x.shape[-1], int):
        raise ValueError(f"hadamard needs a static last dimension, got {x}")
    if not is_float(x.dtype):
        raise ValueError(f"hadamard needs a floating-point input, got {x.dtype}")
    try:
        base_order(size)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if x.shape[-1] % size:
        raise ValueError(f"hadamard size {size} does not divide the last dimension {x.shape[-1]}")
    return x


@op("hadamard", inputs=("x",), attrs={"size": Attr("int"), "transpose": Attr("bool", False)},
    infer=_hadamard_infer)
def hadamard(x, size, transpose):
    """y = x·(I ⊗ H_size) along the last axis: the orthonormal Hadamard matrix H_size of
    ``qcompile.hadamard.hadamard_matrix`` applied to every contiguous chunk of ``size`` elements
    (QuaRot, Ashkboos et al. 2024). H_size is orthogonal but symmetric only for powers of
    two (Sylvester), not for Paley or Goethals–Seidel factors, so the inverse is x·(I ⊗ H_sizeᵀ),
    which ``transpose=True`` applies."""
    return fwht(x, size, transpose=transpose)
