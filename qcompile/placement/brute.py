"""Exact placement by exhaustive search, the reference the MILP is tested against.

It enumerates (node, device) sequences depth-first: the next node is any node whose
predecessors are placed, on any device that can run it and has memory left, and it starts
as soon as its device is free and its inputs have arrived (a semi-active list schedule).
For a fixed assignment the schedule depends only on each device's order, and the earliest
schedule for those orders is such a list schedule, so this covers every optimum.

Two prunings keep it exact:

* *Sorted starts.* Sort an optimal schedule by (start, finish, topological index) and list
  schedule it in that order: no node starts later, and repeating this reaches a schedule
  that is optimal and sorted by its own start times. So we only extend a sequence with a
  node whose (start, finish, index) key exceeds the previous one; this removes the
  interleavings that give the same per-device orders.
* *Bound.* Every later node starts no earlier than the current one, so a branch whose
  ``max(makespan so far, start + longest min-cost tail of any unplaced node)`` is no better
  than the best plan found is cut.

Exponential; meant for tests (≤ ~8 nodes × 3 devices).
"""
from __future__ import annotations

import time

from qcompile.errors import ConfigError
from qcompile.placement.bound import tails
from qcompile.placement.costgraph import INF, Plan, Problem, schedule_in_order

__all__ = ["solve"]


def solve(problem: Problem, *, max_nodes: int = 10) -> Plan:
    t0 = time.perf_counter()
    nodes, names = problem.order, problem.names
    n, nd = len(nodes), len(names)
    if n > max_nodes:
        raise ConfigError(f"brute force refuses {n} nodes (max_nodes={max_nodes})",
                          hint="use placement.milp")
    idx = problem.index
    g = problem.graph
    preds = [[idx[u] for u in g.predecessors(v)] for v in nodes]
    succs = [[idx[w] for w in g.successors(v)] for v in nodes]
    cost = [[problem.cost(v, d) for d in names] for v in nodes]
    capable = [[k for k in range(nd) if cost[i][k] < INF] for i in range(n)]
    mem = [problem.mem(v) for v in nodes]
    limit = [problem.memory(d) for d in names]
    trans = {(idx[u], idx[v]): [[problem.transfer(u, v, a, b) for b in names] for a in names]
             for u, v in g.edges}
    tail = [tails(problem)[v] for v in nodes]
    after = [max((tail[w] for w in succs[i]), default=0.0) for i in range(n)]

    dev, fin = [-1] * n, [0.0] * n
    free, used = [0.0] * nd, [0.0] * nd
    missing = [len(p) for p in preds]
    best = [INF, None, None]          # makespan, devices, sequence
    seq = []

    def dfs(last, makespan):
        if len(seq) == n:
            if makespan < best[0]:
                best[:] = [makespan, dev[:], seq[:]]
            return
        todo = [j for j in range(n) if dev[j] < 0]
        for i in todo:
            if missing[i]:
                continue
            rest = max((tail[j] for j in todo if j != i), default=0.0)
            for k in capable[i]:
                if used[k] + mem[i] > limit[k]:
                    continue
                s = free[k]
                for p in preds[i]:
                    s = max(s, fin[p] + trans[p, i][dev[p]][k])
                f = s + cost[i][k]
                key = (s, f, i)
                if key <= last:
                    continue
                span = max(makespan, f)
                if max(span, s + rest, f + after[i]) >= best[0]:
                    continue
                old_free = free[k]
                dev[i], fin[i], free[k] = k, f, f
                used[k] += mem[i]
                for w in succs[i]:
                    missing[w] -= 1
                seq.append(i)
                dfs(key, span)
                seq.pop()
                for w in succs[i]:
                    missing[w] += 1
                used[k] -= mem[i]
                dev[i], free[k] = -1, old_free

    dfs((-INF, -INF, -1), 0.0)
    if best[1] is None:
        raise ConfigError("no assignment meets the devices' memory limits",
                          hint="raise a device's memory limit or add a device")
    assignment = {nodes[i]: names[k] for i, k in enumerate(best[1])}
    plan = schedule_in_order(problem, assignment, [nodes[i] for i in best[2]], solver="brute")
    plan.solve_s = time.perf_counter() - t0
    plan.lower_bound, plan.status = plan.makespan, "optimal"
    return plan
