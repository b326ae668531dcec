"""Measured latencies of single layers and whole graphs on a target, cached per machine.

A layer's latency is that of the kernel qcompile emits for it: copies of the layer alone
(its op, attributes, weight and bias, the input shape of one calibration sample; each copy
with its own weight, so they stream from memory as a model's layers do) are compiled for the
target under the layer's quantization config and timed in one call; the time of an empty
call on the same input (the runtime's fixed overhead) is subtracted and the rest divided by
the copies. Whole graphs are compiled and
timed as they are. Times are medians of repeated calls after warm-up, in milliseconds.

The cache is a JSON file, ``<cache>/latency.json`` (``$QCOMPILE_CACHE``, or
``$XDG_CACHE_HOME/qcompile``), keyed by the machine (CPU model, cores, thread setting) and by
what was measured, so a later build with the same shapes measures nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from qcompile.ir.graph import Graph, Node
from qcompile.ir.types import TensorType

__all__ = ["LATENCY_TARGETS", "layer_latency", "model_latency", "model_latencies", "time_call",
           "cache_path", "copies", "cached"]

#: targets whose kernels run on this machine's CPU, so their latency can be measured here
LATENCY_TARGETS = ("cpu", "lut", "amx")


def cache_path() -> Path:
    from qcompile.backends.lut.build import cache_dir
    return cache_dir() / "latency.json"


def _machine() -> str:
    from qcompile import __version__
    from qcompile.backends.lut.build import _threads, cpu_model
    model = cpu_model()
    try:
        from importlib.metadata import version
        tvm = version("apache-tvm")
    except Exception:
        tvm = "none"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    # the thread count the kernels will use (TVM's pool and the LUT kernels read the same
    # variables, then the affinity), resolved without starting TVM
    from qcompile import isa
    return (f"{model}|cores={cores}|threads={_threads()}|isa={isa.level()}|"
            f"qcompile={__version__}|tvm={tvm}")


def _load() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store(key: str, ms: float) -> None:
    path = cache_path()
    data = _load()
    data.setdefault(_machine(), {})[key] = ms
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _cached(key: str) -> float | None:
    return _load().get(_machine(), {}).get(key)


def cached(key: str, measure) -> tuple[float, bool]:
    """``(ms, True)`` when this machine's cache holds ``key``; otherwise ``(measure(), False)``
    with the result stored under ``key``. For analyses that time things here (the placement
    costs); ``key`` should be a JSON string naming what was measured."""
    hit = _cached(key)
    if hit is not None:
        return hit, True
    ms = float(measure())
    _store(key, ms)
    return ms, False


def time_call(fn, args, *, min_time: float = 0.1, min_runs: int = 5, warmup: int = 3,
              rounds: int = 5) -> float:
    """Milliseconds of ``fn(*args)``: the median, over ``rounds`` rounds, of a round's median
    (each round at least ``min_runs`` calls and ``min_time`` seconds), after ``warmup`` calls.
    On a shared or virtual machine the speed dips and drifts by 10-20% for seconds at a time;
    the median of round medians ignores a dip in any one round."""
    for _ in range(warmup):
        fn(*args)
    meds = []
    for _ in range(rounds):
        times = []
        start = time.perf_counter()
        while len(times) < min_runs or time.perf_counter() - start < min_time:
            t = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t)
            if len(times) >= 10000:
                break
        meds.append(statistics.median(times))
    return 1e3 * statistics.median(meds)


def copies(graph: Graph, node: Node) -> int:
    """How many copies of ``node`` one timed call runs: enough that their float weights pass
    32 MiB (8 to 64 copies), so the runtime's per-call overhead, spread over them, stays
    small (with 4 copies of a 1024×2048 LUT layer it still added a quarter to its time)."""
    w = graph.constants[node.inputs[1].name]
    return int(min(64, max(8, -(-(32 << 20) // max(w.numel() * w.element_size(), 1)))))


def _layer_graph(graph: Graph, node: Node, shape, reps: int) -> Graph:
    """``reps`` independent copies of ``node`` (each with its own weight, as in a model) on
    one input, each copy an output."""
    g = Graph(f"{node.op}_alone")
    xv = node.inputs[0]
    x = g.add_input("x", TensorType(tuple(int(d) for d in shape), xv.dtype))
    outs = []
    for r in range(reps):
        ins = [x]
        for v in node.inputs[1:]:
            ins.append(None if v is None else g.add_constant(f"{v.name}.{r}",
                                                             graph.constants[v.name].clone()))
        outs.append(g.add_node(node.op, ins, dict(node.attrs), name=f"{node.name}_{r}").outputs[0])
    g.outputs = outs
    return g


def _empty_graph(shape, dtype: str) -> Graph:
    g = Graph("empty")
    x = g.add_input("x", TensorType(tuple(int(d) for d in shape), dtype))
    g.outputs = [g.add("neg", x)]
    return g


def _example(shape, dtype: str) -> torch.Tensor:
    from qcompile.ir.types import to_torch_dtype
    gen = torch.Generator().manual_seed(0)
    return torch.randn(tuple(int(d) for d in shape), generator=gen).to(to_torch_dtype(dtype))


def _layer_config(lc, config):
    from qcompile.config import QuantConfig
    if lc is None:
        return None
    return QuantConfig(weights=lc.weights, group_size=lc.group_size,
                       weight_options=dict(lc.weight_options), activations=lc.activations,
                       activation_granularity=lc.activation_granularity, algorithm="rtn",
                       rtn_clip_search=False)


def _compile_and_time(g: Graph, target: str, cfg, x) -> float:
    from qcompile.api import compile as qcompile_compile
    from qcompile.passes.pipeline import quantize_graph
    if cfg is not None:
        cal = [(x,)] if cfg.activations is not None else None
        g = quantize_graph(g, cfg, cal, progress=False)[0]
    return time_call(qcompile_compile(g, target).run, (x,), rounds=9, min_time=0.15)


def layer_latency(graph: Graph, node: Node, shapes: dict, target: str, lc, config=None) -> float:
    """Milliseconds of ``node`` alone on ``target`` with layer config ``lc`` (None: float),
    for the input shape recorded in ``shapes``: a call running ``copies()`` copies of it, less
    an empty call's time, divided by the copies."""
    shape = shapes[node.inputs[0].name]
    wv = node.inputs[1]
    cfg = _layer_config(lc, config)
    key = json.dumps({"target": target, "op": node.op, "x": list(shape), "dtype": node.inputs[0].dtype,
                      "w": list(wv.type.shape), "wdtype": wv.dtype,
                      "bias": len(node.inputs) > 2 and node.inputs[2] is not None,
                      "attrs": {k: repr(v) for k, v in sorted(node.attrs.items())},
                      "copies": copies(graph, node),
                      "config": None if cfg is None else
                      {k: repr(v) for k, v in sorted(cfg.to_dict().items())}}, sort_keys=True)
    hit = _cached(key)
    if hit is not None:
        return hit
    x = _example(shape, node.inputs[0].dtype)
    reps = copies(graph, node)
    t = _compile_and_time(_layer_graph(graph, node, shape, reps), target, cfg, x)
    ms = max(t - _empty_latency(target, shape, node.inputs[0].dtype), 0.0) / reps
    _store(key, ms)
    return ms


