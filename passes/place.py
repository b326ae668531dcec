"""Place every node of a graph on one of several devices (DiviML, Ghannane & Abdelfattah,
arXiv 2308.00127; our reconstruction, ``shared/reference/peers.md`` §A.2).

The pass builds the cost graph (:func:`qcompile.placement.costs.build_problem`: one node per
fused group as the backends emit it, a measured or roofline cost per device, inf where the
device refuses it, the bytes each edge moves), applies the user's pins, solves it for
latency (:mod:`qcompile.placement.split`: the exact MILP per segment between cut nodes,
stitched by dynamic programming; :mod:`qcompile.placement.milp` for the whole graph when it
is small), grades the plan against the lower bound and the baselines (best single device,
ONNX-Runtime-style greedy, HEFT), and annotates the graph: ``graph.meta["placement"]`` maps
every IR node to its device (:func:`device_of`). The result is a :class:`Placement`, which
also cuts the graph into per-device segments (:func:`qcompile.placement.subgraph.partition`)
for the runtime.

The solver is found from here in one step: ``SOLVERS`` below.
"""
from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from qcompile.errors import ConfigError
from qcompile.ir.graph import Graph, Node
from qcompile.placement import bound, chain, heuristics, milp
from qcompile.placement.costgraph import INF, Plan, Problem, evaluate
from qcompile.placement.subgraph import Segment, partition

__all__ = ["place", "Placement", "device_of", "SOLVERS", "read_plan_file", "apply_pins"]

PLAN_VERSION = 1


def _split(problem: Problem, time_limit: float | None) -> Plan:
    from qcompile.placement import split
    return split.solve(problem, time_limit=time_limit)


def _milp(problem: Problem, time_limit: float | None) -> Plan:
    return milp.solve(problem, time_limit=time_limit)


def _cpsat(problem: Problem, time_limit: float | None) -> Plan:
    from qcompile.placement import cpsat
    return cpsat.solve(problem, time_limit=time_limit)


def _auto(problem: Problem, time_limit: float | None) -> Plan:
    """The chain DP on chains, else splitting (exact: each segment between cut nodes solved
    by brute force, CP-SAT or HiGHS, stitched by dynamic programming)."""
    if chain.is_chain(problem):
        return chain.solve(problem)
    return _split(problem, time_limit)


#: latency solvers by name (``compile(..., placement={"solver": name})``)
SOLVERS = {"auto": _auto, "split": _split, "milp": _milp, "cpsat": _cpsat,
           "heft": lambda p, t: heuristics.heft(p), "greedy": lambda p, t: heuristics.greedy(p),
           "single": lambda p, t: heuristics.single_device(p)}


def device_of(graph: Graph, node: Node | str) -> str | None:
    """The device ``place`` put ``node`` on (None before placement)."""
    name = node if isinstance(node, str) else node.name
    return graph.meta.get("placement", {}).get(name)


