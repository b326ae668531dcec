"""The KV cache write for the ``cpu`` target: ``cache[b, h, slot + t, :] = new[b, h, t, :]``,
in place (``call_tir_inplace``: the result aliases the cache argument), so a decode step
writes one row per layer, head and sequence and copies nothing else."""
from __future__ import annotations

__all__ = ["kv_write", "kv_write_quant", "kv_read_rows"]


def _row_writer(name: str, batch, heads: int, seq: int, tokens, dim: int, row_width: int,
                cache_dtype: str, new_dtype: str, write_row):
    """The PrimFunc ``(cache[batch, heads, seq, row_width], new[batch, heads, tokens, dim],
    slot[1] int64)`` calling ``write_row(C, N, b, h, t, row)`` to emit the stores of new row
    ``t`` into cache row ``row = slot[0] + t``; rows past ``seq`` are skipped (the runtime
    never asks for them). ``batch`` and ``tokens`` may be symbolic (None). Serial: a decode
    step writes one row per head and sequence, far less than the cost of waking the pool."""
    from qcompile.backends.tvm.kernels.dense import _func, _int64, _tv
    _, tirx, _, T = _tv()

    def build():
        nb = tirx.Var("b", "int64") if batch is None else _int64(batch)
        nt = tirx.Var("t", "int64") if tokens is None else _int64(tokens)
        C = T.match_buffer(T.arg("cache", T.handle()),
                           [nb, _int64(heads), _int64(seq), _int64(row_width)], cache_dtype)
        N = T.match_buffer(T.arg("new", T.handle()), [nb, _int64(heads), nt, _int64(dim)], new_dtype)
        S = T.match_buffer(T.arg("slot", T.handle()), [_int64(1)], "int64")
        with T.serial(_int64(0), nb * heads) as p:
            b = tirx.floordiv(p, _int64(heads))
            h = tirx.floormod(p, _int64(heads))
            with T.serial(_int64(0), nt) as t:
                row = S[0] + t
                with T.If(row < _int64(seq)):
                    with T.Then():
                        write_row(C, N, b, h, t, row)
    return _func(name, build).with_attr("tirx.noalias", False)


def kv_write(batch, heads: int, seq: int, tokens, dim: int, dtype: str = "float32"):
    """The PrimFunc writing ``new`` into ``cache`` [batch, heads, seq, dim] from position
    ``slot[0]`` as it is (:func:`_row_writer`)."""
    from qcompile.backends.tvm.kernels.dense import _int64, _tv
    T = _tv()[3]

    def write_row(C, N, b, h, t, row):
        with T.serial(_int64(0), _int64(dim)) as d:
            T.buffer_store(C, N[b, h, t, d], [b, h, row, d])
    return _row_writer("kv_write", batch, heads, seq, tokens, dim, dim, dtype, dtype, write_row)


def kv_write_quant(batch, heads: int, seq: int, tokens, dim: int, bits: int):
    """The PrimFunc writing ``new`` into the uint8 ``cache`` [batch, heads, seq, rb] from
    position ``slot[0]``, each row quantized as ``qcompile.ir.ops.nn.kv_quantize_rows`` does
    (same fp32 division, round half to even, clamp; int4 codes two per byte, low nibble
    first; the fp32 scale's bytes last)."""
    from qcompile.backends.tvm.kernels.dense import _int64, _tv
    from qcompile.ir.ops.nn import kv_row_bytes
    _, tirx, _, T = _tv()
    m = (1 << (bits - 1)) - 1
    ncode = dim * bits // 8

    def byte(v):  # the low 8 bits of an int32 as uint8
        return tirx.Cast("uint8", tirx.bitwise_and(v, tirx.const(0xFF, "int32")))

    def write_row(C, N, b, h, t, row):
        amax = T.alloc_buffer((1,), "float32", scope="local")
        sc = T.alloc_buffer((1,), "float32", scope="local")
        T.buffer_store(amax, tirx.const(0.0, "float32"), [0])
        with T.serial(_int64(0), _int64(dim)) as d:
            T.buffer_store(amax, tirx.max(amax[0], tirx.abs(N[b, h, t, d])), [0])
        T.buffer_store(sc, amax[0] / tirx.const(float(m), "float32"), [0])

        def code(d):
            q = tirx.max(tirx.min(tirx.nearbyint(N[b, h, t, d] / sc[0]),
                                  tirx.const(float(m), "float32")),
                         tirx.const(float(-m), "float32"))
            return tirx.Select(sc[0] > tirx.const(0.0, "float32"),
                               tirx.Cast("int32", q), tirx.const(0, "int32"))
        if bits == 8:
            with T.serial(_int64(0), _int64(dim)) as d:
                T.buffer_store(C, byte(code(d)), [b, h, row, d])
        else:
            with T.serial(_int64(0), _int64(dim // 2)) as j:
                lo = tirx.bitwise_and(code(j * 2), tirx.const(0xF, "int32"))
                hi = tirx.bitwise_and(code(j * 2 + 1), tirx.const(0xF, "int32"))
                packed = tirx.bitwise_or(lo, tirx.shift_left(hi, tirx.const(4, "int32")))
                T.buffer_store(C, byte(packed), [b, h, row, j])
        u = tirx.reinterpret("int32", sc[0])
        for k in range(4):
            T.buffer_store(C, byte(tirx.shift_right(u, tirx.const(8 * k, "int32"))),
                           [b, h, row, _int64(ncode + k)])
    return _row_writer(f"kv_write_q{bits}", batch, heads, seq, tokens, dim,
                       kv_row_bytes(dim, bits), "uint8", "float32", write_row)


def kv_read_rows(cache, bits: int, dim: int):
    """TE: the fp32 rows [..., dim] of a quantized cache ``cache`` [..., rb] (uint8), as
    ``kv_dequantize_rows`` computes them (code as float times the fp32 scale)."""
    from tvm import te, tirx
    ncode = dim * bits // 8
    lead = list(cache.shape[:-1])

    def scale(*i):
        u = tirx.const(0, "int32")
        for k in range(4):
            u = tirx.bitwise_or(u, tirx.shift_left(tirx.Cast("int32", cache[(*i, ncode + k)]),
                                                   tirx.const(8 * k, "int32")))
        return tirx.reinterpret("float32", u)

    def value(*idx):
        *i, d = idx
        if bits == 8:
            u = tirx.Cast("int32", cache[(*i, d)])
            c = tirx.bitwise_xor(u, tirx.const(128, "int32")) - tirx.const(128, "int32")
        else:
            u = tirx.Cast("int32", cache[(*i, tirx.floordiv(d, 2))])
            n = tirx.bitwise_and(tirx.shift_right(u, tirx.Cast("int32", tirx.floormod(d, 2)) * 4),
                                 tirx.const(0xF, "int32"))
            c = tirx.bitwise_xor(n, tirx.const(8, "int32")) - tirx.const(8, "int32")
        return tirx.Cast("float32", c) * scale(*i)
    return te.compute((*lead, dim), value, name="kv_read")
