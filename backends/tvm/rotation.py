"""The ``hadamard`` op in TIR: ``x·(I ⊗ H_size)`` along the last axis with H = H_K ⊗ H_{2^k}
(``qcompile.hadamard``): log2(2^k) butterfly stages (a fast Walsh–Hadamard transform,
O(n log n)) and one dense K×K stage, the same factorisation the interpreter's ``fwht`` runs."""
from __future__ import annotations

import math

__all__ = ["lower_hadamard"]


def _butterfly(y, step: int, p: int):
    """One stage: (a, b) → (a + b, a − b) for the pairs (e, e + step), e's bit ``step`` clear."""
    from tvm import tirx

    def stage(*i):
        j = i[-1]
        bit = tirx.floormod(tirx.floordiv(tirx.floormod(j, p), step), 2)
        partner = tuple(i[:-1]) + (tirx.Select(bit == 0, j + step, j - step),)
        return tirx.Select(bit == 0, y[i] + y[partner], y[partner] - y[i])
    return stage


def _kernel_hadamard(L, n, a):
    """The row-transform kernel's result, or None when it does not apply."""
    import numpy as np
    from tvm import relax

    from qcompile.backends.tvm.kernels.hadamard import hadamard
    from qcompile.backends.tvm.linear import _flat_type, _rows, kernel_rows
    from qcompile.hadamard import base_order, hadamard_matrix
    from qcompile.ir.graph import Value
    v = n.inputs[0]
    if not (L.kernels and L.info is not None and v.dtype == "float32" and v.type.rank >= 2):
        return None
    size, width = n.attrs["size"], int(v.type.shape[-1])
    kf, _ = base_order(size)
    x2, rows = _rows(L, a[0], v)
    args = [x2]
    if kf > 1:
        args.append(relax.const(hadamard_matrix(kf).numpy().astype(np.float32), "float32"))
    func = L.kernel(hadamard, kernel_rows(rows), width, size, transpose=n.attrs["transpose"],
                    info=L.info)
    out = n.outputs[0]
    y = L.call_kernel(func, args, Value(out.name, _flat_type(out)), "hadamard")
    L.report["hadamard.kernel"] = L.report.get("hadamard.kernel", 0) + 1
    return relax.op.reshape(y, L.shape(out)) if out.type.rank != 2 else y


def lower_hadamard(L, n, a):
    fused = _kernel_hadamard(L, n, a)
    if fused is not None:
        return fused
    from tvm import relax, te, tirx

    from qcompile.hadamard import base_order, hadamard_matrix
    size, transpose = n.attrs["size"], n.attrs["transpose"]
    kf, p = base_order(size)
    v = n.inputs[0]
    dt = v.dtype
    out_shape = L.shape(v)
    d = int(v.type.shape[-1])
    lead = out_shape[:-1]
    hk = None
    if kf > 1:  # the K×K factor: H_K acts on the K axis of (chunk, K, 2^k)
        m = hadamard_matrix(kf).numpy()  # out[c] = Σ_a H_K[a, c]·y[a] (H_Kᵀ for the inverse)
        hk = relax.const((m.T if transpose else m).astype(dt), dt)

    def f(x, *h):
        y = te.compute(lead + [d], lambda *i: x[i], name="h_in")
        step = 1
        while step < p:  # butterflies over pairs (e, e ^ step) inside each 2^k block
            y = te.compute(lead + [d], _butterfly(y, step, p), name=f"h_stage{step}")
            step *= 2
        if kf > 1:
            r = te.reduce_axis((0, kf), "r")

            def dense(*i):
                j = i[-1]
                c, rest = tirx.floordiv(j, kf * p), tirx.floormod(j, kf * p)
                row, e = tirx.floordiv(rest, p), tirx.floormod(rest, p)
                src = tuple(i[:-1]) + (c * kf * p + r * p + e,)
                return te.sum(h[0][r, row] * y[src], axis=r)
            y = te.compute(lead + [d], dense, name="h_dense")
        scale = tirx.const(1.0 / math.sqrt(p), dt)
        return te.compute(lead + [d], lambda *i: y[i] * scale, name="hadamard")
    args = [a[0]] + ([hk] if hk is not None else [])
    return L.emit_te(f, *args, name="hadamard")
