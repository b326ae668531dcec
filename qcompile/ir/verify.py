"""The verifier: a graph is well formed when every value is defined before use, names are
unique, every node's output types equal what its op infers, and quantization annotations
point at existing constants."""
from __future__ import annotations

import math

from qcompile.errors import QCompileError, VerificationError
from qcompile.ir.registry import get_schema
from qcompile.ir.types import is_float

__all__ = ["verify"]


def verify(graph) -> None:
    """Raise ``VerificationError`` naming the first bad node; return None when well formed."""
    defined: set[int] = set()
    names: set[str] = set()

    def define(v, where):
        if v.name in names:
            raise VerificationError(f"value name '%{v.name}' is defined twice ({where})")
        names.add(v.name)
        defined.add(id(v))

    for v in graph.inputs:
        define(v, "graph input")
    for name in graph.constants:
        v = graph.constant_value(name)
        define(v, "constant")
        if tuple(graph.constants[name].shape) != v.type.shape:
            raise VerificationError(f"constant %{name} holds a tensor of shape "
                                    f"{tuple(graph.constants[name].shape)} but is typed {v.type}")
    for node in graph.nodes:
        schema = get_schema(node.op)
        for i, v in enumerate(node.inputs):
            if v is not None and id(v) not in defined:
                raise VerificationError(f"input {i} (%{v.name}) is used before it is defined",
                                        node=node, hint="nodes must be in topological order")
        schema.normalize_attrs(node.attrs, node.describe())
        expected = schema.infer_types(node)
        if len(expected) != len(node.outputs):
            raise VerificationError(f"{node.op} produces {len(expected)} outputs, node has "
                                    f"{len(node.outputs)}", node=node)
        for o, t in zip(node.outputs, expected):
            if o.producer is not node:
                raise VerificationError(f"output %{o.name} does not point back at its node",
                                        node=node)
            if not o.type.same_as(t):
                raise VerificationError(f"output %{o.name} is typed {o.type} but {node.op} "
                                        f"of its inputs gives {t}", node=node)
            define(o, node.describe())
    for v in graph.values():
        if v.quant is not None:
            for c in v.quant.constants():
                if c not in graph.constants:
                    raise VerificationError(f"quantization of %{v.name} refers to missing "
                                            f"constant %{c}")
            _check_quant_params(graph, v)
        if v.sparsity is not None:
            _check_sparsity(graph, v)
    for v in graph.outputs:
        if id(v) not in defined:
            raise VerificationError(f"graph output %{v.name} is not defined in the graph")


def _check_sparsity(graph, v) -> None:
    """A sparse constant has at least the zeros its annotation claims (quantization may add
    more: small weights that round to zero)."""
    if v.name not in graph.constants:
        raise VerificationError(f"%{v.name} carries a sparsity annotation ({v.sparsity}) but is "
                                "not a constant")
    t = graph.constants[v.name]
    if v.sparsity.numel != t.numel():
        raise VerificationError(f"sparsity of %{v.name} counts {v.sparsity.numel} elements, the "
                                f"constant has {t.numel()}")
    zeros = int((t == 0).sum())
    if zeros < v.sparsity.zeros:
        raise VerificationError(f"%{v.name} is annotated {v.sparsity} ({v.sparsity.zeros} zeros) "
                                f"but has only {zeros} zeros")


def _check_quant_params(graph, v) -> None:
    """A static spec's parameters must have one entry per block of the value (or one in all)."""
    spec = v.quant
    if not is_float(v.type.dtype):
        raise VerificationError(f"%{v.name} is {v.type.dtype} but carries a quantization "
                                f"annotation ({spec}); only float values are fake-quantized",
                                node=v.producer)
    if spec.dynamic or not v.type.is_static:
        return
    fmt = spec.fmt
    try:
        lay = fmt.layout(v.type.shape, -1 if spec.axis is None else spec.axis)
    except QCompileError as e:
        raise VerificationError(f"quantization of %{v.name} ({spec}) does not fit its type "
                                f"{v.type}: {e}", node=v.producer) from None
    for role in ("scale", "zero_point", "meta"):
        name = getattr(spec, role)
        if name is None:
            continue
        n = graph.constants[name].numel()
        want = math.prod(lay.other) * lay.nblocks
        if n not in (1, want):
            raise VerificationError(
                f"quantization of %{v.name} ({spec}): its {role} %{name} has {n} entries, "
                f"but {v.type} quantized along axis {spec.axis} has {want} blocks",
                node=v.producer, hint="the axis is the one whose elements share a scale")