@dataclass
class Placement:
    """A solved placement: the cost model, the plan over fused groups, the baselines it was
    graded against, every IR node's device, and the per-device segments to run."""

    devices: list                       # DeviceConfig
    links: dict
    problem: Problem
    groups: dict[str, list[str]]        # group -> IR node names
    plan: Plan
    baselines: dict[str, Plan]
    assignment: dict[str, str]          # IR node -> device
    segments: list[Segment]
    pins: dict[str, str] = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    #: the build's measured check of the plan against the best single device (None: none ran)
    verified: dict | None = None

    @property
    def device_names(self) -> list[str]:
        return [d.name for d in self.devices]

    def report(self) -> dict:
        """The numbers ``qcompile build`` prints and ``summary()`` returns."""
        p = self.plan
        counts = {d: sum(1 for v in self.assignment.values() if v == d) for d in self.device_names}
        return {"devices": [{"name": d.name, "target": d.target,
                             **({"spec": d.spec} if getattr(d, "spec", None) else {}),
                             "nodes": counts[d.name]} for d in self.devices],
                "solver": p.solver, "status": p.status, "solve_s": round(p.solve_s, 4),
                "predicted_ms": 1e3 * p.makespan, "lower_bound_ms": 1e3 * p.lower_bound,
                "gap": p.gap, "segments": len(self.segments),
                "baselines_ms": {k: 1e3 * b.makespan for k, b in self.baselines.items()},
                **({"period_ms": 1e3 * p.info["period"]} if "period" in p.info else {}),
                **({"pins": dict(self.pins)} if self.pins else {}),
                **({"verified": dict(self.verified)} if self.verified else {})}

    def format(self) -> str:
        """A few lines for people: devices, predicted latency, bound, gap, solver, baselines."""
        r = self.report()
        lines = ["placement:"]
        for d in r["devices"]:
            spec = f", modelled as {d['spec']}" if "spec" in d else ""
            lines.append(f"  {d['name']:<10} target {d['target']}{spec}: {d['nodes']} nodes")
        lines.append(f"  predicted {r['predicted_ms']:.3f} ms, lower bound {r['lower_bound_ms']:.3f} ms "
                     f"(gap {100 * r['gap']:.1f}%), solver {r['solver']} ({r['status']}) "
                     f"in {r['solve_s']:.2f} s, {r['segments']} segments")
        if r["baselines_ms"]:
            lines.append("  baselines: " + ", ".join(f"{k} {v:.3f} ms" for k, v in r["baselines_ms"].items()))
        if self.verified:
            v = self.verified
            lines.append(f"  measured: plan {v['plan_ms']:.3f} ms, {v['single_device']} alone "
                         f"{v['single_device_ms']:.3f} ms -> kept the {v['kept'].replace('_', ' ')}")
        return "\n".join(lines)

    # -- the editable plan file -----------------------------------------------------------
    def to_json(self) -> dict:
        """The plan as a user edits it: ``pins`` (a node name, a group name or an fnmatch
        pattern over node names or module paths → device) re-solve with those nodes fixed;
        ``assignment`` (group → device) is taken as the plan when it covers every group and
        the file is passed back with ``"solve": false``."""
        p = self.plan
        return {"plan_version": PLAN_VERSION,
                "devices": [{"name": d.name, "target": d.target,
                             **({"spec": d.spec} if getattr(d, "spec", None) else {}),
                             **({"options": dict(d.options)} if getattr(d, "options", None) else {}),
                             **({"memory": d.memory} if getattr(d, "memory", None) is not None else {}),
                             **({"measure": d.measure} if getattr(d, "measure", None) is not None else {})}
                            for d in self.devices],
                "pins": dict(self.pins), "solve": True,
                "assignment": {g: p.assignment[g] for g in self.problem.order},
                "groups": {g: list(ns) for g, ns in self.groups.items()},
                "predicted": {"makespan_s": p.makespan, "lower_bound_s": p.lower_bound,
                              "solver": p.solver, "status": p.status, "solve_s": p.solve_s,
                              "start": {g: p.start[g] for g in self.problem.order},
                              "finish": {g: p.finish[g] for g in self.problem.order},
                              "baselines_s": {k: b.makespan for k, b in self.baselines.items()},
                              **({"verified": dict(self.verified)} if self.verified else {})},
                "segments": [s.to_json() for s in self.segments]}

    def save_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path


