"""The IR graph: ``Value``s produced by ``Node``s, in topological order, owned by a ``Graph``.

Parameters and other constant tensors are ``Value``s without a producer whose tensors the
graph owns (``graph.constants``). Every node carries ``Provenance`` so that errors and
reports can point at the user's model.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Sequence

import torch

from qcompile.ir.quant import QuantSpec
from qcompile.ir.sparsity import SparsitySpec
from qcompile.ir.types import TensorType

__all__ = ["Provenance", "Value", "Node", "Graph"]


@dataclass(frozen=True)
class Provenance:
    """Where a node came from: module path, ``file:line`` and its text, the frontend's node name."""

    module: str | None = None
    source: str | None = None
    code: str | None = None
    origin: str | None = None

    def __str__(self) -> str:
        parts = []
        if self.module:
            parts.append(f"module '{self.module}'")
        if self.source:
            parts.append(self.source + (f": {self.code}" if self.code else ""))
        if self.origin:
            parts.append(f"from {self.origin}")
        return ", ".join(parts) or "unknown origin"

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class Value:
    """An SSA value: a graph input, a constant, or a node output."""

    __slots__ = ("name", "type", "producer", "quant", "sparsity")

    def __init__(self, name: str, type: TensorType, producer: "Node | None" = None,
                 quant: QuantSpec | None = None, sparsity: "SparsitySpec | None" = None):
        self.name = name
        self.type = type
        self.producer = producer
        self.quant = quant
        self.sparsity = sparsity  # constants a pruning pass made sparse

    @property
    def shape(self) -> tuple:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


@dataclass(eq=False)
class Node:
    """One operation: ``outputs = op(inputs, **attrs)``. Optional inputs may be ``None``."""

    op: str
    inputs: list
    outputs: list
    attrs: dict = field(default_factory=dict)
    name: str = ""
    provenance: Provenance = field(default_factory=Provenance)

    def describe(self) -> str:
        return f"node '{self.name}' (op {self.op}; {self.provenance})"

    @property
    def output(self) -> Value:
        return self.outputs[0]

    def __repr__(self) -> str:
        return f"<Node {self.name}: {self.op}>"


