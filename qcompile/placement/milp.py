"""Exact latency placement: a makespan MILP solved with HiGHS (``scipy.optimize.milp``).

DiviML's exact scheduler (Ghannane & Abdelfattah, arXiv 2308.00127); the paper body is
not public, so this is our reconstruction (peers.md §A.2) of the model in
:mod:`costgraph`. Variables and constraints:

* ``x[v,d] ∈ {0,1}`` for each device ``d`` that can run ``v``; ``Σ_d x[v,d] = 1``;
  ``p_v = Σ_d cost[v,d]·x[v,d]``.
* ``z[u,v] ≥ c_ab·(x[u,a] + x[v,b] − 1)`` for ``a ≠ b``, with ``c_ab = α_ab + bytes/β_ab``:
  the transfer time; exact at the optimum because only ``s_v`` pays for a larger ``z``.
* precedence ``s_v ≥ s_u + p_u + z[u,v]`` for each edge.
* no overlap only for pairs incomparable in the transitive closure (ordered pairs are
  already separated by precedence): order bit ``o[u,v]`` and, per shared device ``d``,
  ``s_v ≥ s_u + cost[u,d] − M(1 − o) − M(2 − x[u,d] − x[v,d])`` and the mirror with ``o``.
  ``M`` is tightened per pair from ``est ≤ s ≤ H − tail``: ``est`` the min-cost longest path
  into a node, ``tail`` the one out of it, ``H`` the makespan of the best feasible baseline
  plan (or a trivial sequential bound).
* memory ``Σ_v mem_v·x[v,d] ≤ memory_d``; makespan ``C ≥ s_v + p_v``; minimise ``C``.

The solution's assignment and per-device order (its start times, near-ties broken by finish)
are then list-scheduled (:func:`costgraph.schedule_in_order`), so reported times are exact
model times, not values feasible only up to HiGHS's tolerances; the raw solver values are in
``plan.info``.
"""
from __future__ import annotations

import time

import networkx as nx
import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from qcompile.errors import ConfigError, QCompileError
from qcompile.placement import heuristics
from qcompile.placement.bound import earliest_starts, lower_bound, tails
from qcompile.placement.costgraph import INF, Plan, Problem, evaluate, schedule_in_order

__all__ = ["solve", "horizon"]


def horizon(problem: Problem) -> tuple[float, Plan | None]:
    """A makespan the optimum cannot exceed, and the feasible baseline plan achieving it
    (``None`` when only the trivial bound, running everything one after another, applies)."""
    g = problem.graph
    trivial = sum(max(problem.cost(v, d) for d in problem.capable(v)) for v in problem.order) + sum(
        max(problem.transfer(u, v, a, b) for a in problem.capable(u) for b in problem.capable(v))
        for u, v in g.edges)
    best = None
    for baseline in (heuristics.heft, heuristics.greedy, heuristics.single_device):
        try:
            plan = baseline(problem)
        except ConfigError:
            continue
        if best is None or plan.makespan < best.makespan:
            best = plan
    if best is not None and best.makespan <= trivial:
        return best.makespan, best
    return trivial, None


class _Model:
    """Sparse rows ``lb ≤ Σ coef·var ≤ ub`` over named columns."""

    def __init__(self):
        self.col, self.lo, self.hi, self.integer = {}, [], [], []
        self.rows, self.lb, self.ub = [], [], []

    def var(self, name, lo, hi, integer=False):
        self.col[name] = len(self.lo)
        self.lo.append(lo)
        self.hi.append(hi)
        self.integer.append(int(integer))

    def row(self, coefs: dict, lb=-INF, ub=INF):
        self.rows.append({self.col[k]: c for k, c in coefs.items()})
        self.lb.append(lb)
        self.ub.append(ub)

    def add(self, coefs: dict, name, c):
        coefs[name] = coefs.get(name, 0.0) + c
        return coefs

    def solve(self, objective: str, options: dict):
        c = np.zeros(len(self.lo))
        c[self.col[objective]] = 1.0
        r, k, v = [], [], []
        for i, row in enumerate(self.rows):
            for j, a in row.items():
                r.append(i)
                k.append(j)
                v.append(a)
        a = coo_matrix((v, (r, k)), shape=(len(self.rows), len(self.lo))).tocsr()
        cons = [LinearConstraint(a, self.lb, self.ub)] if self.rows else None
        return milp(c, integrality=np.array(self.integer), bounds=Bounds(self.lo, self.hi),
                    constraints=cons, options=options)


def _sequence(problem: Problem, start: dict, finish: dict, tol: float) -> list:
    """A topological order that follows the solver's start times, reading starts within
    ``tol`` as ties broken by finish time: HiGHS's solution is only feasible up to its
    tolerances, and a zero-cost node started 1e-9 after a long one must still go first."""
    by_start = sorted(problem.order, key=lambda v: (start[v], problem.index[v]))
    rank, group = {}, []
    for v in by_start + [None]:
        if v is None or (group and start[v] - start[group[0]] > tol):
            for w in sorted(group, key=lambda w: (finish[w], problem.index[w])):
                rank[w] = len(rank)
            group = []
        if v is not None:
            group.append(v)
    return list(nx.lexicographical_topological_sort(problem.graph, key=rank.__getitem__))


