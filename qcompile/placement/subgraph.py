"""Cutting a placed graph into per-device subgraphs.

:func:`extract` copies a set of nodes into a standalone :class:`Graph` whose inputs are the
values the nodes read from outside (graph inputs or other nodes' outputs) and whose outputs
are the values read outside them (by other nodes or as graph outputs), with the constants,
quantization parameters and provenance they use. Backends lower it like any graph, so a cost
can be measured on exactly the code a placed run will execute.

:func:`partition` groups a node→device assignment into :class:`Segment` s: maximal sets of
nodes on one device that can run as one call without making the segment graph cyclic (a
node joins a segment of its own device only when no path leaves that segment and comes back
to the node through another device).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qcompile.errors import ConfigError
from qcompile.ir.graph import Graph, Node, Value

__all__ = ["Segment", "extract", "partition", "boundary"]


def boundary(graph: Graph, nodes) -> tuple[list[Value], list[Value]]:
    """(values ``nodes`` read from outside them, values they produce that are read outside),
    each in first-use / production order; constants are not boundary values."""
    inside = {id(n) for n in nodes}
    produced = {id(o) for n in nodes for o in n.outputs}
    ins, seen = [], set()
    for n in nodes:
        for v in n.inputs:
            if v is None or id(v) in produced or id(v) in seen or graph.is_constant(v):
                continue
            seen.add(id(v))
            ins.append(v)
    read_outside = {id(v) for v in graph.outputs}
    for n in graph.nodes:
        if id(n) not in inside:
            read_outside.update(id(v) for v in n.inputs if v is not None)
    outs = [o for n in nodes for o in n.outputs if id(o) in read_outside]
    return ins, outs


def extract(graph: Graph, nodes, name: str = "segment") -> Graph:
    """A standalone graph running ``nodes`` (in ``graph``'s order), as :func:`boundary`
    defines its inputs and outputs; names, types, quantization and provenance are kept, and
    constant tensors are shared with ``graph`` (not copied)."""
    from qcompile.ir.verify import verify
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    nodes = sorted(nodes, key=lambda n: order[id(n)])
    ins, outs = boundary(graph, nodes)
    g = Graph(name)
    vmap: dict[int, Value] = {}

    def const(cname: str) -> Value:
        v = graph.constant_value(cname)
        if id(v) not in vmap:
            nv = g.add_constant(cname, graph.constants[cname], quant=v.quant)
            nv.sparsity = v.sparsity
            vmap[id(v)] = nv
            for c in (v.quant.constants() if v.quant is not None else ()):
                const(c)
        return vmap[id(v)]

    def quant_consts(v: Value):
        for c in (v.quant.constants() if v.quant is not None else ()):
            const(c)

    for v in ins:
        nv = g.add_input(v.name, v.type)
        nv.quant = v.quant
        quant_consts(v)
        vmap[id(v)] = nv
    for n in nodes:
        new_ins = []
        for v in n.inputs:
            if v is None:
                new_ins.append(None)
            elif id(v) in vmap:
                new_ins.append(vmap[id(v)])
            elif graph.is_constant(v):
                new_ins.append(const(v.name))
            else:  # pragma: no cover - boundary() lists every outside value
                raise ConfigError(f"value {v.name!r} read by {n.describe()} has no producer here")
        nn_ = Node(n.op, new_ins, [], dict(n.attrs), g.fresh_name(n.name), n.provenance)
        nn_.outputs = [Value(o.name if o.name == n.name else g.fresh_name(o.name), o.type, nn_,
                             o.quant) for o in n.outputs]
        for o, no in zip(n.outputs, nn_.outputs):
            vmap[id(o)] = no
            quant_consts(o)
        g.nodes.append(nn_)
    g.outputs = [vmap[id(v)] for v in outs]
    g.meta = {k: v for k, v in graph.meta.items() if k in ("symbols",)}
    verify(g)
    return g


@dataclass
class Segment:
    """Nodes of one device run as one call: ``inputs``/``outputs`` are value names of the
    whole graph (what the segment reads and what it hands on)."""

    name: str
    device: str
    nodes: list[str]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"name": self.name, "device": self.device, "nodes": list(self.nodes),
                "inputs": list(self.inputs), "outputs": list(self.outputs)}

    @classmethod
    def from_json(cls, d: dict) -> "Segment":
        return cls(d["name"], d["device"], list(d["nodes"]), list(d["inputs"]), list(d["outputs"]))


def partition(graph: Graph, assignment: dict[str, str], order: list[str] | None = None) -> list[Segment]:
    """Group the nodes of ``graph`` by ``assignment`` (node name → device name) into
    segments, in a topological order of the segment graph.

    Nodes are visited in ``order`` (node names, a topological order of ``graph`` — the plan's
    start order, so segments follow the schedule; default: the graph's order). A node joins
    the open segment of its device when every input it takes from another segment comes
    from one that segment already waits for; otherwise it opens a new one. A segment is one
    call that starts once all its inputs are there, so joining a node with a new
    cross-device input would hold back the nodes before it (two towers on two devices
    joined at a head would run one after the other). The segment graph is acyclic by
    construction."""
    by_name = {n.name: n for n in graph.nodes}
    missing = [n for n in by_name if n not in assignment]
    if missing:
        raise ConfigError(f"the placement leaves {len(missing)} node(s) unplaced, e.g. {missing[:3]}",
                          hint="assign every node to a device")
    if order is None:
        order = [n.name for n in graph.nodes]
    seg_of: dict[str, int] = {}          # node name -> segment index
    producer = {id(o): n.name for n in graph.nodes for o in n.outputs}
    seg_nodes: list[list[str]] = []
    seg_dev: list[str] = []
    seg_anc: list[set[int]] = []         # segments each segment depends on, transitively
    open_seg: dict[str, int] = {}        # device -> the segment a node may still join
    for name in order:
        n = by_name[name]
        d = assignment[name]
        preds = {seg_of[producer[id(v)]] for v in n.inputs
                 if v is not None and id(v) in producer}
        s = open_seg.get(d)
        if s is not None and all(p == s or p in seg_anc[s] for p in preds):
            seg_nodes[s].append(name)
        else:
            s = len(seg_nodes)
            seg_nodes.append([name])
            seg_dev.append(d)
            anc: set[int] = set()
            for p in preds:
                anc |= seg_anc[p] | {p}
            seg_anc.append(anc)
            open_seg[d] = s
        seg_of[name] = s
        # every segment depending on s now depends on what s gained; keep closures exact
        for t in range(len(seg_nodes)):
            if s in seg_anc[t]:
                seg_anc[t] |= seg_anc[s]
    # a topological order of the segments: ancestors first (ties: creation order)
    ranks = sorted(range(len(seg_nodes)), key=lambda t: (len(seg_anc[t]), t))
    done: set[int] = set()
    topo: list[int] = []
    while len(topo) < len(ranks):
        for t in ranks:
            if t not in done and seg_anc[t] <= done:
                topo.append(t)
                done.add(t)
                break
    out = []
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    for i, t in enumerate(topo):
        # graph order, as extract() uses: the boundary's order is the subgraph's input order
        nodes = sorted((by_name[x] for x in seg_nodes[t]), key=lambda n: index[n.name])
        ins, outs = boundary(graph, nodes)
        out.append(Segment(f"seg{i}_{seg_dev[t]}", seg_dev[t], [n.name for n in nodes],
                           [v.name for v in ins], [v.name for v in outs]))
    return out
