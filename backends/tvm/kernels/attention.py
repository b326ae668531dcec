"""Fused attention for the ``cpu`` target: ``o = softmax(q·kᵀ·scale + mask)·v`` per (batch ×
head), one query row at a time, the row's scores never leaving L1.

Per work item (a batch × head pair, in parallel over the cores):

- ``kᵀ`` of the item's KV head is copied once into a ``[d, sk]`` scratch, so the scores
  ``s[j] = Σ_d q[i, d]·kᵀ[d, j]`` are vector FMAs over ``j`` with ``q[i, d]`` broadcast;
- the mask (bool: keep where True; float: added) and the causal bound ``j ≤ i`` apply to the
  score row, then the row max, ``exp`` (a vectorised polynomial — TVM's own ``exp`` is a
  scalar libm call) and the row sum;
- ``o[i, :] = Σ_j e[j]·v[j, :] / Σ e`` with the ``dv`` accumulators in vector registers.

Grouped KV heads (GQA, Ainslie et al. 2023) index their KV head as ``h // (heads / kv_heads)``;
a mask carries one row per batch (``mask_heads = 1``) or per head, and one query row
(broadcast) or ``sq`` of them. ``bh`` (batch × heads) may be symbolic.
"""
from __future__ import annotations

import math

__all__ = ["attention"]


def attention(bh, sq: int, sk: int, d: int, dv: int, *, heads: int, kv_heads: int,
              mask: str | None = None, mask_heads: int = 1, mask_rows: int = 1,
              causal: bool = False, scale: float | None = None, info=None):
    """The PrimFunc ``(q[bh, sq, d], k[bkv, sk, d], v[bkv, sk, dv], [mask[bm, mask_rows, sk]],
    o[bh, sq, dv])`` with ``bkv = bh / heads · kv_heads`` and ``bm = bh / heads · mask_heads``;
    ``mask`` is None, ``"bool"`` or ``"float"``."""
    from qcompile.backends.tvm.kernels.dense import _exp, _f32, _func, _int64, _tv
    _, tirx, _, T = _tv()
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not share {kv_heads} KV heads evenly")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    group = heads // kv_heads
    lanes = info.lanes32 if info is not None else 4
    neg_inf = tirx.const(-math.inf, "float32")
    Q = K = V = M = OUT = None

    def build():
        nonlocal Q, K, V, M, OUT
        i64 = _int64
        nb = tirx.Var("bh", "int64") if not isinstance(bh, int) else bh
        Q = T.match_buffer(T.arg("q", T.handle()), [i64(nb), i64(sq), i64(d)], "float32")
        nkv = tirx.floordiv(i64(nb), i64(heads)) * kv_heads
        K = T.match_buffer(T.arg("k", T.handle()), [nkv, i64(sk), i64(d)], "float32")
        V = T.match_buffer(T.arg("v", T.handle()), [nkv, i64(sk), i64(dv)], "float32")
        M = None
        if mask is not None:
            nm = tirx.floordiv(i64(nb), i64(heads)) * mask_heads
            M = T.match_buffer(T.arg("mask", T.handle()), [nm, i64(mask_rows), i64(sk)],
                               "bool" if mask == "bool" else "float32")
        OUT = T.match_buffer(T.arg("o", T.handle()), [i64(nb), i64(sq), i64(dv)], "float32")
        with T.parallel(i64(0), i64(nb)) as p:
            b = tirx.floordiv(p, i64(heads))
            h = tirx.floormod(p, i64(heads))
            kv = b * kv_heads + tirx.floordiv(h, i64(group))
            mrow = b * mask_heads + (h if mask_heads > 1 else i64(0))
            kt = T.alloc_buffer((i64(d), i64(sk)), "float32", scope="global")
            with T.serial(i64(0), i64(d)) as dd:
                with T.serial(i64(0), i64(sk)) as j:
                    T.buffer_store(kt, K[kv, j, dd], [dd, j])
            full, rest = divmod(sq, ROWS)
            if full:
                with T.serial(i64(0), i64(full)) as ib:
                    _rows(ib * ROWS, ROWS, p, kt, kv, mrow)
            if rest:
                _rows(i64(full * ROWS), rest, p, kt, kv, mrow)

    def _rows(i0, nr: int, p, kt, kv, mrow):
        """Query rows ``i0 .. i0 + nr``: each load of kᵀ and v feeds ``nr`` FMAs."""
        i64 = _int64
        s = [T.alloc_buffer((i64(sk),), "float32", scope="global") for _ in range(nr)]
        acc = [T.alloc_buffer((i64(dv),), "float32", scope="global") for _ in range(nr)]
        red = T.alloc_buffer((i64(2 * nr),), "float32", scope="global")
        part = T.alloc_buffer((i64(lanes),), "float32", scope="global")
        for r in range(nr):
            _vec_loop(T, sk, lanes, lambda j, r=r: T.buffer_store(s[r], _f32(0), [j]))
        with T.serial(i64(0), i64(d)) as dd:
            qs = [Q[p, i0 + r, dd] * _f32(scale) for r in range(nr)]

            def fma(j):
                kv_ = kt[dd, j]
                for r in range(nr):
                    T.buffer_store(s[r], s[r][j] + qs[r] * kv_, [j])
            _vec_loop(T, sk, lanes, fma)
        for r in range(nr):
            i = i0 + r

            def masked(j, r=r, i=i):
                v = s[r][j]
                if M is not None:
                    row = i if mask_rows > 1 else i64(0)
                    v = tirx.Select(M[mrow, row, j], v, neg_inf) if mask == "bool" \
                        else v + M[mrow, row, j]
                if causal:
                    v = tirx.Select(j <= i, v, neg_inf)
                return v
            _vec_loop(T, sk, lanes, lambda j, r=r, f=masked: T.buffer_store(s[r], f(j), [j]))
            _reduce(T, s[r], sk, lanes, part, red, 2 * r, tirx.max, neg_inf)
            _vec_loop(T, sk, lanes, lambda j, r=r: T.buffer_store(
                s[r], _exp(s[r][j] - red[2 * r]), [j]))
            _reduce(T, s[r], sk, lanes, part, red, 2 * r + 1, lambda x, y: x + y, _f32(0))
            _vec_loop(T, dv, lanes, lambda c, r=r: T.buffer_store(acc[r], _f32(0), [c]))
        with T.serial(i64(0), i64(sk)) as j:
            es = [s[r][j] for r in range(nr)]

            def pv(c):
                vv = V[kv, j, c]
                for r in range(nr):
                    T.buffer_store(acc[r], acc[r][c] + es[r] * vv, [c])
            _vec_loop(T, dv, lanes, pv)
        for r in range(nr):
            inv = _f32(1) / red[2 * r + 1]
            _vec_loop(T, dv, lanes, lambda c, r=r, inv=inv: T.buffer_store(
                OUT, acc[r][c] * inv, [p, i0 + r, c]))

    return _func("attention", build)


