"""The KV cache write for the ``cpu`` target: ``cache[b, h, slot + t, :] = new[b, h, t, :]``,
in place (``call_tir_inplace``: the result aliases the cache argument), so a decode step
writes one row per layer, head and sequence and copies nothing else."""
from __future__ import annotations

__all__ = ["kv_write"]


def kv_write(batch, heads: int, seq: int, tokens, dim: int, dtype: str = "float32"):
    """The PrimFunc ``(cache[batch, heads, seq, dim], new[batch, heads, tokens, dim],
    slot[1] int64)`` writing ``new`` into ``cache`` from position ``slot[0]``; ``batch`` and
    ``tokens`` may be symbolic (None), the rest are static. Rows past ``seq`` are not
    written (the runtime never asks for them)."""
    from qcompile.backends.tvm.kernels.dense import _func, _int64, _tv
    _, tirx, _, T = _tv()

    def build():
        nb = tirx.Var("b", "int64") if batch is None else _int64(batch)
        nt = tirx.Var("t", "int64") if tokens is None else _int64(tokens)
        C = T.match_buffer(T.arg("cache", T.handle()), [nb, _int64(heads), _int64(seq), _int64(dim)], dtype)
        N = T.match_buffer(T.arg("new", T.handle()), [nb, _int64(heads), nt, _int64(dim)], dtype)
        S = T.match_buffer(T.arg("slot", T.handle()), [_int64(1)], "int64")
        # serial: a decode step writes heads x dim numbers per sequence, far less than the
        # cost of waking the thread pool
        with T.serial(_int64(0), nb * heads) as p:
            b = tirx.floordiv(p, _int64(heads))
            h = tirx.floormod(p, _int64(heads))
            with T.serial(_int64(0), nt) as t:
                row = S[0] + t
                with T.If(row < _int64(seq)):
                    with T.Then():
                        with T.serial(_int64(0), _int64(dim)) as d:
                            T.buffer_store(C, N[b, h, t, d], [b, h, row, d])
    func = _func("kv_write", build)
    return func.with_attr("tirx.noalias", False)
