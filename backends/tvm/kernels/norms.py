"""Row normalisations for the ``cpu`` target: LayerNorm (Ba et al. 2016, eq. 4; biased variance,
as torch) and RMSNorm (Zhang & Sennrich 2019, eq. 4) over the last axis, rows in parallel,
each row's statistics accumulated in vector partials and the row normalised in one more pass
while it is still in L1. ``m`` (rows) may be symbolic."""
from __future__ import annotations

__all__ = ["layer_norm", "rms_norm"]


def _norm(kind: str, m, n: int, *, eps: float, weight: bool, bias: bool, info):
    from qcompile.backends.tvm.kernels.attention import _reduce, _vec_loop
    from qcompile.backends.tvm.kernels.dense import _f32, _func, _int64, _tv
    _, tirx, _, T = _tv()
    lanes = info.lanes32 if info is not None else 4

    def build():
        i64 = _int64
        rows = tirx.Var("m", "int64") if not isinstance(m, int) else m
        X = T.match_buffer(T.arg("x", T.handle()), [i64(rows), i64(n)], "float32")
        G = T.match_buffer(T.arg("weight", T.handle()), [i64(n)], "float32") if weight else None
        B = T.match_buffer(T.arg("bias", T.handle()), [i64(n)], "float32") if bias else None
        Y = T.match_buffer(T.arg("y", T.handle()), [i64(rows), i64(n)], "float32")
        with T.parallel(i64(0), i64(rows)) as r:
            row = T.alloc_buffer((i64(n),), "float32", scope="global")
            part = T.alloc_buffer((i64(lanes),), "float32", scope="global")
            red = T.alloc_buffer((i64(2),), "float32", scope="global")
            add = lambda a, b: a + b  # noqa: E731
            _vec_loop(T, n, lanes, lambda j: T.buffer_store(row, X[r, j], [j]))
            if kind == "layer":
                _reduce(T, row, n, lanes, part, red, 0, add, _f32(0))
                mean = red[0] / _f32(n)
                _vec_loop(T, n, lanes, lambda j: T.buffer_store(row, row[j] - mean, [j]))
            sq = T.alloc_buffer((i64(n),), "float32", scope="global")
            _vec_loop(T, n, lanes, lambda j: T.buffer_store(sq, row[j] * row[j], [j]))
            _reduce(T, sq, n, lanes, part, red, 1, add, _f32(0))
            inv = _f32(1) / tirx.sqrt(red[1] / _f32(n) + _f32(eps))

            def out(j):
                v = row[j] * inv
                if G is not None:
                    v = v * G[j]
                if B is not None:
                    v = v + B[j]
                return v
            _vec_loop(T, n, lanes, lambda j: T.buffer_store(Y, out(j), [r, j]))
    return _func(f"{kind}_norm", build)


def layer_norm(m, n: int, *, eps: float, weight: bool, bias: bool, info):
    """``(x[m, n], [weight[n]], [bias[n]], y[m, n])``: (x − mean)/√(var + eps)·γ + β."""
    return _norm("layer", m, n, eps=eps, weight=weight, bias=bias, info=info)


def rms_norm(m, n: int, *, eps: float, weight: bool, info):
    """``(x[m, n], [weight[n]], y[m, n])``: x/√(mean(x²) + eps)·g."""
    return _norm("rms", m, n, eps=eps, weight=weight, bias=False, info=info)
