"""decompose_attention: attention → matmul, scale, additive mask, softmax, matmul; checked
structurally and against the interpreter (SDPA) for plain, float-masked, bool-masked, causal,
grouped-head and explicitly scaled attention, and on a captured tiny Llama."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcompile
from qcompile.errors import ConfigError, PassConfigError, PassError
from qcompile.interpreter import run_graph
from qcompile.ir import Graph, Provenance, TensorType, verify
from qcompile.passes import run_passes
from qcompile.passes.decompose_attention import decompose_attention

F32 = "float32"
PROV = Provenance(module="layers.0.attn", source="model.py:7", origin="sdpa")
# The decomposed form computes the same sum in another order than SDPA's kernel (fp32
# reassociation, ~1e-7 relative per op) and gives a masked key the weight e^{-50+Δ} ≈ 2e-22·e^Δ
# (|Δ| < 10 here) instead of 0, far below fp32's 6e-8 relative rounding of the kept weights.
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _ops(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


def _graph(*, hq=2, hk=None, lq=4, lk=None, d=8, dv=6, mask=None, mask_slot=True, **attrs):
    """q[1,hq,lq,d], k[1,hk,lk,d], v[1,hk,lk,dv] (and a mask[1,1,lq,lk] input) → attention →
    {graph output, neg}: both kinds of use must move to the decomposed output."""
    hk, lk = hk or hq, lk or lq
    g = Graph("attention")
    q = g.add_input("q", TensorType((1, hq, lq, d), F32))
    k = g.add_input("k", TensorType((1, hk, lk, d), F32))
    v = g.add_input("v", TensorType((1, hk, lk, dv), F32))
    ins = [q, k, v]
    if mask is not None:
        ins.append(g.add_input("mask", TensorType((1, 1, lq, lk), mask)))
    elif mask_slot:
        ins.append(None)  # what the frontend emits for attn_mask=None
    a = g.add_node("attention", ins, attrs, name="attn", provenance=PROV).output
    g.outputs = [a, g.add("neg", a, name="after")]
    verify(g)
    return g


def _inputs(g: Graph, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in g.inputs:
        if v.name == "mask" and v.dtype == "bool":
            keep = torch.rand(v.shape, generator=gen) > 0.5
            keep[..., 0] = True  # no fully masked row: SDPA makes it NaN, -50 an average
            assert (~keep).any()
            out.append(keep)
        elif v.name == "mask":
            out.append(torch.randn(v.shape, generator=gen) * 2)
        else:
            out.append(torch.randn(v.shape, generator=gen) * 2)  # scores spread of a few units
    return out


def _check(g: Graph, seeds=range(3), **kw) -> Graph:
    h = decompose_attention(g.clone(), **kw)
    verify(h)
    assert "attention" not in _ops(h)
    assert h.nodes[-1].op == "neg" and h.nodes[-1].inputs[0] is h.outputs[0]
    for n in h.nodes[:-1]:  # every new node keeps the attention's provenance and name
        assert n.provenance == PROV and n.name.startswith("attn.")
    for seed in seeds:
        x = _inputs(g, seed)
        for a, b in zip(run_graph(h, *x), run_graph(g, *x)):
            assert not b.isnan().any()
            torch.testing.assert_close(a, b, **TOL)
    return h


def test_plain_attention():
    g = _graph()
    h = _check(g)
    assert _ops(h) == ["permute", "matmul", "mul", "softmax", "matmul", "neg"]
    s = h.nodes[2].inputs[1]
    assert h.constants[s.name].item() == pytest.approx(1 / math.sqrt(8))
    assert h.nodes[0].attrs["perm"] == [0, 1, 3, 2] and h.nodes[0].inputs[0] is h.inputs[1]
    assert h.nodes[3].attrs["axis"] == -1 and h.nodes[4].inputs[1] is h.inputs[2]


def test_attention_without_mask_input():
    """A hand-built attention may leave out the optional mask altogether (three inputs)."""
    h = _check(_graph(mask_slot=False))
    assert _ops(h) == ["permute", "matmul", "mul", "softmax", "matmul", "neg"]


def test_float_mask_is_added_as_is():
    h = _check(_graph(mask="float32", lk=6))
    assert _ops(h) == ["permute", "matmul", "mul", "add", "softmax", "matmul", "neg"]
    assert h.nodes[3].inputs[1] is h.inputs[3]


def test_bool_mask_becomes_arithmetic():
    g = _graph(mask="bool", lk=6)
    h = _check(g)
    assert _ops(h) == ["permute", "matmul", "mul", "cast", "sub", "mul", "add", "softmax",
                       "matmul", "neg"]
    cast, sub, mul = h.nodes[3:6]
    assert cast.inputs[0] is h.inputs[3] and cast.outputs[0].dtype == F32
    assert h.constants[sub.inputs[1].name].item() == 1.0
    assert h.constants[mul.inputs[1].name].item() == 50.0  # (m - 1)·50: 0 kept, -50 masked
    # the tolerance is tight enough to see a mask that is too weak
    weak = decompose_attention(g.clone(), mask_value=-3.0)
    x = _inputs(g)
    assert not torch.allclose(run_graph(weak, *x)[0], run_graph(g, *x)[0], **TOL)


@pytest.mark.parametrize("lq,lk", [(5, 5), (3, 6), (6, 4)], ids=["square", "q_shorter", "q_longer"])
def test_causal_becomes_constant_triangle(lq, lk):
    h = _check(_graph(lq=lq, lk=lk, causal=True))
    assert _ops(h) == ["permute", "matmul", "mul", "add", "softmax", "matmul", "neg"]
    tri = h.constants[h.nodes[3].inputs[1].name]
    # SDPA's is_causal is top-left aligned: query i sees keys j ≤ i
    i, j = torch.meshgrid(torch.arange(lq), torch.arange(lk), indexing="ij")
    assert torch.equal(tri, torch.where(j > i, -50.0, 0.0))


def test_grouped_heads_are_repeated():
    g = _graph(hq=8, hk=2, lq=5, mask="bool", gqa=True)
    h = _check(g)
    assert _ops(h)[:6] == ["reshape", "expand", "reshape"] * 2
    for (r1, ex, r2), src, d in ((h.nodes[0:3], h.inputs[1], 8), (h.nodes[3:6], h.inputs[2], 6)):
        assert r1.inputs[0] is src and r1.outputs[0].shape == (1, 2, 1, 5, d)
        assert ex.outputs[0].shape == (1, 2, 4, 5, d) and r2.outputs[0].shape == (1, 8, 5, d)
    assert h.nodes[-2].inputs[1] is h.nodes[5].outputs[0]  # p @ repeated v
    # the same as repeating each KV head over its group of four query heads
    q, k, v, m = _inputs(g)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                         attn_mask=m)
    torch.testing.assert_close(run_graph(h, q, k, v, m)[0], ref, **TOL)


def test_explicit_scale():
    g = _graph(scale=0.05)
    h = _check(g)
    assert h.constants[h.nodes[2].inputs[1].name].item() == pytest.approx(0.05)
    x = _inputs(g)
    torch.testing.assert_close(run_graph(h, *x)[0], F.scaled_dot_product_attention(
        *x[:3], scale=0.05), **TOL)


def test_captured_sdpa_module():
    class Attn(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True) * 2

    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(1, 8, 6, 16, generator=gen), torch.randn(1, 2, 6, 16, generator=gen),
         torch.randn(1, 2, 6, 16, generator=gen))
    g = qcompile.capture(Attn(), x)
    att = next(n for n in g.nodes if n.op == "attention")
    assert att.attrs["causal"] and att.attrs["gqa"]
    h = run_passes(g.clone(), ["decompose_attention"])
    assert "attention" not in _ops(h) and _ops(h).count("expand") == 2
    assert all(n.provenance == att.provenance for n in h.nodes if n.name.startswith(att.name))
    torch.testing.assert_close(run_graph(h, *x)[0], run_graph(g, *x)[0], **TOL)


@pytest.mark.parametrize("bad", [0.0, 3.0, -math.inf, math.nan])
def test_bad_mask_value_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="mask_value"):
        decompose_attention(_graph(mask="bool"), mask_value=bad)
    with pytest.raises(PassConfigError, match="in pass decompose_attention"):
        run_passes(_graph(mask="bool"), ["decompose_attention"],
                   options={"decompose_attention": {"mask_value": bad}})


def test_heads_that_do_not_group_are_refused():
    with pytest.raises(PassError, match="grouped heads 6/4"):
        decompose_attention(_graph(hq=6, hk=4, gqa=True))


def test_symbolic_causal_lengths_are_refused():
    g = Graph("sym")
    q = g.add_input("q", TensorType((1, 2, "s", 8), F32))
    g.outputs = [g.add("attention", q, q, q, None, causal=True, name="attn")]
    with pytest.raises(PassError, match="static lengths"):
        decompose_attention(g)


@pytest.fixture(scope="module")
def llama():
    from qcompile import zoo
    model, ex = zoo.tiny_llama(batch=1, seq=8, hidden=64, layers=1, heads=4, kv_heads=2)[:2]
    return qcompile.capture(model, ex), list(ex)


def test_tiny_llama(llama):
    g, x = llama
    att = [n for n in g.nodes if n.op == "attention"]
    assert len(att) == 1
    h = decompose_attention(g.clone())
    verify(h)
    assert "attention" not in _ops(h) and _ops(h).count("softmax") == 1
    new = [n for n in h.nodes if n.name.startswith(att[0].name + ".")]
    assert {n.op for n in new} >= {"matmul", "mul", "softmax"}
    assert all(n.provenance == att[0].provenance for n in new)
    assert att[0].provenance.module.endswith("self_attn")
    torch.testing.assert_close(run_graph(h, *x)[0], run_graph(g, *x)[0], **TOL)
