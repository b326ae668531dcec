"""Placement solvers on plain cost graphs: MILP vs brute force vs chain DP, bounds, baselines."""
import math
import random

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcompile.errors import ConfigError, QCompileError
from qcompile.placement import (
    Device,
    Link,
    Problem,
    brute,
    chain,
    check_plan,
    evaluate,
    heuristics,
    lower_bound,
    milp,
)

INF = math.inf
FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def close(a, b, rel=1e-6):
    return abs(a - b) <= rel * max(1.0, abs(a), abs(b))


@st.composite
def problems(draw, max_nodes=7, max_devices=3, chain_only=False, memory=False, min_nodes=1):
    n = draw(st.integers(min_nodes, max_nodes))
    nd = draw(st.integers(1, max_devices))
    names = [f"d{k}" for k in range(nd)]
    g = nx.DiGraph()
    for i in range(n):
        must = draw(st.integers(0, nd - 1))       # at least one device can run the node
        cost = {}
        for k, d in enumerate(names):
            masked = k != must and draw(st.integers(0, 3)) == 0
            if not masked:
                cost[d] = draw(st.integers(0, 40)) / 4
            elif draw(st.booleans()):
                cost[d] = INF                     # an explicit inf, or the device just absent
        g.add_node(i, cost=cost, mem=float(draw(st.integers(0, 4))))
    for j in range(1, n):
        srcs = [j - 1] if chain_only else [i for i in range(j) if draw(st.integers(0, 2)) == 0]
        for i in srcs:
            g.add_edge(i, j, bytes=float(draw(st.integers(0, 2000))))
    links = {}
    for a in names:
        for b in names:
            if a != b and draw(st.booleans()):
                links[a, b] = Link(draw(st.integers(0, 8)) / 4, draw(st.sampled_from([100.0, 500.0, INF])))
    default = Link(draw(st.integers(0, 8)) / 4, draw(st.sampled_from([200.0, 1000.0, INF])))
    limits = [None] * nd
    if memory:
        limits = [draw(st.one_of(st.none(), st.integers(0, 12).map(float))) for _ in names]
    devices = [Device(d, m) for d, m in zip(names, limits)]
    return g, devices, links, default


def build(spec):
    g, devices, links, default = spec
    return Problem(g, devices, links, default)


def outcome(solver, problem):
    try:
        return solver(problem)
    except ConfigError:
        return None


def assert_feasible(problem, plan):
    assert check_plan(problem, plan) == [], check_plan(problem, plan)


@FAST
@given(problems(memory=True, min_nodes=4))
def test_milp_equals_brute_force(spec):
    try:
        problem = build(spec)
    except ConfigError:
        return                       # a memory limit no node fits: covered by the bad-input tests
    exact, ours = outcome(brute.solve, problem), outcome(milp.solve, problem)
    assert (exact is None) == (ours is None)
    if exact is None:
        return
    assert ours.status == "optimal" and ours.gap == 0.0
    assert close(ours.makespan, exact.makespan), (ours.makespan, exact.makespan)
    assert_feasible(problem, ours)
    assert_feasible(problem, exact)


@FAST
@given(problems(memory=True))
def test_milp_schedule_is_feasible(spec):
    try:
        problem = build(spec)
    except ConfigError:
        return
    plan = outcome(milp.solve, problem)
    if plan is None:
        return
    assert_feasible(problem, plan)
    if "highs_failed" in plan.info:  # HiGHS gave up; CP-SAT solved it (checked above)
        return
    # The solver's own start times obey the model too (up to HiGHS's tolerances) ...
    raw = type(plan)(plan.assignment, plan.info["milp_start"], plan.info["milp_finish"],
                     max(plan.info["milp_finish"].values()), "raw")
    assert check_plan(problem, raw, tol=1e-5) == []
    assert plan.makespan <= plan.info["milp_makespan"] + 1e-5 * max(1.0, plan.makespan)
    # ... and no list schedule of its assignment beats it.
    assert evaluate(problem, plan.assignment).makespan >= plan.makespan - 1e-6


@FAST
@given(problems(min_nodes=3))
def test_bound_milp_heuristics_order(spec):
    problem = build(spec)
    plan = milp.solve(problem)
    lb = lower_bound(problem)
    assert lb <= plan.makespan + 1e-9
    for baseline in (heuristics.single_device, heuristics.greedy, heuristics.heft):
        other = outcome(baseline, problem)
        if other is None:            # e.g. no single device can run every node
            continue
        assert_feasible(problem, other)
        assert plan.makespan <= other.makespan + 1e-6, other.solver
        assert other.lower_bound <= other.makespan and 0 <= other.gap <= 1


