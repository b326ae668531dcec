"""sparsify: exact prune counts per method and comparison group, Wanda's activation weighting,
the 2:4 pattern, the IR annotation (printed, serialized, verified), zeros kept through weight
quantization (RTN and GPTQ), and the bad configurations."""
from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.config import QuantConfig
from qcompile.errors import ConfigError, PassError, VerificationError
from qcompile.interpreter import Interpreter
from qcompile.ir import graph_from_json, graph_to_json, verify
from qcompile.ir.printer import print_graph
from qcompile.passes import run_passes
from qcompile.passes.pipeline import quantization_pipeline, quantize_graph
from qcompile.passes.sparsify import prune_mask, wanda_scores


def _run(graph, cfg, data=None):
    g, _ = quantize_graph(graph.clone(), cfg, data, progress=False)
    return g


def _w(g, name):
    lin = next(n for n in g.nodes if n.name == name)
    return lin.inputs[1], g.constants[lin.inputs[1].name]


def test_prune_mask_counts():
    s = torch.rand(6, 40, dtype=torch.float64)
    keep = prune_mask(s, 0.7, per_row=True)
    assert (keep.sum(1) == 12).all()
    keep = prune_mask(s, 0.7, per_row=False)
    assert int((~keep).sum()) == round(0.7 * 240)
    assert s[~keep].max() <= s[keep].min()  # the lowest scores go
    keep = prune_mask(s, 0.5, per_row=True, pattern="2:4")
    assert (keep.reshape(6, 10, 4).sum(-1) == 2).all()
    # ties: the earlier position is pruned first
    assert prune_mask(torch.ones(1, 4), 0.5, per_row=True).tolist() == [[False, False, True, True]]


def test_wanda_weighs_by_activation_norm():
    w = torch.tensor([[1.0, 0.2, 0.5, -3.0]])
    norm = torch.tensor([1.0, 100.0, 1.0, 0.01])
    s = wanda_scores(w, norm)
    keep = prune_mask(s, 0.5, per_row=True)
    assert keep.tolist() == [[True, True, False, False]]  # 0.2 survives, -3.0 does not


@pytest.mark.parametrize("method", ["magnitude", "wanda", "2:4"])
def test_pass_prunes_and_annotates(mlp_graph, method):
    data = [torch.randn(5, 8) for _ in range(4)]
    cfg = QuantConfig(weights=None, sparsity=0.5, sparsity_method=method)
    g = _run(mlp_graph, cfg, data)
    for name, (o, i) in (("fc1", (16, 8)), ("fc2", (4, 16))):
        v, w = _w(g, name)
        assert v.sparsity is not None and v.sparsity.numel == o * i
        assert int((w == 0).sum()) == v.sparsity.zeros == o * i // 2
        if method != "magnitude":
            assert ((w == 0).sum(1) == i // 2).all()  # per output row
        if method == "2:4":
            assert ((w.reshape(o, i // 4, 4) == 0).sum(-1) == 2).all()
            assert v.sparsity.pattern == "2:4" and v.sparsity.method == "wanda"
    verify(g)
    assert "sparse(0.50" in print_graph(g)
    # the pruned graph computes with exactly its zeroed weights
    x = torch.randn(3, 8)
    (y,) = Interpreter(g).run(x)
    (y0,) = Interpreter(g.clone()).run(x)
    torch.testing.assert_close(y, y0)
    assert g.meta["sparsify"]["fc1"].startswith("wanda" if method != "magnitude" else "magnitude")


def test_annotation_survives_serialization_and_verify_checks_it(mlp_graph):
    g = _run(mlp_graph, QuantConfig(weights=None, sparsity=0.75, sparsity_method="magnitude"))
    d = graph_to_json(g)
    g2 = graph_from_json(d, dict(g.constants))
    v, _ = _w(g2, "fc1")
    assert v.sparsity == _w(g, "fc1")[0].sparsity
    name = v.name
    g2.constants[name] = torch.randn_like(g2.constants[name])  # no zeros left
    with pytest.raises(VerificationError, match="has only 0 zeros"):
        verify(g2)


@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
@pytest.mark.parametrize("weights", ["int8", "bf16", "uint4"])
def test_quantization_keeps_the_zeros(mlp_graph, algorithm, weights):
    data = [torch.randn(6, 8) for _ in range(8)]
    cfg = QuantConfig(weights=weights, group_size=None if weights != "uint4" else 8,
                      sparsity=0.7, sparsity_method="wanda", algorithm=algorithm)
    g = _run(mlp_graph, cfg, data)
    for name in ("fc1", "fc2"):
        v, w = _w(g, name)
        assert v.quant is not None and v.sparsity is not None
        assert int((w == 0).sum()) >= v.sparsity.zeros >= round(0.7 * w.numel()) - w.shape[0]
        # the interpreter's fake quantization keeps them zero too
        assert bool((v.quant.fake_quant(w, g.constants)[w == 0] == 0).all())
    verify(g)


def test_overrides_and_skips(mlp_graph):
    cfg = QuantConfig(weights=None, sparsity=0.5, sparsity_method="magnitude",
                      overrides={"fc2": {"sparsity": 0.25}, "fc1": {"sparsity": None}})
    g = _run(mlp_graph, cfg)
    assert _w(g, "fc1")[0].sparsity is None
    assert _w(g, "fc2")[0].sparsity.zeros == 16


def test_pipeline_places_sparsify_before_quantization():
    names, _ = quantization_pipeline(QuantConfig(sparsity=0.5, sparsity_method="magnitude"), None)
    assert names == ["sparsify", "quantize_weights", "quantize_activations"]
    names, _ = quantization_pipeline(QuantConfig(sparsity=0.5), [1])
    assert names == ["calibrate", "sparsify", "quantize_weights", "quantize_activations"]
    names, _ = quantization_pipeline(QuantConfig(sparsity=0.5, sparsity_method="2:4"), None)
    assert names == ["sparsify", "quantize_weights", "quantize_activations"]  # by magnitude


@pytest.mark.parametrize("kw,msg", [
    ({"sparsity": 1.0}, "fraction in"),
    ({"sparsity": -0.1}, "fraction in"),
    ({"sparsity": "half"}, "fraction in"),
    ({"sparsity": 0.7, "sparsity_method": "2:4"}, "exactly half"),
    ({"sparsity": 0.5, "sparsity_method": "random"}, "unknown sparsity_method"),
    ({"overrides": {"fc1": {"sparsity": 2}}}, "layer fc1"),
])
def test_bad_configs(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        QuantConfig(**kw).layer("fc1")


def test_wanda_without_calibration(mlp_graph):
    with pytest.raises(ConfigError, match="sparsity_method='wanda'"):
        _run(mlp_graph, QuantConfig(sparsity=0.5))
    # inside the pass manager the error comes wrapped, naming the pass
    with pytest.raises(PassError, match="calibration statistics of this linear's input") as e:
        run_passes(mlp_graph.clone(), ["sparsify"],
                   options={"sparsify": {"config": QuantConfig(sparsity=0.5)}})
    assert "node 'fc1'" in str(e.value)


def test_2_4_needs_a_width_multiple_of_4():
    g = qcompile.capture(torch.nn.Sequential(torch.nn.Linear(6, 4)).eval(), torch.randn(2, 6))
    with pytest.raises(PassError, match="multiple of 4, this linear has 6"):
        _run(g, QuantConfig(weights=None, sparsity=0.5, sparsity_method="2:4"))
