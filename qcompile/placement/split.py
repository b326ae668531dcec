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
cut nodes, one state per device (a DP), gives the optimum. So, without memory limits and
time limits, ``split.solve`` is optimal; DiviML's modularity-based splitting may also cut
where no cut node is, which can lose optimality — we do not.

Costs ``length(a, b)`` need one exact solve per (entry device, exit device): ``|D|²`` per
segment, not ``|D|``, because the next segment depends on the exit device. They are
computed lazily: a cheap lower bound (min-cost path with min-cost transfers, and the
interior's work spread over the devices) stands in for every pair, the DP is run, the
pairs on its best path that are not yet solved are solved, and this repeats until the
best path uses solved pairs only. Its cost is then no more than any other path's lower
bound, so it is optimal; pairs no optimal path could use are never solved.

Residual edges: an edge straight from a segment's entry to its exit (``x + f(x)``) only
makes the exit wait for one transfer, a constant once ``a`` and ``b`` are fixed. The segment
is solved without that edge — which usually exposes more cut nodes inside it, so it is
split again, recursively — and the exit start becomes ``max(start, transfer)``; the
segment's other nodes are unaffected, so this stays exact.

Repeated blocks: a segment is keyed by its structure in topological order (node costs,
``mem``, optional ``op`` attribute, edge bytes; the entry node's own cost is irrelevant);
segments with equal keys share their solves, remapped node by node.

Memory limits couple all segments, which the DP cannot see. The plan without memory limits
is a lower bound; when it also meets the limits it is optimal. Otherwise ``solve`` falls
back to :func:`milp.solve` on the whole graph (under ``time_limit``; exact but slow without
one) and reports ``info["memory_fallback"] = True``, keeping the better of the two lower
bounds.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Hashable

import networkx as nx

from qcompile.errors import ConfigError
from qcompile.placement import brute, milp
from qcompile.placement.bound import lower_bound
from qcompile.placement.costgraph import INF, Device, Plan, Problem, schedule_in_order

__all__ = ["solve", "cut_nodes", "segments"]

#: segments with at most this many nodes (boundary included) go to brute force: on random
#: 4-device segments it took 1.5–6 ms at 7–8 nodes where the MILP took 14–30 ms, and was
#: slower from 10 nodes on
BRUTE_MAX_NODES = 8
_START = object()         # the device "state" before the first and after the last segment


def cut_nodes(problem: Problem) -> list:
    """The nodes on every source→sink path, in topological order."""
    g = nx.DiGraph(problem.graph.edges)
    g.add_nodes_from(problem.graph)
    src, snk = object(), object()
    g.add_edges_from((src, v) for v in problem.graph if problem.graph.in_degree(v) == 0)
    g.add_edges_from((v, snk) for v in problem.graph if problem.graph.out_degree(v) == 0)
    dom = nx.immediate_dominators(g, src)
    pdom = nx.immediate_dominators(g.reverse(copy=False), snk)
    dominators, v = set(), snk
    while v is not src:
        v = dom[v]
        dominators.add(v)
    post, v = set(), src
    while v is not snk:
        v = pdom[v]
        post.add(v)
    cuts = (dominators & post) - {src, snk}
    return sorted(cuts, key=problem.index.__getitem__)


@dataclass
class _Segment:
    entry: Hashable | None          # cut node before (None for the prefix)
    exit: Hashable | None           # cut node after (None for the suffix)
    interior: list                  # the nodes strictly between, topological order
    key: tuple = ()

    @property
    def nodes(self) -> list:
        return ([] if self.entry is None else [self.entry]) + self.interior + \
            ([] if self.exit is None else [self.exit])


def segments(problem: Problem, cuts: list) -> list[_Segment]:
    """Split the nodes at ``cuts`` (from :func:`cut_nodes`): ``len(cuts) + 1`` segments."""
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
    g, nodes = problem.graph, seg.nodes
    pos = {v: i for i, v in enumerate(nodes)}
    sig = [("entry",)] if seg.entry is not None else []
    sig += [(tuple(problem.cost(v, d) for d in problem.names), problem.mem(v), g.nodes[v].get("op"))
            for v in nodes[len(sig):]]
    edges = sorted((pos[u], pos[w], float(b)) for u in nodes for w, b in g.adj[u].items()
                   if w in pos for b in [b.get("bytes", 0.0)])
    return (seg.entry is not None, seg.exit is not None, tuple(sig), tuple(edges))


def _subproblem(problem: Problem, seg: _Segment, a: str | None, b: str | None) -> Problem:
    """The segment with its entry cut node done on ``a`` at time 0 and its exit on ``b``,
    without a direct entry→exit edge (the caller adds that transfer back); nodes are
    named by position, so equal keys give equal sub-problems."""
    g, nodes = problem.graph, seg.nodes
    h = nx.DiGraph()
    for i, v in enumerate(nodes):
        if v == seg.entry:
            cost = {a: 0.0}
        elif v == seg.exit:
            cost = {b: problem.cost(v, b)}
        else:
            cost = dict(g.nodes[v]["cost"])
        h.add_node(i, cost=cost, mem=problem.mem(v), op=g.nodes[v].get("op"))
    pos = {v: i for i, v in enumerate(nodes)}
    for u in nodes:
        for w, data in g.adj[u].items():
            if w in pos and not (u == seg.entry and w == seg.exit):
                h.add_edge(pos[u], pos[w], bytes=float(data.get("bytes", 0.0)))
    return Problem(h, [Device(n) for n in problem.names], problem.links, problem.default_link)


def _quick_bound(problem: Problem, seg: _Segment, a: str | None, b: str | None) -> float:
    """A lower bound on the segment's length: its longest path under cheapest costs and
    cheapest transfers, and the interior's cheapest work spread over all devices."""
    g = problem.graph

    def devices(v):
        return [a] if v == seg.entry else [b] if v == seg.exit else problem.capable(v)

    def tmin(v):
        return 0.0 if v == seg.entry else problem.cost(v, b) if v == seg.exit else problem.min_cost(v)

    finish: dict = {}
    for v in seg.nodes:
        start = max((finish[u] + min(problem.transfer(u, v, x, y) for x in devices(u) for y in devices(v))
                     for u in g.predecessors(v) if u in finish), default=0.0)
        finish[v] = start + tmin(v)
    work = sum(problem.min_cost(v) for v in seg.interior) / len(problem.names)
    tail = problem.cost(seg.exit, b) if seg.exit is not None else 0.0
    return max(max(finish.values()), work + tail)


def _default_segment_solver(sub: Problem, time_limit: float | None) -> Plan:
    """Brute force up to ``BRUTE_MAX_NODES`` nodes (faster there, measured), then CP-SAT where
    OR-Tools is installed (10x faster than HiGHS on the same instances, geometric mean over
    28, benchmarks/placement_solvers.py), else the HiGHS MILP."""
    if len(sub.order) <= BRUTE_MAX_NODES:
        return brute.solve(sub)
    from qcompile.placement import cpsat
    if cpsat.available():
        return cpsat.solve(sub, time_limit=time_limit)
    return milp.solve(sub, time_limit=time_limit)


@dataclass
class _Solved:
    """A segment's best length for one (entry, exit) device pair, by node position."""

    length: float
    lower: float
    exact: bool
    devices: list                   # device of each node
    order: list                     # positions in schedule order


class _Splitter:
    """The state shared by one call and its nested calls: the solver, the deadline, the
    cache of solved segments (keys carry all the data, so nested problems share it)."""

    def __init__(self, solver, time_limit):
        self.solver, self.t0, self.time_limit = solver, time.perf_counter(), time_limit
        self.solved: dict = {}
        self.bounds: dict = {}
        self.records: list = []

    def remaining(self) -> float | None:
        if self.time_limit is None:
            return None
        return max(1e-3, self.time_limit - (time.perf_counter() - self.t0))

    def run(self, problem: Problem) -> tuple[Plan, bool, float, dict]:
        """The stitched plan, whether it is proved optimal, a lower bound, and counts."""
        cuts = cut_nodes(problem)
        segs = segments(problem, cuts)
        info = {"cut_nodes": len(cuts), "segments": len(segs), "unique_segments": len({s.key for s in segs})}
        if not cuts:
            plan = self.solver(problem, time_limit=self.remaining())
            return plan, plan.status == "optimal", plan.lower_bound, info
        layers = [[_START]] + [problem.capable(c) for c in cuts] + [[_START]]

        def pair(j, a, b):
            return segs[j].key, (None if a == _START else a), (None if b == _START else b)

        def lower(j, a, b):
            k = pair(j, a, b)
            if k in self.solved:
                return self.solved[k].lower
            if k not in self.bounds:
                self.bounds[k] = _quick_bound(problem, segs[j], k[1], k[2])
            return self.bounds[k]

        def current(j, a, b):
            k = pair(j, a, b)
            return self.solved[k].length if k in self.solved else lower(j, a, b)

        while True:
            total, path = _best_path(layers, current)
            todo = [j for j in range(len(segs)) if pair(j, path[j], path[j + 1]) not in self.solved]
            if not todo:
                break
            for j in todo:
                k = pair(j, path[j], path[j + 1])
                if k not in self.solved:          # a repeated block met earlier on this path
                    self.solved[k] = self.segment(problem, segs[j], k[1], k[2])

        assignment, order = {}, []
        for j, seg in enumerate(segs):
            sol = self.solved[pair(j, path[j], path[j + 1])]
            nodes = seg.nodes
            for i, v in enumerate(nodes):
                assignment[v] = sol.devices[i]
            order += [nodes[i] for i in sol.order if i or seg.entry is None]
        plan = schedule_in_order(problem, assignment, order, solver="split")
        exact = all(self.solved[pair(j, path[j], path[j + 1])].exact for j in range(len(segs)))
        info["stitched_makespan"] = total
        return plan, exact, _best_path(layers, lower)[0], info

    def segment(self, problem: Problem, seg: _Segment, a: str | None, b: str | None) -> _Solved:
        if not seg.interior:             # closed form: the exit runs right after the entry
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
        if seg.entry is not None and seg.exit is not None and problem.graph.has_edge(seg.entry, seg.exit):
            # A residual edge entry→exit only delays the exit to ``transfer``: drop it and
            # split what is left (it often has cut nodes of its own), then add it back.
            plan, exact, lower, _ = self.run(sub)
            last = len(sub.order) - 1
            wait = problem.transfer(seg.entry, seg.exit, a, b)
            length = max(plan.start[last], wait) + problem.cost(seg.exit, b)
            lower = max(min(lower, plan.makespan), wait + problem.cost(seg.exit, b))
        else:
            plan = self.solver(sub, time_limit=self.remaining())
            exact, length, lower, how = plan.status == "optimal", plan.makespan, plan.lower_bound, plan.solver
            self.records.append({"segment": _digest(seg.key), "nodes": len(sub.order), "entry": a, "exit": b,
                                 "solver": how, "status": plan.status, "solve_s": time.perf_counter() - t1})
        by_start = sorted(sub.order, key=lambda i: (plan.start[i], plan.finish[i], i))
        rank = {v: r for r, v in enumerate(by_start)}
        order = list(nx.lexicographical_topological_sort(sub.graph, key=rank.__getitem__))
        return _Solved(length, length if exact else lower, exact,
                       [plan.assignment[i] for i in range(len(sub.order))], order)


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
    (default: :func:`brute.solve` up to ``BRUTE_MAX_NODES`` nodes, else :func:`milp.solve`;
    ``cpsat.solve`` fits too and is much faster on segments with parallel branches).
    ``time_limit`` bounds the whole call: segment solves cut short make the status
    ``"time_limit"``, with a proved ``lower_bound``. With no cut node the graph is one
    segment, solved by ``segment_solver`` directly.

    ``info``: ``cut_nodes``, ``segments`` and ``unique_segments`` (top level),
    ``segment_solves`` (one record per solver call, nested segments included: nodes,
    entry/exit devices, status, seconds), ``stitched_makespan`` (the DP's sum, equal to the
    makespan), and ``memory_fallback`` when the memory limits forced a whole-graph MILP.
    """
    if time_limit is not None and not time_limit > 0:
        raise ConfigError(f"time_limit must be > 0 seconds, got {time_limit!r}", hint="or None for no limit")
    splitter = _Splitter(segment_solver or _default_segment_solver, time_limit)
    limited = any(problem.memory(d) < INF for d in problem.names)
    relaxed = Problem(problem.graph, [Device(n) for n in problem.names], problem.links,
                      problem.default_link) if limited else problem
    plan, exact, lower, info = splitter.run(relaxed)
    info["segment_solves"] = splitter.records
    plan.status = "optimal" if exact else "time_limit"
    if _over_memory(problem, plan.assignment):
        # The memory-free optimum breaks a limit, and the DP cannot see memory: solve the
        # whole graph with memory; the memory-free result still bounds it from below.
        fallback = milp.solve(problem, time_limit=splitter.remaining())
        fallback.info = {**info, "memory_fallback": True, "relaxed_makespan": plan.makespan,
                         "inner": fallback.info}
        plan, lower = fallback, max(fallback.lower_bound, lower)
    else:
        plan.info = info if info["cut_nodes"] else {**info, "inner": plan.info}
    plan.solver = "split"
    plan.solve_s = time.perf_counter() - splitter.t0
    plan.lower_bound = plan.makespan if plan.status == "optimal" else \
        min(plan.makespan, max(lower, lower_bound(problem)))
    return plan


def _over_memory(problem: Problem, assignment: dict) -> bool:
    used = dict.fromkeys(problem.names, 0.0)
    for v, d in assignment.items():
        used[d] += problem.mem(v)
    return any(used[d] > problem.memory(d) for d in problem.names)


def _digest(key: tuple) -> str:
    return hashlib.sha1(repr(key).encode()).hexdigest()[:10]
