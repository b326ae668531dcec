"""The online Hadamard transform for the ``cpu`` target (QuaRot's R3/R4, ``qcompile.hadamard``):
``y = x·(I ⊗ H_size)`` along the last axis with ``H_size = H_K ⊗ H_{2^k}``, rows in parallel.

Each row is copied into a scratch buffer and transformed there: ``log2(2^k)`` butterfly
stages ``(a, b) → (a + b, a − b)`` over the pairs ``(e, e + step)`` of every ``2^k`` block —
vectorised across the pairs once ``step`` reaches the vector width — then the dense ``K×K``
mix of the ``K`` sub-blocks (``out[c] = Σ_a H_K[a, c]·y[a]``, or ``H_Kᵀ`` for the inverse) and
the ``1/√2^k`` scale on the way out: O(n log n) per row, as the interpreter's ``fwht``.
"""
from __future__ import annotations

import math

__all__ = ["hadamard"]


def hadamard(m, width: int, size: int, *, transpose: bool = False, info=None):
    """``(x[m, width], [h_k[K, K]], y[m, width])``: every contiguous chunk of ``size`` elements
    of a row transformed; ``h_k`` (the orthonormal ``K×K`` factor, K > 1 only) is an input."""
    from qcompile.backends.tvm.kernels.attention import _vec_loop
    from qcompile.backends.tvm.kernels.dense import _f32, _func, _int64, _tv
    from qcompile.hadamard import base_order
    _, tirx, _, T = _tv()
    kf, p = base_order(size)
    if width % size:
        raise ValueError(f"hadamard size {size} does not divide the width {width}")
    lanes = info.lanes32 if info is not None else 4
    scale = 1.0 / math.sqrt(p)

    def build():
        i64 = _int64
        rows = tirx.Var("m", "int64") if not isinstance(m, int) else m
        X = T.match_buffer(T.arg("x", T.handle()), [i64(rows), i64(width)], "float32")
        HK = T.match_buffer(T.arg("h_k", T.handle()), [i64(kf), i64(kf)], "float32") \
            if kf > 1 else None
        Y = T.match_buffer(T.arg("y", T.handle()), [i64(rows), i64(width)], "float32")
        with T.parallel(i64(0), i64(rows)) as r:
            bufs = [T.alloc_buffer((i64(width),), "float32", scope="global") for _ in range(2)]
            _vec_loop(T, width, lanes, lambda j: T.buffer_store(bufs[0], X[r, j], [j]))
            step, cur = 1, 0
            while step < p:  # ping-pong between two row buffers: a stage reads what it replaces
                _stage(T, bufs[cur], bufs[1 - cur], width // (2 * step), step, lanes)
                step, cur = step * 2, 1 - cur
            buf = bufs[cur]
            if HK is None:
                _vec_loop(T, width, lanes, lambda j: T.buffer_store(Y, buf[j] * _f32(scale), [r, j]))
                return
            chunk = kf * p
            acc = T.alloc_buffer((i64(p),), "float32", scope="global")
            with T.serial(i64(0), i64(width // chunk)) as c:
                with T.serial(i64(0), i64(kf)) as col:
                    _vec_loop(T, p, lanes, lambda e: T.buffer_store(acc, _f32(0), [e]))
                    with T.serial(i64(0), i64(kf)) as a:
                        coef = HK[col, a] if transpose else HK[a, col]
                        _vec_loop(T, p, lanes, lambda e, coef=coef, a=a, c=c: T.buffer_store(
                            acc, acc[e] + coef * buf[c * chunk + a * p + e], [e]))
                    _vec_loop(T, p, lanes, lambda e, col=col, c=c: T.buffer_store(
                        Y, acc[e] * _f32(scale), [r, c * chunk + col * p + e]))
    return _func("hadamard", build)


def _stage(T, src, dst, blocks: int, step: int, lanes: int) -> None:
    """One butterfly stage, ``src`` → ``dst``, over all pairs (lo, lo + step) of the row in
    ``blocks`` groups of ``2·step`` elements."""
    from qcompile.backends.tvm.kernels.dense import _int64
    i64 = _int64

    def pair(g, e):
        lo = g * (2 * step) + e
        T.buffer_store(dst, src[lo] + src[lo + step], [lo])
        T.buffer_store(dst, src[lo] - src[lo + step], [lo + step])
    with T.serial(i64(0), i64(blocks)) as g:
        if step >= lanes and step % lanes == 0:
            with T.serial(i64(0), i64(step // lanes)) as eo:
                with T.vectorized(i64(0), i64(lanes)) as el:
                    pair(g, eo * lanes + el)
        else:
            with T.serial(i64(0), i64(step)) as e:
                pair(g, e)
