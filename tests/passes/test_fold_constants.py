"""fold_constants: source ops and ops of constants become constants; outputs stay the same;
large results and anything symbolic stay as nodes."""
from __future__ import annotations

import torch

from qcompile.interpreter import Interpreter
from qcompile.ir import Graph, TensorType, verify
from qcompile.passes import run_passes
from qcompile.passes.fold_constants import MAX_FOLD_ELEMENTS, fold_constants


def _graph() -> Graph:
    g = Graph("fold")
    x = g.add_input("x", TensorType(("batch", 4), "float32"))
    pos = g.add("arange", end=4, dtype="float32", name="pos")
    two = g.add("full", shape=[4], value=2.0, dtype="float32", name="two")
    k = g.add_constant("k", torch.tensor([1.0, -1.0, 0.5, 3.0]))
    scaled = g.add("mul", pos, two, name="scaled")        # mul of folded results
    bias = g.add("add", scaled, k, name="bias")          # reads a real constant too
    g.outputs = [g.add("add", x, bias, name="out")]
    return g


def test_folds_arange_full_and_arithmetic_of_constants():
    g = _graph()
    before = str(g)
    out = run_passes(g, ["fold_constants"])
    verify(out)
    assert [n.op for n in out.nodes] == ["add"] and out.nodes[0].name == "out"
    folded = out.nodes[0].inputs[1]
    assert out.is_constant(folded) and folded.name == "bias_folded"
    assert torch.equal(out.constants[folded.name], torch.tensor([1.0, 1.0, 4.5, 9.0]))
    assert set(out.constants) == {"bias_folded"}  # intermediates and the used-up k are gone
    assert str(g) == before  # the input graph is not modified


def test_outputs_unchanged():
    g = _graph()
    out = fold_constants(g)
    for b in (1, 3):
        x = torch.randn(b, 4)
        assert torch.equal(Interpreter(out).run(x)[0], Interpreter(g).run(x)[0])


def test_folded_graph_output_becomes_constant():
    g = Graph()
    g.add_input("x", TensorType((2,), "float32"))
    g.outputs = [g.add("full", shape=[2, 2], value=7, dtype="int64", name="sevens")]
    out = fold_constants(g)
    assert out.nodes == [] and out.is_constant(out.outputs[0])
    assert torch.equal(Interpreter(out).run(torch.zeros(2))[0], torch.full((2, 2), 7))


def test_large_constants_not_folded():
    g = Graph()
    x = g.add_input("x", TensorType((2,), "float32"))
    side = 257  # 257 * 257 > MAX_FOLD_ELEMENTS
    assert side * side > MAX_FOLD_ELEMENTS >= 256 * 256
    big = g.add("full", shape=[side, side], value=1.0, dtype="float32", name="big")
    small = g.add("full", shape=[256, 256], value=1.0, dtype="float32", name="small")
    s = g.add("add", g.add("sum", big, name="sum_big"), g.add("sum", small, name="sum_small"))
    g.outputs = [g.add("add", x, s, name="out")]
    out = fold_constants(g)
    ops = [(n.name, n.op) for n in out.nodes]
    assert ops == [("big", "full"), ("sum_big", "sum"), ("add", "add"), ("out", "add")]
    assert set(out.constants) == {"sum_small_folded"}  # the small chain folded to its sum
    assert torch.equal(Interpreter(out).run(torch.zeros(2))[0],
                       torch.full((2,), float(side * side + 256 * 256)))


def test_symbolic_nodes_not_folded():
    g = Graph()
    x = g.add_input("x", TensorType(("batch", 3), "float32"))
    ids = g.add("arange", end="batch", dtype="float32", name="ids")          # symbolic shape
    ones = g.add("full", shape=["batch", 3], value=1.0, dtype="float32", name="ones")
    table = g.add_constant("table", torch.arange(12.0).reshape(4, 3))
    last = g.add("select", table, axis=0, index="batch - 1", name="last")    # symbolic attr only
    assert last.type.is_static
    y = g.add("add", g.add("mul", x, ones), last)
    g.outputs = [g.add("add", y, g.add("reshape", ids, shape=["batch", 1]), name="out")]
    out = fold_constants(g)
    assert {n.name for n in out.nodes} >= {"ids", "ones", "last"}
    assert not any(name.endswith("_folded") for name in out.constants)
    for b in (1, 4):
        x = torch.randn(b, 3)
        expected = x + torch.arange(12.0).reshape(4, 3)[b - 1] + torch.arange(float(b))[:, None]
        assert torch.equal(Interpreter(out).run(x)[0], expected)


def test_annotated_outputs_not_folded():
    from qcompile.ir import QuantSpec
    g = Graph()
    x = g.add_input("x", TensorType((4,), "float32"))
    g.add_constant("s", torch.tensor(0.5))
    c = g.add("full", shape=[4], value=0.7, dtype="float32", name="c")
    c.quant = QuantSpec("int8", scale="s")
    g.outputs = [g.add("add", x, c)]
    out = fold_constants(g)
    assert [n.op for n in out.nodes] == ["full", "add"]
    assert torch.equal(Interpreter(out).run(torch.zeros(4))[0], torch.full((4,), 0.5))
