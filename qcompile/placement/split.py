"""Latency placement by splitting the graph at its cut nodes and stitching exact segment plans.

DiviML's "splitting" scheduler (Ghannane & Abdelfattah, arXiv 2308.00127) solves the
exact MILP per module of a DNN and joins the results; the paper body is not public, so
everything below is our reconstruction (``shared/reference/peers.md`` §A.2–A.3).

*Cut nodes* are the nodes every source→sink path passes through: with a virtual source
``S`` before every source and a virtual sink ``T`` after every sink, the dominators of ``T``
that also post-dominate ``S`` (``networkx.immediate_dominators`` on the graph and on its
reverse). Sorted topologically, ``c_1 … c_k`` cut the nodes into *segments*: the prefix
before ``c_1``, the interior between ``c_j`` and ``c_{j+1}``, the suffix after ``c_k``.
Each segment is solved together with its boundary cut nodes.

Why stitching is exact (not a heuristic) in the :mod:`costgraph` model: an interior node
between ``c_j`` and ``c_{j+1}`` lies on some S→T path, which passes both cut nodes, so it is
a descendant of ``c_j`` and an ancestor of ``c_{j+1}``; no edge skips a cut node. Hence in
*every* schedule all earlier nodes have finished, and every device is idle, when ``c_j``
finishes, and nothing later starts before it. The makespan is therefore the sum of segment
lengths (from the finish of the entry cut node to the finish of the exit one), and a
segment's shortest length depends only on the devices ``a`` of its entry and ``b`` of its
exit cut node (the transfers across the cut included). A shortest path over the chain of
cut nodes, one state per device (a DP), gives the optimum.

Costs ``length(a, b)`` need one exact solve per (entry device, exit device): ``|D|²`` per
segment, because the next segment depends on the exit device. They are computed lazily: a
cheap lower bound stands in for every pair, the DP is run, the pairs on its best path that
are not yet solved are solved, and this repeats until the best path uses solved pairs only.
The bound is an *earliest-finish* relaxation: ``F(v, d) = cost(v, d) + max over
predecessors u of min over devices e of (F(u, e) + transfer(u→v, e, d))`` — the exact
optimum when devices never conflict (a chain, or parallel branches on distinct devices),
so on fork/join segments it is usually tight — and the interior's cheapest work spread
over the devices. A pair is *solved* when a plan for it meets its bound (a cheap plan
first: for segments made of parallel chains, each chain in turn by a chain DP that fits its
nodes around the busy intervals of the chains placed before it, else HEFT), or by the
segment solver. A plan is *proved optimal* when its makespan meets the DP over all pairs'
proved lower bounds (solved pairs' bounds, unsolved pairs' relaxations); that is what
``status == "optimal"`` reports.

Residual edges: an edge straight from a segment's entry to its exit (``x + f(x)``) only
makes the exit wait for one transfer, a constant once ``a`` and ``b`` are fixed. The segment
is solved without that edge — which usually exposes more cut nodes inside it, so it is
split again, recursively — and the exit start becomes ``max(start, transfer)``; the
segment's other nodes are unaffected, so this stays exact.

Repeated blocks: a segment is keyed by its structure in topological order (node costs,
``mem``, optional ``op`` attribute, edge bytes, side inputs; the entry node's own cost is
irrelevant); segments with equal keys share their solves, remapped node by node.

Side inputs (an attention mask, rotary tables, position ids: computed once from a model
input and consumed by every layer). Their long edges skip every layer boundary, so no node
inside the layers is a cut node (MiniLM-L6 on a phone: 6 cut nodes, all in the head, and a
66-node first segment). :func:`split_points` picks a *side set* ``Σ``: the nodes that
descend only from some of the sources (``Σ`` is closed under predecessors and holds no
sink), chosen among single sources, all-but-one sources and greedy unions by how much the
largest segment shrinks. The cut nodes are those of the graph without ``Σ`` that every node
of ``Σ`` reaches, so ``Σ`` lands in the prefix — unrestricted there: each of its nodes is an
ancestor of the first cut node and must finish before it starts in any schedule. A *side
edge* ``p → w`` from ``Σ`` into a later segment is the one thing that skips cut nodes:

* It is *dropped, exactly,* when it can never bind: when its largest possible transfer is
  at most the longest min-cost path from ``p`` to ``w`` over the edges the segments keep
  (``w`` starts no earlier than that after ``p`` finishes in any stitched schedule). On
  MiniLM and a 16-layer Llama only the next one to three layers' edges are kept.
* The graph without the kept side edges is a relaxation that splits exactly at the same
  cut nodes: its DP is a proved lower bound, and its plan, re-timed on the real graph, is
  the first candidate. On MiniLM and Llama it meets the bound: proved optimal.
* Otherwise, when the segments up to the last kept edge's consumer hold at most
  ``PREFIX_ABSORB_MAX`` nodes, the first cut node moves past them: the prefix is solved
  whole, no side edge is left, and the DP is exact again.
* Otherwise (a heuristic, the one place exactness is lost): the devices ``σ`` of the
  producers with kept edges are enumerated (at most ``SIDE_COMBOS_MAX`` combinations, else
  the incumbent's devices), each combination a DP with the producers pinned in the prefix
  and each kept edge a release time of its consumer on each device ``y``: ``max(0,
  finish(p) + transfer(σ(p) → y) − segment start)``, with both times from the incumbent
  plan, or (a second variant) the transfer itself, which assumes ``p`` finished at the
  segment start; the best combination is redone with its own times; HEFT is a candidate
  too. Each release is a virtual source alone on a virtual device whose link to ``y``
  takes that time. These models only propose assignments: every plan is re-timed on the
  real graph, and the bound stays the relaxation's, so the status is ``"heuristic"`` (or
  ``"time_limit"``) with a gap, never a wrong ``"optimal"``.

Every plan ``solve`` returns is a true schedule of the problem: the stitched assignment and
order are re-timed on the whole graph (:func:`costgraph.schedule_in_order`, and
:func:`costgraph.evaluate` if better).

Time: ``time_limit`` bounds the call. Each segment solve gets a share of what is left
(``remaining / (pairs still to solve on the current path + 1)``); a solve cut short keeps
its proved bound, and once the time is spent the remaining pairs take their cheap plans.
The default segment solver is a portfolio: brute force up to ``BRUTE_MAX_NODES`` nodes,
else CP-SAT and HiGHS in turns with doubling budgets (``PORTFOLIO_FIRST_S`` for CP-SAT,
then twice that for HiGHS, …) until one proves optimality or the share is spent — either
solver alone has instances the other solves 50x faster (a 20-node fork/join segment of
``benchmarks/placement.py``'s ``synthetic()``: CP-SAT no proof in 60 s, HiGHS 0.8 s; a
19-node Llama prefix: CP-SAT 0.02 s, HiGHS over 10 s). Without ``time_limit`` the turns go on
until one proves optimality, so ``solve`` stays exact.

Memory limits couple all segments, which the DP cannot see. The plan without memory limits
is a lower bound; when it also meets the limits it is optimal. Otherwise ``solve`` falls
back to :func:`milp.solve` on the whole graph (under ``time_limit``; exact but slow without
one) and reports ``info["memory_fallback"] = True``, keeping the better of the two lower
bounds.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Hashable

import networkx as nx

from qcompile.errors import ConfigError, QCompileError
from qcompile.placement import brute, heuristics, milp
from qcompile.placement.bound import lower_bound
from qcompile.placement.costgraph import INF, Device, Link, Plan, Problem, evaluate, schedule_in_order

__all__ = ["solve", "cut_nodes", "split_points", "segments"]

#: segments with at most this many nodes (boundary included) go to brute force: on random
#: 4-device segments it took 1.5–6 ms at 7–8 nodes where the MILP took 14–30 ms, and was
#: slower from 10 nodes on
BRUTE_MAX_NODES = 8
#: side producers' device combinations enumerated at most (beyond: the relaxed plan's devices)
SIDE_COMBOS_MAX = 27
#: a prefix grown past binding side edges' consumers is solved whole up to this many nodes
PREFIX_ABSORB_MAX = 24
#: the portfolio's first CP-SAT budget in seconds; HiGHS then gets twice that, and so on
PORTFOLIO_FIRST_S = 1.0
_START = object()         # the device "state" before the first and after the last segment


def _le(x: float, y: float) -> bool:
    """``x <= y`` up to floating-point noise (relative 1e-9)."""
    return x <= y + 1e-9 * max(abs(x), abs(y)) + 1e-15


# -- cut nodes, side inputs, segments ---------------------------------------------------------
def _dominator_cuts(g: nx.DiGraph, index: dict) -> list:
    h = nx.DiGraph(g.edges)
    h.add_nodes_from(g)
    src, snk = object(), object()
    h.add_edges_from((src, v) for v in g if g.in_degree(v) == 0)
    h.add_edges_from((v, snk) for v in g if g.out_degree(v) == 0)
    dom = nx.immediate_dominators(h, src)
    pdom = nx.immediate_dominators(h.reverse(copy=False), snk)
    dominators, v = set(), snk
    while v is not src:
        v = dom[v]
        dominators.add(v)
    post, v = set(), src
    while v is not snk:
        v = pdom[v]
        post.add(v)
    cuts = (dominators & post) - {src, snk}
    return sorted(cuts, key=index.__getitem__)


def cut_nodes(problem: Problem) -> list:
    """The nodes on every source→sink path, in topological order."""
    return _dominator_cuts(problem.graph, problem.index)


def _largest_segment(problem: Problem, cuts: list) -> int:
    """Nodes of the largest segment, boundary cut nodes included."""
    where = set(cuts)
    sizes, n = [], 0
    for v in problem.order:
        if v in where:
            sizes.append(n + 1 + bool(sizes))
            n = 0
        else:
            n += 1
    sizes.append(n + bool(sizes))
    return max(sizes)


def _hosted(g: nx.DiGraph, side: frozenset, cuts: list) -> list:
    """The cut nodes that every node of ``side`` reaches (a suffix of ``cuts``: each cut node
    reaches the next)."""
    lo, hi = 0, len(cuts)
    while lo < hi:
        mid = (lo + hi) // 2
        if side <= nx.ancestors(g, cuts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return cuts[lo:]


def split_points(problem: Problem) -> tuple[frozenset, list]:
    """The side set ``Σ`` (empty when side inputs do not help) and the cut nodes to split at.

    ``Σ`` holds the nodes that descend only from a subset ``A`` of the sources; candidates
    are each single source, all sources but one, and greedy unions of single sources; one is
    taken when it makes the largest segment smaller (ties: the smaller ``Σ``). The cut nodes
    are those of the graph without ``Σ`` that every node of ``Σ`` reaches."""
    g, order = problem.graph, problem.order
    base = cut_nodes(problem)
    best = (_largest_segment(problem, base), 0, frozenset(), base)
    sources = [v for v in order if g.in_degree(v) == 0]
    if not 2 <= len(sources) <= 16:
        return best[2], best[3]
    bit, reach = {v: 1 << i for i, v in enumerate(sources)}, {}
    for v in order:
        m = bit.get(v, 0)
        for u in g.predecessors(v):
            m |= reach[u]
        reach[v] = m
    tried: dict = {}

    def score(mask):
        if mask not in tried:
            side = frozenset(v for v in order if reach[v] & ~mask == 0)
            res = None
            if side and len(side) < len(order) and not any(g.out_degree(v) == 0 for v in side):
                rest = g.subgraph([v for v in order if v not in side])
                cuts = _hosted(g, side, _dominator_cuts(rest, problem.index))
                if cuts:
                    res = (_largest_segment(problem, cuts), len(side), side, cuts)
            tried[mask] = res
        return tried[mask]

    full = (1 << len(sources)) - 1
    singles = [1 << i for i in range(len(sources))]
    for mask in singles + [full & ~s for s in singles]:
        r = score(mask)
        if r is not None and r[:2] < best[:2]:
            best = r
    mask, here = 0, (INF,)
    while True:                      # greedy unions of single sources
        step = None
        for s in singles:
            if not mask & s and (mask | s) != full:
                r = score(mask | s)
                if r is not None and (step is None or r[:2] < step[1][:2]):
                    step = (mask | s, r)
        if step is None or step[1][:2] >= here[:2]:
            break
        mask, here = step[0], step[1]
        if here[:2] < best[:2]:
            best = here
    return best[2], best[3]


@dataclass
class _Segment:
    entry: Hashable | None          # cut node before (None for the prefix)
    exit: Hashable | None           # cut node after (None for the suffix)
    interior: list                  # the nodes strictly between, topological order
    key: tuple = ()
    fixed: tuple = ()               # ((node, device), …): side producers pinned to a device
    sides: tuple = ()               # ((consumer, release per device), …): kept side edges

    @property
    def nodes(self) -> list:
        return ([] if self.entry is None else [self.entry]) + self.interior + \
            ([] if self.exit is None else [self.exit])


def segments(problem: Problem, cuts: list) -> list[_Segment]:
    """Split the nodes at ``cuts`` (from :func:`cut_nodes` or :func:`split_points`):
    ``len(cuts) + 1`` segments; side nodes, which precede the first cut, are in the prefix."""
    bounds = [None, *cuts, None]
    where = {c: j for j, c in enumerate(cuts)}
    inner: list[list] = [[] for _ in range(len(cuts) + 1)]
    seen = 0
    for v in problem.order:          # cut nodes are in topological order, so this is a sweep
        if v in where:
            seen = where[v] + 1
        else:
            inner[seen].append(v)
    segs = [_Segment(bounds[j], bounds[j + 1], inner[j]) for j in range(len(cuts) + 1)]
    for s in segs:
        s.key = _key(problem, s)
    return segs


def _key(problem: Problem, seg: _Segment) -> tuple:
    """Equal keys ⇔ the segments are the same sub-problem, node ``i`` for node ``i``."""
    g, nodes, fixed = problem.graph, seg.nodes, dict(seg.fixed)
    pos = {v: i for i, v in enumerate(nodes)}
    sig = [("entry",)] if seg.entry is not None else []
    sig += [(tuple(problem.cost(v, d) if fixed.get(v, d) == d else INF for d in problem.names),
             problem.mem(v), g.nodes[v].get("op")) for v in nodes[len(sig):]]
    edges = sorted((pos[u], pos[w], float(b)) for u in nodes for w, b in g.adj[u].items()
                   if w in pos for b in [b.get("bytes", 0.0)])
    sides = tuple((pos[w], rel) for w, rel in seg.sides)
    return (seg.entry is not None, seg.exit is not None, tuple(sig), tuple(edges), sides)


def _subproblem(problem: Problem, seg: _Segment, a: str | None, b: str | None) -> Problem:
    """The segment with its entry cut node done on ``a`` at time 0 and its exit on ``b``,
    without a direct entry→exit edge (the caller adds that transfer back), its pinned side
    producers on their devices, and per kept side edge a virtual source, numbered after the
    real nodes, alone on a virtual device whose link to device ``y`` takes the edge's
    release time on ``y``; nodes are named by position, so equal keys give equal
    sub-problems."""
    g, nodes, fixed = problem.graph, seg.nodes, dict(seg.fixed)
    h = nx.DiGraph()
    for i, v in enumerate(nodes):
        if v == seg.entry:
            cost = {a: 0.0}
        elif v == seg.exit:
            cost = {b: problem.cost(v, b)}
        elif v in fixed:
            cost = {fixed[v]: problem.cost(v, fixed[v])}
        else:
            cost = dict(g.nodes[v]["cost"])
        h.add_node(i, cost=cost, mem=problem.mem(v), op=g.nodes[v].get("op"))
    pos = {v: i for i, v in enumerate(nodes)}
    for u in nodes:
        for w, data in g.adj[u].items():
            if w in pos and not (u == seg.entry and w == seg.exit):
                h.add_edge(pos[u], pos[w], bytes=float(data.get("bytes", 0.0)))
    devices, links = [Device(n) for n in problem.names], dict(problem.links)
    for k, (w, rel) in enumerate(seg.sides):
        virtual = _virtual_device(problem, k)
        devices.append(Device(virtual))
        links.update({(virtual, y): Link(r, INF) for y, r in zip(problem.names, rel)})
        h.add_node(len(nodes) + k, cost={virtual: 0.0}, mem=0.0, op="side")
        h.add_edge(len(nodes) + k, pos[w], bytes=0.0)
    return Problem(h, devices, links, problem.default_link)


def _virtual_device(problem: Problem, k: int) -> str:
    name = f"side{k}"
    while name in problem.names:
        name = "~" + name
    return name


# -- bounds and cheap plans -------------------------------------------------------------------
def _forward(problem: Problem, seg: _Segment, a: str | None) -> dict:
    """Earliest-finish relaxation ``F[v][d]`` over the segment's nodes (entry on ``a`` at 0;
    see the module docstring). Edges from outside the segment are side edges: the dropped
    ones never bind, the kept ones enter as ``sides``."""
    g, fixed = problem.graph, dict(seg.fixed)
    side_in: dict = {}
    for w, rel in seg.sides:
        side_in.setdefault(w, []).append(dict(zip(problem.names, rel)))
    F: dict = {}
    for v in seg.nodes:
        if v == seg.entry:
            F[v] = {a: 0.0}
            continue
        out = {}
        for d in ([fixed[v]] if v in fixed else problem.capable(v)):
            t = 0.0
            for u in g.predecessors(v):
                if u in F:
                    t = max(t, min(f + problem.transfer(u, v, e, d) for e, f in F[u].items()))
            for rel in side_in.get(v, ()):
                t = max(t, rel[d])
            out[d] = t + problem.cost(v, d)
        F[v] = out
    return F


def _segment_bound(problem: Problem, seg: _Segment, F: dict, b: str | None) -> float:
    fixed = dict(seg.fixed)
    ends = [min(f.values()) for v, f in F.items() if v != seg.exit]
    inner = [v for v in seg.nodes if v != seg.entry and v != seg.exit]
    work = sum(problem.cost(v, fixed[v]) if v in fixed else problem.min_cost(v) for v in inner)
    work /= len(problem.names)
    if seg.exit is not None:
        ends.append(F[seg.exit][b])
        work += problem.cost(seg.exit, b)
    return max(max(ends, default=0.0), work)


def _earliest(busy: list, ready: float, dur: float) -> float:
    """The earliest start ``>= ready`` of a ``dur``-long job among sorted busy intervals."""
    s = ready
    for bs, bf in busy:
        if bf <= s:
            continue
        if bs >= s + dur:
            break
        s = bf
    return s


def _chains(sub: Problem, entry: int, exit_: int) -> list[list] | None:
    """The interior as parallel chains entry → … → exit, or None for another shape."""
    g = sub.graph
    inner = [v for v in sub.order if v not in (entry, exit_)]
    if not inner or any(g.in_degree(v) != 1 or g.out_degree(v) != 1 for v in inner):
        return None
    chains = []
    for v in g.successors(entry):
        if v == exit_:
            continue
        c = [v]
        while True:
            (w,) = g.successors(c[-1])
            if w == exit_:
                break
            c.append(w)
        chains.append(c)
    if sum(map(len, chains)) != len(inner):
        return None
    return chains


def _fit_chains(sub: Problem, entry: int, exit_: int, chains: list[list]) -> Plan:
    """Chains placed one after another, each by a chain DP (earliest finish per device) that
    fits its nodes into the gaps the chains before it left; the best of a few chain orders."""
    a, b = sub.capable(entry)[0], sub.capable(exit_)[0]

    def place(c, busy):
        states, prev = {a: (0.0, ())}, entry
        for v in c:
            nxt = {}
            for d in sub.capable(v):
                dur = sub.cost(v, d)
                best = None
                for e, (f, sched) in states.items():
                    s = _earliest(busy[d], f + sub.transfer(prev, v, e, d), dur)
                    if best is None or s + dur < best[0]:
                        best = (s + dur, sched + ((v, d, s),))
                nxt[d] = best
            states, prev = nxt, v
        return min((f + sub.transfer(prev, exit_, e, b), sched) for e, (f, sched) in states.items())

    free = {d: [] for d in sub.names}
    alone = [place(c, free)[0] for c in chains]
    by_length = sorted(range(len(chains)), key=lambda i: -alone[i])
    orders = [[i] + [k for k in by_length if k != i] for i in by_length[:4]]
    best = None
    for order in orders:
        busy = {d: [] for d in sub.names}
        end, placed = 0.0, []
        for i in order:
            t, sched = place(chains[i], busy)
            end = max(end, t)
            for v, d, s in sched:
                if sub.cost(v, d) > 0:
                    bisect.insort(busy[d], (s, s + sub.cost(v, d)))
            placed += sched
        if best is None or end < best[0]:
            best = (end, placed)
    assignment = {entry: a, exit_: b}
    start = {entry: 0.0}
    for v, d, s in best[1]:
        assignment[v], start[v] = d, s
    order = sorted(start, key=lambda v: (start[v], sub.index[v])) + [exit_]
    return schedule_in_order(sub, assignment, order, solver="chains")


def _cheap_plan(sub: Problem, entry: int | None, exit_: int | None) -> Plan:
    """A quick feasible plan of a segment: chain fitting for parallel chains, else HEFT."""
    chains = _chains(sub, entry, exit_) if entry is not None and exit_ is not None else None
    plan = _fit_chains(sub, entry, exit_, chains) if chains else heuristics.heft(sub)
    plan.status = "heuristic"
    return plan


# -- the segment solver -------------------------------------------------------------------------
def _default_segment_solver(sub: Problem, time_limit: float | None = None) -> Plan:
    """Brute force up to ``BRUTE_MAX_NODES`` nodes (faster there, measured); else CP-SAT and
    HiGHS in turns with doubling budgets (see the module docstring) where OR-Tools is
    installed, else the HiGHS MILP alone."""
    if len(sub.order) <= BRUTE_MAX_NODES:
        return brute.solve(sub)
    from qcompile.placement import cpsat
    if not cpsat.available():
        return milp.solve(sub, time_limit=time_limit)
    t0 = time.perf_counter()
    best, lower, turns, budget = None, 0.0, [], PORTFOLIO_FIRST_S
    for solver in itertools.cycle((cpsat.solve, milp.solve)):
        left = None if time_limit is None else time_limit - (time.perf_counter() - t0)
        if left is not None and left <= 1e-3 and best is not None:
            break
        t1 = time.perf_counter()
        try:                         # segments have no memory limits: no infeasibility here
            plan = solver(sub, time_limit=budget if left is None else max(1e-3, min(budget, left)))
        except QCompileError:        # no plan within the budget
            plan = None
        if plan is not None:
            turns.append((plan.solver, plan.status, round(time.perf_counter() - t1, 4)))
            if plan.status == "optimal":
                plan.info = {**plan.info, "portfolio": turns}
                plan.solve_s = time.perf_counter() - t0
                return plan
            lower = max(lower, plan.lower_bound)
            if best is None or plan.makespan < best.makespan:
                best = plan
            if _le(best.makespan, lower):
                break
        budget *= 2
    best.lower_bound = min(best.makespan, lower)
    best.status = "optimal" if _le(best.makespan, lower) else "time_limit"
    best.info = {**best.info, "portfolio": turns}
    best.solve_s = time.perf_counter() - t0
    return best


@dataclass
class _Solved:
    """A segment's best length for one (entry, exit) device pair, by node position."""

    length: float
    lower: float
    exact: bool
    devices: list                   # device of each node (virtual side sources included)
    order: list                     # positions in schedule order


