"""mixed_precision: choose each layer's weight format among a budget's candidates.

**Problem.** Layers ``i`` (linears and convolutions with constant weights), choices ``c``
(weight formats), binaries ``x_ic`` with ``Σ_c x_ic = 1``. Per choice, costs that a
:class:`~qcompile.Budget` may limit, all exact for the format the quantizers produce:

- bits: ``n_i·b_c`` element bits (HAWQ's average bit-width: ``Σ n_i b_i / Σ n_i``);
- size: the stored bytes of the codes, scales and padding (``QuantizedTensor.nbits``), plus
  every other constant at its dtype;
- BOPs: ``MACs_i·b_w·b_a`` on one calibration sample (HAWQ-V3, Yao et al., ICML 2021, eq. 11);
- latency: the kernel qcompile emits for that layer's shape and format, measured on the target
  (``qcompile.backends.latency``; OHQ, Huang et al., CVPR 2024: measure on the chip, not a
  proxy), plus the rest of the model measured once.

Ties (tied layers share one set of variables) and fixed layers (one allowed choice) shape the
variables; a choice a layer cannot take (a group size that does not divide it, a block format
on a convolution) is not offered to it.

**HAWQ-V3** (Yao et al., ICML 2021, §3.4 eq. 10–12): ``min Σ x_ic Ω_ic`` under the linear
budgets, with HAWQ-V2's ``Ω_ic = Tr(H_ii)/n_i·‖Q_c(W_i) − W_i‖²`` (``qcompile.passes.
sensitivity``), as a MILP solved by HiGHS (``scipy.optimize.milp``).

With ``sensitivity="measured"`` the ILP's ``Ω_ic`` is the loss increase measured with only
layer ``i`` quantized at ``c`` (OHQ, Huang et al., CVPR 2024: sensitivity by masking), for the
regimes (2 bits) where the quadratic model underestimates by orders of magnitude.

**CLADO** (Deng et al., DAC 2025, §3): ``ΔL_p`` (one layer group quantized at one choice)
and ``ΔL_pq`` (two together) from forward passes on the calibration samples give
``G_pp = 2ΔL_p``, ``G_pq = ΔL_pq − ΔL_p − ΔL_q`` (zero within a group), so ``xᵀGx ≈ 2ΔL``;
``G`` is projected on the PSD cone (negative eigenvalues clamped) and ``min xᵀGx`` is
linearised with ``y_pq = x_p x_q``: McCormick's envelope, tightened by multiplying the one-hot
rows by ``x_p`` (``Σ_{q∈h} y_pq = x_p``, Adams–Sherali RLT), which with binary ``x`` forces
``y_pq = x_p x_q`` exactly; then HiGHS with a time limit.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from qcompile.config import Budget, QuantConfig
from qcompile.errors import ConfigError, PassError
from qcompile.ir.graph import Graph, Node
from qcompile.passes.manager import register_pass
from qcompile.passes.sensitivity import hessian_traces, make_loss, nonneg, omega, top_eigenvalues

__all__ = ["mixed_precision", "PrecisionProblem", "PrecisionPlan", "solve_ilp", "solve_clado",
           "clado_matrix", "plot_plan", "exhaustive", "LIMIT_UNITS"]

LIMIT_UNITS = {"avg_bits": "bits", "size_mb": "MB", "gbops": "GBOPs", "latency_ms": "ms"}


# -- the problem ---------------------------------------------------------------------------
@dataclass
class PrecisionProblem:
    """Layers × choices: ``omega[i, c]``, ``costs[k][i, c]`` in the units of limit ``k`` (with
    ``offsets[k]`` added for what no choice changes), ``allowed[i, c]`` and the tie ``groups``
    (lists of layer indices)."""

    layers: list[str]
    choices: list[str]
    omega: np.ndarray
    costs: dict[str, np.ndarray]
    offsets: dict[str, float]
    limits: dict[str, float]
    allowed: np.ndarray
    groups: list[list[int]]

    def __post_init__(self):
        L, C = len(self.layers), len(self.choices)
        self.omega = np.asarray(self.omega, dtype=np.float64).reshape(L, C)
        self.allowed = np.asarray(self.allowed, dtype=bool).reshape(L, C)
        self.costs = {k: np.asarray(v, dtype=np.float64).reshape(L, C) for k, v in self.costs.items()}
        self.offsets = {k: float(self.offsets.get(k, 0.0)) for k in self.costs}
        seen = sorted(i for g in self.groups for i in g)
        if seen != list(range(L)):
            raise PassError("mixed precision: the tie groups must cover every layer once")

    def group_allowed(self, g: Sequence[int]) -> np.ndarray:
        return np.all(self.allowed[list(g)], axis=0)

    def metric(self, k: str, assignment: Sequence[int]) -> float:
        return self.offsets[k] + float(sum(self.costs[k][i, c] for i, c in enumerate(assignment)))

    def objective(self, assignment: Sequence[int]) -> float:
        return float(sum(self.omega[i, c] for i, c in enumerate(assignment)))

    def least(self, k: str) -> float:
        """The least value limit ``k`` can reach (every group at its cheapest choice)."""
        tot = self.offsets[k]
        for g in self.groups:
            ok = self.group_allowed(g)
            tot += float(np.min(self.costs[k][g].sum(0)[ok]))
        return tot

    def check_feasible(self) -> None:
        """``ConfigError`` naming the least achievable value of each limit that cannot be met."""
        for g in self.groups:
            if not self.group_allowed(g).any():
                names = ", ".join(self.layers[i] for i in g)
                raise ConfigError(f"mixed precision: no candidate format fits layer(s) {names}",
                                  hint="add a candidate these layers can take (a smaller group "
                                       "size, an integer format), or skip them")
        for k, lim in self.limits.items():
            least = self.least(k)
            if least > lim * (1 + 1e-9):
                raise ConfigError(
                    f"mixed precision: the budget {k}={lim:g} cannot be met; the least "
                    f"achievable is {k}={least:.6g} {LIMIT_UNITS.get(k, '')}".rstrip(),
                    hint=f"raise {k} to at least {least:.6g}, or add cheaper candidates")

    def assignment_of(self, xg: dict[int, int]) -> list[int]:
        out = [0] * len(self.layers)
        for gi, c in xg.items():
            for i in self.groups[gi]:
                out[i] = c
        return out


def _variables(p: PrecisionProblem):
    """(group index, choice) per variable, for the allowed choices of every group."""
    return [(gi, c) for gi, g in enumerate(p.groups) for c in np.flatnonzero(p.group_allowed(g))]


def _budget_rows(p: PrecisionProblem, var, ncols: int):
    """Budget rows, each normalised by its limit: ``Σ cost/lim ≤ 1 − offset/lim``."""
    from scipy.optimize import LinearConstraint
    from scipy.sparse import lil_array
    out = []
    for k, lim in p.limits.items():
        row = lil_array((1, ncols))
        for j, (gi, c) in enumerate(var):
            row[0, j] = float(p.costs[k][p.groups[gi], c].sum()) / lim
        out.append(LinearConstraint(row.tocsr(), -np.inf, 1.0 - p.offsets[k] / lim))
    return out


def _onehot_rows(p: PrecisionProblem, var, ncols: int):
    from scipy.optimize import LinearConstraint
    from scipy.sparse import lil_array
    A = lil_array((len(p.groups), ncols))
    for j, (gi, _) in enumerate(var):
        A[gi, j] = 1.0
    return LinearConstraint(A.tocsr(), 1.0, 1.0)


def _milp(p: PrecisionProblem, cost, constraints, integrality, time_limit: float, what: str):
    from scipy.optimize import milp
    res = milp(cost, constraints=constraints, integrality=integrality,
               bounds=(0, 1), options={"time_limit": float(time_limit), "mip_rel_gap": 1e-9,
                                       "disp": False})
    if res.status == 2:
        least = {k: round(p.least(k), 6) for k in p.limits}
        raise ConfigError(f"mixed precision ({what}): the limits {p.limits} cannot all be met "
                          f"together; each alone can reach at least {least}",
                          hint="relax one of the limits")
    if res.x is None and res.status != 1:
        raise PassError(f"mixed precision ({what}): HiGHS failed: {res.message}")
    if res.x is None:
        raise ConfigError(f"mixed precision ({what}): HiGHS found no feasible assignment within "
                          f"the time limit of {time_limit:g} s",
                          hint="raise Budget.time_limit, or relax the limits")
    return res


def solve_ilp(p: PrecisionProblem, *, time_limit: float = 60.0) -> tuple[list[int], dict]:
    """HAWQ-V3's integer program (eq. 12): the assignment of least ``Σ Ω`` within the limits."""
    p.check_feasible()
    var = _variables(p)
    n = len(var)
    scale = float(np.max(np.abs(p.omega[p.allowed]))) or 1.0
    cost = np.array([p.omega[p.groups[gi], c].sum() / scale for gi, c in var])
    t0 = time.perf_counter()
    res = _milp(p, cost, [_onehot_rows(p, var, n), *_budget_rows(p, var, n)], np.ones(n),
                time_limit, "hawq-v3")
    xg = {gi: int(c) for (gi, c), x in zip(var, res.x) if x > 0.5}
    return p.assignment_of(xg), {"status": res.message, "optimal": res.status == 0,
                                 "solve_s": time.perf_counter() - t0, "variables": n}