def solve(problem: Problem, *, time_limit: float | None = None, mip_rel_gap: float = 1e-9) -> Plan:
    """Minimise the makespan exactly (up to ``mip_rel_gap``) or until ``time_limit`` seconds.

    Returns a plan with ``status`` ``"optimal"`` or ``"time_limit"`` (the best plan found,
    with HiGHS's dual bound as ``lower_bound``). Raises ``ConfigError`` when no assignment
    meets the memory limits.
    """
    t0 = time.perf_counter()
    g, names, nodes = problem.graph, problem.names, problem.order
    H, baseline = horizon(problem)
    lb = lower_bound(problem)
    est, tail = earliest_starts(problem), tails(problem)
    lst = {v: max(est[v], H - tail[v]) for v in nodes}
    m = _Model()
    for v in nodes:
        for d in problem.capable(v):
            m.var(("x", v, d), 0, 1, integer=True)
        m.var(("s", v), est[v], lst[v])
    m.var("C", lb, H)
    for v in nodes:
        m.row({("x", v, d): 1.0 for d in problem.capable(v)}, 1.0, 1.0)
        m.row({"C": 1.0, ("s", v): -1.0, **{("x", v, d): -problem.cost(v, d) for d in problem.capable(v)}},
              lb=0.0)
    for u, v in g.edges:
        prec = {("s", v): 1.0, ("s", u): -1.0,
                **{("x", u, a): -problem.cost(u, a) for a in problem.capable(u)}}
        pairs = [(a, b, problem.transfer(u, v, a, b)) for a in problem.capable(u)
                 for b in problem.capable(v) if a != b]
        cmax = max((c for *_, c in pairs), default=0.0)
        if cmax > 0:
            m.var(("z", u, v), 0.0, cmax)
            prec[("z", u, v)] = -1.0
            for a, b, c in pairs:
                if c > 0:
                    m.row({("z", u, v): 1.0, ("x", u, a): -c, ("x", v, b): -c}, lb=-c)
        m.row(prec, lb=0.0)
    closure = nx.transitive_closure_dag(g)
    n_pairs = 0
    for i, u in enumerate(nodes):
        for v in nodes[i + 1:]:
            if closure.has_edge(u, v) or closure.has_edge(v, u):
                continue
            shared = [d for d in problem.capable(u) if problem.cost(v, d) < INF]
            if not shared:
                continue
            n_pairs += 1
            o = ("o", u, v)                  # 1: u before v
            m.var(o, 0, 1, integer=True)
            for d in shared:
                xu, xv = ("x", u, d), ("x", v, d)
                ma = max(0.0, lst[u] + problem.cost(u, d) - est[v])
                mb = max(0.0, lst[v] + problem.cost(v, d) - est[u])
                # s_v - s_u >= t_ud - M(1-o) - M(2-xu-xv)
                m.row({("s", v): 1.0, ("s", u): -1.0, o: -ma, xu: -ma, xv: -ma},
                      lb=problem.cost(u, d) - 3 * ma)
                # s_u - s_v >= t_vd - M o - M(2-xu-xv)
                m.row({("s", u): 1.0, ("s", v): -1.0, o: mb, xu: -mb, xv: -mb},
                      lb=problem.cost(v, d) - 2 * mb)
    for d in names:
        if problem.memory(d) < INF:
            m.row({("x", v, d): problem.mem(v) for v in nodes if problem.cost(v, d) < INF},
                  ub=problem.memory(d))
    options = {"mip_rel_gap": mip_rel_gap}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    res = m.solve("C", options)
    if res.status in (2, 4):
        # HiGHS can reject its own solution after presolve/restart by ~1e-6 infeasibility
        # ("Solve error"), and its presolve can wrongly report a feasible model infeasible
        # (tests/placement/test_split.py has one); solving the unreduced model avoids both.
        res = m.solve("C", {**options, "presolve": False})
    info = {"highs_status": int(res.status), "message": res.message, "horizon": H,
            "variables": len(m.lo), "constraints": len(m.rows), "disjunctive_pairs": n_pairs}
    if res.status == 2:
        raise ConfigError("no assignment meets the devices' memory limits (the MILP is infeasible)",
                          hint="raise a device's memory limit or add a device")
    if res.status not in (0, 1):
        from qcompile.placement import cpsat
        if cpsat.available():  # HiGHS 1.x still fails on rare instances ("Solve error")
            plan = cpsat.solve(problem, time_limit=time_limit)
            plan.info["highs_failed"] = res.message
            plan.solve_s = time.perf_counter() - t0
            return plan
        raise QCompileError(f"HiGHS failed on the placement MILP: {res.message}",
                            hint="install OR-Tools (pip install 'qcompile[placement]') to solve "
                                 "with CP-SAT, retry with another time_limit, or use heuristics.heft")
    status = "optimal" if res.status == 0 else "time_limit"
    dual = getattr(res, "mip_dual_bound", None)
    if res.x is None:
        if baseline is None:
            raise ConfigError(f"the MILP found no plan within its limits: {res.message}",
                              hint="raise time_limit")
        plan = baseline
        plan.info = info
    else:
        x = res.x
        col = m.col
        assignment = {v: max(problem.capable(v), key=lambda d: x[col["x", v, d]]) for v in nodes}
        start = {v: float(x[col["s", v]]) for v in nodes}
        finish = {v: start[v] + problem.cost(v, assignment[v]) for v in nodes}
        order = _sequence(problem, start, finish, tol=1e-6 * max(1.0, H))
        plan = schedule_in_order(problem, assignment, order, solver="milp")
        listed = evaluate(problem, assignment)
        if listed.makespan < plan.makespan:
            plan = listed
        info.update(milp_start=start, milp_finish=finish, milp_makespan=float(x[col["C"]]))
        plan.info = info
    plan.solver, plan.status = "milp", status
    plan.solve_s = time.perf_counter() - t0
    if status == "optimal":
        plan.lower_bound = plan.makespan
    else:
        plan.lower_bound = min(plan.makespan, max(lb, dual if dual is not None else -INF))
    return plan
