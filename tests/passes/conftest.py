"""Fixtures for the quantization passes: a hand-built post-LN block, and captured MiniLM and
tiny Llama graphs (captured once per session; tests clone them)."""
from __future__ import annotations

import pytest
import torch

from qcompile.ir import Graph, TensorType


@pytest.fixture
def ln_block() -> Graph:
    """x[b, 16, 32] -> layer_norm(γ, β) -> {q, k linears, residual add} -> out (post-LN style:
    the norm's output also feeds the residual)."""
    gen = torch.Generator().manual_seed(1)
    g = Graph("ln_block")
    x = g.add_input("x", TensorType(("b", 16, 32), "float32"))
    gamma = g.add_constant("ln.weight", torch.rand(32, generator=gen) + 0.5)
    beta = g.add_constant("ln.bias", torch.randn(32, generator=gen) * 0.1)
    h = g.add("layer_norm", x, gamma, beta, name="ln")
    wq = g.add_constant("q.weight", torch.randn(32, 32, generator=gen) / 6)
    wk = g.add_constant("k.weight", torch.randn(32, 32, generator=gen) / 6)
    bq = g.add_constant("q.bias", torch.randn(32, generator=gen) / 6)
    q = g.add("linear", h, wq, bq, name="q")
    k = g.add("linear", h, wk, name="k")
    s = g.add("add", q, k, name="qk")
    g.outputs = [g.add("add", s, h, name="residual")]
    return g


def _outlier_input(b=4, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, 32, generator=gen)
    x[..., 3] *= 30  # outlier channels survive layer_norm's scaling only partly
    return x


@pytest.fixture
def ln_inputs():
    return [(_outlier_input(seed=i),) for i in range(4)]


@pytest.fixture(scope="session")
def minilm_graph():
    from qcompile import capture, zoo
    model, ex = zoo.minilm(batch=2, seq=24)[:2]
    return capture(model, ex), list(ex.values())


@pytest.fixture(scope="session")
def llama_graph():
    from qcompile import capture, zoo
    model, ex = zoo.tiny_llama(batch=2, seq=12, hidden=64, layers=2, heads=4, kv_heads=2)[:2]
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # random init leaves RMSNorm weights at 1: make folding matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.mul_(torch.rand(p.shape, generator=gen) + 0.5)
    return capture(model, tuple(ex)), list(ex)