def exhaustive(p: PrecisionProblem) -> tuple[list[int] | None, float]:
    """The best assignment by enumerating every combination (tests; small problems only)."""
    opts = [np.flatnonzero(p.group_allowed(g)) for g in p.groups]
    grids = np.meshgrid(*opts, indexing="ij")
    combos = np.stack([g.reshape(-1) for g in grids], axis=1)  # [n, groups] choice per group
    assign = np.zeros((combos.shape[0], len(p.layers)), dtype=np.int64)
    for gi, g in enumerate(p.groups):
        assign[:, g] = combos[:, [gi]]
    rows = np.arange(len(p.layers))
    obj = p.omega[rows, assign].sum(1)
    ok = np.ones(len(obj), bool)
    for k, lim in p.limits.items():
        ok &= p.offsets[k] + p.costs[k][rows, assign].sum(1) <= lim * (1 + 1e-9)
    if not ok.any():
        return None, math.inf
    j = int(np.flatnonzero(ok)[np.argmin(obj[ok])])
    return assign[j].tolist(), float(obj[j])


def clado_matrix(p: PrecisionProblem, single: dict, pair: dict, *, psd: bool = False
                 ) -> tuple[list, np.ndarray]:
    """CLADO's ``G`` over the variables (group, choice): ``single[(g, c)] = ΔL``,
    ``pair[((g, c), (h, d))] = ΔL`` for ``g < h``; projected on the PSD cone (negative
    eigenvalues clamped, CLADO §3.3) when ``psd`` — which the exact linearisation of
    ``solve_clado`` does not need, and which moves the objective on feasible points."""
    var = [tuple(map(int, v)) for v in _variables(p)]
    idx = {v: j for j, v in enumerate(var)}
    finite = [v for v in list(single.values()) + list(pair.values()) if math.isfinite(v)]
    big = 10.0 * max(map(abs, finite), default=1.0) + 1.0  # a broken pair: never chosen
    G = np.zeros((len(var), len(var)))
    for v, j in idx.items():
        G[j, j] = 2.0 * single[v]
    for (a, b), dl in pair.items():
        if a not in idx or b not in idx:
            continue
        i, j = idx[a], idx[b]
        G[i, j] = G[j, i] = (dl - single[a] - single[b]) if math.isfinite(dl) else big
    if psd:
        w, V = np.linalg.eigh((G + G.T) / 2)
        G = (V * np.clip(w, 0, None)) @ V.T
    return var, G