def _empty_latency(target: str, shape, dtype: str) -> float:
    key = json.dumps({"target": target, "empty": list(shape), "dtype": dtype})
    hit = _cached(key)
    if hit is not None:
        return hit
    x = _example(shape, dtype)
    ms = _compile_and_time(_empty_graph(shape, dtype), target, None, x)
    _store(key, ms)
    return ms


def _model_key(graph: Graph, sample, target: str, config=None) -> str:
    from qcompile.runtime import graph_hash
    h = hashlib.sha256(graph_hash(graph).encode())
    h.update(json.dumps([list(t.shape) for t in sample]).encode())
    if config is not None:
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=repr).encode())
    return json.dumps({"target": target, "model": h.hexdigest()})


def model_latency(graph: Graph, sample, target: str, config=None, calibration=None) -> float:
    """Milliseconds of the whole ``graph`` (compiled for ``target``, under ``config``) on the
    positional inputs ``sample``."""
    from qcompile.api import compile as qcompile_compile
    key = _model_key(graph, sample, target, config)
    hit = _cached(key)
    if hit is not None:
        return hit
    cm = qcompile_compile(graph, target, config=config, calibration=calibration)
    ms = time_call(cm.run, tuple(sample))
    _store(key, ms)
    return ms


def model_latencies(graphs, sample, target: str, *, rounds: int = 9) -> list[float]:
    """Milliseconds of each (already quantized) graph on ``sample``, compiled for ``target``
    and timed round-robin, ``rounds`` rounds, the median of each: the machine's drift over
    seconds touches them alike, so their differences are steadier than separate timings."""
    from qcompile.api import compile as qcompile_compile
    keys = [_model_key(g, sample, target) for g in graphs]
    cached = [_cached(k) for k in keys]
    if all(c is not None for c in cached):
        return cached
    cms = [qcompile_compile(g, target) for g in graphs]
    times: list[list[float]] = [[] for _ in cms]
    for _ in range(rounds):
        for cm, ts in zip(cms, times):
            ts.append(time_call(cm.run, tuple(sample), rounds=1, min_time=0.2))
    out = [statistics.median(ts) for ts in times]
    for k, ms in zip(keys, out):
        _store(k, ms)
    return out
