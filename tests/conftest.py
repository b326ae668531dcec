"""Shared fixtures: a hand-built MLP graph and a small seeded torch MLP."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qcompile.ir import Graph, TensorType


@pytest.fixture(autouse=True)
def _seed():
    """Every test draws the same random numbers whatever runs before it."""
    torch.manual_seed(0)


@pytest.fixture
def mlp_graph() -> Graph:
    """x: float32[batch, 8] -> linear(16) -> relu -> linear(4), weights as constants."""
    gen = torch.Generator().manual_seed(0)
    g = Graph("mlp")
    x = g.add_input("x", TensorType(("batch", 8), "float32"))
    w1 = g.add_constant("w1", torch.randn(16, 8, generator=gen) / 3)
    b1 = g.add_constant("b1", torch.randn(16, generator=gen) / 3)
    w2 = g.add_constant("w2", torch.randn(4, 16, generator=gen) / 4)
    b2 = g.add_constant("b2", torch.randn(4, generator=gen) / 4)
    h = g.add("linear", x, w1, b1, name="fc1")
    r = g.add("relu", h, name="act")
    g.outputs = [g.add("linear", r, w2, b2, name="fc2")]
    return g


@pytest.fixture
def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def pytest_generate_tests(metafunc):
    """``isa_level``: the test runs once per instruction-set level this host supports
    (``qcompile.isa.supported_levels()``: generic, avx2, avx512, amx), with ``QCOMPILE_ISA``
    capping code generation and kernel choice at that level, so an AVX-512 host also proves
    the AVX2 and portable paths."""
    if "isa_level" in metafunc.fixturenames:
        from qcompile import isa
        metafunc.parametrize("isa_level", isa.supported_levels(), indirect=True)


@pytest.fixture
def isa_level(request, monkeypatch) -> str:
    """The level this run of a kernel test is capped at (see ``pytest_generate_tests``)."""
    from qcompile import isa
    monkeypatch.setenv(isa.ENV, request.param)
    return request.param
