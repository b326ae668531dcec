"""Heterogeneous placement of a cost graph onto devices (DiviML, arXiv 2308.00127).

``Problem`` describes the graph, devices and links; each solver returns a ``Plan``:
``split.solve`` (DiviML's module splitting: cut nodes, exact segments, DP stitching — the
default), ``milp.solve`` (exact, HiGHS), ``cpsat.solve`` (exact, OR-Tools CP-SAT),
``brute.solve`` (exhaustive, for tests), ``chain.solve`` (exact DP on chains),
``throughput.solve`` (pipelined period), and the baselines in ``heuristics``;
``bound.lower_bound`` grades them. ``devices`` parses targets and ships the roofline spec
table, ``costs`` builds a Problem from an IR graph (measured or modelled costs),
``subgraph`` cuts a placed graph into per-device segments, ``gantt`` draws schedules.
The pass that uses them is ``passes/place.py``.
"""
from qcompile.placement import bound, brute, chain, cpsat, heuristics, milp, split, throughput
from qcompile.placement.bound import lower_bound
from qcompile.placement.costgraph import Device, Link, Plan, Problem, check_plan, evaluate, schedule_in_order

__all__ = ["Device", "Link", "Plan", "Problem", "evaluate", "schedule_in_order", "check_plan",
           "lower_bound", "milp", "brute", "chain", "heuristics", "bound", "split", "cpsat",
           "throughput"]