def solve_clado(p: PrecisionProblem, var: list, G: np.ndarray, *, time_limit: float = 60.0
                ) -> tuple[list[int], dict]:
    """``min xᵀGx`` over one-hot ``x`` within the limits, linearised exactly (see the module
    docstring) and solved by HiGHS."""
    from scipy.optimize import LinearConstraint
    from scipy.sparse import lil_array
    p.check_feasible()
    nx = len(var)
    pairs = [(i, j) for i in range(nx) for j in range(i + 1, nx) if var[i][0] != var[j][0]]
    n = nx + len(pairs)
    scale = float(np.max(np.abs(G))) or 1.0
    cost = np.zeros(n)
    cost[:nx] = np.diag(G) / scale
    for t, (i, j) in enumerate(pairs):
        cost[nx + t] = 2.0 * G[i, j] / scale
    by_group: dict[int, list[int]] = {}
    for j, (g, _) in enumerate(var):
        by_group.setdefault(g, []).append(j)
    # Σ_{q ∈ h} y_pq = x_p for every variable p and every other group h
    rows = {}
    for t, (i, j) in enumerate(pairs):
        rows.setdefault((i, var[j][0]), []).append(nx + t)
        rows.setdefault((j, var[i][0]), []).append(nx + t)
    A = lil_array((len(rows), n))
    for r, ((pv, _), cols) in enumerate(rows.items()):
        A[r, pv] = -1.0
        for c in cols:
            A[r, c] = 1.0
    cons = [_onehot_rows(p, var, n), *_budget_rows(p, var, n)]  # y columns: zero there
    if rows:
        cons.append(LinearConstraint(A.tocsr(), 0.0, 0.0))
    integrality = np.concatenate([np.ones(nx), np.zeros(len(pairs))])
    t0 = time.perf_counter()
    res = _milp(p, cost, cons, integrality, time_limit, "clado")
    xg = {var[j][0]: var[j][1] for j in range(nx) if res.x[j] > 0.5}
    return p.assignment_of(xg), {"status": res.message, "optimal": res.status == 0,
                                 "solve_s": time.perf_counter() - t0, "variables": n,
                                 "objective": float(res.fun) * scale}


