"""Where rotations can go, found by pattern (never by model name): residual streams whose
rotation fuses into the weights around them, attention heads (V/O and Q/K), and the linears
that write into a residual add from an MLP (the down projections).

A *residual stream* is the connected set of values of one width ``d`` joined by ``add`` nodes
and by affine-free norms (input and output). It fuses a rotation ``R`` (QuaRot, Ashkboos et
al. 2024, §4) when every value in it is produced by a linear (rows rotated), an embedding
(rows rotated), a constant (rotated), an ``add`` or a norm inside the set, and read only by
linears (columns rotated), adds and norms inside the set, or is a graph output (rotated back
there). LayerNorm streams are centred first (SliceGPT, Ashkboos et al. 2024, §3.1): then each
LayerNorm equals an RMSNorm, which commutes with ``R``. A post-LN residual (BERT) reads the
norm output through its affine, so its stream does not fuse; ``rotate`` rotates such norm
outputs online instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qcompile.ir.graph import Graph, Node, Value

__all__ = ["Stream", "HeadSite", "find_streams", "find_heads", "residual_writers",
           "linear_readers", "NORMS"]

NORMS = ("layer_norm", "rms_norm")


def _last(v: Value):
    return v.type.shape[-1] if v.type.rank else None


def _const_linear(graph: Graph, n: Node, v: Value) -> bool:
    return n.op == "linear" and n.inputs[0] is v and graph.is_constant(n.inputs[1])


def linear_readers(graph: Graph, users, v: Value) -> list[Node]:
    """Linears with a constant weight reading ``v`` as their input."""
    return [n for n in users.get(v, []) if _const_linear(graph, n, v)]


def _is_norm(n: Node) -> bool:
    return n.op in NORMS and n.attrs.get("normalized_ndim", 1) == 1


@dataclass
class Stream:
    width: int
    values: list[Value] = field(default_factory=list)
    norms: list[Node] = field(default_factory=list)
    writers: list[Node] = field(default_factory=list)
    readers: list[Node] = field(default_factory=list)
    embeddings: list[Node] = field(default_factory=list)
    constants: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: a LayerNorm stream: centre it, then its norms are RMSNorms
    center: bool = False

    @property
    def fusable(self) -> bool:
        return bool(self.norms) and not self.problems


def _grow(graph: Graph, users, start: Value) -> Stream:
    d = _last(start)
    st = Stream(d)
    seen: set[int] = set()
    todo = [start]

    def visit(v):
        if v is not None and id(v) not in seen:
            todo.append(v)

    def add_once(lst, item):
        if all(item is not x for x in lst):
            lst.append(item)

    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        st.values.append(v)
        if _last(v) != d:
            st.problems.append(f"%{v.name} has width {_last(v)}, not {d}")
            continue
        p = v.producer
        if p is None:
            if graph.is_constant(v):
                st.constants.append(v)
            else:
                st.problems.append(f"graph input %{v.name} is part of the stream")
        elif p.op == "add":
            for o in p.inputs:
                visit(o)
        elif _is_norm(p):
            add_once(st.norms, p)
            visit(p.inputs[0])
        elif p.op == "linear" and graph.is_constant(p.inputs[1]):
            add_once(st.writers, p)
        elif p.op == "embedding" and graph.is_constant(p.inputs[0]):
            add_once(st.embeddings, p)
        else:
            st.problems.append(f"%{v.name} is produced by {p.describe()}")
        for n in users.get(v, []):
            if n.op == "add":
                visit(n.outputs[0])
                for o in n.inputs:
                    visit(o)
            elif _is_norm(n) and n.inputs[0] is v:
                add_once(st.norms, n)
                visit(n.outputs[0])
            elif _const_linear(graph, n, v):
                add_once(st.readers, n)
            else:
                st.problems.append(f"%{v.name} is read by {n.describe()}")
        if v in graph.outputs:
            st.outputs.append(v)
    for n in st.norms:
        if len(n.inputs) > 1 and any(x is not None for x in n.inputs[1:]):
            st.problems.append(f"{n.describe()} still has its affine weights (run fold_norms first)")
    if len({n.op for n in st.norms}) > 1:
        st.problems.append("the stream mixes LayerNorm and RMSNorm")
    st.center = any(n.op == "layer_norm" for n in st.norms)
    if st.center:
        norm_outs = {id(n.outputs[0]) for n in st.norms}
        st.problems += [f"graph output %{v.name} would be centred" for v in st.outputs
                        if id(v) not in norm_outs]
    return st


def find_streams(graph: Graph) -> list[Stream]:
    """Every residual stream of the graph (fusable or not), one per connected set of norms."""
    users = graph.users()
    out, done = [], set()
    for n in graph.nodes:
        if _is_norm(n) and id(n) not in done and isinstance(_last(n.inputs[0]), int):
            st = _grow(graph, users, n.inputs[0])
            done.update(id(m) for m in st.norms)
            out.append(st)
    return out


# -- attention heads ---------------------------------------------------------------------------
def _keeps_chunks(n: Node, dh: int) -> bool:
    """Whether ``n`` maps contiguous last-axis chunks of ``dh`` elements onto such chunks, so a
    block-diagonal ``I ⊗ R`` on the last axis commutes with it."""
    x, y = n.inputs[0], n.outputs[0]
    if n.op == "reshape":
        a, b = _last(x), _last(y)
        return isinstance(a, int) and isinstance(b, int) and a % dh == 0 and b % dh == 0
    if n.op == "permute":
        return n.attrs["perm"][-1] == x.type.rank - 1
    if n.op == "expand":
        return _last(x) == _last(y)
    if n.op in ("slice", "select"):
        return n.attrs["axis"] % x.type.rank != x.type.rank - 1
    return n.op in ("identity", "cast")


def _walk_back(users, v: Value, dh: int) -> tuple[Node | None, list[Node]]:
    """From ``v`` back through chunk-keeping ops read by nothing else: the first other
    producer and the chain of ops passed."""
    chain = []
    while v.producer is not None and _keeps_chunks(v.producer, dh) and len(users.get(v, [])) == 1:
        chain.append(v.producer)
        v = v.producer.inputs[0]
    if len(users.get(v, [])) != 1:
        return None, chain
    return v.producer, chain


def _walk_forward(graph: Graph, users, v: Value, dh: int) -> Node | None:
    """From ``v`` forward through chunk-keeping ops that are its only readers: the linear
    (constant weight) that reads the end of the chain, or None."""
    while True:
        rs = users.get(v, [])
        if len(rs) != 1 or v in graph.outputs:
            return None
        if rs[0].inputs[0] is not v or not _keeps_chunks(rs[0], dh):
            return rs[0] if _const_linear(graph, rs[0], v) else None
        v = rs[0].outputs[0]


@dataclass
class HeadSite:
    attention: Node
    qk_dim: int
    v_dim: int
    v_proj: Node | None = None
    o_proj: Node | None = None
    #: per q and k: the rotary node (rotate online after it) or the projection (fold into it)
    q_site: Node | None = None
    k_site: Node | None = None


def find_heads(graph: Graph) -> list[HeadSite]:
    users = graph.users()
    out = []
    for a in (n for n in graph.nodes if n.op == "attention"):
        q, k, v = a.inputs[:3]
        h = HeadSite(a, _last(q), _last(v))
        if not isinstance(h.qk_dim, int) or not isinstance(h.v_dim, int):
            continue
        p, _ = _walk_back(users, v, h.v_dim)
        if p is not None and p.op == "linear" and graph.is_constant(p.inputs[1]):
            h.v_proj = p
        h.o_proj = _walk_forward(graph, users, a.outputs[0], h.v_dim)
        sites = []
        for x in (q, k):
            p, _ = _walk_back(users, x, h.qk_dim)
            ok = p is not None and (p.op == "rotary" or (
                p.op == "linear" and graph.is_constant(p.inputs[1])))
            sites.append(p if ok else None)
        h.q_site, h.k_site = sites
        if h.q_site is h.k_site:  # one producer for both (a fused qk): leave it
            h.q_site = h.k_site = None
        out.append(h)
    return out


def residual_writers(graph: Graph, streams: list[Stream]) -> list[Node]:
    """Linears writing into a residual: a fused stream's writers, and (post-LN) linears whose
    output an ``add`` feeding a norm reads."""
    users = graph.users()
    out = [w for s in streams if s.fusable for w in s.writers]
    for n in graph.nodes:
        if n.op != "linear" or not graph.is_constant(n.inputs[1]) or n in out:
            continue
        for a in users.get(n.outputs[0], []):
            if a.op == "add" and any(_is_norm(r) for r in users.get(a.outputs[0], [])):
                out.append(n)
                break
    return out
