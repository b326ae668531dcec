"""Running one model across several devices: the executor of a placed graph.

A :class:`PlacedExecutable` holds one executable per segment (a device's subgraph, lowered
by that device's backend) and one worker thread per device. A call submits every segment to
its device's thread in a topological order of the segment graph; a device runs its segments
in that order, each once the segments it reads from (on any device) have finished, so
independent devices work at the same time. Tensors cross devices as host torch tensors; an
executable that lives elsewhere moves them itself (TVM RPC upload/download, GPU copies).
Each segment's start and end of the last call are in :attr:`PlacedExecutable.timeline`.

:class:`PlacedModel` is the ``CompiledModel`` of a placed build; ``save`` writes the plan
(``plan.json``) and every segment's compiled files (named ``<segment>.<file>``) beside the
whole graph, and :func:`load_placed` lowers nothing: it hands each backend its segment's files
(remote backends upload them again).
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from qcompile.errors import ArtifactError, InputError
from qcompile.ir.graph import Graph
from qcompile.placement.subgraph import Segment, extract
from qcompile.runtime import CompiledModel

__all__ = ["PlacedExecutable", "PlacedModel", "lower_segments", "load_placed", "PLAN_FILE"]

PLAN_FILE = "plan.json"


def _segment_graph(graph: Graph, s: Segment, by_name: dict) -> Graph:
    """The segment's subgraph; its inputs and outputs must be the segment's, in its order
    (the executor feeds it by position)."""
    sub = extract(graph, [by_name[n] for n in s.nodes], s.name)
    got = ([v.name for v in sub.inputs], [v.name for v in sub.outputs])
    if got != (list(s.inputs), list(s.outputs)):
        raise ArtifactError(f"segment {s.name} reads/writes {got}, but the plan lists "
                            f"{(s.inputs, s.outputs)}", hint="rebuild the placed model")
    return sub


def lower_segments(graph: Graph, segments: list[Segment], devices: dict, *, progress: bool = False):
    """Each segment's subgraph lowered by its device's backend: ``[(subgraph, executable)]``."""
    from qcompile.backends import get_backend
    out = []
    it = segments
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(segments, desc="lower segments", unit="seg", leave=False)
    by_name = {n.name: n for n in graph.nodes}
    for s in it:
        d = devices[s.device]
        sub = _segment_graph(graph, s, by_name)
        ex = get_backend(d.target).lower(sub, d.target, **dict(d.options))
        out.append((sub, ex))
    return out


class PlacedExecutable:
    """Segments on devices, run concurrently; see the module docstring."""

    def __init__(self, graph: Graph, segments: list[Segment], executables: list, devices: dict):
        self.graph = graph
        self.segments = segments
        self.executables = executables
        self.devices = devices
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()
        #: the last call's ``[{segment, device, start, end}]`` in seconds from the call's start
        self.timeline: list[dict] = []
        isas = [getattr(e, "isa", None) for e in executables]
        self.isa = next((i for i in isas if i is not None), None)
        #: kernel backends' fallbacks, merged (summary() reports them)
        self.fallbacks = {k: v for e in executables for k, v in (getattr(e, "fallbacks", None) or {}).items()}

    def _pool(self, device: str) -> ThreadPoolExecutor:
        with self._lock:
            if device not in self._pools:
                self._pools[device] = ThreadPoolExecutor(1, thread_name_prefix=f"qcompile-{device}")
            return self._pools[device]

    def __call__(self, *args):
        inputs = self.graph.inputs
        if len(args) != len(inputs):
            raise InputError(f"the model takes {len(inputs)} input(s), got {len(args)}")
        env: dict[str, torch.Tensor] = {}
        for v, a in zip(inputs, args):
            env[v.name] = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
        producer: dict[str, int] = {}
        for i, s in enumerate(self.segments):
            for o in s.outputs:
                producer[o] = i
        t0 = time.perf_counter()
        marks: list = [None] * len(self.segments)
        futures: list[Future] = []

        def run(i: int):
            s = self.segments[i]
            for name in s.inputs:
                j = producer.get(name)
                if j is not None:
                    futures[j].result()  # re-raises a producer's failure here
            start = time.perf_counter()
            outs = self.executables[i](*[env[n] for n in s.inputs])
            end = time.perf_counter()
            for name, t in zip(s.outputs, outs):
                env[name] = t
            marks[i] = (start - t0, end - t0)

        if len(self.segments) == 1:
            run(0)
        else:
            for i, s in enumerate(self.segments):
                futures.append(self._pool(s.device).submit(run, i))
            for f in futures:
                f.result()
        self.timeline = [{"segment": s.name, "device": s.device, "start": m[0], "end": m[1]}
                         for s, m in zip(self.segments, marks)]
        return [env[v.name] for v in self.graph.outputs]

    def close(self):
        for p in self._pools.values():
            p.shutdown(wait=False)
        self._pools.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def verify_plan(graph: Graph, placement, ex: PlacedExecutable, sample: tuple, devices: dict, *,
                rounds: int = 7):
    """Time the placed executable against the best single device's, round-robin (``rounds``
    rounds, medians), and keep the faster: ``(executable, placement, record)``. Only when
    the plan spans several devices, all of them measured here or on a remote (a modelled
    device — the npu in QNN's simulator, a cuda with no GPU — cannot be timed for real).
    The cost model treats devices as independent; where they share cores (a host `cpu` and
    pinned RPC servers on one small machine) a mixed plan can lose, and this catches it."""
    from qcompile.backends import latency
    from qcompile.placement.subgraph import partition
    used = {s.device for s in ex.segments}
    single = placement.baselines.get("single_device")
    if len(used) < 2 or single is None or not all(getattr(d, "measure", False)
                                                  for d in devices.values()):
        return ex, placement, None
    nodes = {n: single.assignment[g] for g, ns in placement.groups.items() for n in ns}
    segs = partition(graph, nodes)
    alt = PlacedExecutable(graph, segs, [e for _, e in lower_segments(graph, segs, devices)], devices)
    t_plan, t_single = [], []
    for _ in range(rounds):
        t_plan.append(latency.time_call(ex, sample, rounds=1, min_time=0.05))
        t_single.append(latency.time_call(alt, sample, rounds=1, min_time=0.05))
    med = sorted(t_plan)[rounds // 2], sorted(t_single)[rounds // 2]
    record = {"plan_ms": med[0], "single_device_ms": med[1],
              "single_device": sorted(set(nodes.values()))[0],
              "kept": "plan" if med[0] <= med[1] else "single_device"}
    if med[0] <= med[1]:
        alt.close()
        placement.verified = record
        return ex, placement, record
    ex.close()
    placement.plan, placement.assignment, placement.segments = single, nodes, segs
    placement.verified = record
    graph.meta["placement"] = dict(nodes)
    return alt, placement, record


class PlacedModel(CompiledModel):
    """A model placed across devices: ``placement`` is the solved :class:`passes.place.Placement`
    (None when loaded: ``plan`` is the saved plan dict)."""

    def __init__(self, graph: Graph, executable: PlacedExecutable, *, placement=None, plan=None,
                 config=None, timings=None, isa=None):
        super().__init__(graph, "placed:" + ",".join(executable.devices), executable,
                         config=config, timings=timings, isa=isa)
        self.placement = placement
        self.plan = plan if plan is not None else placement.to_json()

    @property
    def timeline(self) -> list[dict]:
        return self._exec.timeline

    def device_of(self, node: str) -> str:
        """The device that runs IR node ``node``."""
        return self.plan_assignment()[node]

    def plan_assignment(self) -> dict[str, str]:
        return {n: self.plan["assignment"][g] for g, ns in self.plan["groups"].items() for n in ns}

    def summary(self) -> dict:
        out = super().summary()
        where = self.plan_assignment()
        for layer in out["layers"]:
            layer["device"] = where.get(layer["name"])
        pred = self.plan["predicted"]
        out["placement"] = {
            "devices": self.plan["devices"], "solver": pred["solver"], "status": pred["status"],
            "predicted_ms": 1e3 * pred["makespan_s"], "lower_bound_ms": 1e3 * pred["lower_bound_s"],
            "baselines_ms": {k: 1e3 * v for k, v in pred["baselines_s"].items()},
            "segments": [{"name": s["name"], "device": s["device"], "nodes": len(s["nodes"])}
                         for s in self.plan["segments"]],
            "nodes": where}
        return out

    def gantt(self, path, *, measured: bool = True):
        """Write a PNG of the predicted schedule (per fused group) and, after a run, the
        measured one (per segment)."""
        from qcompile.placement.gantt import plot
        return plot(self.plan, self.timeline if measured else None, path)

    def _manifest_extra(self) -> dict:
        return {"devices": {d["name"]: d["target"] for d in self.plan["devices"]}}

    def _compiled_files(self) -> dict[str, bytes]:
        from qcompile.backends import get_backend
        loaded = self._source_files()
        if loaded:
            return loaded
        files = {PLAN_FILE: (json.dumps(self.plan, indent=1, sort_keys=True) + "\n").encode()}
        for s, ex in zip(self._exec.segments, self._exec.executables):
            d = self._exec.devices[s.device]
            for fname, data in get_backend(d.target).artifacts(ex).items():
                files[f"{s.name}.{fname}"] = data
        return files


def devices_from_plan(plan: dict) -> dict:
    from qcompile.placement.devices import DeviceConfig
    out = {}
    for d in plan["devices"]:
        out[d["name"]] = DeviceConfig(name=d["name"], target=d["target"], spec=d.get("spec"),
                                      memory=d.get("memory"), options=dict(d.get("options", {})),
                                      measure=d.get("measure"))
    return out


def load_placed(directory: Path, graph: Graph, manifest: dict, files: dict[str, bytes]) -> PlacedModel:
    """Rebuild a placed model from its artifact's files (already hash-checked)."""
    from qcompile.backends import get_backend
    try:
        plan = json.loads(files[PLAN_FILE])
        segments = [Segment.from_json(s) for s in plan["segments"]]
        devices = devices_from_plan(plan)
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{directory}/{PLAN_FILE} is missing or corrupt ({e})",
                            hint="rebuild the artifact") from None
    by_name = {n.name: n for n in graph.nodes}
    exes = []
    for s in segments:
        d = devices[s.device]
        sub = _segment_graph(graph, s, by_name)
        prefix = s.name + "."
        mine = {f[len(prefix):]: b for f, b in files.items() if f.startswith(prefix)}
        exes.append(get_backend(d.target).load(sub, d.target, mine))
    ex = PlacedExecutable(graph, segments, exes, devices)
    return PlacedModel(graph, ex, plan=plan, isa=manifest.get("isa"))
