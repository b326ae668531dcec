"""The qcompile IR: typed values, nodes, graphs, the op registry, verifier, printer and
serialization."""
from qcompile.ir.graph import Graph, Node, Provenance, Value
from qcompile.ir.quant import Granularity, QuantSpec
from qcompile.ir.registry import Attr, OpSchema, all_ops, get_schema, op
from qcompile.ir.serialize import graph_from_json, graph_to_json, load_graph, save_graph
from qcompile.ir.sparsity import SparsitySpec
from qcompile.ir.types import TensorType
from qcompile.ir.verify import verify

__all__ = [
    "Graph", "Node", "Value", "Provenance", "TensorType", "QuantSpec", "Granularity", "Attr",
    "OpSchema", "op", "get_schema", "all_ops", "verify", "graph_to_json", "graph_from_json",
    "save_graph", "load_graph", "SparsitySpec",
]
