"""Exact latency placement with OR-Tools CP-SAT: the makespan model of :mod:`milp` as a
constraint program.

DiviML (Ghannane & Abdelfattah, arXiv 2308.00127) solves this model as a MILP; stating it
with CP-SAT's scheduling constraints is our reconstruction (``shared/reference/peers.md``
§A.3). Variables and constraints, in integer *ticks*:

* a start ``s_v`` and an end ``e_v = s_v + Σ_d dur[v,d]·x[v,d]`` per node, with a presence
  literal ``x[v,d]`` and an optional interval ``[s_v, s_v + dur[v,d])`` per device ``d`` that
  can run ``v``; ``AddExactlyOne(x[v,·])``;
* ``AddNoOverlap`` over each device's optional intervals;
* per edge ``u → v``: ``s_v ≥ e_u``, and ``s_v ≥ e_u + trans[u,v,a,b]`` enforced by
  ``x[u,a] ∧ x[v,b]`` for each pair ``a ≠ b`` with a transfer;
* memory ``Σ_v mem_v·x[v,d] ≤ memory_d`` (scaled to integers, see below);
* ``C ≥ e_v``; minimise ``C``. A HEFT/greedy plan is given as a hint.

Resolution: ``tick`` seconds per unit (default: the largest power of ten at most
``horizon / 10**7``, so decimal cost tables stay exact). Durations and transfers are rounded
to the nearest tick, so the integer optimum is the true one up to ``L·tick``, ``L`` the
number of rounded terms on a path (≤ 2·|V|). The solution's assignment and per-device order
are re-timed exactly with :func:`costgraph.schedule_in_order` (reported times are model
times, never tick times), and ``lower_bound`` subtracts that rounding slack from CP-SAT's
bound. Memory sizes are scaled by a power of ten that makes them integers (up to 10**9);
sizes that are not decimal are rounded up and limits down, which is conservative.

OR-Tools is optional (``pip install ortools``); it is imported on first use.
"""
from __future__ import annotations

import math
import time

import networkx as nx

from qcompile.errors import ConfigError, QCompileError
from qcompile.placement.bound import lower_bound
from qcompile.placement.costgraph import INF, Plan, Problem, evaluate, schedule_in_order
from qcompile.placement.milp import horizon

__all__ = ["solve", "available"]


def _cp_model():
    try:
        from ortools.sat.python import cp_model
    except ImportError as e:
        raise ConfigError("placement.cpsat needs OR-Tools, which is not installed",
                          hint="pip install ortools (or use placement.milp, which needs only scipy)") from e
    return cp_model


def available() -> bool:
    """Whether OR-Tools can be imported."""
    try:
        _cp_model()
    except ConfigError:
        return False
    return True


def _default_tick(H: float) -> float:
    if H <= 0:
        return 1.0
    return 10.0 ** math.floor(math.log10(H / 1e7))


def _memory_scale(values: list[float]) -> tuple[int, bool]:
    """A power of ten making every value an integer, and whether that is exact."""
    for k in range(10):
        s = 10 ** k
        if all(abs(x * s - round(x * s)) <= 1e-9 * max(1.0, x * s) for x in values):
            return s, True
    return 10 ** 9, False


