"""The reference backend: registered as 'reference', a roofline cost that grows with size,
and support for every op the frontend emits."""
from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.backends import get_backend
from qcompile.backends.reference import ReferenceBackend
from qcompile.errors import ConfigError
from qcompile.interpreter import Interpreter
from qcompile.ir import Graph, Node, TensorType


def test_reference_is_a_target():
    assert "reference" in qcompile.targets()
    assert isinstance(get_backend("reference"), ReferenceBackend)


@pytest.mark.parametrize("target", ["nope", "Reference"])
def test_unknown_target_lists_known_ones(target):
    with pytest.raises(ConfigError) as ei:
        get_backend(target)
    assert f"unknown target {target!r}" in str(ei.value) and "reference" in str(ei.value)


def test_target_must_be_a_name():
    with pytest.raises(ConfigError, match="is a name"):
        get_backend(3)


def _linear(n: int, batch="batch") -> Node:
    g = Graph()
    x = g.add_input("x", TensorType((batch, n), "float32"))
    w = g.add_constant("w", torch.zeros(n, n))
    return g.add_node("linear", [x, w, None])


def test_cost_positive_and_grows_with_size():
    be = get_backend("reference")
    small, big = _linear(64), _linear(1024)
    c_small = be.cost(small, "cpu", {"batch": 8})
    c_big = be.cost(big, "cpu", {"batch": 8})
    assert 0 < c_small < c_big
    assert c_big > 100 * c_small  # 256x the weights and flops
    assert be.cost(big, "cpu", {"batch": 64}) > c_big  # symbols are bound by env
    assert be.cost(big, "cpu") > 0  # unbound symbols count as 1
    relu_g = Graph()
    r = relu_g.add_node("relu", [relu_g.add_input("x", TensorType((4,), "float32"))])
    assert be.cost(r, "cpu") > 0


def test_supports_every_node_of_a_captured_mlp(tiny_mlp):
    g = qcompile.capture(tiny_mlp, (torch.randn(2, 8),))
    be = get_backend("reference")
    assert g.nodes and all(be.supports(n) for n in g.nodes)
    assert not be.supports(Node("not_an_op", [], []))


def test_lower_runs_the_interpreter(mlp_graph):
    exe = get_backend("reference").lower(mlp_graph, "reference")
    x = torch.randn(3, 8)
    assert torch.equal(exe(x)[0], Interpreter(mlp_graph).run(x)[0])
    assert get_backend("reference").artifacts(exe) == {}
