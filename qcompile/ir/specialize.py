"""Binding symbolic sizes: a graph specialised to some of its dimensions' values."""
from __future__ import annotations

from typing import Mapping

import sympy

from qcompile.ir.graph import Graph
from qcompile.ir.registry import get_schema
from qcompile.ir.types import Dim, TensorType, dim_expr, make_dim
from qcompile.ir.verify import verify

__all__ = ["specialize"]


def specialize(graph: Graph, sizes: Mapping[str, int]) -> Graph:
    """A copy of ``graph`` (constants shared, not copied) with each symbol of ``sizes`` bound
    to its value in every type and symbolic attribute; other symbols stay symbolic. A
    backend lowers the copy with the static shapes its kernels need — the decode step of an
    LLM is its step graph with ``tokens = 1``."""
    subs = {sympy.Symbol(k): int(v) for k, v in sizes.items()}

    def bind(d: Dim) -> Dim:
        return d if isinstance(d, int) else make_dim(dim_expr(d).subs(subs))
    g = graph.clone()
    for v in g.values():
        v.type = TensorType(tuple(bind(d) for d in v.type.shape), v.type.dtype)
    for n in g.nodes:
        for k in get_schema(n.op).dim_attrs:
            a = n.attrs.get(k)
            if isinstance(a, list):
                n.attrs[k] = [bind(x) for x in a]
            elif a is not None:
                n.attrs[k] = bind(a)
    verify(g)
    return g
