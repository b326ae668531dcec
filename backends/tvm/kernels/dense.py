"""Float matmul kernels for the ``cpu`` target: ``dense`` (nn.Linear, ``y = x·wᵀ``, with bias,
activation and residual fused into the write-back) and ``batch_matmul`` (attention-sized
batched products).

Stock TVM schedules nothing on the CPU (a MiniLM forward runs 90× slower than torch), so these
kernels are written directly as TIR loop nests, built with the TVMScript IR builder so that the
micro-kernel can be unrolled in Python:

- the constant weight ``w[N, K]`` is re-laid out at compile time by :func:`pack_dense_weight`
  into panels ``[ceil(N/nb), K, nb]`` (``nb`` = a few vector widths, N zero-padded), so the
  inner loop reads ``nb`` contiguous floats per ``k`` — one cache line per vector, streamed
  in order;
- the micro-kernel keeps an ``mr × nb`` block of accumulators in vector registers
  (AVX-512: 6 rows × 4 zmm = 24 of the 32 registers; AVX2: 6 × 2 ymm = 12 of 16), and per
  ``k`` does ``nb/lanes`` vector loads, ``mr`` scalar broadcasts of ``x`` and ``mr·nb/lanes``
  FMAs (LLVM emits ``vbroadcastss`` + ``vfmadd231ps``; the accumulators are per-row stack
  buffers under TVM's 1 KiB alloca limit so that SROA turns them into registers);
- bias, activation (relu, erf-GELU, tanh-GELU, SiLU: vectorisable polynomial/rational forms,
  because TVM lowers ``exp``/``erf``/``tanh`` to scalar libm calls) and the residual are
  applied to the registers before the one store of each output vector;
- the row count ``m`` may be symbolic: full ``mr``-row tiles run in a loop, the ``m mod mr``
  leftover rows in a smaller micro-kernel chosen at run time (one per leftover count), so
  every ``m ≥ 1`` is exact and nothing reads or writes out of bounds; GEMV-like calls
  (``m ≤ 8``) touch the weight once or twice, not once per row;
- one parallel loop runs over (row chunk, weight panel) items, chunk-major: with many rows
  each core owns one chunk of ``x`` (MiniLM: 512 × 384 floats, L2-resident) and streams all
  weight panels past it; with few rows (GEMV-like) the cores split the panels instead;
- K is not blocked by default: on one core the register-blocked loop already matches
  oneDNN (≈150 GFLOP/s on Emerald Rapids) and blocking it (``DenseSchedule.kc``, partial sums
  kept in ``y``) measured no better for K = 384 or 1536.

``batch_matmul`` uses the same micro-kernel: the non-transposed right operand ``w[b, k, n]`` is
already panel-shaped (rows of ``n`` contiguous floats); the transposed one ``w[b, n, k]`` is
copied into a per-thread panel scratch first (``n·k`` work against ``m·n·k``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["EPILOGUES", "DenseSchedule", "dense_schedule", "pack_dense_weight", "dense",
           "batch_matmul"]

#: activations ``dense`` can fuse into its write-back
EPILOGUES = (None, "relu", "gelu", "gelu_tanh", "silu")


@dataclass(frozen=True)
class DenseSchedule:
    """The blocking of one GEMM: ``mr`` rows × ``nv`` vectors of ``lanes`` fp32 accumulators;
    the weight panel is ``nb = nv·lanes`` columns wide; ``kc`` splits K for L1 (``None``: the
    whole K accumulates in registers); ``chunks`` caps the row chunks of the parallel split."""

    lanes: int
    nv: int
    mr: int
    kc: int | None = None
    chunks: int = 1  # at most this many row chunks (one per core) split the parallel items
    min_chunk_tiles: int = 8  # ... each of at least this many mr-row tiles

    @property
    def nb(self) -> int:
        return self.nv * self.lanes


def _lanes(info) -> int:
    return max(4, int(info.lanes32))


def dense_schedule(n: int, k: int, info) -> DenseSchedule:
    """The schedule rule: register blocking from the vector width, panel width capped by ``n``.

    AVX-512 has 32 vector registers: 6 rows × 4 zmm accumulators (24) + 4 weight vectors + a
    broadcast; AVX2 and 128-bit SIMD have 16: 6 × 2 accumulators (12) + 2 + 1."""
    lanes = _lanes(info)
    regs = 32 if info.avx512 else 16
    nv_max = 4 if info.avx512 else 2
    nv = max(1, min(nv_max, -(-n // lanes)))
    mr = min(8, (regs - nv - 2) // nv) if nv < nv_max else 6
    return DenseSchedule(lanes=lanes, nv=nv, mr=mr, chunks=max(1, int(info.cores)))


def pack_dense_weight(w: np.ndarray, info, schedule: DenseSchedule | None = None) -> np.ndarray:
    """``w[N, K]`` (nn.Linear layout) as panels ``[ceil(N/nb), K, nb]``, N padded with zeros,
    ``nb`` from :func:`dense_schedule` (or ``schedule``) — the layout ``dense`` reads."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"pack_dense_weight wants a 2-D [N, K] weight, got shape {w.shape}")
    n, k = w.shape
    nb = (schedule or dense_schedule(n, k, info)).nb
    nt = -(-n // nb)
    p = np.zeros((nt * nb, k), np.float32)
    p[:n] = w
    return np.ascontiguousarray(p.reshape(nt, nb, k).transpose(0, 2, 1))


# -- scalar building blocks (they vectorise: VectorizeLoop turns them into <lanes x float>) ---
def _tv():
    import tvm
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    return tvm, tirx, IRBuilder, T


def _f32(v: float):
    return _tv()[1].const(float(v), "float32")


def _bind(value, body, name: str = "t"):
    """``body(var)`` with ``var = value`` bound once (a Let), so a value used several times in an
    activation is computed once, whatever LLVM's CSE would do."""
    tirx = _tv()[1]
    v = tirx.Var(name, value.ty)
    return tirx.Let(v, value, body(v))


def _exp(x):
    """Cephes ``expf``: 2**n · p(r), |r| ≤ ln2/2, degree-6 polynomial, ~1 ulp; clamped to
    [-87.3, 88.3] so 2**n stays a normal float (TVM's own ``exp`` is a scalar libm call)."""
    tirx = _tv()[1]
    x = tirx.max(tirx.min(x, _f32(88.3)), _f32(-87.3))

    def body(x):
        return _bind(tirx.floor(x * _f32(1.44269504088896341) + _f32(0.5)), lambda n: _bind(
            x - n * _f32(0.693359375) + n * _f32(2.12194440e-4), lambda r: (
                ((((((_f32(1.9875691500e-4) * r + _f32(1.3981999507e-3)) * r
                     + _f32(8.3334519073e-3)) * r + _f32(4.1665795894e-2)) * r
                   + _f32(1.6666665459e-1)) * r + _f32(5.0000001201e-1)) * r * r + r + _f32(1))
                * tirx.reinterpret("float32", tirx.shift_left(
                    tirx.Cast("int32", n) + tirx.const(127, "int32"),
                    tirx.const(23, "int32")))), "r"), "n")
    return _bind(x, body, "xe")


def _erf(x):
    """erf as the odd/even rational approximation of Eigen/XLA (``generic_fast_erf_float``):
    |error| ≲ 1e-7 on [-4, 4], ±1 outside."""
    tirx = _tv()[1]
    x = tirx.max(tirx.min(x, _f32(4)), _f32(-4))
    a = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
         -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
         -1.60960333262415e-02)
    b = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
         -7.37332916720468e-03, -1.42647390514189e-02)

    def body(x):
        def poly(cs, x2):
            p = _f32(cs[0])
            for c in cs[1:]:
                p = p * x2 + _f32(c)
            return p
        return _bind(x * x, lambda x2: x * poly(a, x2) / poly(b, x2), "x2")
    return _bind(x, body, "xf")


