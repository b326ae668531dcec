"""The Apache TVM backend: targets ``cpu`` (LLVM, host features detected, threads = cores),
``cpu-aarch64`` (cross build only) and ``cuda`` (``sm_80``; ``cuda-sm90``).

``lower`` turns a graph into a Relax module (``lower.py``), schedules it — hand-written
kernels for the heavy ops, rules for the rest (``schedule.py``; dlight's GPU rules on CUDA) —
and builds it with ``tvm.compile``; the result runs on the Relax VM with torch tensors in and
out. An artifact stores the compiled library (``model.so``) and the kernels' parameters
(``tvm_params.safetensors``) beside the graph.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from qcompile.backends.base import Backend, register_backend
from qcompile.backends.tvm.target import (
    CROSS,
    cpu_target,
    cuda_target,
    host_cpu,
    require_tvm,
    target_features,
)
from qcompile.errors import BackendError
from qcompile.interpreter import bind_inputs
from qcompile.ir.graph import Graph, Node

__all__ = ["TVMBackend", "TVMExecutable", "build", "isa_record"]

CUDA_ARCH = {"cuda": "sm_80", "cuda-sm80": "sm_80", "cuda-sm90": "sm_90"}
LIBRARY, PARAMS = "model.so", "tvm_params.safetensors"


def _tvm_target(target: str):
    if target in CUDA_ARCH:
        return cuda_target(CUDA_ARCH[target]), None
    if target.startswith("cpu-"):
        triple, mcpu = CROSS[target[4:]]
        t = cpu_target(mcpu, triple=triple)
        return t, host_cpu(t)
    t = cpu_target()
    return t, host_cpu(t)


def isa_record(target: str) -> dict | None:
    """What a ``target`` build made here needs of the CPU that loads it (the manifest's
    ``isa``: the :mod:`qcompile.isa` level and the x86 features its code may use); None for
    CUDA and cross targets, which are not checked against this machine."""
    if target in CUDA_ARCH or target.startswith("cpu-"):
        return None
    from qcompile import isa
    return {"level": isa.level(), "features": target_features(cpu_target())}


def build(graph: Graph, target: str = "cpu", *, kernels: bool = True, linear_hook=None,
          tune_trials: int = 0):
    """(relax executable, params, lowering) of ``graph`` for ``target``; ``linear_hook``
    lowers linears before the built-in kernels do (:attr:`.lower.Lowering.linear_hook`);
    ``tune_trials`` > 0 tunes what no kernel covers with MetaSchedule (``metaschedule.py``)."""
    tvm = require_tvm()
    from tvm import relax

    from qcompile.backends.tvm.lower import lower_graph
    tgt, info = _tvm_target(target)
    mod, params, L = lower_graph(graph, info, kernels=kernels, linear_hook=linear_hook)
    with tgt:
        mod = tvm.transform.Sequential([
            relax.transform.DeadCodeElimination(),  # e.g. fake quantization a kernel replaced
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
        ])(mod)
    if tune_trials:  # optional MetaSchedule tuning, records cached per shape
        from qcompile.backends.tvm.metaschedule import tune_cpu_module
        mod = tune_cpu_module(mod, tgt, info, tune_trials, target_name=target, report=L.report)
    if target in CUDA_ARCH:
        from tvm.s_tir import dlight as dl
        with tgt:
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        ex = tvm.compile(mod, target=tgt)
    else:
        from qcompile.backends.tvm._shape_func import stable_shape_funcs
        from qcompile.backends.tvm.schedule import schedule_cpu_module
        mod = schedule_cpu_module(mod, tgt, info)
        # tvm.compile's pipeline for CPU targets, then shape functions in a fixed order (so
        # two builds give the same model.so)
        pipeline = tvm.transform.Sequential([relax.get_pipeline("default"),
                                             stable_shape_funcs()])
        ex = tvm.compile(mod, target=tgt, relax_pipeline=pipeline)
    return ex, params, L


class TVMExecutable:
    """The compiled model on the Relax VM: torch/numpy in, torch out."""

    def __init__(self, graph: Graph, target: str, ex, params: list[np.ndarray], report=None,
                 isa: dict | None = None):
        self.graph = graph
        self.target = target
        self.ex = ex
        self.params = params
        self.report = dict(report or {})
        #: what the compiled code needs of the CPU (:func:`isa_record`; None when loaded: the
        #: manifest holds it)
        self.isa = isa
        self._vm = None
        self._shared: TVMExecutable | None = None
        #: inputs the graph writes in place (KV caches, ``kv_write``): passed as the caller's
        #: own memory, and their outputs handed back sharing it
        written = {id(n.inputs[0]) for n in graph.nodes if n.op == "kv_write"}
        self._inplace = {i for i, v in enumerate(graph.inputs) if id(v) in written}
        self._aliased = {i for i, n in enumerate(graph.outputs)
                         if n.producer is not None and n.producer.op == "kv_write"}

    def _ready(self):
        if self._vm is None:
            tvm = require_tvm()
            from tvm import relax
            if self.target.startswith("cpu-"):
                raise BackendError(f"target {self.target!r} is a cross build; it cannot run here",
                                   hint="copy the artifact to a matching machine and load it there")
            if self.target in CUDA_ARCH:
                dev = tvm.cuda(0)
                if not dev.exist:
                    raise BackendError(f"target {self.target!r} needs a CUDA GPU at run time; "
                                       "none is visible", hint="run on a machine with an NVIDIA GPU "
                                       "and driver, or build for target 'cpu'")
            else:
                dev = tvm.cpu(0)
            self._dev = dev
            self._vm = relax.VirtualMachine(self.ex, dev)
            shared = self._shared
            if shared is not None:  # another build of the same graph holds our parameters
                shared._ready()
                self._params = shared._params
            else:
                self._params = [tvm.runtime.tensor(p, dev) for p in self.params]
        return self._vm

    def __call__(self, *inputs):
        import tvm
        vm = self._ready()
        tensors, _ = bind_inputs(self.graph, inputs)
        args = [self._inplace_arg(t, i) if i in self._inplace
                else tvm.runtime.tensor(t.contiguous().numpy(), self._dev)
                for i, t in enumerate(tensors)]
        out = vm["main"](*args, *self._params)
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return [torch.from_dlpack(o) if i in self._aliased else torch.from_numpy(o.numpy())
                for i, o in enumerate(outs)]

    def share_params(self, other: "TVMExecutable") -> bool:
        """Run on ``other``'s parameters (one copy in memory) when they are the same arrays
        — two builds of one graph at different shapes, as an LLM's prefill and decode; True
        if they are, else nothing changes."""
        if len(self.params) != len(other.params) or other.target != self.target or any(
                a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b)
                for a, b in zip(self.params, other.params)):
            return False
        self.params = other.params
        self._shared = other
        return True

    def _inplace_arg(self, t: torch.Tensor, i: int):
        import tvm
        if not t.is_contiguous() or t.device.type != "cpu" or self._dev.dlpack_device_type() != 1:
            raise BackendError(f"input {self.graph.inputs[i].name!r} is written in place and "
                               "must be a contiguous CPU tensor",
                               hint="pass the cache tensor itself (qcompile.llm does)")
        return tvm.runtime.from_dlpack(t)

    def profile(self, *inputs, repeat: int = 3) -> dict[str, float]:
        """Seconds per compiled function (summed over its calls, median over ``repeat`` runs),
        measured by instrumenting the VM's calls: where a run's time goes."""
        import time
        vm = self._ready()
        samples: dict[str, list[float]] = {}
        run: dict[str, float] = {}
        started: list[float] = []

        def instrument(func, name, before, ret, *args):
            if before:
                started.append(time.perf_counter())
            else:
                run[name] = run.get(name, 0.0) + time.perf_counter() - started.pop()
            return 0  # VMInstrumentReturnKind.NO_OP
        vm.set_instrument(instrument)
        try:
            for _ in range(repeat + 1):  # the first run warms up
                run.clear()
                self(*inputs)
                for k, v in run.items():
                    samples.setdefault(k, []).append(v)
        finally:
            vm.set_instrument(None)
        return dict(sorted(((k, sorted(v[1:])[len(v[1:]) // 2]) for k, v in samples.items()
                            if len(v) > 1), key=lambda kv: -kv[1]))

    # -- artifacts ------------------------------------------------------------------------
    def files(self) -> dict[str, bytes]:
        from safetensors.numpy import save
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / LIBRARY
            self.ex.export_library(str(path))
            lib = path.read_bytes()
        params = save({f"p{i:05d}": p for i, p in enumerate(self.params)},
                      metadata={"target": self.target})
        return {LIBRARY: lib, PARAMS: params}

    @staticmethod
    def from_files(graph: Graph, target: str, files: dict[str, bytes]) -> "TVMExecutable":
        tvm = require_tvm()
        from safetensors.numpy import load
        d = tempfile.mkdtemp(prefix="qcompile-tvm-")
        try:
            path = Path(d) / LIBRARY
            path.write_bytes(files[LIBRARY])
            ex = tvm.runtime.load_module(str(path))
        finally:
            shutil.rmtree(d, ignore_errors=True)
        loaded = load(files[PARAMS])
        params = [loaded[k] for k in sorted(loaded)]
        return TVMExecutable(graph, target, ex, params)


class TVMBackend(Backend):
    name = "tvm"
    targets = ("cpu", "cpu-aarch64", *CUDA_ARCH)
    tunable = ("cpu",)  # MetaSchedule measures on this machine
    versioned = ("tvm",)  # a library built by one TVM need not load in another

    def supports(self, node: Node) -> bool:
        from qcompile.backends.tvm import ops  # noqa: F401
        from qcompile.backends.tvm.lower import LOWERINGS
        return node.op in LOWERINGS

    def cost(self, node: Node, device: str = "cpu", env=None) -> float:
        from qcompile.backends import get_backend
        return get_backend("reference").cost(node, device, env)

    def lower(self, graph: Graph, target: str, *, tune_trials: int = 0):
        ex, params, L = build(graph, target, tune_trials=tune_trials)
        return TVMExecutable(graph, target, ex, params, L.report, isa_record(target))

    def artifacts(self, executable) -> dict[str, bytes]:
        return executable.files()

    def load(self, graph: Graph, target: str, files: dict[str, bytes]):
        if LIBRARY not in files or PARAMS not in files:
            from qcompile.errors import ArtifactError
            raise ArtifactError(f"a {target} artifact needs {LIBRARY} and {PARAMS}",
                                hint="rebuild it with qcompile build")
        return TVMExecutable.from_files(graph, target, files)


register_backend(TVMBackend())