# -- the plan ----------------------------------------------------------------------------
@dataclass
class PrecisionPlan:
    """What the pass chose: ``formats`` by node name, the predicted value of every metric, the
    per-layer rows (``layers``) and how the solve went."""

    method: str
    formats: dict[str, str]
    predicted: dict[str, float]
    limits: dict[str, float]
    layers: list[dict]
    solve: dict
    problem: PrecisionProblem | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"method": self.method, "formats": dict(self.formats),
                "predicted": dict(self.predicted), "limits": dict(self.limits),
                "layers": [dict(r) for r in self.layers],
                "solve": {k: v for k, v in self.solve.items() if k != "clado"}}

    def __str__(self) -> str:
        lim = ", ".join(f"{k} ≤ {v:g}" for k, v in self.limits.items())
        pred = ", ".join(f"{k} {v:.4g}" for k, v in self.predicted.items())
        note = "" if self.solve.get("optimal", True) else " [time limit: not proven optimal]"
        lines = [f"mixed precision ({self.method}; {lim}): {pred}{note}"]
        w = max((len(r["layer"]) for r in self.layers), default=5)
        for r in self.layers:
            lines.append(f"  {r['layer']:<{w}}  {r['format']:<8} Ω={r['omega']:.3e}"
                         + (" (fixed)" if r.get("fixed") else ""))
        return "\n".join(lines)


def plot_plan(plan: PrecisionPlan, path, *, pareto: Sequence[dict] | None = None):
    """A figure of the bits chosen per layer and, given ``pareto`` rows (``budget``,
    ``predicted``, optional ``measured``, and ``uniform``: the measured loss of a uniform format
    at ``uniform_at`` bits), the Pareto front; saved to ``path``."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from qcompile.formats import get
    ncols = 2 if pareto else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 3.6), squeeze=False)
    ax = axes[0, 0]
    bits = [get(r["format"]).bits for r in plan.layers]
    ax.bar(range(len(bits)), bits, color=["#888" if r.get("fixed") else "#3572a5"
                                          for r in plan.layers])
    ax.set_xticks(range(len(bits)))
    ax.set_xticklabels([r["layer"] for r in plan.layers], rotation=90, fontsize=6)
    ax.set_ylabel("weight bits")
    ax.set_title(f"{plan.method}: bits per layer (grey: fixed)")
    if pareto:
        ax = axes[0, 1]
        xs = [r["budget"] for r in pareto]
        ax.plot(xs, [r["predicted"] for r in pareto], "o-", label="predicted ΣΩ")
        if any("measured" in r for r in pareto):
            ax2 = ax.twinx()
            ax2.plot(xs, [r.get("measured", np.nan) for r in pareto], "s--", color="C1",
                     label="measured loss")
            uni = [(r.get("uniform_at", r["budget"]), r["uniform"]) for r in pareto
                   if r.get("uniform") is not None]
            if uni:
                ax2.plot(*zip(*uni), "x", color="C3", markersize=9, label="uniform format")
            ax2.set_ylabel("measured loss")
            ax2.legend(loc="upper center")
        ax.set_xlabel(pareto[0].get("unit", "budget"))
        ax.set_ylabel("predicted ΣΩ")
        ax.set_yscale("log")
        ax.legend(loc="upper right")
        ax.set_title("Pareto front")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- building the problem from a graph -------------------------------------------------------
def _names(n: Node) -> tuple[str, ...]:
    return tuple(x for x in (n.provenance.module, n.inputs[1].name, n.name) if x)


def _matches(n: Node, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(x, pattern) for x in _names(n))


def _pinned(config: QuantConfig, n: Node):
    """(True, format) when an override sets this layer's ``weights``; (False, None) otherwise."""
    hit, val = False, None
    for pat, ov in config.overrides.items():
        if isinstance(ov, dict) and "weights" in ov and any(
                x and fnmatch.fnmatchcase(x, pat) for x in _names(n)[:2]):
            hit, val = True, ov["weights"]
    return hit, val


def _shapes(graph: Graph, sample) -> dict[str, tuple]:
    from qcompile.interpreter import Interpreter
    shapes = {}
    it = Interpreter(graph, fake_quant=False)
    it.add_hook(lambda v, t: shapes.__setitem__(v.name, tuple(t.shape)))
    with torch.no_grad():
        it.run(*sample)
    return shapes


