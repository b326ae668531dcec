"""Elementwise ops: unary math and activations, binary arithmetic with broadcasting,
comparisons, logical ops, ``where``, ``cast`` and ``clamp``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.ir.ops._infer import broadcast_shapes, promote, same
from qcompile.ir.registry import Attr, op
from qcompile.ir.types import TensorType, is_float, to_torch_dtype

__all__: list[str] = []

_UNARY = {
    "neg": torch.neg, "abs": torch.abs, "exp": torch.exp, "log": torch.log,
    "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "silu": F.silu,
    "erf": torch.erf, "sin": torch.sin, "cos": torch.cos, "floor": torch.floor,
    "ceil": torch.ceil, "round": torch.round, "sign": torch.sign, "identity": lambda x: x,
}
for _name, _fn in _UNARY.items():
    op(_name, inputs=("x",), infer=same)(lambda x, _fn=_fn: _fn(x))


@op("gelu", inputs=("x",), attrs={"approximate": Attr("str", "none")}, infer=same)
def gelu(x, approximate):
    """GELU (Hendrycks & Gimpel 2016); ``approximate="tanh"`` is their eq. for the tanh form."""
    return F.gelu(x, approximate=approximate)


@op("leaky_relu", inputs=("x",), attrs={"negative_slope": Attr("float", 0.01)}, infer=same)
def leaky_relu(x, negative_slope):
    return F.leaky_relu(x, negative_slope)


@op("clamp", inputs=("x",), attrs={"min": Attr("float", None, True), "max": Attr("float", None, True)},
    infer=same)
def clamp(x, min, max):
    return torch.clamp(x, min=min, max=max)


@op("logical_not", inputs=("x",), infer=lambda t, a: TensorType(t[0].shape, "bool"))
def logical_not(x):
    return torch.logical_not(x)


def _binary_infer(types, attrs):
    return TensorType(broadcast_shapes(types[0].shape, types[1].shape), promote(types[0], types[1]))


def _div_infer(types, attrs):
    t = _binary_infer(types, attrs)
    if attrs.get("rounding_mode") is None and not is_float(t.dtype):
        return TensorType(t.shape, "float32")
    return t


_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum, "remainder": torch.remainder,
    "bitwise_and": torch.bitwise_and, "bitwise_or": torch.bitwise_or,
    "bitwise_xor": torch.bitwise_xor,
}
for _name, _fn in _BINARY.items():
    op(_name, inputs=("a", "b"), infer=_binary_infer)(lambda a, b, _fn=_fn: _fn(a, b))


@op("div", inputs=("a", "b"), attrs={"rounding_mode": Attr("str", None, True)}, infer=_div_infer)
def div(a, b, rounding_mode):
    return torch.div(a, b, rounding_mode=rounding_mode)


def _cmp_infer(types, attrs):
    return TensorType(broadcast_shapes(types[0].shape, types[1].shape), "bool")


_COMPARE = {"eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt,
            "ge": torch.ge, "logical_and": torch.logical_and, "logical_or": torch.logical_or,
            "logical_xor": torch.logical_xor}
for _name, _fn in _COMPARE.items():
    op(_name, inputs=("a", "b"), infer=_cmp_infer)(lambda a, b, _fn=_fn: _fn(a, b))


@op("where", inputs=("cond", "a", "b"),
    infer=lambda t, a: TensorType(broadcast_shapes(t[0].shape, t[1].shape, t[2].shape),
                                  promote(t[1], t[2])))
def where(cond, a, b):
    return torch.where(cond, a, b)


@op("cast", inputs=("x",), attrs={"dtype": Attr("dtype")},
    infer=lambda t, a: TensorType(t[0].shape, a["dtype"]))
def cast(x, dtype):
    return x.to(to_torch_dtype(dtype))
