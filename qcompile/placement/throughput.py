"""Throughput placement: minimise the period of a pipelined steady state (HiGHS MILP).

DiviML's throughput objective (Ghannane & Abdelfattah, arXiv 2308.00127); the paper
body is not public, so the model is our reconstruction (``shared/reference/peers.md`` §A.2).
Inputs stream through the graph; in steady state each device works on a different input,
so one input leaves every ``T`` seconds where the *period* ``T`` is the busiest resource's
load:

* each device ``d``: ``Σ_{v on d} cost[v,d]``;
* each directed link ``(a, b)``, ``a ≠ b``: ``Σ`` transfer times of the edges ``u → v``
  with ``u`` on ``a`` and ``v`` on ``b`` (each ordered device pair is its own link, as in
  :class:`costgraph.Problem`; transfers on one link run one after another).

MILP: ``x[v,d] ∈ {0,1}``, ``Σ_d x[v,d] = 1``; ``y[u,v,a,b] ≥ x[u,a] + x[v,b] − 1``, ``y ≥ 0``
(exact at the optimum: a larger ``y`` only raises a load); loads ``≤ T``; memory
``Σ mem·x ≤ memory``; minimise ``T``. ``contiguous=True`` adds, per device, "at most one run
of consecutive nodes in ``problem.order``" (``r[i,d] ≥ x[i,d] − x[i−1,d]``,
``x[0,d] + Σ_i r[i,d] ≤ 1``): one pipeline stage per device, as pipeline-parallel systems
place layers. A DP over stage boundaries would be exact only if transfers joined adjacent
stages alone; residual edges can skip a stage, so the restriction is solved as a MILP too.

A quick plan bounds ``T`` from above before HiGHS starts: per order of the devices, maximal
consecutive stages under a bisected compute bound (exact for compute alone with the order
fixed) and, unrestricted, longest-node-first onto the least loaded device. The period lower
bound is ``max(max_v t_min(v), Σ_v t_min(v) / |D|)`` (peers.md §A.2), or HiGHS's dual bound
when larger. The plan also carries the single-input schedule of the
chosen assignment (:func:`costgraph.evaluate`), so ``makespan`` is the latency of one input.
"""
from __future__ import annotations

import time
from itertools import permutations

from qcompile.errors import ConfigError, QCompileError
from qcompile.placement.bound import lower_bound
from qcompile.placement.costgraph import INF, Plan, Problem, evaluate
from qcompile.placement.milp import _Model

__all__ = ["solve", "period", "loads", "period_lower_bound"]


def loads(problem: Problem, assignment: dict) -> tuple[dict, dict]:
    """Seconds of work per device and of transfers per directed link ``(a, b)``."""
    work = dict.fromkeys(problem.names, 0.0)
    for v in problem.order:
        work[assignment[v]] += problem.cost(v, assignment[v])
    link: dict = {}
    for u, v in problem.graph.edges:
        a, b = assignment[u], assignment[v]
        if a != b:
            link[a, b] = link.get((a, b), 0.0) + problem.transfer(u, v, a, b)
    return work, link


def period(problem: Problem, assignment: dict) -> float:
    """The steady-state period of ``assignment``: its busiest device or link."""
    work, link = loads(problem, assignment)
    return max([*work.values(), *link.values()])


def period_lower_bound(problem: Problem) -> float:
    t = [problem.min_cost(v) for v in problem.order]
    return max(max(t), sum(t) / len(problem.names))