def _epilogue(kind: str | None, v):
    """``v`` through the activation ``kind`` (one of :data:`EPILOGUES`), as torch defines it."""
    tirx = _tv()[1]
    if kind is None:
        return v
    if kind == "relu":
        return tirx.max(v, _f32(0))
    if kind == "gelu":  # 0.5·x·(1 + erf(x/√2)), torch's default (approximate="none")
        return _bind(v, lambda x: _f32(0.5) * x * (_f32(1) + _erf(x * _f32(0.7071067811865476))))
    if kind == "gelu_tanh":  # 0.5·x·(1 + tanh(u)) = x·sigmoid(2u): no cancellation for x ≪ 0
        return _bind(v, lambda x: x / (_f32(1) + _exp(
            (x + _f32(0.044715) * x * x * x) * _f32(-2 * 0.7978845608028654))))
    if kind == "silu":
        return _bind(v, lambda x: x / (_f32(1) + _exp(-x)))
    raise ValueError(f"unknown epilogue {kind!r}; expected one of {EPILOGUES}")


def _int64(v):
    tirx = _tv()[1]
    return tirx.const(v, "int64") if isinstance(v, int) else v


def _columns(width: int, lanes: int) -> list[tuple[int, int]]:
    """``(offset, lanes)`` vector pieces covering ``width`` columns (a short last one)."""
    out = [(o, lanes) for o in range(0, width - width % lanes, lanes)]
    return out + ([(width - width % lanes, width % lanes)] if width % lanes else [])


