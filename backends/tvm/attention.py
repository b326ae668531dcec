"""Attention: ``softmax(q kᵀ · scale + mask) v`` (Vaswani et al. 2017, eq. 1) as the
interpreter computes it (``scaled_dot_product_attention``: a bool mask keeps True positions,
``causal`` masks the future top-left aligned, ``gqa`` repeats each KV head over its group)."""
from __future__ import annotations

import math

__all__ = ["lower_attention"]


def _kernel_attention(L, n, a):
    """The fused kernel's result, or None when the shapes do not fit it."""
    from tvm import relax, tirx

    from qcompile.backends.tvm.kernels.attention import attention
    from qcompile.backends.tvm.linear import kernel_rows
    R = relax.op
    q, k, v, mask = a
    qt, kt, vt = (x.type for x in n.inputs[:3])
    if not (L.kernels and L.info is not None and qt.rank in (3, 4) and
            all(t.dtype == "float32" for t in (qt, kt, vt))):
        return None
    sq, d, sk, dv = qt.shape[-2], qt.shape[-1], kt.shape[-2], vt.shape[-1]
    heads, kvh = qt.shape[-3], kt.shape[-3]
    if not all(isinstance(x, int) for x in (sq, d, sk, dv, heads, kvh)):
        return None
    if kvh != heads and not (n.attrs["gqa"] and heads % kvh == 0):
        return None
    if qt.rank == 4 and (kt.shape[0] != qt.shape[0] or vt.shape[0] != qt.shape[0]):
        return None
    batch = L.prim(qt.shape[0]) if qt.rank == 4 else tirx.IntImm("int64", 1)
    flat = lambda x, h, s_, e: L.emit(R.reshape(x, [batch * h, s_, e]))  # noqa: E731
    args = [flat(q, heads, sq, d), flat(k, kvh, sk, d), flat(v, kvh, sk, dv)]
    mkind, mh, mr = None, 1, 1
    if mask is not None:
        mt = n.inputs[3].type
        ms = (1,) * (4 - mt.rank) + tuple(mt.shape)
        if mt.rank > 4 or ms[-1] != sk or ms[-3] not in (1, heads) or ms[-2] not in (1, sq):
            return None
        mkind = "bool" if mt.dtype == "bool" else "float"
        if mkind == "float" and mt.dtype != "float32":
            return None
        mh, mr = ms[-3], ms[-2]
        m4 = L.emit(R.reshape(mask, list(ms))) if mt.rank != 4 else mask
        m4 = L.emit(R.broadcast_to(m4, [batch, mh, mr, sk]))
        args.append(L.emit(R.reshape(m4, [batch * mh, mr, sk])))
    func = L.kernel(attention, kernel_rows(batch * heads), sq, sk, d, dv, heads=heads,
                    kv_heads=kvh, mask=mkind, mask_heads=mh, mask_rows=mr,
                    causal=n.attrs["causal"], scale=n.attrs["scale"], info=L.info)
    from qcompile.ir.graph import Value
    from qcompile.ir.types import TensorType, dim_mul
    out = n.outputs[0]
    flat_out = Value(out.name, TensorType((dim_mul(qt.shape[0], heads) if qt.rank == 4 else heads,
                                           sq, dv), "float32"))
    y = L.call_kernel(func, args, flat_out, "attention")
    L.report["attention.fused"] = L.report.get("attention.fused", 0) + 1
    return R.reshape(y, L.shape(out))


def lower_attention(L, n, a):
    fused = _kernel_attention(L, n, a)
    if fused is not None:
        return fused
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
