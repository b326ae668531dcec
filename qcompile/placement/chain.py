"""Exact placement of a chain (path graph) by dynamic programming in O(|V|·|D|²).

On a chain nothing runs concurrently, so the makespan is the sum of node costs plus the
transfers between consecutive nodes on different devices:
``f[i][d] = cost(v_i, d) + min_e (f[i-1][e] + transfer(v_{i-1}, v_i, e, d))``.
This is the stitching step of DiviML's splitting heuristic (Ghannane & Abdelfattah,
arXiv 2308.00127; our reconstruction, peers.md §A.2). Memory limits are not modelled
by the DP: a result that breaks one raises ``ConfigError``.
"""
from __future__ import annotations

import time

from qcompile.errors import ConfigError
from qcompile.placement.costgraph import INF, Plan, Problem, schedule_in_order

__all__ = ["solve", "is_chain"]


def is_chain(problem: Problem) -> bool:
    g = problem.graph
    return all(g.in_degree(v) <= 1 and g.out_degree(v) <= 1 for v in g) and \
        g.number_of_edges() == g.number_of_nodes() - 1


def solve(problem: Problem) -> Plan:
    t0 = time.perf_counter()
    if not is_chain(problem):
        raise ConfigError("chain.solve needs a path graph (one source, each node one successor)",
                          hint="use placement.milp for general DAGs")
    nodes, names = problem.order, problem.names
    f = [{d: problem.cost(nodes[0], d) for d in names}]
    back = [{}]
    for u, v in zip(nodes, nodes[1:]):
        row, arg = {}, {}
        for d in names:
            c = problem.cost(v, d)
            if c == INF:
                row[d], arg[d] = INF, None
                continue
            e = min(names, key=lambda e: f[-1][e] + problem.transfer(u, v, e, d))
            row[d], arg[d] = f[-1][e] + problem.transfer(u, v, e, d) + c, e
        f.append(row)
        back.append(arg)
    d = min(names, key=lambda d: f[-1][d])
    assignment = {}
    for i in range(len(nodes) - 1, -1, -1):
        assignment[nodes[i]] = d
        d = back[i].get(d)
    plan = schedule_in_order(problem, assignment, nodes, solver="chain")
    plan.solve_s = time.perf_counter() - t0
    plan.lower_bound, plan.status = plan.makespan, "optimal"
    return plan
