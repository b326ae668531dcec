"""The placement model: a cost graph, devices, links, a plan, and the makespan of an assignment.

The model every solver in :mod:`qcompile.placement` follows (DiviML's latency model,
Ghannane & Abdelfattah, arXiv 2308.00127; our reconstruction, see
``shared/reference/peers.md`` §A.2):

* each node ``v`` runs on exactly one device ``d`` it can run on, for ``cost[v][d]`` seconds
  (a device missing from the node's ``cost`` dict, or at ``inf``, cannot run it);
* a device runs one node at a time, without preemption;
* a node starts once every predecessor ``u`` has finished, plus the transfer time
  ``α + bytes/β`` of the link ``(device(u), device(v))`` when the two differ (free when equal);
* transfers never contend: any number may use a link at once, and they overlap computation;
* the sum of ``mem`` of the nodes on a device stays within its ``memory`` limit;
* the makespan is the latest finish; the solvers minimise it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Iterable

import networkx as nx

from qcompile.errors import ConfigError

__all__ = ["Device", "Link", "Problem", "Plan", "evaluate", "schedule_in_order", "check_plan"]

INF = math.inf


@dataclass(frozen=True)
class Device:
    """A device that runs nodes one at a time; ``memory`` bounds the summed node ``mem``."""

    name: str
    memory: float | None = None


@dataclass(frozen=True)
class Link:
    """A directed link: a transfer of ``b`` bytes takes ``latency + b / bandwidth`` seconds."""

    latency: float = 0.0
    bandwidth: float = INF

    def time(self, nbytes: float) -> float:
        return self.latency + (0.0 if self.bandwidth == INF else nbytes / self.bandwidth)


def _bad_number(x) -> bool:
    return not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x)


@dataclass
class Problem:
    """A cost graph to place on ``devices`` connected by ``links``, validated on construction.

    ``graph`` is a ``networkx.DiGraph``: node attribute ``cost`` (``{device name: seconds}``)
    is required, ``mem`` (default 0) optional; edge attribute ``bytes`` (default 0).
    ``links`` maps an ordered pair of device names to its :class:`Link`; pairs not listed use
    ``default_link``. Raises :class:`ConfigError` for an unknown device, a node no device can
    run, a negative cost, a cycle, or a memory limit that no plan can meet node by node or
    in total (a packing that fails only in combination is reported by the solvers).
    """

    graph: nx.DiGraph
    devices: list[Device]
    links: dict[tuple[str, str], Link] = field(default_factory=dict)
    default_link: Link = field(default_factory=Link)

    def __post_init__(self):
        self.devices = [Device(d) if isinstance(d, str) else d for d in self.devices]
        self._validate_devices()
        self._validate_graph()
        self.order: list[Hashable] = list(nx.topological_sort(self.graph))
        self.index = {v: i for i, v in enumerate(self.order)}
        self.names = [d.name for d in self.devices]
        self._validate_memory()

    # -- validation ---------------------------------------------------------------------------
    def _validate_devices(self):
        if not self.devices:
            raise ConfigError("placement problem has no devices", hint="give at least one Device")
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate device names in {names}", hint="name each device once")
        for d in self.devices:
            if d.memory is not None and (_bad_number(d.memory) or d.memory < 0):
                raise ConfigError(f"device {d.name!r} has invalid memory {d.memory!r}",
                                  hint="use a non-negative number, or None for no limit")
        known = set(names)
        for (a, b), link in self.links.items():
            if a not in known or b not in known:
                raise ConfigError(f"link {(a, b)!r} names an unknown device",
                                  hint=f"known devices: {sorted(known)}")
            if a == b:
                raise ConfigError(f"link {(a, b)!r} joins a device to itself",
                                  hint="same-device transfers are free; drop this link")
        for key, link in [*self.links.items(), ("default", self.default_link)]:
            if _bad_number(link.latency) or link.latency < 0 or link.latency == INF:
                raise ConfigError(f"link {key!r} has invalid latency {link.latency!r}",
                                  hint="latency is a finite number of seconds >= 0")
            if _bad_number(link.bandwidth) or link.bandwidth <= 0:
                raise ConfigError(f"link {key!r} has invalid bandwidth {link.bandwidth!r}",
                                  hint="bandwidth is bytes/second > 0 (inf for free transfers)")

    def _validate_graph(self):
        g = self.graph
        if not isinstance(g, nx.DiGraph) or g.is_multigraph():
            raise ConfigError(f"cost graph must be a networkx.DiGraph, got {type(g).__name__}")
        if g.number_of_nodes() == 0:
            raise ConfigError("cost graph has no nodes", hint="there is nothing to place")
        if not nx.is_directed_acyclic_graph(g):
            cycle = [u for u, _ in nx.find_cycle(g)]
            raise ConfigError(f"cost graph has a cycle through {cycle!r}",
                              hint="placement needs a DAG; break the cycle (e.g. unroll it)")
        known = {d.name for d in self.devices}
        for v, data in g.nodes(data=True):
            cost = data.get("cost")
            if not isinstance(cost, dict):
                raise ConfigError(f"node {v!r} has no 'cost' dict",
                                  hint="set graph.nodes[v]['cost'] = {device: seconds}")
            for d, t in cost.items():
                if d not in known:
                    raise ConfigError(f"node {v!r} has a cost for unknown device {d!r}",
                                      hint=f"known devices: {sorted(known)}")
                if _bad_number(t) or t < 0:
                    raise ConfigError(f"node {v!r} has invalid cost {t!r} on device {d!r}",
                                      hint="costs are seconds >= 0; inf marks an unsupported device")
            if not any(t < INF for t in cost.values()):
                raise ConfigError(f"node {v!r} cannot run on any device",
                                  hint="give it a finite cost on at least one device "
                                       "(e.g. a CPU fallback)")
            mem = data.get("mem", 0.0)
            if _bad_number(mem) or mem < 0 or mem == INF:
                raise ConfigError(f"node {v!r} has invalid mem {mem!r}", hint="use a finite number >= 0")
        for u, v, data in g.edges(data=True):
            b = data.get("bytes", 0.0)
            if _bad_number(b) or b < 0 or b == INF:
                raise ConfigError(f"edge {u!r}->{v!r} has invalid bytes {b!r}",
                                  hint="use a finite number >= 0")

    def _validate_memory(self):
        for v in self.order:
            if not any(self.fits(v, d, 0.0) for d in self.capable(v)):
                raise ConfigError(
                    f"node {v!r} (mem {self.mem(v)}) fits in the memory of no device that can run it",
                    hint="raise a device's memory limit or give the node a cost on a larger device")
        limits = [d.memory for d in self.devices]
        if all(m is not None for m in limits):
            total = sum(self.mem(v) for v in self.order)
            if total > sum(limits):
                raise ConfigError(f"nodes need {total} memory in all but the devices hold {sum(limits)}",
                                  hint="raise the devices' memory limits or add a device")

    # -- queries ------------------------------------------------------------------------------
    def cost(self, v, d: str) -> float:
        return float(self.graph.nodes[v]["cost"].get(d, INF))

    def capable(self, v) -> list[str]:
        """Devices that can run ``v``, in device order."""
        return [n for n in self.names if self.cost(v, n) < INF]

    def min_cost(self, v) -> float:
        return min(self.cost(v, d) for d in self.names)

    def mem(self, v) -> float:
        return float(self.graph.nodes[v].get("mem", 0.0))

    def memory(self, d: str) -> float:
        m = self.devices[self.names.index(d)].memory
        return INF if m is None else float(m)

    def fits(self, v, d: str, used: float) -> bool:
        return used + self.mem(v) <= self.memory(d)

    def link(self, a: str, b: str) -> Link:
        return self.links.get((a, b), self.default_link)

    def transfer(self, u, v, a: str, b: str) -> float:
        """Seconds for edge ``u -> v`` with ``u`` on ``a`` and ``v`` on ``b`` (0 when ``a == b``)."""
        if a == b:
            return 0.0
        return self.link(a, b).time(float(self.graph.edges[u, v].get("bytes", 0.0)))


@dataclass
class Plan:
    """An assignment of nodes to devices with a schedule.

    ``status`` is ``"optimal"`` (proved), ``"time_limit"`` (best found when the solver
    stopped) or ``"heuristic"``. ``lower_bound`` is a proved bound on the optimal makespan;
    ``gap`` is ``(makespan - lower_bound) / makespan`` (HiGHS's convention), 0 for an empty one.
    """

    assignment: dict
    start: dict
    finish: dict
    makespan: float
    solver: str
    solve_s: float = 0.0
    lower_bound: float = 0.0
    status: str = "heuristic"
    info: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        return 0.0 if self.makespan <= 0 else max(0.0, (self.makespan - self.lower_bound) / self.makespan)


def _check_assignment(problem: Problem, assignment: dict):
    used = dict.fromkeys(problem.names, 0.0)
    for v in problem.order:
        if v not in assignment:
            raise ConfigError(f"assignment leaves node {v!r} unplaced", hint="assign every node")
        d = assignment[v]
        if d not in used:
            raise ConfigError(f"node {v!r} is assigned to unknown device {d!r}",
                              hint=f"known devices: {problem.names}")
        if problem.cost(v, d) == INF:
            raise ConfigError(f"node {v!r} is assigned to {d!r}, which cannot run it",
                              hint=f"devices that can: {problem.capable(v)}")
        used[d] += problem.mem(v)
    for d, m in used.items():
        if m > problem.memory(d):
            raise ConfigError(f"assignment puts {m} memory on device {d!r}, over its limit "
                              f"{problem.memory(d)}", hint="move nodes off that device")


def _ready_time(problem: Problem, assignment, finish, free, v) -> float:
    d = assignment[v]
    t = free[d]
    for u in problem.graph.predecessors(v):
        t = max(t, finish[u] + problem.transfer(u, v, assignment[u], d))
    return t


def _plan(problem, assignment, start, finish, solver, **kw) -> Plan:
    makespan = max(finish.values())
    return Plan(dict(assignment), start, finish, makespan, solver, **kw)


def schedule_in_order(problem: Problem, assignment: dict, order: Iterable, solver="order") -> Plan:
    """The semi-active schedule of ``assignment`` that runs nodes in ``order`` (a topological
    order): each node starts as soon as its device is free of the nodes before it in ``order``
    and its inputs have arrived. For a fixed per-device order this is the earliest schedule."""
    _check_assignment(problem, assignment)
    free = dict.fromkeys(problem.names, 0.0)
    start, finish = {}, {}
    for v in order:
        s = _ready_time(problem, assignment, finish, free, v)
        start[v], finish[v] = s, s + problem.cost(v, assignment[v])
        free[assignment[v]] = finish[v]
    return _plan(problem, assignment, start, finish, solver)


def evaluate(problem: Problem, assignment: dict) -> Plan:
    """The makespan of ``assignment`` under a list schedule.

    Repeatedly start, among the nodes whose predecessors have all been scheduled, the one
    that can start earliest (ties: topological index), at the time its device is free and
    its inputs have arrived; a device never goes back to fill an earlier idle gap
    (no insertion). Transfers do not contend. The result is an upper bound on the optimum for
    this assignment (the exact optimum needs the per-device order; see ``brute``).
    """
    _check_assignment(problem, assignment)
    g, index = problem.graph, problem.index
    missing = {v: g.in_degree(v) for v in problem.order}
    ready = [v for v, k in missing.items() if k == 0]
    free = dict.fromkeys(problem.names, 0.0)
    start, finish = {}, {}
    while ready:
        v = min(ready, key=lambda w: (_ready_time(problem, assignment, finish, free, w), index[w]))
        ready.remove(v)
        s = _ready_time(problem, assignment, finish, free, v)
        start[v], finish[v] = s, s + problem.cost(v, assignment[v])
        free[assignment[v]] = finish[v]
        for w in g.successors(v):
            missing[w] -= 1
            if missing[w] == 0:
                ready.append(w)
    return _plan(problem, assignment, start, finish, "evaluate")


def check_plan(problem: Problem, plan: Plan, tol: float = 1e-6) -> list[str]:
    """Every way ``plan`` breaks the model (empty when it is a feasible schedule), checked
    with absolute tolerance ``tol``: durations, precedence plus transfer, no overlap on a
    device, capability, memory, and the reported makespan."""
    out = []
    a, s, f = plan.assignment, plan.start, plan.finish
    try:
        _check_assignment(problem, a)
    except ConfigError as e:
        return [str(e)]
    for v in problem.order:
        if s[v] < -tol or abs(f[v] - s[v] - problem.cost(v, a[v])) > tol:
            out.append(f"node {v!r}: start {s[v]} finish {f[v]} cost {problem.cost(v, a[v])}")
    for u, v in problem.graph.edges:
        need = f[u] + problem.transfer(u, v, a[u], a[v])
        if s[v] < need - tol:
            out.append(f"edge {u!r}->{v!r}: {v!r} starts at {s[v]} before {need}")
    nodes = problem.order
    for i, u in enumerate(nodes):
        for v in nodes[i + 1:]:
            if a[u] == a[v] and min(f[u], f[v]) - max(s[u], s[v]) > tol:
                out.append(f"nodes {u!r} and {v!r} overlap on {a[u]!r}")
    if abs(plan.makespan - max(f.values())) > tol:
        out.append(f"makespan {plan.makespan} != latest finish {max(f.values())}")
    return out