class Graph:
    """A DAG of nodes in topological order, with its inputs, outputs and constants."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.constants: dict[str, torch.Tensor] = {}
        self._const_values: dict[str, Value] = {}
        self._names: set[str] = set()
        self._next_id = 0
        #: transient analysis results passes hand on (calibration statistics, ...); not saved
        self.meta: dict[str, Any] = {}

    # -- naming ---------------------------------------------------------------------
    def fresh_name(self, base: str) -> str:
        base = base or "v"
        if base not in self._names:
            self._names.add(base)
            return base
        while True:
            cand = f"{base}_{self._next_id}"
            self._next_id += 1
            if cand not in self._names:
                self._names.add(cand)
                return cand

    # -- building -------------------------------------------------------------------
    def add_input(self, name: str, type: TensorType) -> Value:
        v = Value(self.fresh_name(name), type)
        self.inputs.append(v)
        return v

    def add_constant(self, name: str, tensor: torch.Tensor, quant: QuantSpec | None = None) -> Value:
        tensor = tensor.detach()
        v = Value(self.fresh_name(name), TensorType.of(tensor), quant=quant)
        self.constants[v.name] = tensor
        self._const_values[v.name] = v
        return v

    def constant_value(self, name: str) -> Value:
        return self._const_values[name]

    def is_constant(self, v: Value | None) -> bool:
        return v is not None and v.producer is None and v.name in self._const_values \
            and self._const_values[v.name] is v

    def add_node(self, op: str, inputs: Sequence[Value | None], attrs: dict | None = None, *,
                 name: str | None = None, provenance: Provenance | None = None,
                 output_types: Sequence[TensorType] | None = None,
                 output_names: Sequence[str] | None = None, before: Node | None = None) -> Node:
        """Append a node (or insert it ``before`` a given node); output types are inferred
        from the op's schema unless given."""
        from qcompile.ir.registry import get_schema
        schema = get_schema(op)
        attrs = schema.normalize_attrs(dict(attrs or {}), name or op)
        node = Node(op, list(inputs), [], attrs, self.fresh_name(name or op),
                    provenance or Provenance())
        if output_types is None:
            output_types = schema.infer_types(node)
        names = output_names or [node.name if i == 0 else f"{node.name}.{i}"
                                 for i in range(len(output_types))]
        node.outputs = [Value(self.fresh_name(n) if n != node.name else n, t, node)
                        for n, t in zip(names, output_types)]
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        return node

    def add(self, op: str, *inputs: Value | None, provenance: Provenance | None = None,
            name: str | None = None, **attrs) -> Value:
        """Shorthand: append a single-output node and return its output value."""
        return self.add_node(op, inputs, attrs, name=name, provenance=provenance).output

    # -- queries --------------------------------------------------------------------
    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self._const_values.values()
        for n in self.nodes:
            yield from n.outputs

    def value(self, name: str) -> Value:
        for v in self.values():
            if v.name == name:
                return v
        raise KeyError(name)

    def users(self) -> dict[Value, list[Node]]:
        """Map every value to the nodes that read it (graph outputs are not nodes)."""
        out: dict[Value, list[Node]] = {v: [] for v in self.values()}
        for n in self.nodes:
            for v in n.inputs:
                if v is not None:
                    out.setdefault(v, []).append(n)
        return out

    def op_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for n in self.nodes:
            hist[n.op] = hist.get(n.op, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))

    def symbols(self) -> list[str]:
        from qcompile.ir.types import symbols_of
        seen: list[str] = []
        for v in self.inputs:
            for d in v.shape:
                for s in sorted(symbols_of(d)):
                    if s not in seen:
                        seen.append(s)
        return seen

    # -- rewriting ------------------------------------------------------------------
    def replace_uses(self, old: Value, new: Value, *, nodes: Iterable[Node] | None = None) -> None:
        for n in (self.nodes if nodes is None else nodes):
            n.inputs = [new if v is old else v for v in n.inputs]
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_dead(self) -> int:
        """Drop nodes whose outputs nobody reads, and unused constants. Returns nodes removed."""
        live = {id(v) for v in self.outputs}
        kept: list[Node] = []
        for n in reversed(self.nodes):
            if any(id(o) in live for o in n.outputs):
                kept.append(n)
                live.update(id(v) for v in n.inputs if v is not None)
        removed = len(self.nodes) - len(kept)
        self.nodes = kept[::-1]
        live_values = [v for v in self.values() if id(v) in live]
        for v in live_values:  # scales and zero points of live annotated values stay
            if v.quant is not None:
                live.update(id(self._const_values[c]) for c in v.quant.constants())
        for name in list(self.constants):
            if id(self._const_values[name]) not in live:
                del self.constants[name]
                del self._const_values[name]
        return removed

    def clone(self) -> "Graph":
        """A structural copy: new Values and Nodes; constant tensors are shared (not copied)."""
        g = Graph(self.name)
        g._names = set(self._names)
        g._next_id = self._next_id
        vmap: dict[int, Value] = {}
        for v in self.inputs:
            nv = Value(v.name, v.type, quant=v.quant)
            g.inputs.append(nv)
            vmap[id(v)] = nv
        for name, t in self.constants.items():
            v = self._const_values[name]
            nv = Value(name, v.type, quant=v.quant, sparsity=v.sparsity)
            g.constants[name] = t
            g._const_values[name] = nv
            vmap[id(v)] = nv
        for n in self.nodes:
            nn_ = Node(n.op, [vmap[id(v)] if v is not None else None for v in n.inputs], [],
                       dict(n.attrs), n.name, n.provenance)
            nn_.outputs = [Value(o.name, o.type, nn_, o.quant) for o in n.outputs]
            for o, no in zip(n.outputs, nn_.outputs):
                vmap[id(o)] = no
            g.nodes.append(nn_)
        g.outputs = [vmap[id(v)] for v in self.outputs]
        g.meta = dict(self.meta)
        return g

    def __str__(self) -> str:
        from qcompile.ir.printer import print_graph
        return print_graph(self)

    def __repr__(self) -> str:
        return (f"<Graph {self.name}: {len(self.inputs)} inputs, {len(self.nodes)} nodes, "
                f"{len(self.constants)} constants>")


def with_provenance(node: Node, **changes: Any) -> Provenance:
    return replace(node.provenance, **changes)