class _Splitter:
    """The state shared by one call and its nested calls: the solver, the deadline, the
    cache of solved segments (keys carry all the data, so nested problems share it)."""

    def __init__(self, solver, time_limit, certify: bool):
        self.solver, self.certify = solver, certify
        self.t0 = time.perf_counter()
        self.deadline = None if time_limit is None else self.t0 + time_limit
        self.solved: dict = {}
        self.bounds: dict = {}
        self.forwards: dict = {}
        self.records: list = []
        self.cut_short = False       # a solve was cut short by the time limit

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(1e-3, self.deadline - time.perf_counter())

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    # -- one problem: side inputs, worlds, DP ---------------------------------------------------
    def run(self, problem: Problem) -> tuple[Plan, float, dict]:
        """The best plan found (a true schedule of ``problem``), a proved lower bound on its
        optimum, and counts."""
        side, cuts = split_points(problem)
        if not cuts:
            plan, lower = self.whole(problem)
            return plan, lower, {"cut_nodes": 0, "segments": 1, "unique_segments": 1, "inner": plan.info}
        segs = segments(problem, cuts)
        info = {"cut_nodes": len(cuts), "segments": len(segs), "unique_segments": len({s.key for s in segs})}
        kept = self.side_edges(problem, side, segs, info) if side else []
        total, path, lower = self.dp(problem, segs)
        best = self.stitch(problem, segs, path)
        info.update(stitched_makespan=total)
        if kept and not _le(best.makespan, lower) and not self.out_of_time():
            # Kept side edges bind. Move the first cut node past their consumers when the
            # prefix stays small: then no side edge is left to model, and the DP is exact.
            m = max(e[2] for e in kept)
            if sum(len(s.nodes) for s in segs[:m + 1]) - m <= PREFIX_ABSORB_MAX:
                info["side_absorbed"] = m
                if m == len(cuts):
                    plan, low = self.whole(problem)
                    segs, kept = [], []
                else:
                    segs = segments(problem, cuts[m:])
                    kept = self.side_edges(problem, side, segs, {})
                    t2, p2, low = self.dp(problem, segs)
                    plan = self.stitch(problem, segs, p2)
                    info.update(cut_nodes=len(cuts) - m, segments=len(segs),
                                unique_segments=len({s.key for s in segs}))
                    if plan.makespan < best.makespan:
                        info["stitched_makespan"] = t2
                lower = max(lower, low)      # a relaxation's bound (exact when kept is empty)
                if plan.makespan < best.makespan:
                    best = plan
            if kept and not _le(best.makespan, lower):
                best = self.side_worlds(problem, segs, kept, best, info)
        return best, lower, info

    def side_worlds(self, problem: Problem, segs: list, kept: list, best: Plan, info: dict) -> Plan:
        """Better plans when kept side edges bind: the producers' devices enumerated, each
        combination a DP whose side inputs arrive when the incumbent plan says, and one where
        they arrive at the segment start plus the transfer (the producer finished before; an
        upper bound); the best one again with its own timings; and HEFT. These are models to
        find assignments, not bounds: every plan is re-timed on the real graph."""
        producers = sorted({e[0] for e in kept}, key=problem.index.__getitem__)
        mine = tuple(best.assignment[p] for p in producers)
        combos = list(itertools.product(*(problem.capable(p) for p in producers)))
        combos = [mine] + [c for c in combos if c != mine] if len(combos) <= SIDE_COMBOS_MAX else [mine]
        tried, chosen = 0, None
        for sigma, upper in [(c, u) for c in combos for u in (False, True)] + [(None, False)] * 2:
            if self.out_of_time():
                break
            if sigma is None:        # refine the best one with its own timings
                if chosen is None:
                    break
                sigma = chosen
            world = _world(problem, segs, kept, dict(zip(producers, sigma)), best, upper)
            found = self.dp(problem, world, cutoff=INF if upper else best.makespan)
            tried += 1
            if found is not None:
                plan = self.stitch(problem, world, found[1])
                if plan.makespan < best.makespan:
                    best, chosen = plan, sigma
                    info.update(stitched_makespan=found[0], side_devices=dict(zip(producers, sigma)))
        info["side_combinations"] = tried
        other = heuristics.heft(problem)
        if other.makespan < best.makespan:
            best = other
            info["side_heft"] = True
        best.solver = "split"
        return best

    def side_edges(self, problem: Problem, side: frozenset, segs: list, info: dict) -> list:
        """Side edges into later segments: ``(p, w, segment, bytes, slack)`` for those that
        can bind (``slack``: the min-cost path length from ``p`` to ``w``); the others are dropped."""
        g = problem.graph
        where = {}
        for j, s in enumerate(segs):
            for v in s.interior:
                where[v] = j
            if s.exit is not None:
                where[s.exit] = j
        edges = [(p, w) for p in side for w in g.successors(p) if w not in side and where[w] >= 1]
        skip = set(edges)
        kept = []
        for p in sorted({p for p, _ in edges}, key=problem.index.__getitem__):
            # the longest min-cost path p ⇝ w over the edges the segments keep (through the
            # first cut node), so that it holds in every stitched schedule
            est = {p: 0.0}
            for v in problem.order[problem.index[p] + 1:]:
                reach = [est[u] + (problem.min_cost(u) if u != p else 0.0)
                         for u in g.predecessors(v) if u in est and (u, v) not in skip]
                if reach:
                    est[v] = max(reach)
            for q, w in edges:
                if q == p:
                    worst = max(problem.transfer(p, w, x, y)
                                for x in problem.capable(p) for y in problem.capable(w))
                    if not _le(worst, est[w]):
                        kept.append((p, w, where[w], float(g.edges[p, w].get("bytes", 0.0)), est[w]))
        info.update(side_nodes=len(side), side_edges=len(edges), side_edges_kept=len(kept))
        return kept

    def dp(self, problem: Problem, segs: list, cutoff: float = INF):
        """Lazy DP over the cut nodes' devices: ``(total, path, proved lower bound)``, or None
        once the best path's value reaches ``cutoff``."""
        layers = [[_START]] + [problem.capable(s.exit) for s in segs[:-1]] + [[_START]]

        def pair(j, a, b):
            return segs[j].key, (None if a is _START else a), (None if b is _START else b)

        def bound(j, a, b):
            k = pair(j, a, b)
            if k not in self.bounds:
                fk = (k[0], k[1])
                if fk not in self.forwards:
                    self.forwards[fk] = _forward(problem, segs[j], k[1])
                self.bounds[k] = _segment_bound(problem, segs[j], self.forwards[fk], k[2])
            return self.bounds[k]

        def current(j, a, b):
            s = self.solved.get(pair(j, a, b))
            return bound(j, a, b) if s is None else s.length

        def lower(j, a, b):
            s = self.solved.get(pair(j, a, b))
            return bound(j, a, b) if s is None else max(s.lower, bound(j, a, b))

        while True:
            total, path = _best_path(layers, current)
            if total >= cutoff:
                return None
            todo = [j for j in range(len(segs)) if pair(j, path[j], path[j + 1]) not in self.solved]
            if not todo:
                break
            for i, j in enumerate(todo):
                k = pair(j, path[j], path[j + 1])
                if k not in self.solved:          # a repeated block met earlier on this path
                    self.solved[k] = self.segment(problem, segs[j], k[1], k[2],
                                                  bound(j, path[j], path[j + 1]), len(todo) - i)
        return total, path, _best_path(layers, lower)[0]

    def stitch(self, problem: Problem, segs: list, path: list) -> Plan:
        """The plan of the DP path, re-timed on the real graph (side edges included)."""
        assignment, order = {}, []
        for j, seg in enumerate(segs):
            a, b = path[j], path[j + 1]
            sol = self.solved[seg.key, None if a is _START else a, None if b is _START else b]
            nodes = seg.nodes
            for i, v in enumerate(nodes):
                assignment[v] = sol.devices[i]
            order += [nodes[i] for i in sol.order if i < len(nodes) and (i or seg.entry is None)]
        plan = schedule_in_order(problem, assignment, order, solver="split")
        listed = evaluate(problem, assignment)
        if listed.makespan < plan.makespan:
            plan = listed
        plan.solver = "split"
        return plan

    # -- solving one piece ------------------------------------------------------------------------
    def call_solver(self, sub: Problem, share: int) -> Plan | None:
        left = self.remaining()
        try:
            return self.solver(sub, time_limit=None if left is None else left / (share + 1))
        except ConfigError:
            raise
        except QCompileError:        # no plan within the budget
            return None

    def whole(self, problem: Problem) -> tuple[Plan, float]:
        """A problem with no cut node: the segment solver on all of it."""
        seg = _Segment(None, None, list(problem.order))
        bound = _segment_bound(problem, seg, _forward(problem, seg, None), None)
        cheap = heuristics.heft(problem) if self.certify else None
        if cheap is not None and _le(cheap.makespan, bound):
            cheap.status = "optimal"
            return cheap, cheap.makespan
        plan = None if self.out_of_time() else self.call_solver(problem, 0)
        if plan is None or (cheap is not None and cheap.makespan < plan.makespan):
            lower = plan.lower_bound if plan is not None else 0.0
            plan = cheap or heuristics.heft(problem)
            plan.lower_bound = lower
        lower = max(bound, plan.lower_bound)
        if plan.status == "optimal":
            lower = plan.makespan
        elif not _le(plan.makespan, lower):
            self.cut_short = True
        return plan, lower

    def segment(self, problem: Problem, seg: _Segment, a: str | None, b: str | None, bound: float,
                share: int) -> _Solved:
        if not seg.interior and not seg.sides:   # closed form: the exit runs right after the entry
            if seg.exit is None:
                t, devs = 0.0, [a]
            elif seg.entry is None:
                t, devs = problem.cost(seg.exit, b), [b]
            else:
                t = problem.transfer(seg.entry, seg.exit, a, b) + problem.cost(seg.exit, b)
                devs = [a, b]
            return _Solved(t, t, True, devs, list(range(len(devs))))
        t1 = time.perf_counter()
        sub = _subproblem(problem, seg, a, b)
        n = len(seg.nodes)
        entry, exit_ = (0 if seg.entry is not None else None), (n - 1 if seg.exit is not None else None)
        if seg.entry is not None and seg.exit is not None and problem.graph.has_edge(seg.entry, seg.exit):
            # A residual edge entry→exit only delays the exit to ``transfer``: drop it and
            # split what is left (it often has cut nodes of its own), then add it back.
            plan, lower, _ = self.run(sub)
            wait = problem.transfer(seg.entry, seg.exit, a, b)
            length = max(plan.start[exit_], wait) + problem.cost(seg.exit, b)
            # the sub-problem's bound holds with the edge too, and the exit waits for it
            lower = max(lower, wait + problem.cost(seg.exit, b), bound)
            exact = _le(length, lower)
            lower = length if exact else min(lower, length)
        else:
            how, status = None, None
            plan = _cheap_plan(sub, entry, exit_) if self.certify else None
            if plan is not None and _le(plan.makespan, bound):
                how, status, lower = "bound", "optimal", plan.makespan
            elif self.out_of_time():
                plan = plan or _cheap_plan(sub, entry, exit_)
                how, status, lower = plan.solver, "time_limit", bound
            else:
                solved = self.call_solver(sub, share)
                if solved is None:
                    plan = plan or _cheap_plan(sub, entry, exit_)
                    how, status, lower = plan.solver, "time_limit", bound
                else:
                    how, status = solved.solver, solved.status
                    lower = max(bound, solved.lower_bound)
                    if plan is None or solved.makespan <= plan.makespan:
                        plan = solved
                    if solved.status == "optimal":
                        lower = plan.makespan
            length = plan.makespan
            exact = status == "optimal" or _le(length, lower)
            lower = length if exact else min(lower, length)
            if not exact:
                self.cut_short = True
            self.records.append({"segment": _digest(seg.key), "nodes": len(sub.order), "entry": a, "exit": b,
                                 "solver": how, "status": status, "solve_s": time.perf_counter() - t1})
        by_start = sorted(sub.order, key=lambda i: (plan.start[i], plan.finish[i], i))
        rank = {v: r for r, v in enumerate(by_start)}
        order = list(nx.lexicographical_topological_sort(sub.graph, key=rank.__getitem__))
        return _Solved(length, lower, exact, [plan.assignment[i] for i in range(len(sub.order))], order)


