"""The verifier: a graph is well formed when every value is defined before use, names are
unique, every node's output types equal what its op infers, and quantization annotations
point at existing constants."""
from __future__ import annotations

from qcompile.errors import VerificationError
from qcompile.ir.registry import get_schema

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
    for v in graph.outputs:
        if id(v) not in defined:
            raise VerificationError(f"graph output %{v.name} is not defined in the graph")