def solve(problem: Problem, *, contiguous: bool = False, time_limit: float | None = None,
          mip_rel_gap: float = 1e-9) -> Plan:
    """Minimise the period (exactly, up to ``mip_rel_gap``, or until ``time_limit``).

    ``status`` (``"optimal"`` or ``"time_limit"``) is about the period, reported with its
    proved bound in ``info["period"]`` and ``info["period_lower_bound"]``, beside
    ``info["device_loads"]`` and ``info["link_loads"]``. ``makespan``, ``start`` and
    ``finish`` are one input's schedule, ``lower_bound`` a bound on the makespan
    (:func:`bound.lower_bound`). Raises ``ConfigError`` when no assignment meets the memory
    limits.
    """
    t0 = time.perf_counter()
    g, names, nodes = problem.graph, problem.names, problem.order
    plb = period_lower_bound(problem)
    guess = _fallback(problem, contiguous)
    ub = INF if guess is None else period(problem, guess) * (1 + 1e-9) + 1e-12
    m = _Model()
    m.var("T", plb, ub)                # the quick plan's period cuts the search off
    for v in nodes:
        for d in problem.capable(v):
            m.var(("x", v, d), 0, 1, integer=True)
        m.row({("x", v, d): 1.0 for d in problem.capable(v)}, 1.0, 1.0)
    for d in names:
        m.row({"T": -1.0, **{("x", v, d): problem.cost(v, d) for v in nodes if problem.cost(v, d) < INF}},
              ub=0.0)
        if problem.memory(d) < INF:
            m.row({("x", v, d): problem.mem(v) for v in nodes if problem.cost(v, d) < INF},
                  ub=problem.memory(d))
    link_rows: dict = {}
    for u, v in g.edges:
        for a in problem.capable(u):
            for b in problem.capable(v):
                c = problem.transfer(u, v, a, b)
                if a != b and c > 0:
                    m.var(("y", u, v, a, b), 0.0, 1.0)
                    m.row({("y", u, v, a, b): 1.0, ("x", u, a): -1.0, ("x", v, b): -1.0}, lb=-1.0)
                    link_rows.setdefault((a, b), {"T": -1.0})[("y", u, v, a, b)] = c
    for row in link_rows.values():
        m.row(row, ub=0.0)
    if contiguous:
        for d in names:
            def xd(i):
                return ("x", nodes[i], d) if problem.cost(nodes[i], d) < INF else None
            runs = {xd(0): 1.0} if xd(0) else {}
            for i in range(1, len(nodes)):
                if xd(i) is None:
                    continue
                m.var(("r", i, d), 0.0, 1.0)
                rise = {("r", i, d): 1.0, xd(i): -1.0}
                if xd(i - 1):
                    rise[xd(i - 1)] = 1.0
                m.row(rise, lb=0.0)
                runs[("r", i, d)] = 1.0
            if runs:
                m.row(runs, ub=1.0)
    options = {"mip_rel_gap": mip_rel_gap}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    res = m.solve("T", options)
    if res.status in (2, 4):           # see milp.solve: HiGHS presolve can misreport
        res = m.solve("T", {**options, "presolve": False})
    if res.status == 2 and guess is None:
        raise ConfigError("no assignment meets the devices' memory limits (the throughput MILP is "
                          "infeasible)", hint="raise a device's memory limit or add a device")
    if res.status not in (0, 1):       # (infeasible despite a feasible quick plan included)
        raise QCompileError(f"HiGHS failed on the throughput MILP: {res.message}",
                            hint="retry with another time_limit")
    assignment = guess
    if res.x is not None:
        found = {v: max(problem.capable(v), key=lambda d: res.x[m.col["x", v, d]]) for v in nodes}
        if guess is None or period(problem, found) <= period(problem, guess):
            assignment = found
    if assignment is None:
        raise QCompileError(f"HiGHS found no throughput plan in time: {res.message}",
                            hint="raise time_limit")
    plan = evaluate(problem, assignment)
    work, link = loads(problem, assignment)
    T = period(problem, assignment)
    status = "optimal" if res.status == 0 else "time_limit"
    dual = getattr(res, "mip_dual_bound", None)
    plan.info = {"period": T, "throughput": INF if T == 0 else 1.0 / T,
                 "period_lower_bound": T if status == "optimal" else min(T, max(plb, dual or -INF)),
                 "device_loads": work, "link_loads": link, "contiguous": contiguous,
                 "highs_status": int(res.status), "message": res.message,
                 "milp_period": None if res.x is None else float(res.x[m.col["T"]]),
                 "quick_period": None if guess is None else period(problem, guess),
                 "variables": len(m.lo), "constraints": len(m.rows)}
    plan.solver, plan.status = "throughput", status
    plan.solve_s = time.perf_counter() - t0
    plan.lower_bound = min(plan.makespan, lower_bound(problem))
    return plan


def _fallback(problem: Problem, contiguous: bool) -> dict | None:
    """A quick plan that bounds the MILP's search and stands in when HiGHS stops before it
    finds a better one (``None`` if none is found). The best of: for each order of the
    devices (up to 5 devices; beyond, fastest first only), ``problem.order`` split greedily
    into maximal stages under a bisected compute bound (optimal for compute alone with the
    order fixed; links are then counted); and, without ``contiguous``, longest node first
    onto the device where it finishes the least loaded."""
    nodes, names = problem.order, problem.names
    orders = permutations(names) if len(names) <= 5 else \
        [sorted(names, key=lambda d: sum(min(problem.cost(v, d), 1e300) for v in nodes))]

    def stages(perm, T):
        out, i = {}, 0
        for d in perm:
            load = mem = 0.0
            while i < len(nodes) and load + problem.cost(nodes[i], d) <= T and \
                    mem + problem.mem(nodes[i]) <= problem.memory(d):
                load += problem.cost(nodes[i], d)
                mem += problem.mem(nodes[i])
                out[nodes[i]] = d
                i += 1
        return out if i == len(nodes) else None

    found = []
    total = sum(max(problem.cost(v, d) for d in problem.capable(v)) for v in nodes)
    for perm in orders:
        if stages(perm, total) is None:
            continue
        lo, hi = 0.0, total
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if stages(perm, mid) is not None else (mid, hi)
        found.append(stages(perm, hi))
    if not contiguous:
        load = dict.fromkeys(names, 0.0)
        mem = dict.fromkeys(names, 0.0)
        lpt = {}
        for v in sorted(nodes, key=lambda v: -problem.min_cost(v)):
            room = [d for d in problem.capable(v) if problem.fits(v, d, mem[d])]
            if not room:
                break
            d = min(room, key=lambda d: load[d] + problem.cost(v, d))
            lpt[v], load[d], mem[d] = d, load[d] + problem.cost(v, d), mem[d] + problem.mem(v)
        if len(lpt) == len(nodes):
            found.append(lpt)
    return min(found, key=lambda a: period(problem, a), default=None)
