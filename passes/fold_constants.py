"""Constant folding: evaluate nodes whose inputs are all constants (and source ops with
static attributes) once, at compile time, and replace them by constants.

Requires: a verified graph. Guarantees: same outputs; weights read by linear/conv/... stay
the same constants (large results are not folded, so weight identities survive).
"""
from __future__ import annotations

import torch

from qcompile.ir.graph import Graph
from qcompile.ir.registry import get_schema
from qcompile.ir.types import numel, symbols_of
from qcompile.passes.manager import register_pass

__all__ = ["fold_constants"]

#: results larger than this stay as nodes (folding would copy weights)
MAX_FOLD_ELEMENTS = 1 << 16


def _static_attrs(node) -> bool:
    for k in get_schema(node.op).dim_attrs:
        v = node.attrs[k]
        for d in (v if isinstance(v, list) else [v]):
            if d is not None and symbols_of(d):
                return False
    return True


@register_pass("fold_constants")
def fold_constants(graph: Graph) -> Graph:
    g = graph.clone()
    kept = []
    for node in g.nodes:
        foldable = (all(g.is_constant(v) for v in node.inputs if v is not None)
                    and all(o.type.is_static for o in node.outputs)
                    and all(numel(o.shape) <= MAX_FOLD_ELEMENTS for o in node.outputs)
                    and _static_attrs(node) and all(o.quant is None for o in node.outputs))
        if not foldable:
            kept.append(node)
            continue
        args = [None if v is None else g.constants[v.name] for v in node.inputs]
        with torch.no_grad():
            outs = get_schema(node.op).run(args, node.attrs, {})
        for o, t in zip(node.outputs, outs):
            c = g.add_constant(o.name + "_folded", t.contiguous())
            g.replace_uses(o, c, nodes=g.nodes)
    g.nodes = kept
    g.remove_dead()
    return g