class _Gemm:
    """One GEMM nest ``y[b, i, j] = finish(sum_k x(b, i, k) · w(b, jt, k, c))``, ``j = jt·nb + c``.

    The accessors are Python callables returning TIR expressions or emitting stores:
    ``x(b, i, k)``, ``w(b, jt, k, c)``, ``finish(b, i, j, acc)`` (epilogue + store) and, for a
    K-blocked schedule, ``partial_store(b, i, j, acc)`` / ``partial_load(b, i, j)`` (partial sums
    kept in y). ``prepare(b, jt)`` may emit per-item set-up (a packed copy of the panel) and
    return the ``w`` accessor to use instead. ``b`` is ``None`` for a plain GEMM."""

    def __init__(self, s: DenseSchedule, m, n: int, k: int, *, x, w, finish, batch=None,
                 partial_store=None, partial_load=None, prepare=None, w_padded: bool = True):
        self.s, self.m, self.n, self.k, self.batch = s, m, n, k, batch
        self.x, self.w, self.finish = x, w, finish
        self.partial_store, self.partial_load, self.prepare = partial_store, partial_load, prepare
        self.nt = -(-n // s.nb)
        self.tail = n - (self.nt - 1) * s.nb  # columns of the last panel
        self.w_padded = w_padded  # the last panel may be read at full width (zero padding)
        kc = s.kc if s.kc and s.kc < k and partial_store is not None else k
        self.kblocks = [(k0, min(k, k0 + kc)) for k0 in range(0, k, kc)]

    def micro(self, b, w, rows: int, i0, jt, cw: int, sw: int, kb: int):
        """``rows`` rows from ``i0`` of panel ``jt``, K block ``kb``: compute ``cw`` columns,
        store ``sw`` (the epilogue after the last K block, partial sums before it)."""
        T = _tv()[3]
        lanes, nb = self.s.lanes, self.s.nb
        k0, k1 = self.kblocks[kb]
        # per-row accumulators, each under TVM's 1 KiB stack-alloca limit: a bigger buffer, or
        # any "local"-scope one, becomes TVMBackendAllocWorkspace memory that LLVM cannot
        # promote to registers (2.5x slower: every FMA then loads and stores its accumulator)
        accs = [T.alloc_buffer((nb,), "float32", scope="global") for _ in range(rows)]
        for r in range(rows):
            for o, nl in _columns(cw, lanes):
                # after the first K block, resume from the partial sums of the stored columns
                # (a padded lane past n starts from 0: it is never stored)
                valid = max(0, min(nl, sw - o)) if kb else 0
                for lo, hi, load in ((0, valid, True), (valid, nl, False)):
                    if hi > lo:
                        with T.vectorized(0, hi - lo) as ln:
                            c = o + lo + ln
                            T.buffer_store(accs[r], self.partial_load(b, i0 + r, jt * nb + c)
                                           if load else _f32(0), [c])
        with T.serial(_int64(k0), _int64(k1)) as kk:
            for r in range(rows):
                xv = self.x(b, i0 + r, kk)  # one vbroadcastss per row and k
                for o, nl in _columns(cw, lanes):
                    with T.vectorized(0, nl) as ln:  # one vfmadd231ps per vector
                        T.buffer_store(accs[r], accs[r][o + ln] + xv * w(jt, kk, o + ln),
                                       [o + ln])
        store = self.finish if kb == len(self.kblocks) - 1 else self.partial_store
        for r in range(rows):
            for o, nl in _columns(sw, lanes):
                with T.vectorized(0, nl) as ln:
                    store(b, i0 + r, jt * nb + o + ln, accs[r][o + ln])

    def rows(self, b, w, r0, nrows, jt, cw: int, sw: int):
        """Rows ``[r0, r0 + nrows)``: per K block, full ``mr``-row tiles, then the leftover rows
        in a micro-kernel of their own (chosen at run time when ``nrows`` is symbolic). With K
        blocks the ``kc × nb`` weight block is reused from L1 by every tile of the chunk."""
        _, tirx, _, T = _tv()
        mr = self.s.mr
        for kb in range(len(self.kblocks)):
            if isinstance(nrows, int):
                if nrows // mr:
                    with T.serial(_int64(0), _int64(nrows // mr)) as it:
                        self.micro(b, w, mr, r0 + it * mr, jt, cw, sw, kb)
                if nrows % mr:
                    self.micro(b, w, nrows % mr, r0 + nrows // mr * mr, jt, cw, sw, kb)
                continue
            with T.serial(_int64(0), tirx.floordiv(nrows, _int64(mr))) as it:
                self.micro(b, w, mr, r0 + it * mr, jt, cw, sw, kb)
            left = tirx.floormod(nrows, _int64(mr))
            for r in range(1, mr):
                with T.If(left == _int64(r)):
                    with T.Then():
                        self.micro(b, w, r, r0 + nrows - r, jt, cw, sw, kb)

    def panel(self, b, jt, r0, nrows):
        """Rows ``[r0, r0 + nrows)`` of panel ``jt``; the last panel may be narrower."""
        T = _tv()[3]
        nb, tail = self.s.nb, self.tail
        w = self.prepare(b, jt) if self.prepare else (lambda jt_, kk, c: self.w(b, jt_, kk, c))
        cw = nb if self.w_padded else tail
        if tail == nb:
            self.rows(b, w, r0, nrows, jt, nb, nb)
        elif self.nt == 1:
            self.rows(b, w, r0, nrows, jt, cw, tail)
        else:
            with T.If(jt == _int64(self.nt - 1)):
                with T.Then():
                    self.rows(b, w, r0, nrows, jt, cw, tail)
                with T.Else():
                    self.rows(b, w, r0, nrows, jt, nb, nb)

    def emit(self):
        """The nest under one parallel loop over work items (batch, row chunk, panel).

        Rows split into ``C`` chunks, one per core when ``m`` is large (``C`` is decided at
        run time when ``m`` is symbolic: ``clamp(m // (min_chunk_tiles·mr), 1, chunks)``), and
        items run chunk-major, so with TVM's static split a thread owns one chunk of ``x``
        (MiniLM: 512 rows × 384 = 768 KiB, L2-resident) and streams every weight panel past it
        once. Small ``m`` (GEMV-like) gives ``C = 1``: the threads split the panels instead."""
        _, tirx, _, T = _tv()
        s, m, nt = self.s, self.m, self.nt
        unit = s.min_chunk_tiles * s.mr
        if s.chunks <= 1:
            nch = 1
        elif isinstance(m, int):
            nch = max(1, min(s.chunks, m // unit))
        else:
            nch = tirx.max(_int64(1), tirx.min(_int64(s.chunks), tirx.floordiv(m, _int64(unit))))
        if isinstance(nch, int) and nch == 1:
            mcs = m
        else:  # rows per chunk, rounded up to whole tiles
            mcs = (tirx.floordiv(tirx.floordiv(_int64(m) + nch - 1, nch) + (s.mr - 1), _int64(s.mr))
                   * s.mr)
        per_batch = _int64(nt) * _int64(nch)
        count = per_batch if self.batch is None else per_batch * _int64(self.batch)
        with T.parallel(_int64(0), count) as p:
            if self.batch is None:
                b, q = None, p
            else:
                b, q = tirx.floordiv(p, per_batch), tirx.floormod(p, per_batch)
            if isinstance(nch, int) and nch == 1:
                self.panel(b, q, _int64(0), m)
            else:
                c, jt = tirx.floordiv(q, _int64(nt)), tirx.floormod(q, _int64(nt))
                r0 = c * mcs
                self.panel(b, jt, r0, tirx.max(_int64(0), tirx.min(mcs, _int64(m) - r0)))


def _func(name: str, build):
    """A PrimFunc from ``build()`` run inside an IR-builder prim_func frame."""
    _, _, IRBuilder, T = _tv()
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            # noalias: inputs and output never overlap (call_tir allocates the output), so
            # LLVM may keep weight vectors in registers across the rows of a tile
            T.func_attr({"tirx.noalias": True, "global_symbol": name})
            build()
    return ib.get()


def _buf(name: str, shape, T):
    return T.match_buffer(T.arg(name, T.handle()), [_int64(d) for d in shape], "float32")


def dense(m, n: int, k: int, *, bias: bool = False, epilogue: str | None = None,
          residual: bool = False, info, schedule: DenseSchedule | None = None):
    """``y = epi(x · wᵀ + bias) + residual`` as a scheduled PrimFunc.

    Arguments ``(x[m, k], w_packed[ceil(n/nb), k, nb], [bias[n]], [residual[m, n]], y[m, n])``,
    all float32, ``w_packed = pack_dense_weight(w, info)``. ``m`` is an int or a symbolic
    int64 ``tvm.tirx.Var``; ``n``, ``k`` are static. ``schedule`` overrides the rule
    (:func:`dense_schedule`; the packing must then use the same ``nb``)."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}; expected one of {EPILOGUES}")
    if isinstance(m, int) and m < 1 or n < 1 or k < 1:
        raise ValueError(f"dense needs m, n, k >= 1, got {m}, {n}, {k}")
    s = schedule or dense_schedule(n, k, info)
    nt = -(-n // s.nb)
    T = _tv()[3]

    def build():
        X = _buf("x", (m, k), T)
        W = _buf("w", (nt, k, s.nb), T)
        B = _buf("bias", (n,), T) if bias else None
        R = _buf("residual", (m, n), T) if residual else None
        Y = _buf("y", (m, n), T)

        def finish(_, i, j, v):
            if B is not None:
                v = v + B[j]
            v = _epilogue(epilogue, v)
            if R is not None:
                v = v + R[i, j]
            T.buffer_store(Y, v, [i, j])

        _Gemm(s, m, n, k, x=lambda _, i, kk: X[i, kk], w=lambda _, jt, kk, c: W[jt, kk, c],
              finish=finish, partial_store=lambda _, i, j, v: T.buffer_store(Y, v, [i, j]),
              partial_load=lambda _, i, j: Y[i, j]).emit()
    return _func("dense", build)


def batch_matmul(b, m, n: int, k: int, *, transpose_b: bool, info,
                 schedule: DenseSchedule | None = None):
    """``y[b] = x[b] · w[b]ᵀ`` (``transpose_b``, ``w[b, n, k]``) or ``x[b] · w[b]``
    (``w[b, k, n]``) as a scheduled PrimFunc with arguments ``(x[b, m, k], w, y[b, m, n])``.

    ``b`` and ``m`` may be symbolic int64 ``tvm.tirx.Var``s (or ints); ``n``, ``k`` static.
    Parallel over (batch, column panel, row chunk) items. ``w[b, k, n]`` is read in place (its
    rows are panels already); ``w[b, n, k]`` is first copied, one panel per item, into a
    zero-padded ``[k, nb]`` scratch (TVM workspace memory: any buffer over 1 KiB is) so the
    micro-kernel reads contiguous vectors."""
    if isinstance(m, int) and m < 1 or isinstance(b, int) and b < 1 or n < 1 or k < 1:
        raise ValueError(f"batch_matmul needs b, m, n, k >= 1, got {b}, {m}, {n}, {k}")
    s = schedule or dense_schedule(n, k, info)
    if schedule is None and not (isinstance(b, int) and b < info.cores):
        # the batch gives the parallelism; whole-m items pack a transposed panel only once
        s = DenseSchedule(lanes=s.lanes, nv=s.nv, mr=s.mr, kc=s.kc, chunks=1)
    _, tirx, _, T = _tv()
    nb = s.nb

    def build():
        X = _buf("x", (b, m, k), T)
        W = _buf("w", (b, n, k) if transpose_b else (b, k, n), T)
        Y = _buf("y", (b, m, n), T)

        def prepare(bi, jt):
            if not transpose_b:
                return lambda jt_, kk, c: W[bi, kk, jt_ * nb + c]
            # the transpose: scratch[kk, c] = w[bi, jt·nb + c, kk], zero past n; the outer
            # loop walks w's rows so the reads are contiguous (k floats per column)
            P = T.alloc_buffer((k * nb,), "float32", scope="global")
            with T.serial(_int64(0), _int64(nb)) as c:
                j = jt * nb + c
                with T.If(j < _int64(n)):
                    with T.Then():
                        with T.serial(_int64(0), _int64(k)) as kk:
                            T.buffer_store(P, W[bi, j, kk], [kk * nb + c])
                    with T.Else():
                        with T.serial(_int64(0), _int64(k)) as kk:
                            T.buffer_store(P, _f32(0), [kk * nb + c])
            return lambda jt_, kk, c: P[kk * nb + c]

        _Gemm(s, m, n, k, batch=b, x=lambda bi, i, kk: X[bi, i, kk], w=None,
              finish=lambda bi, i, j, v: T.buffer_store(Y, v, [bi, i, j]),
              partial_store=lambda bi, i, j, v: T.buffer_store(Y, v, [bi, i, j]),
              partial_load=lambda bi, i, j: Y[bi, i, j], prepare=prepare,
              w_padded=transpose_b).emit()
    return _func("batch_matmul", build)
