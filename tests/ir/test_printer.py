"""The printer: a deterministic listing with op names, types, attrs and annotations."""
from __future__ import annotations

import torch

from qcompile.ir import Graph, Provenance, QuantSpec, TensorType
from qcompile.ir.printer import format_attrs, print_graph


def _annotated(mlp_graph: Graph) -> Graph:
    g = mlp_graph
    s = g.add_constant("act_scale", torch.tensor(0.05))
    g.nodes[1].output.quant = QuantSpec("int8", scale=s.name)
    ws = g.add_constant("w1_scale", torch.full((16,), 0.01))
    g.constant_value("w1").quant = QuantSpec("int4", "per_channel", axis=0, scale=ws.name)
    y = g.add("softmax", g.outputs[0], axis=-1, name="probs",
              provenance=Provenance(module="head", source="model.py:12", origin="softmax_1"))
    z = g.add("clamp", y, min=0.125, name="clip")
    g.outputs = [g.add("slice", z, axis=1, start=0, end=2, name="first2"), y]
    return g


def test_printout_contains_ops_types_attrs_and_annotations(mlp_graph):
    text = str(_annotated(mlp_graph))
    lines = text.splitlines()
    assert lines[0] == "graph mlp(%x: float32[batch, 8]) {" and lines[-1] == "}"
    assert "  const %w1: float32[16, 8] ~int4 per_channel(axis=0)" in lines
    assert "  const %act_scale: float32[]" in lines
    assert "  %fc1: float32[batch, 16] = linear(%x, %w1, %b1)" in lines
    assert "  %act: float32[batch, 16] ~int8 per_tensor = relu(%fc1)" in lines
    assert "  %probs: float32[batch, 4] = softmax(%fc2){axis=-1}  # head" in lines
    assert "  %clip: float32[batch, 4] = clamp(%probs){min=0.125}" in lines  # None attrs dropped
    assert "  %first2: float32[batch, 2] = slice(%clip){axis=1, end=2, start=0, step=1}" in lines
    assert lines[-2] == "  return %first2, %probs"


def test_printout_is_deterministic(mlp_graph):
    g = _annotated(mlp_graph)
    text = print_graph(g)
    assert print_graph(g) == text
    assert str(g.clone()) == text
    assert "# head" not in print_graph(g, provenance=False)


def test_format_attrs():
    assert format_attrs({}) == ""
    assert format_attrs({"b": [1, "batch"], "a": 0.5, "c": None}) == "{a=0.5, b=[1, batch]}"
    assert format_attrs({"x": True, "s": "tanh"}) == "{s=tanh, x=True}"


def test_none_inputs_print_as_none():
    g = Graph("g")
    x = g.add_input("x", TensorType((2, 8), "float32"))
    w = g.add_constant("w", torch.zeros(3, 8))
    g.outputs = [g.add_node("linear", [x, w, None], name="fc").output]
    assert "  %fc: float32[2, 3] = linear(%x, %w, None)" in str(g).splitlines()
