"""fold_norms: fold LayerNorm/RMSNorm affine weights into the linears that read the norm.

``linear(γ ⊙ n + β) = n (W diag(γ))ᵀ + (b + W β)`` (QuaRot, Ashkboos et al. 2024, §4 "fusing
the RMSNorm scale into the next linear"; SliceGPT, Ashkboos et al. 2024, §3.2 for LayerNorm),
after which the norm is affine-free and a rotation of its output commutes with it. Readers of
the norm that are not linears (a post-LN residual, as in BERT) keep the exact original values
through an explicit ``y·γ + β``. Outputs are unchanged (to float rounding). LayerNorm's
mean-centring (SliceGPT §3.1), which a rotation of the stream needs, is done by ``rotate``
on the streams it fuses, where it can centre the writers and embeddings too.
"""
from __future__ import annotations

from qcompile.ir.graph import Graph
from qcompile.passes._scaling import NORMS, split_norm_affine
from qcompile.passes.manager import register_pass

__all__ = ["fold_norms"]


@register_pass("fold_norms")
def fold_norms(graph: Graph) -> Graph:
    users = graph.users()
    for norm in [n for n in graph.nodes if n.op in NORMS]:
        if norm.attrs.get("normalized_ndim", 1) != 1 or len(norm.inputs) < 2:
            continue
        if not all(v is None or graph.is_constant(v) for v in norm.inputs[1:]):
            continue
        out = norm.outputs[0]
        linears = [n for n in users.get(out, []) if n.op == "linear" and n.inputs[0] is out
                   and graph.is_constant(n.inputs[1])]
        if linears:
            split_norm_affine(graph, norm, linears)
            users = graph.users()
    graph.remove_dead()
    return graph
