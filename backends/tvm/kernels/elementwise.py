"""Activations as vectorised kernels for the ``cpu`` target: GELU (erf and tanh forms), SiLU
and ReLU over ``[rows, n]``, rows in parallel, with the polynomial ``exp``/``erf`` of the dense
kernel's epilogues (TVM's own ``exp``/``erf`` are scalar libm calls: a stand-alone GELU over
MiniLM's 1024×1536 activations took 13 ms, this takes a fraction of a millisecond)."""
from __future__ import annotations

__all__ = ["activation"]


def activation(m, n: int, *, kind: str, info):
    """``(x[m, n] f32, y[m, n] f32)`` with ``y = kind(x)``, ``kind`` one of the dense
    epilogues (``relu``, ``gelu``, ``gelu_tanh``, ``silu``)."""
    from qcompile.backends.tvm.kernels.attention import _vec_loop
    from qcompile.backends.tvm.kernels.dense import EPILOGUES, _epilogue, _func, _int64, _tv
    if kind not in EPILOGUES or kind is None:
        raise ValueError(f"unknown activation {kind!r}; expected one of {EPILOGUES[1:]}")
    _, tirx, _, T = _tv()
    lanes = info.lanes32 if info is not None else 4

    def build():
        i64 = _int64
        rows = tirx.Var("m", "int64") if not isinstance(m, int) else m
        X = T.match_buffer(T.arg("x", T.handle()), [i64(rows), i64(n)], "float32")
        Y = T.match_buffer(T.arg("y", T.handle()), [i64(rows), i64(n)], "float32")
        with T.parallel(i64(0), i64(rows)) as r:
            _vec_loop(T, n, lanes, lambda j: T.buffer_store(Y, _epilogue(kind, X[r, j]), [r, j]))
    return _func(f"act_{kind}", build)
