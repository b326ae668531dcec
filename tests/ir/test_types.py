"""Tensor types: dtypes, symbolic dimensions and their arithmetic."""
from __future__ import annotations

import pytest
import sympy
import torch

from qcompile.errors import QCompileError, UnsupportedOpError
from qcompile.ir import TensorType
from qcompile.ir.types import (
    DTYPES,
    dim_div,
    dim_mul,
    dims_equal,
    eval_dim,
    from_torch_dtype,
    is_float,
    make_dim,
    numel,
    symbols_of,
    to_torch_dtype,
)


def test_static_type_basics():
    t = TensorType((2, 3), "float32")
    assert t.rank == 2 and t.is_static and str(t) == "float32[2, 3]"
    assert t == TensorType([2, 3], "float32") and hash(t) == hash(TensorType((2, 3), "float32"))
    assert t.to_json() == {"shape": [2, 3], "dtype": "float32"}
    assert TensorType.from_json(t.to_json()) == t
    assert TensorType.of(torch.zeros(4, 1, dtype=torch.int8)) == TensorType((4, 1), "int8")
    assert TensorType((), "bool").rank == 0 and str(TensorType((), "bool")) == "bool[]"


def test_symbolic_dims_are_normalised():
    t = TensorType(("batch*2", "batch", 8), "float16")
    assert t.shape == ("2*batch", "batch", 8) and not t.is_static
    assert str(t) == "float16[2*batch, batch, 8]"
    assert TensorType(("batch + batch",), "float32").shape == ("2*batch",)
    assert TensorType(("3 - 1",), "float32").shape == (2,)  # constant expressions become ints
    assert TensorType.from_json(t.to_json()) == t


def test_same_as_compares_expressions():
    a = TensorType(("2*batch", 4), "float32")
    assert a.same_as(TensorType(("batch*2", 4), "float32"))
    assert not a.same_as(TensorType(("batch", 4), "float32"))
    assert not a.same_as(TensorType(("2*batch", 4), "float16"))
    assert not a.same_as(TensorType(("2*batch", 4, 1), "float32"))


def test_dim_arithmetic():
    assert dim_mul(3, 4) == 12 and dim_mul() == 1
    assert dim_mul("batch", 2) == "2*batch"
    assert dim_mul("batch", "seq") == "batch*seq"
    assert dim_div(8, 2) == 4 and dim_div(7, 2) == 3  # static sizes divide exactly as ints
    assert dim_div("2*batch", 2) == "batch"
    assert dim_div("batch*seq", "seq") == "batch"
    assert dim_div(dim_mul("batch", 6), 3) == "2*batch"
    assert numel(("batch", 4, 2)) == "8*batch" and numel(()) == 1 and numel((2, 5)) == 10


def test_dims_equal():
    assert dims_equal(4, 4) and not dims_equal(4, 5)
    assert dims_equal("2*batch", "batch*2")
    assert dims_equal("batch + batch", "2*batch")
    assert dims_equal(dim_div("2*batch", 2), "batch")
    assert not dims_equal("batch", "seq")
    assert not dims_equal("batch", 1)


def test_eval_dim():
    env = {"batch": 3, "seq": 5}
    assert eval_dim("batch", env) == 3
    assert eval_dim("2*batch", env) == 6
    assert eval_dim("batch*seq + 1", env) == 16
    assert eval_dim(7, {}) == 7
    assert isinstance(eval_dim("2*batch", env), int)
    assert eval_dim("floor(batch/2)", env) == 1
    with pytest.raises(KeyError):
        eval_dim("batch", {})


def test_make_dim_and_symbols():
    assert make_dim(sympy.Integer(4)) == 4 and isinstance(make_dim(sympy.Integer(4)), int)
    assert make_dim(sympy.Symbol("batch") * 3) == "3*batch"
    assert make_dim("batch*1") == "batch"
    with pytest.raises(TypeError):
        make_dim(True)
    assert symbols_of("batch*seq + 2") == {"batch", "seq"}
    assert symbols_of(4) == set()


def test_dtype_conversion():
    for name, dt in DTYPES.items():
        assert to_torch_dtype(name) is dt
        assert from_torch_dtype(dt) == name
    assert is_float("bfloat16") and not is_float("int8") and not is_float("bool")


def test_dtype_conversion_errors():
    with pytest.raises(UnsupportedOpError) as ei:
        from_torch_dtype(torch.complex64)
    assert "complex64" in str(ei.value) and "float32" in str(ei.value)  # lists supported ones
    with pytest.raises(UnsupportedOpError, match="'float8'") as ei:
        to_torch_dtype("float8")
    assert isinstance(ei.value, QCompileError) and "bfloat16" in str(ei.value)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        TensorType((2,), "float8")
    with pytest.raises(UnsupportedOpError):
        TensorType.of(torch.zeros(2, dtype=torch.complex64))