@FAST
@given(problems(chain_only=True, max_nodes=8))
def test_chain_dp_equals_milp(spec):
    problem = build(spec)
    dp = chain.solve(problem)
    assert_feasible(problem, dp)
    assert close(dp.makespan, milp.solve(problem).makespan)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=7), st.data())
def test_free_transfers_on_identical_devices_give_critical_path(costs, data):
    n = len(costs)
    g = nx.DiGraph()
    for i, c in enumerate(costs):
        g.add_node(i, cost={f"d{k}": float(c) for k in range(n)})
    for j in range(1, n):
        for i in range(j):
            if data.draw(st.booleans()):
                g.add_edge(i, j, bytes=1e6)
    problem = Problem(g, [f"d{k}" for k in range(n)], default_link=Link(0.0, INF))
    finish = {}
    for v in nx.topological_sort(g):
        finish[v] = costs[v] + max((finish[u] for u in g.predecessors(v)), default=0.0)
    critical = max(finish.values())
    assert close(milp.solve(problem).makespan, critical)
    assert close(lower_bound(problem), critical)
    h = g.copy()
    for v in h:
        h.nodes[v]["cost"] = {"cpu": float(costs[v])}
    one = Problem(h, ["cpu"], default_link=Link(1.0, 1.0))
    assert close(milp.solve(one).makespan, sum(costs))
    assert close(heuristics.heft(one).makespan, sum(costs))


def diamond():
    g = nx.DiGraph()
    g.add_node("a", cost={"cpu": 4.0, "gpu": 1.0}, mem=1.0)
    g.add_node("b", cost={"cpu": 3.0, "gpu": 2.0}, mem=1.0)
    g.add_node("c", cost={"cpu": 3.0, "gpu": 2.0}, mem=1.0)
    g.add_node("d", cost={"cpu": 1.0}, mem=1.0)
    g.add_edges_from([("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")], bytes=100.0)
    return g


def test_diamond_uses_both_devices():
    problem = Problem(diamond(), ["cpu", "gpu"], default_link=Link(0.1, 1000.0))
    plan = milp.solve(problem)
    # a and one branch on the GPU, the other branch and the CPU-only d on the CPU:
    # a 0-1 on gpu, b 1-3 on gpu, c 1.2-4.2 on cpu, d 4.2-5.2 (b's result arrives at 3.2).
    assert plan.makespan == pytest.approx(5.2)
    assert sorted(plan.assignment.values()) == ["cpu", "cpu", "gpu", "gpu"]
    assert plan.makespan < heuristics.single_device(problem).makespan


def test_time_limited_milp_reports_status():
    rng = random.Random(3)
    names = ["d0", "d1", "d2"]
    g = nx.DiGraph()
    for i in range(22):
        g.add_node(i, cost={d: rng.randint(1, 40) / 4 for d in names if d == "d2" or rng.random() < 0.8})
        g.add_edges_from((j, i, {"bytes": float(rng.randint(0, 2000))})
                         for j in range(i) if rng.random() < 0.12)
    problem = Problem(g, names, default_link=Link(0.5, 1000.0))
    quick = milp.solve(problem, time_limit=0.01)
    assert quick.status in ("time_limit", "optimal") and check_plan(problem, quick) == []
    assert lower_bound(problem) <= quick.lower_bound <= quick.makespan
    assert quick.makespan <= heuristics.heft(problem).makespan + 1e-9
    assert quick.solve_s < 5


def test_unknown_device_is_named():
    g = diamond()
    g.nodes["b"]["cost"]["npu"] = 1.0
    with pytest.raises(ConfigError, match=r"node 'b'.*'npu'") as err:
        Problem(g, ["cpu", "gpu"])
    assert "known devices" in str(err.value)


def test_node_no_device_can_run_is_named():
    g = diamond()
    g.nodes["c"]["cost"] = {"cpu": INF}
    with pytest.raises(ConfigError, match="node 'c' cannot run on any device"):
        Problem(g, ["cpu", "gpu"])


def test_cycle_is_rejected():
    g = diamond()
    g.add_edge("d", "a")
    with pytest.raises(ConfigError, match="cycle"):
        Problem(g, ["cpu", "gpu"])


def test_negative_cost_is_rejected():
    g = diamond()
    g.nodes["a"]["cost"]["gpu"] = -1.0
    with pytest.raises(ConfigError, match="invalid cost"):
        Problem(g, ["cpu", "gpu"])