def _macs(n: Node, shapes) -> int:
    out = math.prod(shapes[n.outputs[0].name])
    w = n.inputs[1].type.shape
    if n.op == "linear":
        return out * int(w[1])
    return out * int(math.prod(w[1:]))


def _dtype_bits(dtype: str) -> int:
    return {"float32": 32, "float16": 16, "bfloat16": 16, "float64": 64}.get(dtype, 32)


def _quantized(n: Node, lc, w: torch.Tensor, config: QuantConfig):
    """The candidate's RTN quantization of ``w`` (a QuantizedTensor), or None if it cannot."""
    from qcompile.passes.quantize_weights import conv_format, rtn
    try:
        fmt = lc.weight_format()
        if n.op == "conv":
            fmt = conv_format(fmt)
            return None if fmt is None else fmt.quantize(w, tuple(range(1, w.dim())))
        fmt.layout(w.shape, -1)
        return rtn(w, fmt, clip_search=config.rtn_clip_search)
    except ConfigError:
        return None


def _union(n: int, pairs) -> list[list[int]]:
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a
    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


@dataclass
class _Layer:
    node: Node
    lc: object
    fixed: str | None = None  # format it must take (Budget.fixed or an override)
    reason: str = ""


def _decision_layers(graph: Graph, config: QuantConfig, budget: Budget) -> list[_Layer]:
    from qcompile.passes.quantize_weights import weight_layers
    out = []
    for n in weight_layers(graph):
        lc = config.layer(*_names(n)[:2])
        pinned, fmt = _pinned(config, n)
        if lc is None:
            continue
        if pinned and fmt is None:
            continue  # an override keeps it float
        out.append(_Layer(n, lc, fmt if pinned else None, "override" if pinned else ""))
    if not out:
        raise ConfigError("mixed precision found no layer to decide (no linear or convolution "
                          "with a constant weight outside 'skip' overrides)")
    quantizable = out
    kept = {id(q.node) for q in quantizable}
    skipped = [n for n in weight_layers(graph) if id(n) not in kept]
    for pat, fmt in budget.fixed.items():
        if pat in ("first", "last"):
            hits = [quantizable[0 if pat == "first" else -1]]
        else:
            hits = [q for q in quantizable if _matches(q.node, pat)]
            if not hits:
                gone = [n.name for n in skipped if _matches(n, pat)]
                if gone:
                    raise ConfigError(f"Budget.fixed pins {pat!r} to {fmt}, but an override "
                                      f"keeps {', '.join(gone)} in float",
                                      hint="drop one of the two")
                raise ConfigError(f"Budget.fixed pattern {pat!r} matches no layer",
                                  hint="patterns match module paths, weight names or node names")
        for q in hits:
            if q.fixed is not None and q.fixed != fmt:
                raise ConfigError(f"conflicting formats for layer {q.node.name}: "
                                  f"{q.reason or 'Budget.fixed'} says {q.fixed}, Budget.fixed "
                                  f"{pat!r} says {fmt}", node=q.node,
                                  hint="pin each layer once")
            q.fixed, q.reason = fmt, q.reason or f"Budget.fixed {pat!r}"
    return out


def _ties(graph: Graph, layers: list[_Layer], budget: Budget) -> list[list[int]]:
    pairs = []
    if budget.tie_shared_inputs:
        by_input: dict[int, list[int]] = {}
        for i, q in enumerate(layers):
            by_input.setdefault(id(q.node.inputs[0]), []).append(i)
        pairs += [(g[0], j) for g in by_input.values() for j in g[1:]]
    for tie in budget.ties:
        members = sorted({i for i, q in enumerate(layers) for pat in tie if _matches(q.node, pat)})
        if not members:
            raise ConfigError(f"Budget.ties group {list(tie)} matches no layer")
        pairs += [(members[0], j) for j in members[1:]]
    groups = _union(len(layers), pairs)
    for g in groups:
        fixed = {layers[i].fixed for i in g} - {None}
        if len(fixed) > 1:
            names = ", ".join(layers[i].node.name for i in g)
            raise ConfigError(f"tied layers {names} are pinned to different formats "
                              f"{sorted(fixed)}", hint="pin them alike, or untie them (drop "
                              "the Budget.ties group, or set tie_shared_inputs=False for "
                              "layers tied by a shared input)")
    return groups


