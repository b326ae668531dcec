"""Hessian sensitivities: Hutchinson's trace against the exact Hessian, exactness for a diagonal
Hessian, power iteration against the top eigenvalue, the losses and their bad inputs."""
from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.errors import ConfigError
from qcompile.ir import Graph, TensorType
from qcompile.passes.sensitivity import hessian_traces, make_loss, omega, top_eigenvalues


def _mlp_graph(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4))
    xs = [torch.randn(128, 12, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
    return qcompile.capture(m, (xs[0],)), xs


def _exact_block_traces(g, loss, layers):
    names = [n.inputs[1].name for n in layers]
    w0 = tuple(g.constants[k].float() for k in names)
    H = torch.autograd.functional.hessian(lambda *ws: loss(dict(zip(names, ws))), w0)
    out = {}
    for i, k in enumerate(names):
        n = w0[i].numel()
        out[k] = (H[i][i].reshape(n, n), float(H[i][i].reshape(n, n).trace()))
    return out


@pytest.mark.parametrize("kind", ["mse", "kl", "task"])
def test_hutchinson_within_5_percent_of_exact_trace(kind):
    g, xs = _mlp_graph()
    labels = [torch.randint(0, 4, (128,), generator=torch.Generator().manual_seed(i))
              for i in range(2)] if kind == "task" else None
    loss = make_loss(g, [[x] for x in xs], labels, kind)
    layers = [n for n in g.nodes if n.op == "linear"]
    exact = _exact_block_traces(g, loss, layers)
    res = hessian_traces(g, layers, loss, max_iters=300, tol=0.0, seed=0)
    assert res.probes == 300
    for k, (_, tr) in exact.items():
        assert tr > 0
        assert abs(res.traces[k] - tr) <= 0.05 * tr, (k, res.traces[k], tr)
        assert res.stderr[k] > 0


def test_hutchinson_exact_for_a_diagonal_hessian_after_one_probe():
    # y = x W^T on one-hot rows, MSE to labels: H = 2/N·(XᵀX ⊗ I) is diagonal
    g = Graph("diag")
    x = g.add_input("x", TensorType((8, 8), "float32"))
    w = g.add_constant("w", torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))
    g.outputs = [g.add("linear", x, w, name="fc")]
    eye = torch.eye(8) * torch.arange(1, 9).float()[:, None]  # distinct diagonal entries
    y = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    loss = make_loss(g, [[eye]], [y], "task")
    layers = [n for n in g.nodes if n.op == "linear"]
    (H, tr), = _exact_block_traces(g, loss, layers).values()
    assert torch.count_nonzero(H - torch.diag(torch.diag(H))) == 0
    res = hessian_traces(g, layers, loss, max_iters=1, seed=3)
    assert res.probes == 1
    assert res.traces["w"] == pytest.approx(tr, rel=1e-6)
    # every later probe gives the same value, so the stopping rule ends at the second one
    assert hessian_traces(g, layers, loss, max_iters=50, tol=1e-3).probes == 2


def test_stopping_rule_ends_early_with_a_loose_tolerance():
    g, xs = _mlp_graph()
    loss = make_loss(g, [[xs[0]]], None, "mse")
    layers = [n for n in g.nodes if n.op == "linear"]
    assert hessian_traces(g, layers, loss, max_iters=100, tol=0.5).probes < 100
    assert hessian_traces(g, layers, loss, max_iters=7, tol=0.0).probes == 7


def test_power_iteration_finds_each_blocks_top_eigenvalue():
    g, xs = _mlp_graph(1)
    loss = make_loss(g, [[x] for x in xs], None, "mse")
    layers = [n for n in g.nodes if n.op == "linear"]
    lam = top_eigenvalues(g, layers, loss, max_iters=300, tol=1e-7)
    for k, (H, _) in _exact_block_traces(g, loss, layers).items():
        top = float(torch.linalg.eigvalsh(H.double())[-1])
        assert lam[k] == pytest.approx(top, rel=1e-3)


def test_mse_and_kl_losses_are_zero_at_the_float_weights():
    g, xs = _mlp_graph()
    for kind in ("mse", "kl"):
        loss = make_loss(g, [[x] for x in xs], None, kind)
        assert float(loss()) == pytest.approx(0.0, abs=1e-9)
        w = {"0.weight": g.constants["0.weight"] * 1.1}
        assert float(loss(w)) > 0


def test_omega_is_curvature_times_squared_error_and_clamps_negative_curvature():
    assert omega(2.0, 0.25) == pytest.approx(0.5)
    assert omega(-1.0, 0.25) == 0.0
    assert omega(float("nan"), 0.25) != omega(float("nan"), 0.25)  # NaN stays NaN


def test_bad_inputs():
    g, xs = _mlp_graph()
    with pytest.raises(ConfigError, match="needs labels"):
        make_loss(g, [[xs[0]]], None, "task")
    with pytest.raises(ConfigError, match="calibration samples"):
        make_loss(g, [], None, "mse")
    with pytest.raises(ConfigError, match="1 labels for 2"):
        make_loss(g, [[x] for x in xs], [torch.zeros(128, dtype=torch.long)], "task")
