"""cpsat.solve (the makespan model on OR-Tools CP-SAT) against the HiGHS MILP and brute force."""
import math
import sys

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from test_solvers import build, close, diamond, problems

from qcompile.errors import ConfigError
from qcompile.placement import Device, Link, Problem, brute, check_plan, cpsat, lower_bound, milp

INF = math.inf
FAST = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def ortools():
    return pytest.importorskip("ortools")


def outcome(solver, problem):
    try:
        return solver(problem)
    except ConfigError:
        return None


@FAST
@given(problems(memory=True, max_nodes=8))
def test_cpsat_equals_milp(spec):
    pytest.importorskip("ortools")
    try:
        problem = build(spec)
    except ConfigError:
        return
    ours, exact = outcome(cpsat.solve, problem), outcome(milp.solve, problem)
    assert (ours is None) == (exact is None)
    if ours is None:
        return
    assert ours.status == "optimal"
    assert close(ours.makespan, exact.makespan), (ours.makespan, exact.makespan)
    assert lower_bound(problem) - 1e-9 <= ours.lower_bound <= ours.makespan
    assert check_plan(problem, ours) == [], check_plan(problem, ours)


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problems(memory=True, min_nodes=5, max_nodes=7))
def test_cpsat_equals_brute_force(spec):
    pytest.importorskip("ortools")
    try:
        problem = build(spec)
    except ConfigError:
        return
    ours, exact = outcome(cpsat.solve, problem), outcome(brute.solve, problem)
    assert (ours is None) == (exact is None)
    if ours is not None:
        assert close(ours.makespan, exact.makespan)


def test_diamond_and_two_workers(ortools):
    problem = Problem(diamond(), ["cpu", "gpu"], default_link=Link(0.1, 1000.0))
    for workers in (1, 2):
        plan = cpsat.solve(problem, workers=workers)
        assert plan.makespan == pytest.approx(5.2) and plan.status == "optimal"
        assert plan.info["workers"] == workers and plan.solver == "cpsat"


def test_non_decimal_times_are_rounded_then_retimed_exactly(ortools):
    # thirds do not fit any tick: the schedule is re-timed with the exact costs, and the
    # rounding slack keeps the lower bound honest
    g = diamond()
    for v in g:
        g.nodes[v]["cost"] = {d: c / 3 for d, c in g.nodes[v]["cost"].items()}
    problem = Problem(g, ["cpu", "gpu"], default_link=Link(0.1 / 3, 3000.0))
    plan = cpsat.solve(problem, tick=0.01)
    exact = milp.solve(problem)
    assert check_plan(problem, plan) == []
    assert exact.makespan - 1e-9 <= plan.makespan <= exact.makespan + 2 * len(problem.order) * 0.01
    assert plan.lower_bound <= exact.makespan + 1e-9
    assert plan.info["tick"] == 0.01


def test_fractional_memory_is_exact_when_decimal(ortools):
    g = diamond()
    for v in g:
        g.nodes[v]["mem"] = 0.5
    problem = Problem(g, [Device("cpu"), Device("gpu", memory=0.5)], default_link=Link(0.1, 1000.0))
    plan = cpsat.solve(problem)
    assert list(plan.assignment.values()).count("gpu") == 1
    assert plan.makespan == pytest.approx(milp.solve(problem).makespan)


def test_memory_packing_infeasible_raises(ortools):
    g = diamond()
    for v in g:
        g.nodes[v]["mem"] = 1.5
        g.nodes[v]["cost"] = {"cpu": 1.0, "gpu": 1.0}
    problem = Problem(g, [Device("cpu", 2.0), Device("gpu", 2.0), Device("npu", 2.0)])
    with pytest.raises(ConfigError, match="memory"):
        cpsat.solve(problem)


def test_time_limit_keeps_a_feasible_plan(ortools):
    import random
    rng = random.Random(3)
    names = ["d0", "d1", "d2"]
    g = nx.DiGraph()
    for i in range(30):
        g.add_node(i, cost={d: rng.randint(1, 40) / 4 for d in names if d == "d2" or rng.random() < 0.8})
        g.add_edges_from((j, i, {"bytes": float(rng.randint(0, 2000))})
                         for j in range(i) if rng.random() < 0.1)
    problem = Problem(g, names, default_link=Link(0.5, 1000.0))
    plan = cpsat.solve(problem, time_limit=0.05)
    assert plan.status in ("optimal", "time_limit")
    assert lower_bound(problem) <= plan.lower_bound + 1e-9 and plan.lower_bound <= plan.makespan
    assert check_plan(problem, plan) == []


def test_bad_tick_is_refused(ortools):
    with pytest.raises(ConfigError, match="tick"):
        cpsat.solve(Problem(diamond(), ["cpu", "gpu"]), tick=0.0)


def test_missing_ortools_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "ortools", None)
    monkeypatch.setitem(sys.modules, "ortools.sat", None)
    monkeypatch.setitem(sys.modules, "ortools.sat.python", None)
    assert not cpsat.available()
    with pytest.raises(ConfigError, match="OR-Tools") as err:
        cpsat.solve(Problem(diamond(), ["cpu", "gpu"]))
    assert "pip install ortools" in str(err.value)