@pytest.mark.parametrize("limits, match", [
    ((0.5, 8.0), "node 'd'"),          # d runs only on the CPU and does not fit there
    ((2.0, 1.0), "memory in all"),     # 4 units of nodes, 3 units of memory
])
def test_memory_no_plan_meets_is_rejected_before_solving(limits, match):
    devices = [Device("cpu", limits[0]), Device("gpu", limits[1])]
    with pytest.raises(ConfigError, match=match):
        Problem(diamond(), devices)


def test_memory_packing_infeasible_raises_from_solvers():
    # each device holds 2, nodes need 1.5 each: 4 units of memory, no two nodes share a device
    g = diamond()
    for v in g:
        g.nodes[v]["mem"] = 1.5
        g.nodes[v]["cost"] = {"cpu": 1.0, "gpu": 1.0}
    problem = Problem(g, [Device("cpu", 2.0), Device("gpu", 2.0), Device("npu", 2.0)])
    for solver in (milp.solve, brute.solve):
        with pytest.raises(ConfigError, match="memory"):
            solver(problem)


def test_memory_limit_moves_work():
    g = diamond()
    problem = Problem(g, [Device("cpu"), Device("gpu", memory=1.0)], default_link=Link(0.1, 1000.0))
    plan = milp.solve(problem)
    assert list(plan.assignment.values()).count("gpu") <= 1
    assert plan.makespan == pytest.approx(brute.solve(problem).makespan)


def test_chain_solver_refuses_a_dag():
    problem = Problem(diamond(), ["cpu", "gpu"])
    with pytest.raises(ConfigError, match="path graph"):
        chain.solve(problem)


def test_errors_are_qcompile_errors():
    assert issubclass(ConfigError, QCompileError)


def _regression(devices, links, default, nodes, edges):
    g = nx.DiGraph()
    for v, (cost, mem) in enumerate(nodes):
        g.add_node(v, cost=cost, mem=mem)
    g.add_edges_from((u, v, {"bytes": b}) for u, v, b in edges)
    return Problem(g, devices, links, default)


def test_regression_highs_solve_error_is_retried():
    # HiGHS reported "Solve error" (its post-restart solution was 1e-6 infeasible).
    problem = _regression(["d0", "d1"], {("d1", "d0"): Link(1.25, INF)}, Link(0.75, 200.0), [
        ({"d0": 3.0, "d1": 2.5}, 4.0), ({"d0": 3.5, "d1": 1.25}, 4.0), ({"d0": 9.0, "d1": 6.75}, 2.0),
        ({"d0": 4.5, "d1": 3.75}, 0.0), ({"d1": 0.25}, 3.0)], [(1, 4, 1304.0)])
    plan = milp.solve(problem)
    assert plan.status == "optimal"
    assert plan.makespan == pytest.approx(brute.solve(problem).makespan) == pytest.approx(8.25)


def test_regression_zero_cost_near_tie_keeps_milp_order():
    # The MILP started zero-cost node 1 at 8 - 1e-6 + 3e-15, a hair after node 5 on d0;
    # sorting raw starts put 1 behind 5 and lost 3.4 s.
    problem = _regression(["d0", "d1"], {}, Link(0.5, 200.0), [
        ({"d0": 6.5, "d1": 8.5}, 2.0), ({"d0": 0.0}, 3.0), ({"d0": 8.0, "d1": 1.5}, 3.0),
        ({"d0": 4.5, "d1": 1.25}, 0.0), ({"d1": 5.5}, 1.0), ({"d0": 7.25, "d1": 9.25}, 4.0)],
        [(0, 3, 650.0), (0, 4, 1529.0), (1, 3, 328.0)])
    assert milp.solve(problem).makespan == pytest.approx(brute.solve(problem).makespan) \
        == pytest.approx(15.25)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(problems(max_nodes=5, memory=True))
def test_brute_force_equals_naive_enumeration(spec):
    """brute's pruning is exact: compare with every assignment × every topological order."""
    try:
        problem = build(spec)
    except ConfigError:
        return
    from itertools import product

    from qcompile.placement import schedule_in_order
    orders = list(nx.all_topological_sorts(problem.graph))
    best = INF
    for devices in product(*[problem.capable(v) for v in problem.order]):
        try:
            best = min(best, *(schedule_in_order(problem, dict(zip(problem.order, devices)), o).makespan
                               for o in orders))
        except ConfigError:          # over a memory limit
            continue
    got = outcome(brute.solve, problem)
    assert (got.makespan if got else INF) == best
