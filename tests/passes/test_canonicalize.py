"""canonicalize: hand-written RMSNorm and rotate_half rotary become one node each, with the
module's numbers; near misses stay as they are."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qcompile
import qcompile.passes
from qcompile.interpreter import Interpreter
from qcompile.ir import Graph, TensorType, verify
from qcompile.passes import run_passes
from qcompile.passes.canonicalize import canonicalize


class LlamaRMSNorm(nn.Module):
    """As in transformers' modeling_llama."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class BareRMSNorm(nn.Module):
    """No weight, eps on the left of the add."""

    def forward(self, x):
        return x * torch.rsqrt(1e-5 + x.pow(2).mean(dim=-1, keepdim=True))


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    def forward(self, q, cos, sin):
        return q * cos + rotate_half(q) * sin


class RotarySwapped(nn.Module):
    def forward(self, q, cos, sin):
        return sin * rotate_half(q) + cos * q


class MeanOverAxis0(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6))


class VarianceAlsoReturned(nn.Module):
    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + 1e-6), variance


class RotatedAlsoReturned(nn.Module):
    def forward(self, q, cos, sin):
        r = rotate_half(q)
        return q * cos + r * sin, r


@pytest.fixture
def capture_raw(monkeypatch):
    """capture() without its final canonicalize, so the decomposed pattern is what we get."""
    real = qcompile.passes.run_passes

    def no_canon(graph, pipeline, **kw):
        return real(graph, [p for p in pipeline if p != "canonicalize"], **kw)

    def cap(module, example_inputs):
        with monkeypatch.context() as m:
            m.setattr(qcompile.passes, "run_passes", no_canon)
            return qcompile.capture(module, example_inputs)
    return cap


def _ops(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


def _check_numbers(g: Graph, module: nn.Module, inputs: tuple):
    outs = Interpreter(g).run(*inputs)
    ref = module(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    assert len(outs) == len(ref)
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_llama_rmsnorm_becomes_one_node(capture_raw):
    m, x = LlamaRMSNorm(8), (torch.randn(2, 3, 8) * 3,)
    raw = capture_raw(m, x)
    assert {"pow", "mean", "add", "rsqrt", "mul"} <= set(_ops(raw))
    g = run_passes(raw, ["canonicalize"])
    verify(g)
    assert _ops(g) == ["rms_norm"]
    node = g.nodes[0]
    assert node.inputs == [g.inputs[0], g.constant_value("weight")]
    assert node.attrs["eps"] == pytest.approx(1e-6) and node.attrs["normalized_ndim"] == 1
    normed = next(n for n in raw.nodes if n.op == "mul" and any(
        v.producer is not None and v.producer.op == "rsqrt" for v in n.inputs))
    assert node.provenance == normed.provenance and node.provenance.origin  # provenance kept
    assert list(g.constants) == ["weight"]  # eps and the exponent constants are gone
    _check_numbers(g, m, x)
    _check_numbers(raw, m, x)
    assert _ops(qcompile.capture(m, x)) == ["rms_norm"]  # capture canonicalizes too


def test_rmsnorm_without_weight(capture_raw):
    m, x = BareRMSNorm(), (torch.randn(4, 16),)
    g = canonicalize(capture_raw(m, x))
    assert _ops(g) == ["rms_norm"] and g.nodes[0].inputs[1] is None
    assert g.nodes[0].attrs["eps"] == pytest.approx(1e-5)
    _check_numbers(g, m, x)


@pytest.mark.parametrize("module", [Rotary(), RotarySwapped()], ids=["q_cos_first", "swapped"])
def test_rotate_half_becomes_one_rotary_node(capture_raw, module):
    x = (torch.randn(1, 2, 5, 8), torch.randn(5, 8), torch.randn(5, 8))
    raw = capture_raw(module, x)
    assert {"slice", "neg", "concat", "mul", "add"} <= set(_ops(raw))
    g = run_passes(raw, ["canonicalize"])
    assert _ops(g) == ["rotary"]
    assert g.nodes[0].inputs == g.inputs  # rotary(q, cos, sin)
    _check_numbers(g, module, x)


def test_near_miss_mean_over_axis0_is_kept(capture_raw):
    m, x = MeanOverAxis0(), (torch.randn(3, 8),)
    raw = capture_raw(m, x)
    g = canonicalize(raw)
    assert "rms_norm" not in _ops(g) and _ops(g) == _ops(raw)
    _check_numbers(g, m, x)


def test_near_miss_intermediate_read_twice_is_kept(capture_raw):
    m, x = VarianceAlsoReturned(), (torch.randn(3, 8),)
    raw = capture_raw(m, x)
    g = canonicalize(raw)
    assert "rms_norm" not in _ops(g) and _ops(g) == _ops(raw)
    assert len(g.outputs) == 2
    _check_numbers(g, m, x)


def test_near_miss_rotated_half_also_returned_is_kept(capture_raw):
    m = RotatedAlsoReturned()
    x = (torch.randn(1, 2, 5, 8), torch.randn(5, 8), torch.randn(5, 8))
    raw = capture_raw(m, x)
    g = canonicalize(raw)
    assert "rotary" not in _ops(g) and _ops(g) == _ops(raw)
    _check_numbers(g, m, x)


def test_rotary_with_wrong_split_is_kept():
    g = Graph()
    q = g.add_input("q", TensorType((2, 8), "float32"))
    cos = g.add_input("cos", TensorType((2, 8), "float32"))
    sin = g.add_input("sin", TensorType((2, 8), "float32"))
    hi = g.add("slice", q, axis=-1, start=3, end=8)   # not the half split
    lo = g.add("slice", q, axis=-1, start=0, end=3)
    rot = g.add("concat", g.add("neg", hi), lo, axis=-1)
    g.outputs = [g.add("add", g.add("mul", q, cos), g.add("mul", rot, sin))]
    out = canonicalize(g)
    assert _ops(out) == _ops(g)


def test_input_graph_untouched(capture_raw):
    raw = capture_raw(LlamaRMSNorm(8), (torch.randn(2, 8),))
    before = str(raw)
    canonicalize(raw)
    assert str(raw) == before
