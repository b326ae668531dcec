"""Baseline placements: best single device, ORT-style greedy, and HEFT list scheduling.

All three respect capability masks and memory limits, and raise ``ConfigError`` when their
rule finds no feasible plan. Their ``lower_bound`` is :func:`bound.lower_bound`.

HEFT follows Topcuoglu, Hariri & Wu, "Performance-effective and low-complexity task
scheduling for heterogeneous computing", IEEE TPDS 13(3), 2002: upward rank from mean
costs and mean transfer times, then each node, in decreasing rank, goes to the device
giving its earliest finish time. We use the insertion-free variant (a device never fills
an earlier idle gap), so the plan is exactly ``schedule_in_order`` of the rank order.
"""
from __future__ import annotations

import time

from qcompile.errors import ConfigError
from qcompile.placement.bound import lower_bound
from qcompile.placement.costgraph import INF, Plan, Problem, evaluate, schedule_in_order

__all__ = ["single_device", "greedy", "heft"]


def _finish(plan: Plan, problem: Problem, t0: float) -> Plan:
    plan.solve_s = time.perf_counter() - t0
    plan.lower_bound = min(lower_bound(problem), plan.makespan)
    plan.status = "heuristic"
    return plan


def single_device(problem: Problem) -> Plan:
    """The fastest plan that puts every node on one device (the "fastest GPU" baseline)."""
    t0 = time.perf_counter()
    best = None
    for d in problem.names:
        if all(problem.cost(v, d) < INF for v in problem.order) and \
                sum(problem.mem(v) for v in problem.order) <= problem.memory(d):
            plan = evaluate(problem, dict.fromkeys(problem.order, d))
            if best is None or plan.makespan < best.makespan:
                best = plan
    if best is None:
        raise ConfigError("no single device can run every node within its memory",
                          hint="use greedy, heft or milp, which mix devices")
    best.solver = "single_device"
    return _finish(best, problem, t0)


def greedy(problem: Problem, priority: list[str] | None = None) -> Plan:
    """ONNX Runtime-style partitioning: each node goes to the first device in ``priority``
    (default: device order, so the last device is the fallback, e.g. the CPU) that can run
    it and still has memory for it."""
    t0 = time.perf_counter()
    priority = list(priority or problem.names)
    if sorted(priority) != sorted(problem.names):
        raise ConfigError(f"greedy priority {priority} is not a permutation of {problem.names}")
    used = dict.fromkeys(problem.names, 0.0)
    assignment = {}
    for v in problem.order:
        d = next((d for d in priority if problem.cost(v, d) < INF and problem.fits(v, d, used[d])), None)
        if d is None:
            raise ConfigError(f"greedy found no device with room for node {v!r}",
                              hint="use milp, which packs memory exactly")
        assignment[v] = d
        used[d] += problem.mem(v)
    plan = evaluate(problem, assignment)
    plan.solver = "greedy"
    return _finish(plan, problem, t0)


def _mean_transfer(problem: Problem, u, v) -> float:
    pairs = [(a, b) for a in problem.names for b in problem.names if a != b]
    return sum(problem.transfer(u, v, a, b) for a, b in pairs) / len(pairs) if pairs else 0.0


def heft(problem: Problem) -> Plan:
    """HEFT (Topcuoglu et al. 2002), insertion-free, memory-aware."""
    t0 = time.perf_counter()
    g = problem.graph
    rank = {}
    for v in reversed(problem.order):
        costs = [problem.cost(v, d) for d in problem.capable(v)]
        rank[v] = sum(costs) / len(costs) + max(
            (_mean_transfer(problem, v, w) + rank[w] for w in g.successors(v)), default=0.0)
    # rank[u] >= rank[w] for every edge u->w, so this sort is a topological order.
    order = sorted(problem.order, key=lambda v: (-rank[v], problem.index[v]))
    free = dict.fromkeys(problem.names, 0.0)
    used = dict.fromkeys(problem.names, 0.0)
    assignment, finish = {}, {}
    for v in order:
        best = None
        for d in problem.capable(v):
            if not problem.fits(v, d, used[d]):
                continue
            ready = max([free[d]] + [finish[u] + problem.transfer(u, v, assignment[u], d)
                                     for u in g.predecessors(v)])
            eft = ready + problem.cost(v, d)
            if best is None or eft < best[0]:
                best = (eft, d)
        if best is None:
            raise ConfigError(f"HEFT found no device with room for node {v!r}",
                              hint="use milp, which packs memory exactly")
        finish[v], assignment[v] = best
        free[best[1]] = best[0]
        used[best[1]] += problem.mem(v)
    plan = schedule_in_order(problem, assignment, order, solver="heft")
    return _finish(plan, problem, t0)
