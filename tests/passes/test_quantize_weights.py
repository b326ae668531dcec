"""quantize_weights: annotated weights decode to exactly what the format gives, in the layer's
format; overrides and skips; the interpreter reproduces the quantized weight."""
from __future__ import annotations

import pytest
import torch

from qcompile import formats
from qcompile.config import QuantConfig
from qcompile.errors import PassError
from qcompile.interpreter import Interpreter
from qcompile.passes import run_passes
from qcompile.passes.quantize_weights import rtn


@pytest.mark.parametrize("weights,opts", [("int4", {"group_size": 4}), ("mxfp4", {}),
                                          ("nvfp4", {"weight_options": {"pad": True}}),
                                          ("uint4", {"group_size": 8}),
                                          ("nf4", {"group_size": None}), ("bf16", {})])
def test_rtn_annotation_is_exact(mlp_graph, weights, opts):
    w1 = mlp_graph.constants["w1"].clone()
    cfg = QuantConfig(weights=weights, **{"group_size": None, **opts})
    g = run_passes(mlp_graph.clone(), ["quantize_weights"],
                   options={"quantize_weights": {"config": cfg, "progress": False}})
    lin = next(n for n in g.nodes if n.name == "fc1")
    w = lin.inputs[1]
    assert w.quant is not None and w.quant.format == formats.get(weights).name
    fmt = cfg.layer("fc1").weight_format()
    want = fmt.fake_quant(w1)
    assert torch.equal(g.constants[w.name], want)
    # the interpreter's fake quantization with the stored parameters changes nothing more
    assert torch.equal(w.quant.fake_quant(g.constants[w.name], g.constants), want)
    x = torch.randn(3, 8)
    (y,) = Interpreter(g).run(x)
    h = torch.relu(torch.nn.functional.linear(x, want, g.constants[lin.inputs[2].name]))
    fc2 = g.nodes[-1]
    ref = torch.nn.functional.linear(h, g.constants[fc2.inputs[1].name],
                                     g.constants[fc2.inputs[2].name])
    torch.testing.assert_close(y, ref)


def test_overrides_and_report(mlp_graph):
    cfg = QuantConfig(weights="int4", group_size=4, overrides={"fc2": "skip"})
    g = run_passes(mlp_graph, ["quantize_weights"],
                   options={"quantize_weights": {"config": cfg, "progress": False}})
    assert g.meta["quantize_weights"] == {"fc1": "rtn int4(granularity=per_group, group_size=4)",
                                          "fc2": "float"}
    assert g.nodes[-1].inputs[1].quant is None


def test_rtn_clip_search_never_worse():
    w = torch.randn(16, 64)
    w[0, 0] = 12.0  # an outlier: clipping pays
    fmt = formats.get("int3", group_size=64)
    plain = ((fmt.dequantize(fmt.quantize(w)) - w) ** 2).sum()
    qt = rtn(w, fmt, clip_search=True)
    searched = ((qt.dequantize() - w) ** 2).sum()
    assert searched < plain and qt.format.clip_ratio < 1


def test_gptq_without_calibration_is_refused(mlp_graph):
    cfg = QuantConfig(weights="int4", group_size=4, algorithm="gptq")
    with pytest.raises(PassError, match="needs calibration"):
        run_passes(mlp_graph, ["quantize_weights"],
                   options={"quantize_weights": {"config": cfg, "progress": False}})


def test_a_format_that_does_not_fit_names_the_layer(mlp_graph):
    cfg = QuantConfig(weights="int4", group_size=16)  # fc1's input has 8 features
    with pytest.raises(PassError, match=r"fc1.*does not divide") as e:
        run_passes(mlp_graph, ["quantize_weights"],
                   options={"quantize_weights": {"config": cfg, "progress": False}})
    assert "skip" in str(e.value)


def _conv_net():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 4, 3, groups=4), torch.nn.Flatten(),
                            torch.nn.Linear(4 * 4 * 4, 5)).eval()
    return m, torch.randn(2, 3, 6, 6)


@pytest.mark.parametrize("weights", ["int4", "int8", "uint3"])
def test_conv_weights_are_quantized_per_output_channel(weights):
    import qcompile
    m, x = _conv_net()
    g = qcompile.capture(m, (x,))
    cfg = QuantConfig(weights=weights, group_size=16)
    q = run_passes(g.clone(), ["quantize_weights"],
                   options={"quantize_weights": {"config": cfg, "progress": False}})
    convs = [n for n in q.nodes if n.op == "conv"]
    floats = [n for n in g.nodes if n.op == "conv"]
    assert len(convs) == 2
    for n, f in zip(convs, floats):
        spec = n.inputs[1].quant
        assert spec is not None and spec.axis == (1, 2, 3)
        assert spec.granularity.value == "per_channel"
        w = g.constants[f.inputs[1].name]
        fmt = formats.get(weights, granularity="per_channel")
        want = fmt.fake_quant(w, (1, 2, 3))
        assert torch.equal(q.constants[n.inputs[1].name], want)
        assert q.constants[spec.scale].numel() == w.shape[0]  # one scale per output channel
    # the interpreter reproduces the stored weights; the conv output follows
    assert torch.equal(convs[0].inputs[1].quant.fake_quant(q.constants[convs[0].inputs[1].name],
                                                           q.constants),
                       q.constants[convs[0].inputs[1].name])
    assert "per_channel" in q.meta["quantize_weights"][convs[0].name]


def test_block_formats_leave_convs_in_float_on_record():
    import qcompile
    m, x = _conv_net()
    g = qcompile.capture(m, (x,))
    q = run_passes(g.clone(), ["quantize_weights"], options={"quantize_weights": {
        "config": QuantConfig(weights="mxfp4"),
        "progress": False}})
    convs = [n for n in q.nodes if n.op == "conv"]
    assert all(n.inputs[1].quant is None for n in convs)
    assert all("needs a single axis" in q.meta["quantize_weights"][n.name] for n in convs)
    lin = next(n for n in q.nodes if n.op == "linear")
    assert lin.inputs[1].quant is not None


def test_quantized_convs_on_cpu_equal_the_interpreter():
    pytest.importorskip("tvm")
    import qcompile
    m, x = _conv_net()
    cm = qcompile.compile(m, "cpu", example_inputs=(x,), config=QuantConfig(weights="int4",
                                                                            group_size=16))
    ref = Interpreter(cm.graph).run(x)[0]
    torch.testing.assert_close(cm(x), ref, rtol=1e-5, atol=1e-5)