def build_problem(graph: Graph, config: QuantConfig, budget: Budget, sample, *,
                  target: str | None = None, keep_weights: bool = False, progress: bool = True):
    """(problem, per-layer info, the dequantized candidates when ``keep_weights``)."""
    layers = _decision_layers(graph, config, budget)
    groups = _ties(graph, layers, budget)
    choices = list(budget.candidates) + sorted({q.fixed for q in layers if q.fixed} -
                                               set(budget.candidates))
    shapes = _shapes(graph, sample)
    L, C = len(layers), len(choices)
    err = np.zeros((L, C))
    allowed = np.zeros((L, C), bool)
    bits = np.zeros((L, C))
    nbytes = np.zeros((L, C))
    bops = np.zeros((L, C))
    deq = {}
    from qcompile.formats import get
    it = list(enumerate(layers))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="mixed precision: candidates", leave=False, unit="layer")
    for i, q in it:
        n = q.node
        w = graph.constants[n.inputs[1].name].float()
        macs = _macs(n, shapes)
        af = q.lc.activation_format()
        abits = af.bits if af is not None else _dtype_bits(n.inputs[0].dtype)
        for c, name in enumerate(choices):
            if (q.fixed is not None and name != q.fixed) or \
                    (q.fixed is None and name not in budget.candidates):
                continue  # a format pinned elsewhere is no candidate here
            qt = _quantized(n, q.lc.with_weights(name), w, config)
            if qt is None:
                if q.fixed is not None:
                    raise ConfigError(f"the pinned format {name} ({q.reason}) cannot quantize "
                                      f"this layer's weight {list(w.shape)}", node=n,
                                      hint="pin a format that fits it (block formats need a "
                                           "single axis divisible by their block), or skip it")
                continue
            allowed[i, c] = True
            wq = qt.dequantize(torch.float32)
            err[i, c] = float((wq.double() - w.double()).pow(2).sum())
            bits[i, c] = w.numel() * get(name).bits
            nbytes[i, c] = qt.nbits / 8
            bops[i, c] = macs * get(name).bits * abits
            if keep_weights:
                deq[(i, c)] = wq
    unused = [c for j, c in enumerate(choices) if c in budget.candidates and not allowed[:, j].any()]
    if unused:
        import warnings
        warnings.warn(f"mixed precision: candidate(s) {unused} fit no layer (group sizes, block "
                      f"formats on convolutions, or options they do not take)", stacklevel=2)
    decided = {q.node.inputs[1].name for q in layers}
    other = sum(t.numel() * t.element_size() for k, t in graph.constants.items()
                if k not in decided)
    ntot = sum(graph.constants[q.node.inputs[1].name].numel() for q in layers)
    costs = {"avg_bits": bits / ntot, "size_mb": nbytes / 1e6, "gbops": bops / 1e9}
    offsets = {"avg_bits": 0.0, "size_mb": other / 1e6, "gbops": 0.0}
    info = {"layers": layers, "err": err}
    if budget.latency_ms is not None:
        early = PrecisionProblem([q.node.name for q in layers], choices, np.zeros((L, C)),
                                 costs, offsets, {k: v for k, v in budget.limits().items()
                                                  if k != "latency_ms"}, allowed, groups)
        early.check_feasible()  # before minutes of measurements
        lat, rest, corr = _latencies(graph, config, layers, choices, allowed, shapes, sample,
                                     budget.latency_target or target, progress=progress)
        costs["latency_ms"], offsets["latency_ms"] = lat, rest
        info["latency"] = {"per_layer_ms": lat.tolist(), "rest_ms": rest,
                           "correction_ms": corr}
    prob = PrecisionProblem([q.node.name for q in layers], choices, np.zeros((L, C)), costs,
                            offsets, budget.limits(), allowed, groups)
    return prob, info, deq


@dataclass
class _Formats:
    """A stand-in plan for ``quantize_weights``: formats by node name."""

    formats: dict


