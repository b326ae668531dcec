"""qcompile.backends.latency: the timing statistic, the copies rule, the one-layer graphs and
the per-machine cache (no timing assertions: only what is measured and what is cached)."""
from __future__ import annotations

import json

import torch

from qcompile.backends import latency
from qcompile.config import QuantConfig
from qcompile.ir import Graph, TensorType


def _graph(n=64, k=32):
    g = Graph("one")
    x = g.add_input("x", TensorType((4, k), "float32"))
    w = g.add_constant("fc.weight", torch.randn(n, k, generator=torch.Generator().manual_seed(0)))
    b = g.add_constant("fc.bias", torch.zeros(n))
    g.outputs = [g.add("linear", x, w, b, name="fc")]
    return g


def test_time_call_is_the_median_of_round_medians(monkeypatch):
    clock = iter(range(10000))
    monkeypatch.setattr(latency.time, "perf_counter", lambda: next(clock) * 1e-3)
    calls = []
    ms = latency.time_call(lambda: calls.append(1), (), min_time=0.0, min_runs=3, warmup=2,
                           rounds=3)
    assert len(calls) == 2 + 3 * 3
    assert ms == 1.0  # every call spans one tick of the fake clock


def test_copies_spread_the_call_overhead_and_stay_bounded():
    assert latency.copies(_graph(64, 32), _graph(64, 32).nodes[0]) == 64  # tiny: the most
    big = _graph(4096, 4096)
    assert latency.copies(big, big.nodes[0]) == 8  # 64 MiB of fp32: the fewest
    mid = _graph(1024, 1024)
    assert latency.copies(mid, mid.nodes[0]) == 8  # 4 MiB: 32 MiB needs 8


def test_layer_graph_holds_independent_copies():
    g = _graph()
    lg = latency._layer_graph(g, g.nodes[0], (4, 32), 3)
    assert len(lg.outputs) == 3 and len(lg.inputs) == 1
    ws = [lg.constants[n.inputs[1].name] for n in lg.nodes]
    assert all(torch.equal(w, g.constants["fc.weight"]) for w in ws)
    assert len({w.data_ptr() for w in ws}) == 3  # each copy streams its own weight


def test_cache_keys_separate_formats_and_hits_measure_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    g = _graph()
    node = g.nodes[0]
    seen = []

    def fake(graph, target, cfg, x):
        seen.append(None if cfg is None else cfg.weights)
        return 0.5 if graph.name == "empty" else 2.0
    monkeypatch.setattr(latency, "_compile_and_time", fake)
    shapes = {"x": (4, 32)}
    cfg = QuantConfig(group_size=32)
    a = latency.layer_latency(g, node, shapes, "cpu", cfg.layer("fc").with_weights("int4"))
    b = latency.layer_latency(g, node, shapes, "cpu", cfg.layer("fc").with_weights("int8"))
    assert seen == ["int4", None, "int8"]  # the empty call is measured once per shape
    reps = latency.copies(g, node)
    assert a == b == (2.0 - 0.5) / reps  # (copies − an empty call) / copies
    n = len(seen)
    latency.layer_latency(g, node, shapes, "cpu", cfg.layer("fc").with_weights("int4"))
    assert len(seen) == n  # a hit
    data = json.loads(latency.cache_path().read_text())
    (machine, entries), = data.items()
    assert "threads=" in machine and "qcompile=" in machine
    assert len(entries) == 3  # int4, int8 and the empty call


def test_model_latencies_time_round_robin_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    order = []

    class CM:
        def __init__(self, name):
            self.name = name

        def run(self, *a):
            order.append(self.name)
    import qcompile.api
    graphs = [_graph(64, 32), _graph(32, 32)]
    names = iter(["a", "b"])
    monkeypatch.setattr(qcompile.api, "compile", lambda g, t: CM(next(names)))
    out = latency.model_latencies(graphs, [torch.randn(4, 32)], "cpu", rounds=3)
    assert len(out) == 2 and all(t >= 0 for t in out)
    # rounds alternate between the models: a's calls never all come before b's
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")
    monkeypatch.setattr(qcompile.api, "compile", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("measured again")))
    assert latency.model_latencies(graphs, [torch.randn(4, 32)], "cpu") == out
