"""rotate: orthogonal rotations that spread activation outliers over all channels before
quantization, computational invariance keeping the float model's outputs (to rounding).

QuaRot (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", 2024, §4;
R1–R4 named as in SpinQuant, Liu et al. 2024, Fig. 1):

- **R1**, the residual stream: ``E ← E R``, ``W_read ← W R``, ``W_write ← Rᵀ W``, ``b ← b R``
  on a stream that fuses (``_rotation_sites``; LayerNorm streams are centred first and their
  norms become RMSNorms, SliceGPT §3.1). A post-LN stream (BERT) cannot fuse — its residual
  reads the norm output through γ — so each norm output that feeds linears is rotated
  *online* (a ``hadamard`` or a ``matmul`` op) and ``R`` folds into those linears' columns.
- **R2**, per head on V and O: ``W_v ← (I ⊗ R2)ᵀ W_v``, ``W_o ← W_o (I ⊗ R2)`` (§4, "V/O").
- **R3**, per head on Q and K: ``QKᵀ`` is unchanged by ``(I ⊗ H)`` on both; after a rotary
  embedding (position dependent) it is an online ``hadamard`` op, otherwise it folds into the
  Q and K projections.
- **R4**, online before the down projection (every linear writing a residual from an MLP):
  ``x ← x H``, ``W ← W H``.

Kinds: ``"hadamard"`` (R1, R2: randomized Hadamard ``diag(±1)·H``; online sites plain ``H``),
``"random"`` (random orthogonal matrices, QR of a Gaussian with the sign fix of Mezzadri 2007,
§5; online sites stay Hadamard, except R1 online, a dense ``matmul``), and ``"pca"`` (ResQ,
Saxena et al. 2024, §3: ``R1 = U · blockdiag(R_low, R_high)`` with ``U`` the eigenbasis of the
calibration covariance in ascending order, summed over the stream's norm outputs, and random
orthogonal blocks; the top ``r = fraction·d`` coordinates hold the high-variance subspace, and
every linear reading them is split into a low part and a high part ``…resq_high`` that the
quantization config keeps at higher precision).

Requires ``fold_norms`` before (for a fused stream) and, for ``pca``, ``calibrate`` with
``hessian=True``. Non-power-of-two sizes use ``qcompile.hadamard`` (12·2^k, 172·2^k, ...).
"""
from __future__ import annotations

import torch

from qcompile.errors import ConfigError, PassError
from qcompile.hadamard import hadamard_matrix, random_signs, supported
from qcompile.ir.graph import Graph, Node, Value
from qcompile.passes._rotation_sites import (
    Stream,
    find_heads,
    find_streams,
    linear_readers,
    residual_writers,
)
from qcompile.passes._scaling import set_constant
from qcompile.passes.manager import register_pass

__all__ = ["rotate", "random_orthogonal", "pca_basis", "pca_rotation", "KINDS", "HIGH_SUFFIX"]

KINDS = ("hadamard", "random", "pca")
HIGH_SUFFIX = "resq_high"


# -- matrices ----------------------------------------------------------------------------------
def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal ``n×n`` (float64): QR of a Gaussian with R's diagonal made
    positive (Mezzadri, "How to generate random matrices from the classical compact groups",
    2007, §5)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def pca_basis(cov: torch.Tensor) -> torch.Tensor:
    """The eigenvectors of ``cov`` by ascending eigenvalue (``Uᵀ C U`` is diagonal)."""
    return torch.linalg.eigh(cov.double())[1]


def pca_rotation(cov: torch.Tensor, high: int, seed: int) -> torch.Tensor:
    """ResQ's ``U · blockdiag(R_low, R_high)`` (Saxena et al. 2024, §3.2): the last ``high``
    coordinates span the top-variance subspace, each block randomly rotated inside."""
    n = cov.shape[0]
    u = pca_basis(cov)
    blocks = [random_orthogonal(n - high, seed)] + ([random_orthogonal(high, seed + 1)] if high else [])
    return u @ torch.block_diag(*blocks)


def _fused_matrix(kind: str, n: int, seed: int) -> torch.Tensor:
    """R1/R2 for a fused site: randomized Hadamard (random orthogonal where no Hadamard
    matrix of that order is known) or random orthogonal."""
    if kind in ("hadamard", "pca") and supported(n):
        return random_signs(n, seed)[:, None] * hadamard_matrix(n)
    return random_orthogonal(n, seed)


# -- weight surgery --------------------------------------------------------------------------
def _const(graph: Graph, v: Value) -> torch.Tensor:
    return graph.constants[v.name].to(torch.float64)


def _rotate_output(graph: Graph, lin: Node, r: torch.Tensor) -> None:
    """``y ← y R``: ``W ← Rᵀ W``, ``b ← b R``."""
    lin.inputs[1] = set_constant(graph, lin.inputs[1], r.T @ _const(graph, lin.inputs[1]))
    if len(lin.inputs) > 2 and lin.inputs[2] is not None:
        lin.inputs[2] = set_constant(graph, lin.inputs[2], _const(graph, lin.inputs[2]) @ r)


