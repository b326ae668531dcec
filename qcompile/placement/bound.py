"""A lower bound on the optimal makespan, to grade heuristic plans.

DiviML (Ghannane & Abdelfattah, arXiv 2308.00127) grades its heuristics against a
theoretical lower bound; its formula is not public, so we use the standard one
(``shared/reference/peers.md`` §A.2): with ``t_min(v)`` the node's cheapest cost,

    LB = max(longest path under t_min with free transfers,  sum_v t_min(v) / |D|).

The first term holds because a node cannot start before its predecessors finish; the
second because the |D| devices together must do at least ``sum t_min`` seconds of work.
"""
from __future__ import annotations

from qcompile.placement.costgraph import Problem

__all__ = ["lower_bound", "earliest_starts", "tails"]


def earliest_starts(problem: Problem) -> dict:
    """Longest path under ``t_min`` from any source to ``v``, excluding ``v``."""
    est = {}
    for v in problem.order:
        est[v] = max((est[u] + problem.min_cost(u) for u in problem.graph.predecessors(v)), default=0.0)
    return est


def tails(problem: Problem) -> dict:
    """Longest path under ``t_min`` from ``v`` (included) to any sink."""
    tail = {}
    for v in reversed(problem.order):
        tail[v] = problem.min_cost(v) + max((tail[w] for w in problem.graph.successors(v)), default=0.0)
    return tail


def lower_bound(problem: Problem) -> float:
    critical = max(tails(problem).values())
    work = sum(problem.min_cost(v) for v in problem.order) / len(problem.devices)
    return max(critical, work)