def _latencies(graph, config, layers, choices, allowed, shapes, sample, target, *, progress):
    """Per-layer latencies of every allowed choice, and the rest of the model: the latency of
    the whole model quantized at a reference assignment (each layer's first allowed choice),
    less its layers' latencies. The reference is quantized, not float, so that what the
    quantized kernels do not fuse (epilogues the float kernels absorb) counts in the rest.
    Each other format is corrected per layer by a whole-model measurement at that format
    (returned by format, ms per layer): a kernel timed alone may pay per-call costs it does
    not pay inside the model, by an amount that depends on the kernel."""
    from qcompile.backends.latency import LATENCY_TARGETS, layer_latency, model_latencies
    from qcompile.passes.quantize_activations import quantize_activations
    from qcompile.passes.quantize_weights import quantize_weights
    if target not in LATENCY_TARGETS:
        raise ConfigError(f"a latency budget needs latencies measured on a target that runs "
                          f"here ({', '.join(LATENCY_TARGETS)}); got {target!r}",
                          hint="compile for 'cpu', 'lut' or 'amx', or set "
                               "Budget.latency_target")
    L, C = allowed.shape
    lat = np.zeros((L, C))
    work = [(i, c) for i in range(L) for c in range(C) if allowed[i, c]]
    it = work
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(work, desc=f"mixed precision: latency on {target}", leave=False, unit="kernel")
    for i, c in it:
        lc = layers[i].lc.with_weights(choices[c])
        lat[i, c] = layer_latency(graph, layers[i].node, shapes, target, lc, config)
    ref = [int(np.flatnonzero(allowed[i])[0]) if allowed[i].any() else None for i in range(L)]

    def quantized(assign) -> Graph:
        formats = {q.node.name: choices[c] for q, c in zip(layers, assign) if c is not None}
        g = graph.clone()
        g.meta["mixed_precision"] = _Formats(formats)
        g = quantize_weights(g, config=dataclasses.replace(config, mixed_precision=None),
                             progress=False)
        if config.activations is not None or any(isinstance(o, dict) and o.get("activations")
                                                 for o in config.overrides.values()):
            g = quantize_activations(g, config=config)
        g.meta.clear()
        return g
    # a kernel timed alone pays a per-call cost it does not pay inside the model, and that
    # cost differs by format: the whole model at each format (where a layer takes it), timed
    # round-robin with the reference, gives each format's correction per layer, so every
    # uniform assignment predicts what was measured
    variants = []
    for c in range(C):
        switched = [i for i in range(L) if allowed[i, c] and ref[i] != c]
        if switched:
            variants.append((c, switched, [c if i in switched else ref[i] for i in range(L)]))
    times = model_latencies([quantized(ref)] + [quantized(a) for *_, a in variants], sample,
                            target)
    total = times[0]
    corrections = {}
    for (c, switched, _), t_c in zip(variants, times[1:]):
        iso = sum(lat[i, c] - lat[i, ref[i]] for i in switched)
        delta = ((t_c - total) - iso) / len(switched)
        corrections[choices[c]] = delta
        for i in switched:
            lat[i, c] = max(lat[i, c] + delta, 0.0)
    rest = total - sum(lat[i, c] for i, c in enumerate(ref) if c is not None)
    return lat, rest, corrections


# -- CLADO's measurements -----------------------------------------------------------------------
def clado_measure(p: PrecisionProblem, layers: list[_Layer], deq: dict, loss, *,
                  progress: bool = True) -> tuple[dict, dict]:
    """``ΔL`` of every variable alone and of every pair from different groups."""
    var = [tuple(map(int, v)) for v in _variables(p)]

    def params(vs):
        out = {}
        for g, c in vs:
            for i in p.groups[g]:
                out[layers[i].node.inputs[1].name] = deq[(i, c)]
        return out
    with torch.no_grad():
        base = float(loss(None))
        pairs = [(a, b) for a, b in itertools.combinations(var, 2) if a[0] != b[0]]
        it = [(v,) for v in var] + pairs
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="clado: ΔL", leave=False, unit="eval")
        single, pair = {}, {}
        for vs in it:
            dl = float(loss(params(vs))) - base
            if len(vs) == 1:
                single[vs[0]] = dl
            else:
                pair[vs] = dl
    return single, pair


def _drop_non_finite(p: PrecisionProblem, layers, budget: Budget) -> None:
    """A non-finite sensitivity (a loss that overflows at that format, a diverged estimate)
    takes the choice off the table, with a warning naming the layer and format."""
    bad = p.allowed & ~np.isfinite(p.omega)
    if bad.any():
        import warnings
        hits = [f"{layers[i].node.name}@{p.choices[c]}" for i, c in zip(*np.nonzero(bad))]
        warnings.warn(f"mixed precision: non-finite sensitivity ({budget.sensitivity}) for "
                      f"{', '.join(hits)}; those choices are not offered", stacklevel=3)
        p.allowed &= ~bad
        p.omega[bad] = 0.0
        p.check_feasible()



def measure_layers(p: PrecisionProblem, layers: list[_Layer], deq: dict, loss, *,
                   progress: bool = True) -> np.ndarray:
    """OHQ's sensitivity (Huang et al., CVPR 2024, §3.2, with the calibration loss in place of
    its KL): ``Ω_ic = max(L(W_i ← Q_c(W_i)) − L(W), 0)``, every other layer in float."""
    out = np.zeros_like(p.omega)
    work = [(i, c) for g in p.groups for i in g for c in np.flatnonzero(p.group_allowed(g))]
    if progress:
        from tqdm.auto import tqdm
        work = tqdm(work, desc="measured sensitivity", leave=False, unit="eval")
    with torch.no_grad():
        base = float(loss(None))
        for i, c in work:
            dl = float(loss({layers[i].node.inputs[1].name: deq[(i, int(c))]})) - base
            out[i, c] = nonneg(dl)  # NaN stays: flagged by the caller
    return out


