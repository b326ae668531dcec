"""The verifier accepts well-formed graphs and names the bad node in every rejection."""
from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.errors import VerificationError
from qcompile.ir import Graph, QuantSpec, TensorType, Value, verify


def test_good_graphs_verify(mlp_graph, tiny_mlp):
    assert verify(mlp_graph) is None
    assert verify(mlp_graph.clone()) is None
    assert verify(qcompile.capture(tiny_mlp, (torch.randn(2, 8),))) is None
    g = Graph()
    a = g.add_input("a", TensorType(("batch", 3), "float32"))
    g.outputs = [a]  # an input may be an output directly
    verify(g)


def _raises(graph, *needles):
    with pytest.raises(VerificationError) as ei:
        verify(graph)
    for n in needles:
        assert n in str(ei.value), (n, str(ei.value))
    return ei.value


def test_use_before_definition(mlp_graph):
    g = mlp_graph
    g.nodes[1], g.nodes[2] = g.nodes[2], g.nodes[1]  # fc2 now reads act before act is defined
    err = _raises(g, "node 'fc2'", "%act", "before it is defined")
    assert err.node is g.nodes[1] and "topological" in str(err)


def test_output_type_mismatch(mlp_graph):
    mlp_graph.nodes[1].outputs[0].type = TensorType(("batch", 99), "float32")
    _raises(mlp_graph, "node 'act'", "float32[batch, 99]", "float32[batch, 16]")


def test_output_dtype_mismatch(mlp_graph):
    mlp_graph.nodes[2].outputs[0].type = TensorType(("batch", 4), "float16")
    _raises(mlp_graph, "node 'fc2'", "float16")


def test_linear_with_mismatched_weight():
    g = Graph()
    x = g.add_input("x", TensorType(("batch", 8), "float32"))
    w = g.add_constant("w", torch.zeros(4, 6))  # in-features 6, the input has 8
    n = g.add_node("linear", [x, w, None], name="proj",
                   output_types=[TensorType(("batch", 4), "float32")])
    g.outputs = [n.output]
    _raises(g, "node 'proj'", "in-features", "8 != 6")


def test_duplicate_value_names(mlp_graph):
    mlp_graph.nodes[1].outputs[0].name = "fc1"  # act's output now has fc1's name
    _raises(mlp_graph, "'%fc1' is defined twice", "node 'act'")


def test_duplicate_input_and_constant_names(mlp_graph):
    mlp_graph.inputs[0].name = "w1"
    _raises(mlp_graph, "'%w1' is defined twice")


def test_output_not_pointing_back(mlp_graph):
    mlp_graph.nodes[0].outputs[0].producer = mlp_graph.nodes[1]
    _raises(mlp_graph, "node 'fc1'", "does not point back")


def test_graph_output_not_defined(mlp_graph):
    removed = mlp_graph.nodes.pop()  # fc2 leaves the graph, its output stays an output
    _raises(mlp_graph, f"graph output %{removed.output.name}", "not defined")
    g = Graph()
    g.add_input("x", TensorType((2,), "float32"))
    g.outputs = [Value("ghost", TensorType((2,), "float32"))]
    _raises(g, "%ghost")


def test_quant_annotation_naming_missing_constant(mlp_graph):
    act = mlp_graph.nodes[1].output
    act.quant = QuantSpec("int8", scale="act_scale")
    _raises(mlp_graph, "%act", "missing constant %act_scale")
    mlp_graph.add_constant("act_scale", torch.tensor(0.1))
    verify(mlp_graph)  # with the constant present the annotation is fine


def test_quant_parameters_must_fit_the_value(mlp_graph):
    w1 = mlp_graph.constant_value("w1")  # [16, 8]
    mlp_graph.add_constant("w1_scale", torch.ones(8))
    w1.quant = QuantSpec("int8", "per_channel", axis=1, scale="w1_scale")
    _raises(mlp_graph, "w1_scale has 8 entries", "16 blocks")
    w1.quant = QuantSpec("int8", "per_channel", axis=0, scale="w1_scale")  # one per column
    verify(mlp_graph)
    w1.quant = QuantSpec("int4", "per_group", axis=1, group_size=3, scale="w1_scale")
    _raises(mlp_graph, "does not fit", "does not divide")


def test_constant_type_disagrees_with_tensor(mlp_graph):
    mlp_graph.constants["w1"] = torch.zeros(3, 3)
    _raises(mlp_graph, "%w1", "(3, 3)")


def test_bad_attrs_and_arity_are_caught(mlp_graph):
    mlp_graph.nodes[1].attrs["inplace"] = True
    _raises(mlp_graph, "node 'act'", "inplace")
    mlp_graph.nodes[1].attrs.clear()
    verify(mlp_graph)
    mlp_graph.nodes[1].inputs.append(mlp_graph.inputs[0])
    _raises(mlp_graph, "node 'act'", "takes inputs")
