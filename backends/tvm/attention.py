"""Attention: ``softmax(q kᵀ · scale + mask) v`` (Vaswani et al. 2017, eq. 1) as the
interpreter computes it (``scaled_dot_product_attention``: a bool mask keeps True positions,
``causal`` masks the future top-left aligned, ``gqa`` repeats each KV head over its group)."""
from __future__ import annotations

import math

__all__ = ["lower_attention"]


def lower_attention(L, n, a):
    from tvm import relax
    R = relax.op
    q, k, v, mask = a
    qt = n.inputs[0].type
    rank = qt.rank
    d = qt.shape[-1]
    if n.attrs["gqa"] and rank >= 3:
        hq, hk = qt.shape[-3], n.inputs[1].type.shape[-3]
        rep = hq // hk
        if rep > 1:
            k = L.emit(R.repeat(k, rep, axis=rank - 3))
            v = L.emit(R.repeat(v, rep, axis=rank - 3))
    scale = n.attrs["scale"] if n.attrs["scale"] is not None else 1.0 / math.sqrt(d)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    s = L.emit(R.matmul(q, L.emit(R.permute_dims(k, perm))))
    s = L.emit(R.multiply(s, L.const(scale, qt.dtype)))
    sq, sk = qt.shape[-2], n.inputs[1].type.shape[-2]
    if n.attrs["causal"]:
        from tvm import te, tirx
        causal = L.emit_te(lambda: te.compute((L.prim(sq), L.prim(sk)), lambda i, j: j <= i,
                                              name="causal"), name="causal_mask")
        s = L.emit(R.where(causal, s, L.const(-math.inf, qt.dtype)))
        _ = tirx
    if mask is not None:
        if n.inputs[3].dtype == "bool":
            s = L.emit(R.where(mask, s, L.const(-math.inf, qt.dtype)))
        else:
            s = L.emit(R.add(s, L.cast(mask, qt.dtype)))
    p = L.emit(R.nn.softmax(s, axis=-1))
    return R.matmul(p, v)
