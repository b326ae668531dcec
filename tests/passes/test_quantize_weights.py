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