def _rotate_input(graph: Graph, lin: Node, r: torch.Tensor) -> None:
    """The input arrives as ``x R``: ``W ← W R``."""
    lin.inputs[1] = set_constant(graph, lin.inputs[1], _const(graph, lin.inputs[1]) @ r)


def _blocks(r: torch.Tensor, width: int) -> torch.Tensor:
    """``I ⊗ R`` of size ``width``."""
    return torch.block_diag(*[r] * (width // r.shape[0]))


def _insert(graph: Graph, op: str, x: Value, readers: list[Node], tag: str, **attrs) -> Value:
    """A node ``op(x, ...)`` placed before the first of ``readers``, which then read it."""
    first = min(readers, key=graph.nodes.index)
    args = [x] + attrs.pop("_args", [])
    n = graph.add_node(op, args, attrs, name=f"{x.name}.{tag}", provenance=first.provenance,
                       before=first)
    for r in readers:
        r.inputs = [n.outputs[0] if v is x else v for v in r.inputs]
    return n.outputs[0]


# -- R1 --------------------------------------------------------------------------------------
def _center(graph: Graph, st: Stream) -> None:
    """Make every stream value mean-free: then LayerNorm(x) = RMSNorm(x) (SliceGPT §3.1)."""
    d = st.width
    c = torch.eye(d, dtype=torch.float64) - 1.0 / d
    for w in st.writers:
        _rotate_output(graph, w, c)
    for e in st.embeddings:
        t = _const(graph, e.inputs[0])
        e.inputs[0] = set_constant(graph, e.inputs[0], t - t.mean(-1, keepdim=True))
    for n in st.norms:
        n.op = "rms_norm"
        n.inputs = n.inputs[:1]


def _fuse(graph: Graph, st: Stream, r: torch.Tensor) -> None:
    users = graph.users()
    consts = [(v, [n for n in users.get(v, []) if n.op == "add"]) for v in st.constants]
    if st.center:
        _center(graph, st)
    for v, adds in consts:
        t = _const(graph, v)
        if st.center:
            t = t - t.mean(-1, keepdim=True)
        nv = set_constant(graph, v, t @ r)
        for a in adds:
            a.inputs = [nv if x is v else x for x in a.inputs]
    for w in st.writers:
        _rotate_output(graph, w, r)
    for rd in st.readers:
        _rotate_input(graph, rd, r)
    for e in st.embeddings:
        e.inputs[0] = set_constant(graph, e.inputs[0], _const(graph, e.inputs[0]) @ r)
    for v in st.outputs:  # rotated back where the stream leaves the graph
        back = graph.add_constant(f"{v.name}.unrotate", r.T.float())
        n = graph.add_node("matmul", [v, back], name=f"{v.name}.unrotate",
                           provenance=v.producer.provenance if v.producer else None)
        graph.outputs = [n.outputs[0] if o is v else o for o in graph.outputs]


def _stream_covariance(st: Stream, cal) -> torch.Tensor:
    outs = [n.outputs[0] for n in st.norms if n.outputs[0].name in (cal or {})]
    covs = [cal[v.name].covariance() for v in outs if cal[v.name].xtx is not None]
    if not covs:
        names = ", ".join(n.name for n in st.norms[:3])
        raise PassError(f"rotation='pca' needs the calibration covariance of the norm outputs "
                        f"({names}, ...)", hint="run calibrate with hessian=True before rotate "
                                               "(compile() does with calibration=)")
    return sum(covs)


# -- the pass ----------------------------------------------------------------------------------
def _high(d: int, fraction: float) -> int:
    return max(1, round(d * fraction))


@register_pass("rotate")
def rotate(graph: Graph, *, kind: str = "hadamard", seed: int = 0, online: bool = True,
           fraction: float = 0.125) -> Graph:
    if kind not in KINDS:
        raise ConfigError(f"unknown rotation kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")
    if not 0 < fraction < 1:
        raise ConfigError(f"the high-precision fraction must be in (0, 1), got {fraction}")
    cal = graph.meta.get("calibration")
    streams = find_streams(graph)
    users = graph.users()
    fused = [s for s in streams if s.fusable]
    post_ln = [n for s in streams if not s.fusable for n in s.norms
               if linear_readers(graph, users, n.outputs[0])]
    if not fused and not post_ln:
        why = "; ".join(p for s in streams for p in s.problems[:2]) or \
            "no LayerNorm/RMSNorm over the last axis"
        raise PassError(f"rotate found no residual stream to rotate: {why}",
                        hint="rotation needs norm → linear blocks (transformer layers); compile "
                             "this model with rotation=None")
    heads = find_heads(graph)
    writers = residual_writers(graph, streams)
    report = {"kind": kind, "r1_fused": [], "r1_online": [], "r2": [], "r3": [], "r4": [],
              "skipped": [p for s in streams if not s.fusable for p in s.problems[:1]]}
    high_inputs: list[Value] = []
    for i, st in enumerate(fused):
        if kind == "pca":
            r = pca_rotation(_stream_covariance(st, cal), _high(st.width, fraction), seed + i)
            high_inputs += [n.outputs[0] for n in st.norms]
        else:
            r = _fused_matrix(kind, st.width, seed + i)
        _fuse(graph, st, r)
        report["r1_fused"].append(f"{len(st.norms)} norms, width {st.width}"
                                  + (", centred" if st.center else ""))
    for j, norm in enumerate(post_ln):
        x = norm.outputs[0]
        readers = linear_readers(graph, graph.users(), x)
        d = x.type.shape[-1]
        if kind == "pca":
            if cal is None or x.name not in cal or cal[x.name].xtx is None:
                raise PassError(f"rotation='pca' needs the calibration covariance of %{x.name}",
                                hint="run calibrate with hessian=True before rotate")
            r = pca_rotation(cal[x.name].covariance(), _high(d, fraction), seed + 1000 + j)
        elif kind == "hadamard" and supported(d):
            r = hadamard_matrix(d)
        else:
            r = random_orthogonal(d, seed + 1000 + j)
        if kind == "hadamard" and supported(d):
            y = _insert(graph, "hadamard", x, readers, "r1", size=d)
        else:
            rc = graph.add_constant(f"{x.name}.r1", r.float())
            y = _insert(graph, "matmul", x, readers, "r1", _args=[rc])
        for rd in readers:
            _rotate_input(graph, rd, r)
        if kind == "pca":
            high_inputs.append(y)
        report["r1_online"].append(norm.name)
    for k, h in enumerate(heads):
        if h.v_proj is not None and h.o_proj is not None:
            r2 = _fused_matrix(kind, h.v_dim, seed + 2000 + k)
            _rotate_output(graph, h.v_proj, _blocks(r2, h.v_proj.outputs[0].type.shape[-1]))
            _rotate_input(graph, h.o_proj, _blocks(r2, h.o_proj.inputs[0].type.shape[-1]))
            report["r2"].append(h.attention.name)
        if online and h.q_site is not None and h.k_site is not None and supported(h.qk_dim):
            hm = hadamard_matrix(h.qk_dim)
            for site in (h.q_site, h.k_site):
                if site.op == "rotary":
                    out = site.outputs[0]
                    _insert(graph, "hadamard", out, graph.users()[out], "r3", size=h.qk_dim)
                else:
                    _rotate_output(graph, site, _blocks(hm, site.outputs[0].type.shape[-1]))
            report["r3"].append(h.attention.name)
    o_projs = {id(h.o_proj) for h in heads}
    for w in writers if online else []:
        n_in = w.inputs[0].type.shape[-1]
        if id(w) in o_projs or not isinstance(n_in, int) or not supported(n_in):
            continue
        _insert(graph, "hadamard", w.inputs[0], [w], "r4", size=n_in)
        _rotate_input(graph, w, hadamard_matrix(n_in))
        report["r4"].append(w.name)
    for x in high_inputs:
        _split_high(graph, x, _high(x.type.shape[-1], fraction))
    graph.meta["rotate"] = report
    graph.meta.pop("calibration", None)  # it describes the unrotated values
    graph.remove_dead()
    return graph


def _split_high(graph: Graph, x: Value, r: int) -> None:
    """Every linear reading ``x`` becomes ``linear(x[..., :d−r], W[:, :d−r], b) +
    linear(x[..., d−r:], W[:, d−r:])``; the high part's weight is named ``….resq_high``."""
    readers = linear_readers(graph, graph.users(), x)
    if not readers:
        return
    d = x.type.shape[-1]
    lo = _insert(graph, "slice", x, readers, "low", axis=-1, start=0, end=d - r)
    hi = graph.add_node("slice", [x], {"axis": -1, "start": d - r, "end": d}, name=f"{x.name}.high",
                        provenance=lo.producer.provenance, before=lo.producer).outputs[0]
    for lin in readers:
        w = _const(graph, lin.inputs[1])
        w_name = lin.inputs[1].name
        lin.inputs[1] = set_constant(graph, lin.inputs[1], w[:, :d - r])
        i = graph.nodes.index(lin) + 1
        nxt = graph.nodes[i] if i < len(graph.nodes) else None
        wh = graph.add_constant(f"{w_name}.{HIGH_SUFFIX}", w[:, d - r:].to(graph.constants[w_name].dtype))
        part = graph.add_node("linear", [hi, wh], name=f"{lin.name}.high", provenance=lin.provenance,
                              before=nxt)
        users = graph.users().get(lin.outputs[0], [])
        total = graph.add_node("add", [lin.outputs[0], part.outputs[0]], name=f"{lin.name}.sum",
                               provenance=lin.provenance, before=nxt)
        graph.replace_uses(lin.outputs[0], total.outputs[0], nodes=users)  # and graph outputs