def _world(problem: Problem, segs: list, kept: list, sigma: dict, ref: Plan, upper: bool) -> list:
    """The segments with the side producers pinned to ``sigma`` in the prefix, and each side
    edge that can still bind from there as a release time of its consumer: on device ``y``,
    ``max(0, finish(p) + transfer(σ(p) → y) − start of the segment)`` with ``finish(p)`` and
    the segment's start taken from the plan ``ref``, or (``upper``) the transfer itself."""
    out = []
    for j, s in enumerate(segs):
        sides = []
        for p, w, jj, nb, slack in kept:
            if jj != j:
                continue
            tr = [problem.transfer(p, w, sigma[p], y) for y in problem.names]
            if _le(max(t for t, y in zip(tr, problem.names) if problem.cost(w, y) < INF), slack):
                continue             # cannot bind with p on sigma[p]
            lag = 0.0 if upper else ref.finish[s.entry] - ref.finish[p]
            rel = tuple(max(0.0, t - lag) for t in tr)
            if any(r > 0 for r in rel):
                sides.append((w, rel))
        fixed = tuple((p, d) for p, d in sigma.items()) if j == 0 else ()
        new = _Segment(s.entry, s.exit, s.interior, fixed=fixed, sides=tuple(sides))
        new.key = _key(problem, new)
        out.append(new)
    return out


