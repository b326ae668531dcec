import pytest
import torch

from qcompile.interpreter import run_graph
from qcompile.ir import Graph, TensorType
from qcompile.ir.specialize import specialize


def _graph():
    g = Graph("g")
    x = g.add_input("x", TensorType(("batch", "tokens", 8), "float32"))
    w = g.add_constant("w", torch.randn(4, 8))
    y = g.add("linear", x, w)
    g.outputs = [g.add("reshape", y, shape=["batch", "tokens * 4"])]
    return g


def test_binds_only_the_given_symbols_and_shares_constants():
    g = _graph()
    one = specialize(g, {"tokens": 1})
    assert one.inputs[0].type.shape == ("batch", 1, 8)
    assert one.outputs[0].type.shape == ("batch", 4)
    assert one.nodes[-1].attrs["shape"] == ["batch", 4]
    assert one.constants["w"] is g.constants["w"]           # not copied
    assert g.inputs[0].type.shape == ("batch", "tokens", 8)  # the original is untouched
    x = torch.randn(3, 1, 8)
    assert torch.equal(run_graph(one, x)[0], run_graph(g, x)[0])
    with pytest.raises(Exception):
        run_graph(one, torch.randn(3, 2, 8))                 # tokens is 1 now
