"""decompose_attention: ``attention`` → matmul, scale, additive mask, softmax, matmul.

Scaled dot-product attention, softmax(q·kᵀ·scale + mask)·v (Vaswani et al. 2017, eq. 1), as
its five ops, so that a QDQ target can give every intermediate (scores, probabilities) a
calibrated scale of its own, as an NPU needs: the fused op would hide them from calibration
and from the interpreter, and the exported file would then hold float tensors the NPU cannot
run. Masks become arithmetic: a boolean mask ``m`` adds ``(float(m) − 1)·|mask_value|``
(0 where kept, ``mask_value`` where masked) — no ``where`` (the QNN HTP cannot finalise a
Select) and no −inf (a min/max calibration of −inf gives a NaN scale). Causal masks become a
constant additive matrix; grouped KV heads (Ainslie et al. 2023) are repeated.

``mask_value`` −50 is finite yet removes a masked key: its weight relative to a kept one is
≤ e^{−50+Δ} where Δ is the spread of the scores (|Δ| < 20 in MiniLM), below the float32
epsilon of the softmax sum; −50 keeps the scores' 16-bit grid fine (npu.md §3 measured it on
MiniLM: token cosine 0.999). It is not exact for rows whose every key is masked, which SDPA
leaves NaN/uniform anyway.
Requires: static head counts for GQA. Guarantees: outputs equal up to float rounding and the
masked keys' e^{mask_value} weight.
"""
from __future__ import annotations

import math

import torch

from qcompile.errors import ConfigError, PassError
from qcompile.ir.graph import Graph, Node
from qcompile.passes.manager import register_pass

__all__ = ["decompose_attention"]


def _decompose(g: Graph, n: Node, mask_value: float) -> None:
    q, k, v = n.inputs[:3]
    mask = n.inputs[3] if len(n.inputs) > 3 else None  # the mask is optional
    prov = n.provenance
    base = n.name

    def add(op, *ins, **attrs):
        return g.add_node(op, list(ins), attrs, name=f"{base}.{op}", provenance=prov,
                          before=n).outputs[0]

    rank = len(q.shape)
    if n.attrs.get("gqa") and rank >= 4 and q.shape[-3] != k.shape[-3]:
        hq, hk = q.shape[-3], k.shape[-3]
        if not (isinstance(hq, int) and isinstance(hk, int)) or hq % hk:
            raise PassError(f"attention {n.name}: grouped heads {hq}/{hk} must be static "
                            "multiples", node=n)
        rep = hq // hk

        def repeat(t):
            lead = list(t.shape[:-3])
            _, L, d = t.shape[-3:]
            t = add("reshape", t, shape=lead + [hk, 1, L, d])
            t = add("expand", t, shape=lead + [hk, rep, L, d])
            return add("reshape", t, shape=lead + [hq, L, d])
        k, v = repeat(k), repeat(v)
    d = q.shape[-1]
    scale = n.attrs.get("scale")
    if scale is None:
        if not isinstance(d, int):
            raise PassError(f"attention {n.name}: a symbolic head size needs an explicit scale",
                            node=n)
        scale = 1.0 / math.sqrt(d)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    s = add("matmul", q, add("permute", k, perm=perm))
    s = add("mul", s, g.add_constant(f"{base}.scale", torch.tensor(float(scale))))
    if mask is not None:
        if mask.dtype == "bool":
            m = add("cast", mask, dtype=s.dtype)
            m = add("sub", m, g.add_constant(f"{base}.one", torch.tensor(1.0)))
            m = add("mul", m, g.add_constant(f"{base}.mask_value", torch.tensor(-float(mask_value))))
        else:
            m = mask
        s = add("add", s, m)
    if n.attrs.get("causal"):
        lq, lk = q.shape[-2], k.shape[-2]
        if not (isinstance(lq, int) and isinstance(lk, int)):
            raise PassError(f"attention {n.name}: a causal mask needs static lengths", node=n,
                            hint="compile with static shapes")
        # top-left aligned, as SDPA's is_causal (the op's semantics): key j is masked for j > i
        tri = torch.triu(torch.full((lq, lk), float(mask_value)), diagonal=1)
        s = add("add", s, g.add_constant(f"{base}.causal", tri))
    p = add("softmax", s, axis=-1)
    out = add("matmul", p, v)
    g.replace_uses(n.outputs[0], out)
    g.nodes.remove(n)


@register_pass("decompose_attention")
def decompose_attention(graph: Graph, *, mask_value: float = -50.0) -> Graph:
    if not mask_value < 0 or not math.isfinite(mask_value):
        raise ConfigError(f"decompose_attention: mask_value must be a finite negative number, "
                          f"got {mask_value}")
    for n in [n for n in graph.nodes if n.op == "attention"]:
        _decompose(graph, n, mask_value)
    return graph