def _best_path(layers: list[list], weight: Callable) -> tuple[float, list]:
    """Shortest path through ``layers`` of device states; ``weight(j, a, b)`` is segment
    ``j``'s length from state ``a`` in layer ``j`` to ``b`` in layer ``j + 1``."""
    dist = {_START: 0.0}
    back = []
    for j in range(len(layers) - 1):
        nxt, arg = {}, {}
        for b in layers[j + 1]:
            best, how = INF, None
            for a, da in dist.items():
                w = da + weight(j, a, b)
                if w < best:
                    best, how = w, a
            nxt[b], arg[b] = best, how
        dist = nxt
        back.append(arg)
    path = [_START]
    for arg in reversed(back):
        path.append(arg[path[-1]])
    return dist[_START], path[::-1]


def solve(problem: Problem, *, time_limit: float | None = None,
          segment_solver: Callable | None = None) -> Plan:
    """Minimise the makespan by splitting at cut nodes (see the module docstring).

    ``segment_solver(sub_problem, time_limit=seconds) -> Plan`` solves one segment exactly
    (default: brute force up to ``BRUTE_MAX_NODES`` nodes, else a CP-SAT/HiGHS portfolio;
    with the default, segments whose cheap plan meets their lower bound skip the solver).
    ``time_limit`` bounds the whole call. ``status`` is ``"optimal"`` only when the plan's
    makespan meets a proved lower bound; else ``"time_limit"`` when a segment solve was cut
    short, or ``"heuristic"`` (side edges modelled conservatively left a gap). The makespan
    is always that of a true schedule of ``problem``; ``lower_bound`` is proved.

    ``info``: ``cut_nodes``, ``segments`` and ``unique_segments`` (top level); with side
    inputs ``side_nodes``, ``side_edges``, ``side_edges_kept`` and ``side_combinations``;
    ``segment_solves`` (one record per segment solve, nested segments included: nodes,
    entry/exit devices, solver — ``"bound"`` when a cheap plan met the bound —, status,
    seconds); ``stitched_makespan`` (the DP's sum: the makespan, or an upper bound on it
    with kept side edges); ``proved``; and ``memory_fallback`` when the memory limits forced
    a whole-graph MILP.
    """
    if time_limit is not None and not time_limit > 0:
        raise ConfigError(f"time_limit must be > 0 seconds, got {time_limit!r}", hint="or None for no limit")
    splitter = _Splitter(segment_solver or _default_segment_solver, time_limit,
                         certify=segment_solver is None)
    limited = any(problem.memory(d) < INF for d in problem.names)
    relaxed = Problem(problem.graph, [Device(n) for n in problem.names], problem.links,
                      problem.default_link) if limited else problem
    plan, lower, info = splitter.run(relaxed)
    info["segment_solves"] = splitter.records
    proved = _le(plan.makespan, lower)
    plan.status = "optimal" if proved else "time_limit" if splitter.cut_short else "heuristic"
    if _over_memory(problem, plan.assignment):
        # The memory-free optimum breaks a limit, and the DP cannot see memory: solve the
        # whole graph with memory; the memory-free result still bounds it from below.
        fallback = milp.solve(problem, time_limit=splitter.remaining())
        fallback.info = {**info, "memory_fallback": True, "relaxed_makespan": plan.makespan,
                         "inner": fallback.info}
        plan, lower = fallback, max(fallback.lower_bound, min(lower, plan.makespan))
        proved = plan.status == "optimal" or _le(plan.makespan, lower)
        plan.status = "optimal" if proved else "time_limit"
    else:
        plan.info = info
    plan.info["proved"] = proved
    plan.solver = "split"
    plan.solve_s = time.perf_counter() - splitter.t0
    plan.lower_bound = plan.makespan if proved else min(plan.makespan, max(lower, lower_bound(problem)))
    return plan


def _over_memory(problem: Problem, assignment: dict) -> bool:
    used = dict.fromkeys(problem.names, 0.0)
    for v, d in assignment.items():
        used[d] += problem.mem(v)
    return any(used[d] > problem.memory(d) for d in problem.names)


def _digest(key: tuple) -> str:
    return hashlib.sha1(repr(key).encode()).hexdigest()[:10]
