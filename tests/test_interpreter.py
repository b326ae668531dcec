"""The reference interpreter: hooks, differentiable parameter overrides (first and second
order, against torch autograd on the same module), input checking and fake quantization."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.func import functional_call

import qcompile
from qcompile.errors import InputError
from qcompile.interpreter import Interpreter, bind_inputs, run_graph
from qcompile.ir import Graph, QuantSpec, TensorType
from qcompile.ir.types import eval_dim


def _eager(g: Graph, x: torch.Tensor) -> torch.Tensor:
    c = g.constants
    h = torch.relu(torch.nn.functional.linear(x, c["w1"], c["b1"]))
    return torch.nn.functional.linear(h, c["w2"], c["b2"])


def test_runs_symbolic_batch(mlp_graph):
    for b in (1, 3):
        x = torch.randn(b, 8)
        (y,) = Interpreter(mlp_graph).run(x)
        assert y.shape == (b, 4)
        torch.testing.assert_close(y, _eager(mlp_graph, x), rtol=0, atol=0)
    assert torch.equal(run_graph(mlp_graph, x)[0], _eager(mlp_graph, x))


def test_hooks_see_every_node_output_once_per_run(mlp_graph):
    interp = Interpreter(mlp_graph)
    seen: Counter = Counter()
    shapes = {}

    def hook(v, t):
        seen[v.name] += 1
        shapes[v.name] = tuple(t.shape)

    remove = interp.add_hook(hook)
    for b in (2, 5):
        seen.clear()
        interp.run(torch.randn(b, 8))
        node_outs = [o for n in mlp_graph.nodes for o in n.outputs]
        for o in node_outs:
            assert seen[o.name] == 1, o.name
            assert shapes[o.name] == tuple(eval_dim(d, {"batch": b}) for d in o.shape)
        assert seen["x"] == 1 and shapes["x"] == (b, 8)  # inputs and constants are seen too
        assert shapes["w1"] == (16, 8)
        assert sum(seen.values()) == len(node_outs) + 1 + len(mlp_graph.constants)
    remove()
    seen.clear()
    interp.run(torch.randn(2, 8))
    assert not seen


def test_hook_sees_value_objects_of_the_graph(mlp_graph):
    got = []
    interp = Interpreter(mlp_graph)
    interp.add_hook(lambda v, t: got.append(v))
    interp.run(torch.randn(2, 8))
    assert mlp_graph.nodes[1].output in got and mlp_graph.inputs[0] in got


def _captured(tiny_mlp, x):
    g = qcompile.capture(tiny_mlp, (x,))
    assert torch.equal(g.constants["0.weight"], tiny_mlp[0].weight)
    return g


def test_param_override_gradient_equals_autograd(tiny_mlp):
    x = torch.randn(3, 8)
    g = _captured(tiny_mlp, x)
    w = tiny_mlp[0].weight.detach().clone().requires_grad_()
    b = tiny_mlp[2].bias.detach().clone().requires_grad_()
    (y,) = Interpreter(g).run(x, params={"0.weight": w, "2.bias": b})
    assert y.requires_grad
    (y.square().sum() + y[:, 0].sum()).backward()

    out = tiny_mlp(x)
    (out.square().sum() + out[:, 0].sum()).backward()
    assert w.grad.abs().sum() > 0
    torch.testing.assert_close(w.grad, tiny_mlp[0].weight.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.grad, tiny_mlp[2].bias.grad, rtol=0, atol=1e-6)
    assert not g.constants["0.weight"].requires_grad  # the graph's own tensors are untouched


def test_param_override_changes_the_output(tiny_mlp):
    x = torch.randn(2, 8)
    g = _captured(tiny_mlp, x)
    zero = torch.zeros(4, 16)
    (y,) = Interpreter(g).run(x, params={"2.weight": zero})
    assert torch.equal(y, tiny_mlp[2].bias.detach().expand(2, 4))
    with pytest.raises(InputError, match="nope"):
        Interpreter(g).run(x, params={"nope": zero})


def test_hessian_vector_product_equals_torch(tiny_mlp):
    x = torch.randn(4, 8, dtype=torch.float64)
    model = tiny_mlp.double()
    g = qcompile.capture(model, (x,))
    w0 = model[0].weight.detach().clone()
    v = torch.randn_like(w0)
    interp = Interpreter(g)

    def loss_ir(w):
        return interp.run(x, params={"0.weight": w})[0].square().sum()

    w = w0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_ir(w), w, create_graph=True)
    (hv,) = torch.autograd.grad((grad * v).sum(), w)

    def loss_torch(w):
        return functional_call(model, {"0.weight": w}, (x,)).square().sum()

    _, hv_ref = torch.autograd.functional.hvp(loss_torch, w0, v)
    assert hv_ref.abs().max() > 1e-3  # a real second-order term, not zero
    torch.testing.assert_close(hv, hv_ref, rtol=0, atol=1e-6)


# -- input checking -------------------------------------------------------------------
def test_wrong_number_of_inputs(mlp_graph):
    with pytest.raises(InputError, match=r"expected 1 inputs \(x\), got 2"):
        Interpreter(mlp_graph).run(torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(InputError, match="got 0"):
        Interpreter(mlp_graph).run()


def test_wrong_rank(mlp_graph):
    with pytest.raises(InputError) as ei:
        Interpreter(mlp_graph).run(torch.randn(2, 3, 8))
    msg = str(ei.value)
    assert "'x'" in msg and "[2, 3, 8]" in msg and "[batch, 8]" in msg and "rank 3" in msg


def test_wrong_static_dim(mlp_graph):
    with pytest.raises(InputError) as ei:
        Interpreter(mlp_graph).run(torch.randn(2, 9))
    msg = str(ei.value)
    assert "'x'" in msg and "[2, 9]" in msg and "[batch, 8]" in msg


def _two_input_graph() -> Graph:
    g = Graph()
    a = g.add_input("a", TensorType(("batch", 4), "float32"))
    b = g.add_input("b", TensorType(("batch", 4), "float32"))
    g.outputs = [g.add("add", a, b)]
    return g


def test_symbol_bound_inconsistently():
    g = _two_input_graph()
    assert Interpreter(g).run(torch.ones(3, 4), torch.ones(3, 4))[0].shape == (3, 4)
    with pytest.raises(InputError) as ei:
        Interpreter(g).run(torch.ones(2, 4), torch.ones(3, 4))
    msg = str(ei.value)
    assert "'b'" in msg and "[3, 4]" in msg and "'batch' is already bound to 2" in msg


def test_derived_dim_is_checked():
    g = Graph()
    a = g.add_input("a", TensorType(("n", 2), "float32"))
    b = g.add_input("b", TensorType(("2*n",), "float32"))
    g.outputs = [g.add("add", g.add("reshape", a, shape=[-1]), b)]
    assert Interpreter(g).run(torch.ones(3, 2), torch.ones(6))[0].shape == (6,)
    with pytest.raises(InputError, match=r"'b' has shape \[5\], expected \[2\*n\] with \{'n': 3\}"):
        Interpreter(g).run(torch.ones(3, 2), torch.ones(5))


def test_numpy_inputs_accepted(mlp_graph):
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    (y,) = Interpreter(mlp_graph).run(x)
    assert isinstance(y, torch.Tensor)
    assert torch.equal(y, _eager(mlp_graph, torch.from_numpy(x)))
    (y64,) = Interpreter(mlp_graph).run(x.astype(np.float64))  # converted to the graph's dtype
    assert y64.dtype == torch.float32 and torch.equal(y64, y)


def test_bad_input_kinds(mlp_graph):
    with pytest.raises(InputError, match="must be a torch.Tensor or numpy array, got list"):
        Interpreter(mlp_graph).run([[0.0] * 8])
    with pytest.raises(InputError, match="dtype torch.int64, expected float32"):
        Interpreter(mlp_graph).run(torch.ones(2, 8, dtype=torch.int64))


def test_bind_inputs_returns_env(mlp_graph):
    tensors, env = bind_inputs(mlp_graph, [torch.ones(7, 8)])
    assert env == {"batch": 7} and tensors[0].shape == (7, 8)


# -- fake quantization ----------------------------------------------------------------
def test_annotated_value_is_fake_quantized(mlp_graph):
    s = 0.125
    mlp_graph.add_constant("act_scale", torch.tensor(s))
    act = mlp_graph.nodes[1].output
    act.quant = QuantSpec("int4", scale="act_scale")
    x = torch.randn(5, 8) * 3
    got = {}
    interp = Interpreter(mlp_graph)
    interp.add_hook(lambda v, t: got.__setitem__(v.name, t))
    (y,) = interp.run(x)
    relu = torch.relu(torch.nn.functional.linear(x, mlp_graph.constants["w1"],
                                                 mlp_graph.constants["b1"]))
    expected_act = torch.clamp(torch.round(relu / s), -8, 7) * s
    assert torch.equal(got["act"], expected_act)
    assert (relu > 7 * s).any()  # saturation happened
    c = mlp_graph.constants
    assert torch.equal(y, torch.nn.functional.linear(expected_act, c["w2"], c["b2"]))
    (plain,) = Interpreter(mlp_graph, fake_quant=False).run(x)
    assert torch.equal(plain, _eager(mlp_graph, x)) and not torch.equal(plain, y)


def test_annotated_constant_and_override_are_fake_quantized(mlp_graph):
    mlp_graph.add_constant("w1_scale", torch.full((16,), 0.5))
    mlp_graph.constant_value("w1").quant = QuantSpec("int8", "per_channel", axis=1,  # one scale per row
                                                     scale="w1_scale")
    x = torch.randn(2, 8)
    w1q = torch.round(mlp_graph.constants["w1"] / 0.5) * 0.5
    c = mlp_graph.constants
    ref = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1q, c["b1"])),
                                     c["w2"], c["b2"])
    assert torch.equal(Interpreter(mlp_graph).run(x)[0], ref)
    w = c["w1"].clone().requires_grad_()  # an override is quantized too, with an STE gradient
    (y,) = Interpreter(mlp_graph).run(x, params={"w1": w})
    assert torch.equal(y.detach(), ref)
    y.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
