"""Checks of a captured step graph: its KV caches are state the graph may write in place."""
from __future__ import annotations

from qcompile.errors import VerificationError
from qcompile.ir.graph import Graph
from qcompile.llm.spec import LlmSpec

__all__ = ["check_step_graph"]


def check_step_graph(graph: Graph, spec: LlmSpec) -> None:
    """Each cache input is read by exactly one node, a ``kv_write``, whose result is the
    matching output: then writing it in place is invisible to the rest of the graph."""
    caches = graph.inputs[4:]
    if len(caches) != 2 * spec.layers or len(graph.outputs) != 1 + 2 * spec.layers:
        raise VerificationError(f"step graph {graph.name!r} has {len(caches)} cache inputs and "
                                f"{len(graph.outputs) - 1} cache outputs; expected {2 * spec.layers}")
    readers: dict[int, list] = {id(v): [] for v in caches}
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None and id(v) in readers:
                readers[id(v)].append(n)
    for v, out in zip(caches, graph.outputs[1:]):
        r = readers[id(v)]
        if len(r) != 1 or r[0].op != "kv_write" or r[0].inputs[0] is not v or r[0].outputs[0] is not out:
            raise VerificationError(f"cache input {v.name!r} of {graph.name!r} must be read only "
                                    f"by the kv_write whose result is its output; read by "
                                    f"{[f'{n.op} {n.name}' for n in r]}")
