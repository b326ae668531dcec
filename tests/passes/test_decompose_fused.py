"""decompose_fused: rms_norm, rotary and silu as primitive ops, equal to the fused ops up to
fp32 rounding order (a few ulps: ≤ 1e-6 relative)."""
from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile import zoo
from qcompile.interpreter import run_graph
from qcompile.ir import verify
from qcompile.passes import run_passes


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _decomposed(g):
    return run_passes(g.clone(), ["decompose_fused"])


class Fused(torch.nn.Module):
    def __init__(self, weight: bool):
        super().__init__()
        self.norm = torch.nn.RMSNorm(16, eps=1e-6, elementwise_affine=weight)
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.nn.functional.silu(self.fc(self.norm(x)))


@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_and_silu(weight):
    x = torch.randn(2, 5, 16)
    m = Fused(weight).eval()
    if weight:
        with torch.no_grad():
            m.norm.weight.uniform_(0.5, 1.5)
    g = qcompile.capture(m, (x,))
    assert {"rms_norm", "silu"} <= set(g.op_histogram())
    d = _decomposed(g)
    verify(d)
    ops = d.op_histogram()
    assert "rms_norm" not in ops and "silu" not in ops
    assert ops.get("div") == 1 and "reciprocal" not in ops and ops.get("sigmoid") == 1
    norm = next(o for o in g.nodes if o.op == "rms_norm")
    made = [n for n in d.nodes if n.name.startswith(norm.name + ".")]
    assert len(made) == (6 if weight else 5)  # mul, mean, add, sqrt, div[, mul]
    assert all(n.provenance == norm.provenance for n in made)
    assert _rel(run_graph(d, x)[0], run_graph(g, x)[0]) <= 1e-6


def test_tiny_llama_decomposes_to_the_same_logits():
    m, inputs, _ = zoo.tiny_llama(batch=1, seq=8, hidden=64, layers=2, heads=4, kv_heads=2)
    g = qcompile.capture(m, inputs)
    assert {"rms_norm", "rotary", "silu"} <= set(g.op_histogram())
    d = _decomposed(g)
    assert not {"rms_norm", "rotary", "silu"} & set(d.op_histogram())
    assert _rel(run_graph(d, *inputs)[0], run_graph(g, *inputs)[0]) <= 1e-5


def test_only_the_ops_asked_for():
    m, inputs, _ = zoo.tiny_llama(batch=1, seq=8, hidden=64, layers=1, heads=4, kv_heads=2)
    g = qcompile.capture(m, inputs)
    d = run_passes(g.clone(), ["decompose_fused"], options={"decompose_fused": {"ops": ("silu",)}})
    ops = d.op_histogram()
    assert "silu" not in ops and "rms_norm" in ops and "rotary" in ops