#: query rows computed together (each kᵀ / v vector load feeds this many FMAs)
ROWS = 4


def _reduce(T, buf, n: int, lanes: int, part, red, slot: int, op, init) -> None:
    """``red[slot] = op-reduction of buf[:n]``: ``lanes`` partial results, then a short tail."""
    from qcompile.backends.tvm.kernels.dense import _int64
    i64 = _int64
    full = n - n % lanes
    with T.vectorized(i64(0), i64(lanes)) as q:
        T.buffer_store(part, init, [q])
    if full:
        with T.serial(i64(0), i64(full // lanes)) as jo:
            with T.vectorized(i64(0), i64(lanes)) as q:
                T.buffer_store(part, op(part[q], buf[jo * lanes + q]), [q])
    T.buffer_store(red, init, [i64(slot)])
    with T.serial(i64(0), i64(lanes)) as q:
        T.buffer_store(red, op(red[slot], part[q]), [i64(slot)])
    if n % lanes:
        with T.serial(i64(full), i64(n)) as j:
            T.buffer_store(red, op(red[slot], buf[j]), [i64(slot)])


def _vec_loop(T, n: int, lanes: int, body) -> None:
    """``body(j)`` for ``j < n``: whole vectors vectorised, the remainder serial."""
    from qcompile.backends.tvm.kernels.dense import _int64
    full = n - n % lanes
    if full:
        with T.serial(_int64(0), _int64(full // lanes)) as jo:
            with T.vectorized(_int64(0), _int64(lanes)) as jl:
                body(jo * lanes + jl)
    if n % lanes:
        with T.serial(_int64(full), _int64(n)) as j:
            body(j)