# -- the pass ---------------------------------------------------------------------------------
@register_pass("mixed_precision")
def mixed_precision(graph: Graph, *, config: QuantConfig, data=None, labels=None,
                    target: str | None = None, progress: bool = True) -> Graph:
    """Choose each layer's weight format for ``config.mixed_precision``; the plan goes to
    ``graph.meta["mixed_precision"]`` for ``quantize_weights``."""
    from qcompile.passes.calibrate import as_positional
    config = QuantConfig.coerce(config)
    budget = config.mixed_precision
    if budget is None:
        raise ConfigError("the mixed_precision pass needs QuantConfig.mixed_precision")
    if not data:
        raise ConfigError("mixed precision needs calibration data for its sensitivities",
                          hint="pass calibration=[inputs, ...] to compile()")
    samples = [as_positional(graph, x, i) for i, x in enumerate(data[:budget.samples])]
    labs = None if labels is None else list(labels)[:len(samples)]
    t0 = time.perf_counter()
    measured = budget.method == "clado" or budget.sensitivity == "measured"
    prob, info, deq = build_problem(graph, config, budget, samples[0], target=target,
                                    keep_weights=measured, progress=progress)
    prob.check_feasible()  # before the costly sensitivities
    layers: list[_Layer] = info["layers"]
    loss = make_loss(graph, samples, labs, budget.loss)
    nodes = [q.node for q in layers]
    extra = {}
    curv = {q.node.inputs[1].name: math.nan for q in layers}
    if budget.method == "clado":
        single, pair = clado_measure(prob, layers, deq, loss, progress=progress)
        for (g, c), dl in single.items():  # shown per layer: a group's ΔL shared evenly
            for i in prob.groups[g]:
                prob.omega[i, c] = nonneg(dl) / len(prob.groups[g]) if math.isfinite(dl) \
                    else math.nan
    elif budget.sensitivity == "measured":
        prob.omega[:] = measure_layers(prob, layers, deq, loss, progress=progress)
    else:
        if budget.sensitivity == "trace":
            tr = hessian_traces(graph, nodes, loss, max_iters=budget.max_iters, tol=budget.tol,
                                seed=budget.seed, progress=progress)
            curv = {k: v / graph.constants[k].numel() for k, v in tr.traces.items()}
            extra = {"probes": tr.probes}
        else:
            curv = top_eigenvalues(graph, nodes, loss, max_iters=budget.max_iters,
                                   tol=budget.tol, seed=budget.seed, progress=progress)
        for i, q in enumerate(layers):
            prob.omega[i] = omega(curv[q.node.inputs[1].name], info["err"][i])
    sens_s = time.perf_counter() - t0
    _drop_non_finite(prob, layers, budget)
    if budget.method == "hawq-v3":
        assign, solve = solve_ilp(prob, time_limit=budget.time_limit)
    else:
        var, G = clado_matrix(prob, single, pair, psd=budget.clado_psd)
        assign, solve = solve_clado(prob, var, G, time_limit=budget.time_limit)
    solve.update(extra, sensitivity_s=round(sens_s, 3))
    if "latency" in info:
        solve["latency_correction_ms"] = info["latency"]["correction_ms"]
    if not solve["optimal"]:
        import warnings
        warnings.warn(f"mixed precision ({budget.method}): HiGHS stopped at the time limit of "
                      f"{budget.time_limit:g} s with a feasible, possibly suboptimal assignment "
                      f"({solve['status']})", stacklevel=2)
    rows = []
    for i, (q, c) in enumerate(zip(layers, assign)):
        rows.append({"layer": q.node.provenance.module or q.node.name, "node": q.node.name,
                     "format": prob.choices[c],
                     "params": graph.constants[q.node.inputs[1].name].numel(),
                     "curvature": None if math.isnan(cv := float(curv[q.node.inputs[1].name]))
                     else cv,
                     "omega": float(prob.omega[i, c]), "fixed": q.fixed is not None,
                     **{k: float(prob.costs[k][i, c]) for k in prob.costs}})
    predicted = {"omega": prob.objective(assign),
                 **{k: prob.metric(k, assign) for k in prob.costs}}
    plan = PrecisionPlan(budget.method, {q.node.name: prob.choices[c]
                                         for q, c in zip(layers, assign)},
                         predicted, prob.limits, rows, solve, prob)
    graph.meta["mixed_precision"] = plan
    return graph
