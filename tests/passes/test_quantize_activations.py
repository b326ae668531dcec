"""quantize_activations: linears' inputs are annotated on a copy (other readers see floats);
static scales come from calibration; KV annotations sit on attention's K and V."""
from __future__ import annotations

import torch

from qcompile.config import QuantConfig
from qcompile.interpreter import Interpreter
from qcompile.passes.pipeline import quantize_graph


def test_copy_keeps_the_residual_float(ln_block, ln_inputs):
    cfg = QuantConfig(weights="int8", group_size=None, activations="int8")
    g, _ = quantize_graph(ln_block.clone(), cfg, None, progress=False)
    ident = [n for n in g.nodes if n.op == "identity"]
    assert len(ident) == 1 and str(ident[0].outputs[0].quant) == "int8 per_token(axis=-1)"
    lin = [n for n in g.nodes if n.op == "linear"]
    assert all(n.inputs[0] is ident[0].outputs[0] for n in lin)
    residual = g.nodes[-1]
    assert residual.inputs[1] is ident[0].inputs[0]  # the residual reads the float value
    (x,) = ln_inputs[0]
    seen = {}
    interp = Interpreter(g)
    interp.add_hook(lambda v, t: seen.setdefault(v.name, t))
    interp.run(x)
    q = seen[ident[0].outputs[0].name]
    s = q.abs().amax(-1, keepdim=True) / 127
    torch.testing.assert_close(q / s, (q / s).round(), rtol=0, atol=1e-3)


def test_static_per_tensor_scale_from_calibration(ln_block, ln_inputs):
    cfg = QuantConfig(weights="int8", group_size=None, activations="uint8",
                      activation_granularity="per_tensor")
    g, _ = quantize_graph(ln_block.clone(), cfg, ln_inputs, progress=False)
    spec = next(n for n in g.nodes if n.op == "identity").outputs[0].quant
    assert spec.scale is not None and spec.zero_point is not None and not spec.dynamic
    lo = min(float(Interpreter(ln_block).run(x)[0].min()) for (x,) in ln_inputs)
    assert float(g.constants[spec.scale]) > 0 and lo is not None


def test_kv_cache_annotations(llama_graph):
    graph, xs = llama_graph
    cfg = QuantConfig(weights=None, kv_cache="int8")
    g, _ = quantize_graph(graph.clone(), cfg, None, progress=False)
    for n in (n for n in g.nodes if n.op == "attention"):
        assert str(n.inputs[1].quant) == "int8 per_token(axis=-1)"
        assert str(n.inputs[2].quant) == "int8 per_token(axis=-1)"
        assert n.inputs[0].quant is None
    ref = Interpreter(graph).run(*xs)[0]
    y = Interpreter(g).run(*xs)[0]
    assert 0 < float((y - ref).norm() / ref.norm()) < 0.05