def read_plan_file(spec) -> dict:
    """A plan given as a dict or a JSON path (what :meth:`Placement.save_json` writes, or a
    hand-written ``{"pins": {...}}``), checked for shape."""
    if isinstance(spec, (str, Path)):
        try:
            spec = json.loads(Path(spec).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read the plan file {spec}: {e.strerror}",
                              hint="pass the JSON a previous build wrote (plan.json)") from None
        except ValueError as e:
            raise ConfigError(f"the plan file {spec} is not JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"a plan is a dict or a JSON file path, got {type(spec).__name__}")
    unknown = set(spec) - {"plan_version", "devices", "pins", "solve", "assignment", "groups",
                           "predicted", "segments", "solver", "time_limit", "objective",
                           "contiguous", "verify"}
    if unknown:
        raise ConfigError(f"unknown plan keys {sorted(unknown)}",
                          hint="a plan has 'pins' {pattern: device}, 'assignment', 'solve', "
                               "'solver', 'time_limit'")
    pins = spec.get("pins", {})
    if not isinstance(pins, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in pins.items()):
        raise ConfigError("plan 'pins' must map node names or patterns to device names")
    return spec


def _match(pattern: str, graph: Graph, group_nodes: list[str], group: str, by_name) -> bool:
    if pattern == group or pattern in group_nodes:
        return True
    for n in group_nodes:
        module = by_name[n].provenance.module or ""
        if fnmatch.fnmatchcase(n, pattern) or (module and fnmatch.fnmatchcase(module, pattern)):
            return True
    return False


def apply_pins(problem: Problem, groups: dict, graph: Graph, pins: dict[str, str]) -> Problem:
    """A copy of ``problem`` where each group a pin matches can run only on the pinned device
    (its other costs set to inf). A pin naming an unknown device, matching nothing, or
    pinning a group to a device that cannot run it is a ``ConfigError``."""
    if not pins:
        return problem
    names = problem.names
    by_name = {n.name: n for n in graph.nodes}
    g = problem.graph.copy()
    for pattern, dev in pins.items():
        if dev not in names:
            raise ConfigError(f"pin {pattern!r} names unknown device {dev!r}",
                              hint=f"devices: {names}")
        hit = [grp for grp in problem.order
               if grp in groups and _match(pattern, graph, groups[grp], grp, by_name)]
        if not hit:
            raise ConfigError(f"pin {pattern!r} matches no node",
                              hint="pin a node name, a group name from plan.json, or an fnmatch "
                                   "pattern over node names or module paths (e.g. 'encoder.layer.0.*')")
        for grp in hit:
            if problem.cost(grp, dev) == INF:
                raise ConfigError(f"pin {pattern!r} puts {grp!r} on {dev!r}, which cannot run it",
                                  hint=f"devices that can: {problem.capable(grp)}")
            g.nodes[grp]["cost"] = {d: (t if d == dev else INF)
                                    for d, t in g.nodes[grp]["cost"].items()}
    return Problem(g, problem.devices, problem.links, problem.default_link)


def _baselines(problem: Problem) -> dict[str, Plan]:
    out = {}
    for name, fn in (("single_device", heuristics.single_device), ("greedy", heuristics.greedy),
                     ("heft", heuristics.heft)):
        try:
            out[name] = fn(problem)
        except ConfigError:  # e.g. no single device can run everything
            pass
    return out


def _fixed_plan(problem: Problem, assignment: dict, terminals: dict | None = None) -> Plan:
    """The plan of a given {group: device} ``assignment``; a terminal (a graph input or
    output, ``CostModel.terminals``) the assignment leaves out goes with its group."""
    assignment = dict(assignment)
    for t, g in (terminals or {}).items():
        if t not in assignment and g in assignment:
            assignment[t] = assignment[g]
    missing = [g for g in problem.order if g not in assignment]
    if missing:
        raise ConfigError(f"the plan's assignment leaves {len(missing)} group(s) out, e.g. {missing[:3]}",
                          hint="give every group a device, or set \"solve\": true and use pins")
    plan = evaluate(problem, {g: assignment[g] for g in problem.order})
    plan.solver, plan.status = "given", "heuristic"
    plan.lower_bound = min(plan.makespan, bound.lower_bound(problem))
    return plan


def solve_problem(problem: Problem, solver: str = "auto", time_limit: float | None = 60.0) -> Plan:
    if solver not in SOLVERS:
        raise ConfigError(f"unknown placement solver {solver!r}", hint=f"solvers: {sorted(SOLVERS)}")
    t0 = time.perf_counter()
    plan = SOLVERS[solver](problem, time_limit)
    if solver in ("heft", "greedy", "single"):
        plan.lower_bound = min(plan.makespan, bound.lower_bound(problem))
    plan.solve_s = plan.solve_s or (time.perf_counter() - t0)
    return plan


def place(graph: Graph, devices, links, sample, *, plan=None, solver: str | None = None,
          time_limit: float | None = None, progress: bool = True, cost_model=None) -> Placement:
    """Place ``graph`` on ``devices`` (``DeviceConfig`` s) joined by ``links`` for the input
    shapes of ``sample`` (a tuple of example tensors); ``plan`` is a plan dict or JSON path
    (pins, a fixed assignment, solver options). Annotates ``graph.meta["placement"]``."""
    spec = read_plan_file(plan) if plan is not None else {}
    solver = solver or spec.get("solver", "auto")
    time_limit = time_limit if time_limit is not None else spec.get("time_limit", 60.0)
    cm = cost_model
    if cm is None:
        from qcompile.placement.costs import build_problem
        cm = build_problem(graph, devices, links, sample, progress=progress)
    problem, groups = cm.problem, cm.groups
    pins = dict(spec.get("pins", {}))
    pinned = apply_pins(problem, groups, graph, pins)
    objective = spec.get("objective", "latency")
    if objective not in ("latency", "throughput"):
        raise ConfigError(f"unknown placement objective {objective!r}",
                          hint="'latency' (one input, the makespan) or 'throughput' (the "
                               "pipelined period: the busiest device or link)")
    if spec.get("solve", True) is False:
        best = _fixed_plan(pinned, spec.get("assignment", {}), getattr(cm, "terminals", {}))
    elif objective == "throughput":
        from qcompile.placement import throughput
        best = throughput.solve(pinned, contiguous=bool(spec.get("contiguous", False)),
                                time_limit=time_limit)
    else:
        best = solve_problem(pinned, solver, time_limit)
    baselines = _baselines(problem)
    assignment = {n: best.assignment[g] for g, ns in groups.items() for n in ns}
    graph.meta["placement"] = dict(assignment)
    order = _node_order(graph, groups, best)
    segments = partition(graph, assignment, order)
    return Placement(list(devices), dict(links), problem, groups, best, baselines, assignment,
                     segments, pins, dict(getattr(cm, "source", {})))


def _node_order(graph: Graph, groups: dict, plan: Plan) -> list[str]:
    """IR node names in the plan's start order (a topological order: ties by graph order)."""
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    group_of = {n: g for g, ns in groups.items() for n in ns}
    dg = nx.DiGraph()
    producer = {id(o): n.name for n in graph.nodes for o in n.outputs}
    for n in graph.nodes:
        dg.add_node(n.name)
        for v in n.inputs:
            if v is not None and id(v) in producer:
                dg.add_edge(producer[id(v)], n.name)
    key = {n: (plan.start[group_of[n]], index[n]) for n in index}
    return list(nx.lexicographical_topological_sort(dg, key=key.__getitem__))