def solve(problem: Problem, *, time_limit: float | None = None, workers: int = 1,
          tick: float | None = None) -> Plan:
    """Minimise the makespan with CP-SAT (``workers`` search threads; 1 is deterministic).

    Returns a plan with ``status`` ``"optimal"`` (CP-SAT proved its integer model optimal)
    or ``"time_limit"``. Raises ``ConfigError`` when OR-Tools is missing or no assignment
    meets the memory limits.
    """
    cp_model = _cp_model()
    t0 = time.perf_counter()
    g, names, nodes = problem.graph, problem.names, problem.order
    H, baseline = horizon(problem)
    tick = float(tick) if tick is not None else _default_tick(H)
    if not tick > 0 or tick == INF:
        raise ConfigError(f"tick must be a positive number of seconds, got {tick!r}")

    def ticks(seconds: float) -> int:
        return int(round(seconds / tick))

    dur = {(v, d): ticks(problem.cost(v, d)) for v in nodes for d in problem.capable(v)}
    trans = {(u, v, a, b): ticks(problem.transfer(u, v, a, b)) for u, v in g.edges
             for a in problem.capable(u) for b in problem.capable(v) if a != b}
    top = sum(max(dur[v, d] for d in problem.capable(v)) for v in nodes) + \
        sum(max((trans[u, v, a, b] for a in problem.capable(u) for b in problem.capable(v) if a != b),
                default=0) for u, v in g.edges)
    m = cp_model.CpModel()
    x, s, e = {}, {}, {}
    intervals = {d: [] for d in names}
    for v in nodes:
        s[v] = m.NewIntVar(0, top, f"s{problem.index[v]}")
        e[v] = m.NewIntVar(0, top, f"e{problem.index[v]}")
        for d in problem.capable(v):
            x[v, d] = m.NewBoolVar(f"x{problem.index[v]}_{d}")
            intervals[d].append(m.NewOptionalFixedSizeIntervalVar(s[v], dur[v, d], x[v, d], ""))
        m.AddExactlyOne(x[v, d] for d in problem.capable(v))
        m.Add(e[v] == s[v] + sum(dur[v, d] * x[v, d] for d in problem.capable(v)))
    for d in names:
        m.AddNoOverlap(intervals[d])
    for u, v in g.edges:
        m.Add(s[v] >= e[u])
        for a in problem.capable(u):
            for b in problem.capable(v):
                if a != b and trans[u, v, a, b] > 0:
                    m.Add(s[v] >= e[u] + trans[u, v, a, b]).OnlyEnforceIf([x[u, a], x[v, b]])
    limited = [d for d in names if problem.memory(d) < INF]
    if limited:
        scale, exact = _memory_scale([problem.mem(v) for v in nodes] + [problem.memory(d) for d in limited])
        size = {v: round(problem.mem(v) * scale) if exact else math.ceil(problem.mem(v) * scale - 1e-9)
                for v in nodes}
        for d in limited:
            cap = round(problem.memory(d) * scale) if exact else math.floor(problem.memory(d) * scale + 1e-9)
            m.Add(sum(size[v] * x[v, d] for v in nodes if (v, d) in x) <= cap)
    C = m.NewIntVar(0, top, "C")
    m.AddMaxEquality(C, [e[v] for v in nodes])
    m.Minimize(C)
    if baseline is not None:
        for v in nodes:
            for d in problem.capable(v):
                m.AddHint(x[v, d], int(baseline.assignment[v] == d))
            m.AddHint(s[v], ticks(baseline.start[v]))

    solver = cp_model.CpSolver()
    solver.parameters.num_workers = int(workers)
    if time_limit is not None:
        solver.parameters.max_time_in_seconds = float(time_limit)
    code = solver.Solve(m)
    info = {"cpsat_status": solver.StatusName(code), "tick": tick, "workers": int(workers),
            "horizon": H, "branches": solver.NumBranches(), "conflicts": solver.NumConflicts()}
    if code == cp_model.INFEASIBLE:
        raise ConfigError("no assignment meets the devices' memory limits (CP-SAT: infeasible)",
                          hint="raise a device's memory limit or add a device")
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if baseline is None:
            raise QCompileError(f"CP-SAT found no plan: {solver.StatusName(code)}",
                                hint="raise time_limit, or use placement.milp")
        plan = baseline
        status = "time_limit"
    else:
        assignment = {v: next(d for d in problem.capable(v) if solver.Value(x[v, d])) for v in nodes}
        start = {v: solver.Value(s[v]) for v in nodes}
        end = {v: solver.Value(e[v]) for v in nodes}
        rank = {v: k for k, v in enumerate(sorted(nodes, key=lambda v: (start[v], end[v], problem.index[v])))}
        order = list(nx.lexicographical_topological_sort(g, key=rank.__getitem__))
        plan = schedule_in_order(problem, assignment, order, solver="cpsat")
        listed = evaluate(problem, assignment)
        if listed.makespan < plan.makespan:
            plan = listed
        if baseline is not None and baseline.makespan < plan.makespan:
            plan = baseline          # rounding to ticks can cost up to L·tick
        status = "optimal" if code == cp_model.OPTIMAL else "time_limit"
        info.update(cpsat_start_ticks=start, cpsat_makespan_ticks=solver.Value(C))
    slack = len(nodes) * tick      # ≤ 2|V| rounded terms on a path, each off by ≤ tick/2
    proved = solver.BestObjectiveBound() * tick - slack
    plan.info = info
    plan.solver, plan.status = "cpsat", status
    plan.solve_s = time.perf_counter() - t0
    plan.lower_bound = min(plan.makespan, max(lower_bound(problem), proved))
    return plan
