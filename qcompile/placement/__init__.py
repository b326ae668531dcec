"""Heterogeneous placement of a cost graph onto devices (DiviML, arXiv 2308.00127).

``Problem`` describes the graph, devices and links; each solver returns a ``Plan``:
``milp.solve`` (exact, HiGHS), ``brute.solve`` (exhaustive, for tests), ``chain.solve``
(exact DP on chains), and the baselines in ``heuristics``; ``bound.lower_bound`` grades them.
"""
from qcompile.placement import bound, brute, chain, heuristics, milp
from qcompile.placement.bound import lower_bound
from qcompile.placement.costgraph import Device, Link, Plan, Problem, check_plan, evaluate, schedule_in_order

__all__ = ["Device", "Link", "Plan", "Problem", "evaluate", "schedule_in_order", "check_plan",
           "lower_bound", "milp", "brute", "chain", "heuristics", "bound"]
