"""Graph ⇄ JSON (structure) + safetensors (tensors). No pickle anywhere."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qcompile.errors import ArtifactError
from qcompile.ir.graph import Graph, Node, Provenance, Value
from qcompile.ir.quant import QuantSpec
from qcompile.ir.sparsity import SparsitySpec
from qcompile.ir.types import TensorType

__all__ = ["graph_to_json", "graph_from_json", "save_graph", "load_graph", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def _value_json(v: Value) -> dict:
    d = {"name": v.name, "type": v.type.to_json()}
    if v.quant is not None:
        d["quant"] = v.quant.to_json()
    if getattr(v, "sparsity", None) is not None:
        d["sparsity"] = v.sparsity.to_json()
    return d


def graph_to_json(graph: Graph) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "name": graph.name,
        "inputs": [_value_json(v) for v in graph.inputs],
        "constants": [_value_json(graph.constant_value(n)) for n in graph.constants],
        "nodes": [{"name": n.name, "op": n.op,
                   "inputs": [None if v is None else v.name for v in n.inputs],
                   "outputs": [_value_json(o) for o in n.outputs],
                   "attrs": n.attrs, "provenance": n.provenance.to_json()} for n in graph.nodes],
        "outputs": [v.name for v in graph.outputs],
    }


def graph_from_json(d: dict, tensors: dict[str, torch.Tensor]) -> Graph:
    if d.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"graph format version {d.get('format_version')} is not "
                            f"{FORMAT_VERSION}", hint="rebuild the artifact with this qcompile")
    g = Graph(d["name"])
    env: dict[str, Value] = {}

    def mk(vd, producer=None):
        q = QuantSpec.from_json(vd["quant"]) if "quant" in vd else None
        sp = SparsitySpec.from_json(vd["sparsity"]) if "sparsity" in vd else None
        v = Value(vd["name"], TensorType.from_json(vd["type"]), producer, q, sp)
        g._names.add(v.name)
        env[v.name] = v
        return v

    for vd in d["inputs"]:
        g.inputs.append(mk(vd))
    for vd in d["constants"]:
        if vd["name"] not in tensors:
            raise ArtifactError(f"tensor for constant %{vd['name']} is missing from the params")
        v = mk(vd)
        g.constants[v.name] = tensors[vd["name"]]
        g._const_values[v.name] = v
    for nd in d["nodes"]:
        try:
            ins = [None if n is None else env[n] for n in nd["inputs"]]
        except KeyError as e:
            raise ArtifactError(f"node {nd['name']} reads undefined value %{e.args[0]}") from None
        node = Node(nd["op"], ins, [], nd["attrs"], nd["name"], Provenance(**nd["provenance"]))
        g._names.add(node.name)
        node.outputs = [mk(od, node) for od in nd["outputs"]]
        g.nodes.append(node)
    g.outputs = [env[n] for n in d["outputs"]]
    return g


def save_graph(graph: Graph, directory: str | os.PathLike) -> None:
    """Write ``graph.json`` and ``params.safetensors`` into an existing directory."""
    directory = Path(directory)
    tensors = {k: t.detach().contiguous().clone() for k, t in graph.constants.items()}
    save_file(tensors, str(directory / "params.safetensors"), metadata={"format": "pt"})
    text = json.dumps(graph_to_json(graph), indent=1, sort_keys=True)
    (directory / "graph.json").write_text(text + "\n")


def load_graph(directory: str | os.PathLike) -> Graph:
    directory = Path(directory)
    try:
        d = json.loads((directory / "graph.json").read_text())
        tensors = load_file(str(directory / "params.safetensors"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read graph from {directory}: {e}") from e
    return graph_from_json(d, tensors)
