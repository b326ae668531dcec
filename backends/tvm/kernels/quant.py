"""Quantized linear kernels for the ``cpu`` target: weight-only integer and MX group-dequant
matmuls (W2/W3/W4/W8, MXFP4, MXINT8 with float activations) and W8A8 (dynamic per-token int8
activations, int32 accumulation on AVX512-VNNI ``vpdpbusd``).

All kernels are TIR loop nests built with the TVMScript IR builder (the loop bodies are
unrolled in Python), ``y[m, n] = x[m, k] · dequant(W)[n, k]ᵀ (+ bias[n])``, parallel over
tiles of output rows, and correct for every ``m ≥ 1`` (``m`` an int or a symbolic int64
``tvm.tirx.Var``; ``n`` and ``k`` are static: the weights are constants). They reproduce the
interpreter's fake quantization: the dequantized weight is ``(q − z)·s`` exactly as
:class:`qcompile.formats.IntFormat` / ``MXFormat`` decode it (the GEMV sums ``x·(q − z)``
per group and scales the group sum, an fp32 reassociation, ~1e-7 of the output's scale).

Weight layout (``pack_*``; one layout serves every target and every ``m``)
-------------------------------------------------------------------------
Output rows are cut into *blocks* of 16 (``N`` zero-padded to ``Nb·16``): a vector lane is an
output row, so one 16-lane vector of packed words holds the codes of 16 rows at the same ``k``
positions, the inner loop needs no horizontal sums and the result of a block is one 16-float
store. Along ``K`` the codes of one lane are packed in 32-bit words, ``kpw`` codes per word
group, code ``i`` of a group at bits ``b·i`` (``kpw`` = 8 for 4 bits, 16 for 2 bits):

- ``qweight``: ``uint32 [Nb, ceil(K/kpw) + 1, 16]`` for 2 and 4 bits (the extra, zero, word
  group keeps the kernel's unaligned loads at byte offsets 1-3 of the last words inside the
  array); ``uint32 [Nb, ceil(K/32), 3, 16]`` for 3 bits (word 0: the low 2 bits of codes 0-15,
  word 1: of codes 16-31, word 2: the high bit of all 32, bit ``i`` = code ``i``);
  ``int8``/``uint8 [Nb, K, 16]`` for 8 bits. Symmetric codes are stored offset-binary
  (``q + 2^(b-1)``), asymmetric ones as they are;
- ``scales``: ``float32 [Nb, G, 16]`` (``G`` groups along K; per channel ``G = 1``): the 16
  scales of a block for one group are one vector load;
- ``zeros`` (asymmetric only): ``float32 [Nb, G, 16]``, stored *centred* as ``2^(b-1) − z``.

MX weights (``pack_mx_weight``) use the same ``qweight`` layout (MXFP4: the E2M1 bit patterns
as 4-bit codes; MXINT8: the int8 codes as 8-bit ones) and keep the E8M0 scale bytes,
``uint8 [Nb, K/32, 16]``, decoded to ``2^(e−127)`` in the kernel (subnormal ``e = 0`` exact,
``0xFF`` → NaN; MXINT8 folds its ``/64`` into the exponent, exact by the same argument).

Kernel arguments: ``(x[m, k] f32, qweight, scales, [zeros], [bias[n] f32], y[m, n] f32)`` — the
packed arrays in the order of :data:`INT_ARGS` / :data:`MX_ARGS`; W8A8:
``(x, w, wsum, wscale, [bias], y)`` (:data:`W8A8_ARGS`), see :func:`int8_matmul`.

Schedules
---------
*Dequantisation is fused into the inner loop and vectorised over packed words.* One 64-byte
load brings 16 rows × ``kpw`` codes. With AVX-512 a code becomes a float through ``vpermps``
as a 16-entry lookup table: ``vpermps`` reads only the low 4 index bits, so no mask is needed,
and the table does the int→float conversion and the centring (``t[v] = v − 2^(b−1)``;
MXFP4's table is the E2M1 values). Code ``i`` is in the low bits after a load at byte offset
``⌊b·i/8⌋`` and a shift by ``b·i mod 8``, so for 4 bits half the codes need no shift at all:
per 128 weights 4 shifts, 8 ``vpermps`` and 8 FMAs with ``x[k]`` broadcast — 20 uops on the
two 512-bit ports, ~10 cycles, which is what a core measures (31 ns per 1000 weights at
~2.5 GHz, L2- or L3-resident alike: compute-bound, not memory-bound, on 1 and 2 threads).
Without AVX-512 (AVX2, NEON) the code is masked and converted (``vcvtdq2ps``) instead.

*GEMV* (``m < GEMM_MIN_M``; what decode measures): per group, ``acc_g += x[k] · t[code]`` in
vector registers; at the group's end ``acc += s · (acc_g + zc · Σx_g)`` (one FMA per group;
``Σx_g`` = the group sums of ``x``, computed once per call, for asymmetric weights only). The
scales are one vector load per block and group and never leave registers. A tile is 8 blocks
(128 rows) on AVX-512; ``m`` is processed in chunks of ``MT ≤ 8`` rows (8, then 4, 2, 1 for the
rest, chosen at run time), each chunk computing ``MT × NTs`` accumulator pairs (``MT·NTs = 8``:
16 of the 32 zmm registers) so that every decoded word feeds ``MT`` FMAs and the FMA chains
are independent. Batches 1, 2, 4, 8 decode each weight once; 3, 5-7 two or three times (the
tile is then in L1/L2).

*GEMM* (``m ≥ GEMM_MIN_M``; what prefill and encoders measure): ``dense``'s nest and
micro-kernel (:class:`.dense._Gemm`) on weights decoded per work item. A work item is (row
chunk, panel of ``nb`` output rows of W; ``nb`` = 64 = 4 blocks with AVX-512); it first decodes
its panel, ``w = (t[code] + zc) · s`` — exactly the interpreter's dequantised weight — into a
per-item fp32 scratch ``[K, nb]`` laid out as :func:`.dense.pack_dense_weight` lays out a panel
(K = 1536: 384 KiB, L2-resident; the ``nb`` floats of one ``k`` are written together, so each
cache line is written once), then runs the register-blocked micro-kernel over every row of its
chunk: 6 rows × 4 zmm accumulators, per ``k`` 4 vector loads of the panel, 6 broadcasts of
``x`` and 24 FMAs, ``m mod 6`` leftover rows in their own micro-kernel. With many rows each
core owns one chunk of ``x`` (chunk-major items), so it decodes the whole weight once per call:
~5 uops per 16 weights against 16·(m/cores) FMAs, ~1% at m = 1024. Same speed as ``dense`` on
the fp32 weight from m ≈ 64 on (MiniLM's GEMMs at m = 1024: 1.00–1.02×, ~320 GFLOP/s on two
Emerald Rapids cores), ~1.1–1.4× of it for 16 ≤ m < 64 where the decode is not yet amortised.
The sums are those of the fused GEMM this replaced (the same ``w``, the same FMA chain in
``k`` order from 0, the bias added last), so the result is bit-identical to it.

``dequant_matmul`` holds both and branches on ``m`` at run time (:data:`GEMM_MIN_M`);
``dequant_gemv`` / ``dequant_gemm`` build one each.

*W8A8*: a first pass quantizes each row of ``x`` (``s = max|x|/127``, ``q = clamp(rne(x/s))``
with a true division, exactly ``IntFormat`` ``int8 per_token``) into a scratch of ``q + 128``
bytes; the main loop is ``vpdpbusd`` (u8 × s8 → 4-way int32 dot) on the
``int8 [Nb, K/4, 64]`` weight panel (16 rows × 4 k per 64 bytes) with the row's 4 bytes
broadcast, ``MT × NTs`` accumulators; ``acc − 128·Σ_k w`` (precomputed) is the exact int32
product sum. Without VNNI (AVX2) the signed bytes go through ``vpsignb``/``vpabsb``/
``vpmaddubsw``/``vpmaddwd`` (exact: ``|q_x| ≤ 127``, so the int16 pair sums cannot saturate);
other CPUs get plain int32 math.

TVM 0.27 notes: stack buffers must be ``global`` scope (``local`` ones, however small, become
``TVMBackendAllocWorkspace`` heap memory that LLVM cannot keep in registers); the function
attribute is ``tirx.noalias`` (``tir.noalias`` is silently ignored); LLVM ≥ 20 declares
``vpdpbusd``'s byte operands ``<64 x i8>`` (TVM's own ``dot_16x4_vnni`` tensor intrinsic
still passes ``<16 x i32>`` and fails to verify); many sibling buffers make
``CompactBufferAllocation`` superlinear, so repeated micro-kernels are run-time loops.
"""
from __future__ import annotations

import numpy as np

from .dense import DenseSchedule, _Gemm, dense_schedule

__all__ = ["GEMM_MIN_M", "INT_ARGS", "MX_ARGS", "W8A8_ARGS", "MX_FORMATS",
           "pack_int_weight", "dequant_matmul", "dequant_gemv", "dequant_gemm",
           "pack_int8_weight", "int8_matmul", "pack_mx_weight", "mx_dequant_matmul",
           "packed_bytes"]

#: ``dequant_matmul`` runs the GEMM schedule from this many rows of ``x`` on
GEMM_MIN_M = 16
#: order of the packed arrays in the kernels' arguments (``zeros`` only when asymmetric)
INT_ARGS = ("qweight", "scales", "zeros")
MX_ARGS = ("qweight", "scales")
W8A8_ARGS = ("w", "wsum", "wscale")
#: MX formats the MX kernel decodes: registry name -> (code bits, scale exponent offset)
MX_FORMATS = {"mxfp4": (4, 0), "mxint8": (8, 6)}

LANES = 16  # output rows per block: one 16-lane vector
_KPW = {2: 16, 3: 32, 4: 8, 8: 1}  # codes per (lane, word group) along K


# -- packing (numpy) ---------------------------------------------------------------------------
def _np(a):
    if hasattr(a, "detach"):  # torch tensors
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _blocks(a: np.ndarray, nb: int) -> np.ndarray:
    """``a[N, ...]`` zero-padded to ``nb·16`` rows, as ``[nb, 16, ...]``."""
    out = np.zeros((nb * LANES,) + a.shape[1:], a.dtype)
    out[: a.shape[0]] = a
    return out.reshape((nb, LANES) + a.shape[1:])


def _pack_codes(v: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes ``v[N, Kc]`` (< 2^bits) as the ``qweight`` array of ``bits``."""
    n, kc = v.shape
    nb, kpw = -(-n // LANES), _KPW[bits]
    if bits == 8:
        return np.ascontiguousarray(_blocks(v, nb).transpose(0, 2, 1))
    kw = -(-kc // kpw)
    p = np.zeros((n, kw * kpw), np.uint32)
    p[:, :kc] = v
    c = _blocks(p, nb).reshape(nb, LANES, kw, kpw)  # [block, lane, word group, slot]
    if bits == 3:
        words = np.zeros((nb, LANES, kw, 3), np.uint32)
        for i in range(32):
            words[..., i // 16] |= (c[..., i] & 3) << (2 * (i % 16))
            words[..., 2] |= (c[..., i] >> 2) << i
        return np.ascontiguousarray(words.transpose(0, 2, 3, 1))
    words = np.zeros((nb, LANES, kw + 1), np.uint32)  # + a zero word group: see the doc
    for i in range(kpw):
        words[..., :kw] |= c[..., i] << (bits * i)
    return np.ascontiguousarray(words.transpose(0, 2, 1))


def _group_of(kc: int, ngroups: int, group: int | None) -> int:
    if group is not None and group < kc and ngroups > 1:
        return int(group)
    if ngroups == 1:
        return kc
    if kc % ngroups:
        raise ValueError(f"{ngroups} scales per row do not divide the {kc} codes of a row; "
                         "pass group=")
    return kc // ngroups


def pack_int_weight(codes, scales, zeros=None, bits: int = 4, *, group: int | None = None
                    ) -> dict[str, np.ndarray]:
    """Integer codes ``[N, K]`` as the arrays ``dequant_matmul`` reads (see the module doc).

    ``codes`` are signed (symmetric, ``zeros=None``) or unsigned with a zero point per group
    (``zeros[N, G]``); ``scales[N, G]`` (``G = K/group``; per channel ``[N]`` or ``[N, 1]``) —
    exactly what ``qcompile.formats.get("int4", ...).quantize(w)`` returns (``codes``,
    ``params["scale"]``, ``params["zero_point"]``). A symmetric format with unsigned codes and
    an implied zero point (``full_range``) is passed as asymmetric with ``zeros = 2^(b-1)``.
    Returns ``{"qweight", "scales"[, "zeros"]}``."""
    if bits not in _KPW:
        raise ValueError(f"pack_int_weight supports 2, 3, 4 and 8 bits, got {bits}")
    codes = _np(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [N, K], got shape {codes.shape}")
    n, kc = codes.shape
    s = _np(scales).astype(np.float32).reshape(n, -1)
    g = _group_of(kc, s.shape[1], group)
    ngroups = s.shape[1]
    if ngroups * g < kc:
        raise ValueError(f"{ngroups} groups of {g} do not cover the {kc} codes of a row")
    kpad = kc if ngroups == 1 else ngroups * g
    c = codes.astype(np.int64)
    off = 1 << (bits - 1)
    if zeros is None:
        lo, hi = -off, off - 1
        v = c + off
    else:
        lo, hi = 0, (1 << bits) - 1
        v = c
    if c.size and (c.min() < lo or c.max() > hi):
        raise ValueError(f"{'asymmetric' if zeros is not None else 'symmetric'} {bits}-bit codes "
                         f"must lie in [{lo}, {hi}], got [{c.min()}, {c.max()}]")
    vp = np.zeros((n, kpad), np.int64)
    vp[:, :kc] = v
    if zeros is None and kpad > kc:
        vp[:, kc:] = off  # the code of 0
    nb = -(-n // LANES)
    if bits == 8:
        q = (vp - off).astype(np.int8) if zeros is None else vp.astype(np.uint8)
        qweight = _pack_codes(q, 8)
    else:
        qweight = _pack_codes(vp.astype(np.uint32), bits)
    out = {"qweight": qweight,
           "scales": np.ascontiguousarray(_blocks(s, nb).transpose(0, 2, 1))}
    if zeros is not None:
        z = _np(zeros).astype(np.float32).reshape(n, ngroups)
        out["zeros"] = np.ascontiguousarray(_blocks(off - z, nb).transpose(0, 2, 1))
    return out


def pack_mx_weight(codes, scales, fmt_name: str) -> dict[str, np.ndarray]:
    """MX codes ``[N, K]`` (K a multiple of 32, as ``quantize`` pads them; MXFP4: E2M1 bit
    patterns 0-15, MXINT8: int8) and E8M0 scale bytes ``[N, K/32]`` as
    ``{"qweight", "scales"}`` for :func:`mx_dequant_matmul`."""
    fmt = fmt_name.lower()
    if fmt not in MX_FORMATS:
        raise ValueError(f"pack_mx_weight supports {list(MX_FORMATS)}, got {fmt_name!r}")
    codes = _np(codes)
    n, kc = codes.shape
    if kc % 32:
        raise ValueError(f"MX codes come in blocks of 32 along K, got K = {kc}")
    s = _np(scales).astype(np.uint8).reshape(n, kc // 32)
    nb = -(-n // LANES)
    bits = MX_FORMATS[fmt][0]
    if bits == 4:
        if codes.min() < 0 or codes.max() > 15:
            raise ValueError("MXFP4 codes are 4-bit patterns 0..15")
        qweight = _pack_codes(codes.astype(np.uint32), 4)
    else:
        qweight = _pack_codes(codes.astype(np.int8), 8)
    return {"qweight": qweight, "scales": np.ascontiguousarray(_blocks(s, nb).transpose(0, 2, 1))}


def pack_int8_weight(codes, scales) -> dict[str, np.ndarray]:
    """W8A8 weights: int8 codes ``[N, K]`` and per-channel scales ``[N]`` as
    ``{"w": int8 [Nb, ceil(K/4), 64], "wsum": int32 [Nb·16] (Σ_k w), "wscale": f32 [Nb·16]}``:
    ``w[b, q, 4r + j]`` is the code of row ``16b + r`` at ``k = 4q + j`` (the ``vpdpbusd``
    operand: 16 rows × 4 k in 64 bytes); rows padded to whole blocks of 16, K to a multiple of
    4, with zeros."""
    c = _np(codes)
    if c.ndim != 2:
        raise ValueError(f"codes must be [N, K], got shape {c.shape}")
    if c.size and (c.min() < -128 or c.max() > 127):
        raise ValueError("int8 codes must lie in [-128, 127]")
    n, k = c.shape
    nb, k4 = -(-n // LANES), -(-k // 4)
    p = np.zeros((n, k4 * 4), np.int8)
    p[:, :k] = c
    w = np.ascontiguousarray(_blocks(p, nb).reshape(nb, LANES, k4, 4).transpose(0, 2, 1, 3)
                             ).reshape(nb, k4, 4 * LANES)
    s = _np(scales).astype(np.float32).reshape(-1)
    if s.size != n:
        raise ValueError(f"W8A8 wants one scale per output channel ({n}), got {s.size}")
    wsum = np.zeros(nb * LANES, np.int32)
    wsum[:n] = c.astype(np.int64).sum(1)
    ws = np.zeros(nb * LANES, np.float32)
    ws[:n] = s
    return {"w": w, "wsum": wsum, "wscale": ws}


def packed_bytes(packed: dict[str, np.ndarray]) -> int:
    """Bytes of the packed weight arrays (what one call reads)."""
    return int(sum(a.nbytes for a in packed.values()))


# -- TIR building blocks -----------------------------------------------------------------------
def _tv():
    import tvm
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T
    return tvm, tirx, IRBuilder, T


def _i64(v):
    return _tv()[1].const(v, "int64") if isinstance(v, int) else v


def _c(v, dtype):
    return _tv()[1].const(v, dtype)


def _R(lanes=LANES):
    tirx = _tv()[1]
    return tirx.Ramp(_i64(0), _i64(1), lanes)


def _bc(v, lanes=LANES):
    return _tv()[1].Broadcast(v, lanes)


def _vec(dtype, lanes=LANES):
    """A ``lanes``-vector register: a stack buffer (``global`` scope, < 1 KiB: TVM 0.27 sends
    any ``local``-scope allocation, however small, to TVMBackendAllocWorkspace, which LLVM
    cannot promote to registers)."""
    return _tv()[3].alloc_buffer((lanes,), dtype, scope="global")


def _set(buf, value):
    _tv()[3].buffer_store(buf, value, [_R(buf.shape[0])])


def _get(buf):
    return buf[_R(buf.shape[0])]


def _u32(v):
    return _bc(_c(v, "uint32"))


def _i32(v):
    return _bc(_c(v, "int32"))


def _lanes(e) -> int:
    return int(e.ty.dtype.lanes)


def _func(name: str, build):
    _, _, IRBuilder, T = _tv()
    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(name)
            T.func_attr({"tirx.noalias": True, "global_symbol": name})
            build()
    return ib.get()


def _buf(name, shape, dtype):
    T = _tv()[3]
    return T.match_buffer(T.arg(name, T.handle()), [_i64(d) for d in shape], dtype)


def _is_x86(info) -> bool:
    t = getattr(info, "triple", "") or ""
    return not t or t.startswith(("x86_64", "i686"))


def _tile(nb: int, info) -> int:
    """Blocks (of 16 rows) per parallel work item: 8 with AVX-512, 4 otherwise; 4 when 8 would
    leave fewer than two items per core (small N). Not below 4: a GEMV row chunk computes the
    blocks of its item together, and fewer than 4 independent FMA chains stall on latency."""
    tile = 8 if info.avx512 else 4
    while tile > 4 and -(-nb // tile) < 2 * max(1, int(info.cores)):
        tile //= 2
    return min(tile, nb)


def _fp4_values(v):
    """E2M1 values of the int32 codes ``v`` (any lanes): sign · (e ? (2+m)·2^(e−2) : m/2)."""
    tirx = _tv()[1]
    lanes = _lanes(v)
    b = (lambda c: _bc(_c(c, "int32"), lanes)) if lanes > 1 else (lambda c: _c(c, "int32"))
    f = (lambda c: _bc(_c(c, "float32"), lanes)) if lanes > 1 else (lambda c: _c(c, "float32"))
    e = (v >> b(1)) & b(3)
    mnt = v & b(1)
    t = tirx.Select(e == b(0), mnt, (mnt + b(2)) << tirx.max(e - b(1), b(0)))
    mag = tirx.Cast(f"float32x{lanes}" if lanes > 1 else "float32", t) * f(0.5)
    return tirx.Select((v & b(8)) != b(0), f(0.0) - mag, mag)


def _pow2_e8m0(e, off: int):
    """``2^(e − 127 − off)`` as float32 lanes from E8M0 exponents ``e`` (int32 lanes),
    subnormals exact, ``e = 255`` → NaN."""
    tirx = _tv()[1]
    p = e - _i32(off)
    bits = tirx.Select(p >= _i32(1), p << _i32(23), _i32(1) << tirx.max(p + _i32(22), _i32(0)))
    bits = tirx.Select(e == _i32(255), _i32(0x7FC00000), bits)
    return tirx.reinterpret("float32x16", bits)


# -- the weight-only kernels -------------------------------------------------------------------
class _Plan:
    """Static facts of one weight-only kernel: code kind and bits, groups, decode path and
    register blocking from the CPU."""

    def __init__(self, n, k, *, kind, bits, group, asym, info, mx_off=0):
        self.n, self.k, self.kind, self.bits, self.asym = n, k, kind, bits, asym
        self.mx_off, self.info = mx_off, info
        self.nb = -(-n // LANES)
        self.kpw = _KPW[bits]
        if kind != "int":  # MX: blocks of 32, codes padded to whole blocks
            self.g, self.ng = 32, -(-k // 32)
            kpad = self.ng * 32
        elif group is None or group >= k:  # per channel: one group over K
            self.g, self.ng, kpad = k, 1, k
        else:
            self.g, self.ng = int(group), -(-k // int(group))
            kpad = self.ng * self.g
            if self.g % self.kpw:
                raise ValueError(f"group size {self.g} must be a multiple of {self.kpw} for "
                                 f"{bits}-bit codes")
        self.kw = -(-kpad // self.kpw)  # word groups per lane
        self.lut = bool(info.avx512) and _is_x86(info) and bits < 8
        # without the table, 2/3/4-bit integer codes stay raw (v, not v − 2^(b−1)) in the
        # inner loop and the offset is taken out per group with the sums of x: one op less
        self.raw = kind == "int" and bits < 8 and not self.lut
        self.off = float(1 << (bits - 1))
        regs = 32 if info.avx512 else 16
        vregs = max(1, LANES * 32 // max(info.vector_bits, 128))  # registers per 16-lane vector
        # GEMV: MT·NTs accumulator pairs
        self.pairs = max(1, (regs // 2) // (2 * vregs))
        self.tile = _tile(self.nb, info)

    # codes -> centred values (float32x16)
    def table(self):
        tirx = _tv()[1]
        v = tirx.Ramp(_c(0, "int32"), _c(1, "int32"), LANES)
        if self.kind == "mxfp4":
            return _fp4_values(v)
        mask = (1 << self.bits) - 1
        return tirx.Cast("float32x16", (v & _i32(mask)) - _i32(1 << (self.bits - 1)))

    def qshape(self):
        if self.bits == 8:
            return (self.nb, self.kw, LANES)
        if self.bits == 3:
            return (self.nb, self.kw, 3, LANES)
        return (self.nb, self.kw + 1, LANES)

    def value(self, Q, b, kw, i, cache):
        """Value vector of code ``i`` of word group ``kw`` of block ``b``: centred
        (``v − 2^(b−1)``; MX: the element value), or the raw code ``v`` when ``self.raw``."""
        tirx = _tv()[1]
        R = _R()
        if self.bits == 8:
            raw = tirx.Cast("float32x16", Q[b, kw, R])
            if self.kind == "int" and self.asym:
                return raw - _bc(_c(128.0, "float32"))
            return raw
        if self.bits == 3:  # i = (half, slot in the half)
            h, i = i
            lo = Q[b, kw, h, R]
            hi = Q[b, kw, _i64(2), R] >> _bc(tirx.Cast("uint32", h) * _c(16, "uint32"))
            lo = lo >> _u32(2 * i) if i else lo
            hi = hi >> _u32(i - 2) if i > 2 else (hi << _u32(2 - i) if i < 2 else hi)
            if self.lut:  # bit 3 may be garbage: the table repeats every 8 entries
                idx = (lo & _u32(3)) | (hi & _u32(0xFFFFFFFC))
            else:
                idx = (lo & _u32(3)) | (hi & _u32(4))
        else:
            # code i sits in the low bits of each lane after a load at byte offset ⌊b·i/8⌋
            # and a shift by b·i mod 8: half (4 bits) or three quarters (2 bits) of the shifts
            # of `word >> b·i` become (unaligned) loads. vpermps reads only the low 4 index
            # bits; the arithmetic path masks
            per = 8 // self.bits
            base = (b * _i64(self.kw + 1) + kw) * _i64(4 * LANES) + _i64(i // per)
            w = tirx.reinterpret("uint32x16", self.QB[tirx.Ramp(base, _i64(1), 4 * LANES)])
            sh = self.bits * (i % per)
            idx = w >> _u32(sh) if sh else w
            if not self.lut:
                idx = idx & _u32((1 << self.bits) - 1)
        idx = tirx.reinterpret("int32x16", idx)
        if self.lut:
            if "table" not in cache:
                cache["table"] = self.table()
            return tirx.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.permvar.sf.512",
                                              cache["table"], idx)
        if self.kind == "mxfp4":
            return _fp4_values(idx)
        return tirx.Cast("float32x16", idx)  # raw

    def scale(self, S, b, gi):
        tirx = _tv()[1]
        R = _R()
        if self.kind == "int":
            return S[b, gi, R]
        return _pow2_e8m0(tirx.Cast("int32x16", S[b, gi, R]), self.mx_off)

    # K is walked group by group; each group is whole word groups plus, for the last group of a
    # per-channel / padded row, a few codes of a partial word group
    def segments(self):
        """``(first group, count, codes per group)`` runs of groups, plus the partial tail."""
        full = self.k // self.g
        out = [(0, full, self.g)] if full else []
        if self.k % self.g:
            out.append((full, 1, self.k % self.g))
        return out


class _WeightOnly:
    """Emits the GEMV or GEMM nest of one weight-only kernel."""

    def __init__(self, plan: _Plan, m, X, Q, S, Z, B, Y, XS):
        self.p, self.m = plan, m
        self.X, self.Q, self.S, self.Z, self.B, self.Y, self.XS = X, Q, S, Z, B, Y, XS

    def _zc(self, b, gi):
        """What turns a group's values into ``v − z``: the stored centred zero point
        ``2^(b−1) − z`` (minus ``2^(b−1)`` for raw codes), or None."""
        p = self.p
        if self.Z is None:
            return _bc(_c(-p.off, "float32")) if p.raw else None
        zc = self.Z[b, gi, _R()]
        return zc - _bc(_c(p.off, "float32")) if p.raw else zc

    # walk the codes of one group: fn(kw_expr, slot, k_expr) for every code in it
    def _walk_group(self, gi, ncodes, fn):
        """``fn(word group, slot, k)`` for every code of group ``gi`` (``ncodes`` codes): a
        run-time loop over the word groups, the slots unrolled. A 3-bit word group (32 codes)
        is walked as two run-time halves of 16 unrolled slots, the slot given as
        ``(half, slot in half)``: half the code, and the same instructions."""
        T = _tv()[3]
        p = self.p
        kpw = p.kpw
        w0 = gi * _i64(p.g // kpw) if p.ng > 1 else _i64(0)
        k0 = gi * _i64(p.g) if p.ng > 1 else _i64(0)
        nfull, tail = divmod(ncodes, kpw)

        def word(wd, kbase):
            if p.bits != 3:
                for i in range(kpw):
                    fn(wd, i, kbase + _i64(i))
                return
            with T.serial(_i64(0), _i64(2)) as h:
                for i in range(16):
                    fn(wd, (h, i), kbase + h * _i64(16) + _i64(i))

        if nfull == 1:
            word(w0, k0)
        elif nfull:
            with T.serial(_i64(0), _i64(nfull)) as it:
                word(w0 + it, k0 + it * _i64(kpw))
        for i in range(tail):
            slot = (_i64(i // 16), i % 16) if p.bits == 3 else i
            fn(w0 + _i64(nfull), slot, k0 + _i64(nfull * kpw + i))

    def _store(self, mrow, b, acc):
        """``y[mrow, 16b : 16b+16] = acc (+ bias)``, the last block partial when 16 ∤ n."""
        T = _tv()[3]
        tirx = _tv()[1]
        n = self.p.n
        rem = n % LANES

        def full():
            v = _get(acc)
            if self.B is not None:
                v = v + self.B[tirx.Ramp(b * _i64(LANES), _i64(1), LANES)]
            T.buffer_store(self.Y, v, [mrow, tirx.Ramp(b * _i64(LANES), _i64(1), LANES)])

        def part():
            for j in range(rem):
                col = b * _i64(LANES) + _i64(j)
                v = acc[_i64(j)]
                if self.B is not None:
                    v = v + self.B[col]
                T.buffer_store(self.Y, v, [mrow, col])

        if not rem:
            full()
            return
        last = _i64(self.p.nb - 1)
        with T.If(b == last):
            with T.Then():
                part()
            with T.Else():
                full()

    def gemv_body(self, MT, m0, b0, count):
        _subtiles(b0, count, max(1, self.p.pairs // MT),
                       lambda bl: self._gemv_blocks(MT, m0, bl))

    def _gemv_blocks(self, MT, m0, bl):
        T = _tv()[3]
        p = self.p
        zero = _bc(_c(0.0, "float32"))
        acc = [[_vec("float32") for _ in bl] for _ in range(MT)]
        for row in acc:
            for a in row:
                _set(a, zero)
        for g0, cnt, ncodes in p.segments():
            def group(gi):
                accg = [[_vec("float32") for _ in bl] for _ in range(MT)]
                for row in accg:
                    for a in row:
                        _set(a, zero)
                cache = {}

                def step(wd, i, kk):
                    vals = [p.value(self.Q, b, wd, i, cache) for b in bl]
                    for mt in range(MT):
                        xb = _bc(self.X[m0 + _i64(mt), kk])
                        for j in range(len(bl)):
                            _set(accg[mt][j], _get(accg[mt][j]) + xb * vals[j])
                self._walk_group(gi, ncodes, step)
                for j, b in enumerate(bl):
                    s = p.scale(self.S, b, gi)
                    for mt in range(MT):
                        t = _get(accg[mt][j])
                        zc = self._zc(b, gi)
                        if zc is not None:  # Σ x·(v − z) = Σ x·v + (z_c − off)·Σ x
                            t = t + zc * _bc(self.XS[m0 + _i64(mt), gi])
                        _set(acc[mt][j], _get(acc[mt][j]) + t * s)
            if cnt == 1:
                group(_i64(g0))
            else:
                with T.serial(_i64(g0), _i64(g0 + cnt)) as gi:
                    group(gi)
        for mt in range(MT):
            for j, b in enumerate(bl):
                self._store(m0 + _i64(mt), b, acc[mt][j])

    def gemm(self):
        """The GEMM schedule: ``dense``'s nest (:class:`~.dense._Gemm`: row chunks × weight
        panels, 6 × 4-vector register-blocked micro-kernel) with each work item's panel first
        decoded into an fp32 scratch laid out as ``pack_dense_weight`` lays out a panel."""
        T = _tv()[3]
        p = self.p
        s = _panel_schedule(p.n, p.k, p.info)

        def prepare(_, jt):
            P = T.alloc_buffer((_i64(p.k * s.nb),), "float32", scope="global")
            self._decode_panel(P, jt, s.nb)
            return lambda jt_, kk, c: P[kk * _i64(s.nb) + c]

        def finish(_, i, j, v):
            if self.B is not None:
                v = v + self.B[j]
            T.buffer_store(self.Y, v, [i, j])

        # w_padded=False: the last panel of an n that is no multiple of nb computes only its
        # real columns, so the micro-kernel never reads the blocks the decode skips there
        _Gemm(s, self.m, p.n, p.k, x=lambda _, i, kk: self.X[i, kk], w=None, finish=finish,
              prepare=prepare, w_padded=False).emit()

    def _decode_panel(self, P, jt, nb: int):
        """``P[k·nb + 16j + l] = w[16(jt·nb/16 + j) + l, k]``, ``w = (t[code] + zc)·s``: the
        blocks of panel ``jt``, group by group (the group's scales and zero points in
        registers), the ``nb`` floats of one ``k`` stored together (each cache line of the
        scratch is written once, whole). Blocks past the last one (in the last panel, when
        ``nb`` does not divide the padded n) are left out."""
        T = _tv()[3]
        tirx = _tv()[1]
        p = self.p
        nbk = nb // LANES
        nt = -(-p.n // nb)
        last = p.nb - (nt - 1) * nbk  # blocks in the last panel

        def blocks(count):
            bl = [jt * _i64(nbk) + _i64(j) for j in range(count)]
            for g0, cnt, ncodes in p.segments():
                def group(gi):
                    sv, zv = [], []
                    for b in bl:
                        sv.append(_vec("float32"))
                        _set(sv[-1], p.scale(self.S, b, gi))
                        zc = self._zc(b, gi)
                        if zc is not None:
                            zv.append(_vec("float32"))
                            _set(zv[-1], zc)
                    cache = {}

                    def step(wd, i, kk):
                        for j, b in enumerate(bl):
                            v = p.value(self.Q, b, wd, i, cache)
                            if zv:
                                v = v + _get(zv[j])
                            T.buffer_store(P, v * _get(sv[j]), [tirx.Ramp(
                                kk * _i64(nb) + _i64(j * LANES), _i64(1), LANES)])
                    self._walk_group(gi, ncodes, step)
                if cnt == 1:
                    group(_i64(g0))
                else:
                    with T.serial(_i64(g0), _i64(g0 + cnt)) as gi:
                        group(gi)

        if last == nbk:
            blocks(nbk)
            return
        with T.If(jt < _i64(nt - 1)):
            with T.Then():
                blocks(nbk)
            with T.Else():
                blocks(last)

    def nest(self, body, top, m):
        """Parallel over tiles of blocks; inside, ``m`` in chunks of ``top`` rows, the rest in
        chunks of ``top/2, …, 1`` rows (chosen at run time when ``m`` is symbolic)."""
        T = _tv()[3]
        p = self.p
        tile = min(p.tile, p.nb)
        ntiles, rem = divmod(p.nb, tile)

        def rows(b0, count):
            _msplit(m, top, lambda mt, m0: body(mt, m0, b0, count))

        with T.parallel(_i64(0), _i64(ntiles + (1 if rem else 0))) as t:
            if not rem:
                rows(t * _i64(tile), tile)
            else:
                with T.If(t < _i64(ntiles)):
                    with T.Then():
                        rows(t * _i64(tile), tile)
                    with T.Else():
                        rows(_i64(ntiles * tile), rem)


def _panel_schedule(n: int, k: int, info) -> DenseSchedule:
    """``dense``'s blocking (:func:`~.dense.dense_schedule`) with the panel a whole number of
    16-row blocks wide: ``nb`` = 16, 32, 48 or 64 with AVX-512; 16 with AVX2 and 128-bit SIMD,
    whose rule would otherwise give 8 for a narrow ``n``."""
    s = dense_schedule(n, k, info)
    if s.nb % LANES == 0:
        return s
    nv = -(-s.nb // LANES) * LANES // s.lanes
    regs = 32 if info.avx512 else 16
    return DenseSchedule(lanes=s.lanes, nv=nv, mr=max(1, min(8, (regs - nv - 2) // nv)),
                         chunks=s.chunks, min_chunk_tiles=s.min_chunk_tiles)


def _subtiles(b0, count: int, nts: int, fn):
    """``fn(blocks)`` over the ``count`` blocks from ``b0`` in runs of ``nts`` (a run-time loop;
    a shorter static run for the rest). Emitting the runs as separate code instead costs far
    more than code size: TVM 0.27's CompactBufferAllocation is superlinear in the number of
    sibling stack buffers (30 s for a W8A8 kernel with symbolic ``m``)."""
    T = _tv()[3]
    full, rest = divmod(count, nts)
    if full == 1:
        fn([b0 + _i64(j) for j in range(nts)])
    elif full:
        with T.serial(_i64(0), _i64(full)) as sb:
            fn([b0 + sb * _i64(nts) + _i64(j) for j in range(nts)])
    if rest:
        fn([b0 + _i64(full * nts + j) for j in range(rest)])


def _msplit(m, top: int, emit):
    """``emit(MT, m0)`` over rows ``[0, m)``: chunks of ``top``, then the binary rest."""
    T = _tv()[3]
    tirx = _tv()[1]
    sizes = []
    s = top // 2
    while s:
        sizes.append(s)
        s //= 2
    if isinstance(m, int):
        c, r = divmod(m, top)
        if c == 1:
            emit(top, _i64(0))
        elif c:
            with T.serial(_i64(0), _i64(c)) as it:
                emit(top, it * _i64(top))
        base = c * top
        for sz in sizes:
            if r & sz:
                emit(sz, _i64(base))
                base += sz
        return
    with T.serial(_i64(0), tirx.floordiv(m, _i64(top))) as it:
        emit(top, it * _i64(top))
    r = tirx.floormod(m, _i64(top))
    base = m - r
    for sz in sizes:
        with T.If(tirx.floormod(tirx.floordiv(r, _i64(sz)), _i64(2)) == _i64(1)):
            with T.Then():
                emit(sz, base + tirx.floordiv(r, _i64(2 * sz)) * _i64(2 * sz))


def _rows(m, body):
    """``body(i)`` for the rows ``i < m`` of a per-row pre-pass: a serial loop for few rows
    (a parallel launch costs more than the work), parallel from ``GEMM_MIN_M`` rows on."""
    T = _tv()[3]

    def serial():
        with T.serial(_i64(0), _i64(m)) as i:
            body(i)

    def parallel():
        with T.parallel(_i64(0), _i64(m)) as i:
            body(i)
    if isinstance(m, int):
        (serial if m < GEMM_MIN_M else parallel)()
        return
    with T.If(m < _i64(GEMM_MIN_M)):
        with T.Then():
            serial()
        with T.Else():
            parallel()


def _group_sums(plan: _Plan, m, X, XS):
    """``XS[i, g] = Σ_{k in group g} x[i, k]`` (asymmetric weights only), 16 lanes at a time."""
    T = _tv()[3]
    tirx = _tv()[1]

    def row(i):
        for g0, cnt, ncodes in plan.segments():
            nv, rest = divmod(ncodes, LANES)

            def group(gi):
                k0 = gi * _i64(plan.g)
                acc = _vec("float32")
                _set(acc, _bc(_c(0.0, "float32")))
                if nv:
                    with T.serial(_i64(0), _i64(nv)) as v:
                        ramp = tirx.Ramp(k0 + v * _i64(LANES), _i64(1), LANES)
                        _set(acc, _get(acc) + X[i, ramp])
                tot = acc[_i64(0)]
                for j in range(1, LANES):
                    tot = tot + acc[_i64(j)]
                for j in range(rest):
                    tot = tot + X[i, k0 + _i64(nv * LANES + j)]
                T.buffer_store(XS, tot, [i, gi])
            if cnt == 1:
                group(_i64(g0))
            else:
                with T.serial(_i64(g0), _i64(g0 + cnt)) as gi:
                    group(gi)
    _rows(m, row)


def _weight_only(name, m, n, k, plan: _Plan, mode: str, bias: bool, zeros: bool):
    if isinstance(m, int) and m < 1 or n < 1 or k < 1:
        raise ValueError(f"{name} needs m, n, k >= 1, got {m}, {n}, {k}")
    T = _tv()[3]

    def build():
        X = _buf("x", (m, k), "float32")
        qdt = "uint32" if plan.bits < 8 else (
            "uint8" if plan.kind == "int" and plan.asym else "int8")
        Q = _buf("qweight", plan.qshape(), qdt)
        S = _buf("scales", (plan.nb, plan.ng, LANES), "float32" if plan.kind == "int" else "uint8")
        Z = _buf("zeros", (plan.nb, plan.ng, LANES), "float32") if zeros else None
        B = _buf("bias", (n,), "float32") if bias else None
        Y = _buf("y", (m, n), "float32")
        if plan.bits in (2, 4):  # the same words as bytes (the loads at byte offsets)
            plan.QB = T.decl_buffer((_i64(plan.nb * (plan.kw + 1) * 4 * LANES),), "uint8",
                                    data=Q.data)
        em = _WeightOnly(plan, m, X, Q, S, Z, B, Y, None)

        def gemv():
            if zeros or plan.raw:  # the group sums of x, for the GEMV's zero-point term
                em.XS = T.alloc_buffer((_i64(m), _i64(plan.ng)), "float32", scope="global")
                _group_sums(plan, m, X, em.XS)
            em.nest(em.gemv_body, 8, m)
        gemm = em.gemm
        if mode == "gemv":
            gemv()
        elif mode == "gemm":
            gemm()
        elif isinstance(m, int):
            (gemv if m < GEMM_MIN_M else gemm)()
        else:
            with T.If(m < _i64(GEMM_MIN_M)):
                with T.Then():
                    gemv()
                with T.Else():
                    gemm()
    return _func(name, build)


def _int_plan(n, k, bits, group, asym, info):
    if bits not in _KPW:
        raise ValueError(f"dequant kernels support 2, 3, 4 and 8 bits, got {bits}")
    return _Plan(n, k, kind="int", bits=bits, group=group, asym=asym, info=info)


def dequant_matmul(m, n: int, k: int, *, bits: int, group: int | None, asym: bool,
                   bias: bool = False, info):
    """``y = x · dequant(W)ᵀ (+ bias)`` for integer weights packed by :func:`pack_int_weight`.

    Arguments ``(x[m, k] f32, qweight, scales, [zeros if asym], [bias[n] f32], y[m, n] f32)``.
    ``group``: codes per scale along K (32, 64, 128, …) or ``None`` (per channel).
    Runs the GEMV schedule for ``m < GEMM_MIN_M`` and the GEMM schedule otherwise (a run-time
    branch when ``m`` is symbolic); both are correct for every ``m``."""
    plan = _int_plan(n, k, bits, group, asym, info)
    return _weight_only(f"dequant_w{bits}", m, n, k, plan, "auto", bias, asym)


def dequant_gemv(m, n: int, k: int, *, bits: int, group: int | None, asym: bool,
                 bias: bool = False, info):
    """:func:`dequant_matmul` with the GEMV schedule only (fastest for ``m ≤ 8``)."""
    plan = _int_plan(n, k, bits, group, asym, info)
    return _weight_only(f"dequant_gemv_w{bits}", m, n, k, plan, "gemv", bias, asym)


def dequant_gemm(m, n: int, k: int, *, bits: int, group: int | None, asym: bool,
                 bias: bool = False, info):
    """:func:`dequant_matmul` with the GEMM schedule only (for ``m ≥ GEMM_MIN_M``)."""
    plan = _int_plan(n, k, bits, group, asym, info)
    return _weight_only(f"dequant_gemm_w{bits}", m, n, k, plan, "gemm", bias, asym)


def mx_dequant_matmul(m, n: int, k: int, *, fmt: str, bias: bool = False, info,
                      mode: str = "auto"):
    """``y = x · dequant(W)ᵀ (+ bias)`` for MXFP4 / MXINT8 weights packed by
    :func:`pack_mx_weight`; arguments ``(x[m, k] f32, qweight, scales u8, [bias], y[m, n])``.
    ``k`` is the activation width (the codes may be padded to a multiple of 32)."""
    fmt = fmt.lower()
    if fmt not in MX_FORMATS:
        raise ValueError(f"mx_dequant_matmul supports {list(MX_FORMATS)}, got {fmt!r}")
    bits, off = MX_FORMATS[fmt]
    plan = _Plan(n, k, kind=fmt, bits=bits, group=32, asym=False, info=info, mx_off=off)
    return _weight_only(f"dequant_{fmt}", m, n, k, plan, mode, bias, False)


# -- W8A8 --------------------------------------------------------------------------------------
def int8_matmul(m, n: int, k: int, *, bias: bool = False, info, out_dtype: str = "float32"):
    """W8A8: ``y = (Σ_k q_x·q_w) · s_x · s_w + bias`` with ``q_x`` the dynamic per-token int8
    quantization of ``x`` (``s_x = max|x_row| / 127``, round half to even, clamp to
    [-128, 127]; what the interpreter's ``int8 per_token`` fake-quant computes).

    Arguments ``(x[m, k] f32, w, wsum, wscale, [bias[n] f32], y[m, n])`` with the arrays of
    :func:`pack_int8_weight`. ``out_dtype="int32"`` writes the exact int32 sums ``Σ q_x·q_w``
    instead (for checking; bias is then not allowed)."""
    if isinstance(m, int) and m < 1 or n < 1 or k < 1:
        raise ValueError(f"int8_matmul needs m, n, k >= 1, got {m}, {n}, {k}")
    if out_dtype not in ("float32", "int32"):
        raise ValueError(f"out_dtype must be float32 or int32, got {out_dtype!r}")
    if out_dtype == "int32" and bias:
        raise ValueError("the int32 output is the raw sum: no bias")
    x86 = _is_x86(info)
    path = "vnni" if info.vnni and x86 else ("avx2" if x86 and info.vector_bits >= 256
                                              else "generic")
    nb, k4 = -(-n // LANES), -(-k // 4)
    T = _tv()[3]

    def build():
        X = _buf("x", (m, k), "float32")
        W = _buf("w", (nb, k4, 4 * LANES), "int8")
        WS = _buf("wsum", (nb * LANES,), "int32")
        SC = _buf("wscale", (nb * LANES,), "float32")
        B = _buf("bias", (n,), "float32") if bias else None
        Y = _buf("y", (m, n), out_dtype)
        xdt = "uint8" if path == "vnni" else "int8"
        # the quantized rows, written as bytes, read as one int32 per 4 of them
        XW = T.alloc_buffer((_i64(m), _i64(k4)), "int32", scope="global")
        XQ = T.decl_buffer((_i64(m), _i64(k4 * 4)), xdt, data=XW.data)
        SX = T.alloc_buffer((_i64(m),), "float32", scope="global")
        _quantize_rows(m, k, k4, X, XQ, SX, path == "vnni")
        _int8_nest(m, n, nb, k4, path, info, W, WS, SC, B, Y, XW, SX, out_dtype)
    return _func(f"int8_matmul_{path}", build)


def _quantize_rows(m, k, k4, X, XQ, SX, offset: bool):
    """Per row: ``s = max|x| / 127``; ``q = clamp(rne(x / s), -128, 127)`` (``x / 1`` when
    ``s`` is 0 or not finite, as ``safe_div``), stored ``+128`` as uint8 when ``offset``."""
    T = _tv()[3]
    tirx = _tv()[1]
    nv, rem = divmod(k, LANES)

    def row(i):
        mx = _vec("float32")
        _set(mx, _bc(_c(0.0, "float32")))
        if nv:
            with T.serial(_i64(0), _i64(nv)) as v:
                xv = X[i, tirx.Ramp(v * _i64(LANES), _i64(1), LANES)]
                _set(mx, tirx.max(_get(mx), tirx.abs(xv)))
        amax = _vec("float32", 1)
        T.buffer_store(amax, _c(0.0, "float32"), [_i64(0)])
        for j in range(LANES):
            T.buffer_store(amax, tirx.max(amax[_i64(0)], mx[_i64(j)]), [_i64(0)])
        for j in range(rem):
            T.buffer_store(amax, tirx.max(amax[_i64(0)], tirx.abs(X[i, _i64(nv * LANES + j)])),
                           [_i64(0)])
        s = amax[_i64(0)] / _c(127.0, "float32")
        T.buffer_store(SX, s, [i])
        ok = tirx.all(s != _c(0.0, "float32"), s < _c(float("inf"), "float32"))
        sd = tirx.Select(ok, s, _c(1.0, "float32"))
        dt = "uint8" if offset else "int8"

        def q(xv, lanes):
            f = (lambda c: _bc(_c(c, "float32"), lanes)) if lanes > 1 else (
                lambda c: _c(c, "float32"))
            r = tirx.nearbyint(xv / (_bc(sd, lanes) if lanes > 1 else sd))
            r = tirx.min(tirx.max(r, f(-128.0)), f(127.0))
            it = f"int32x{lanes}" if lanes > 1 else "int32"
            qi = tirx.Cast(it, r)
            if offset:
                qi = qi + (_bc(_c(128, "int32"), lanes) if lanes > 1 else _c(128, "int32"))
            return tirx.Cast(f"{dt}x{lanes}" if lanes > 1 else dt, qi)

        if nv:
            with T.serial(_i64(0), _i64(nv)) as v:
                ramp = tirx.Ramp(v * _i64(LANES), _i64(1), LANES)
                T.buffer_store(XQ, q(X[i, ramp], LANES), [i, ramp])
        for j in range(rem):
            kk = _i64(nv * LANES + j)
            T.buffer_store(XQ, q(X[i, kk], 1), [i, kk])
        for j in range(k, k4 * 4):  # padding: the code of 0
            T.buffer_store(XQ, _c(128 if offset else 0, dt), [i, _i64(j)])
    _rows(m, row)


def _int8_nest(m, n, nb, k4, path, info, W, WS, SC, B, Y, XW, SX, out_dtype):
    T = _tv()[3]
    tirx = _tv()[1]
    tile = _tile(nb, info)
    ntiles, rem = divmod(nb, tile)
    pairs = 8 if info.avx512 else 4  # MT·NTs int32 accumulators
    unroll = 4 if k4 % 4 == 0 else (2 if k4 % 2 == 0 else 1)

    def xword(mrow, kq):
        """The 4 activation bytes of ``k = 4kq … 4kq+3`` as one int32."""
        return XW[mrow, kq]

    def dot(acc, xw, b, kq):
        if path == "vnni":
            # LLVM ≥ 20 declares the byte operands <64 x i8> (TVM's own dot_16x4_vnni
            # intrinsic still passes <16 x i32> and no longer verifies)
            wv = W[b, kq, tirx.Ramp(_i64(0), _i64(1), 64)]
            return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512",
                                              acc, tirx.reinterpret("int8x64", _bc(xw)), wv)
        if path == "avx2":
            halves = []
            xb = tirx.reinterpret("int8x32", _bc(xw, 8))
            for h in range(2):
                wv = W[b, kq, tirx.Ramp(_i64(h * 32), _i64(1), 32)]
                sx = tirx.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", xb, wv)
                aw = tirx.abs(wv)
                p16 = tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw",
                                                 tirx.reinterpret("uint8x32", aw), sx)
                halves.append(tirx.call_llvm_pure_intrin(
                    "int32x8", "llvm.x86.avx2.pmadd.wd", p16, _bc(_c(1, "int16"), 16)))
            return acc + tirx.Shuffle(halves, list(range(16)))
        out = acc
        xb = tirx.reinterpret("int8x4", xw)
        for kk in range(4):
            xe = tirx.Cast("int32", tirx.Shuffle([xb], [kk]))
            wv = tirx.Cast("int32x16", W[b, kq, tirx.Ramp(_i64(kk), _i64(4), LANES)])
            out = out + _bc(xe) * wv
        return out

    def body(MT, m0, b0, count):
        _subtiles(b0, count, max(1, pairs // MT), lambda bl: blocks(MT, m0, bl))

    def blocks(MT, m0, bl):
        acc = [[_vec("int32") for _ in bl] for _ in range(MT)]
        for row in acc:
            for a in row:
                _set(a, _bc(_c(0, "int32")))

        def step(kq):
            xw = [xword(m0 + _i64(mt), kq) for mt in range(MT)]
            for j, b in enumerate(bl):
                for mt in range(MT):
                    _set(acc[mt][j], dot(_get(acc[mt][j]), xw[mt], b, kq))
        with T.serial(_i64(0), _i64(k4 // unroll)) as it:
            for u in range(unroll):
                step(it * _i64(unroll) + _i64(u))
        for mt in range(MT):
            mrow = m0 + _i64(mt)
            for j, b in enumerate(bl):
                cols = tirx.Ramp(b * _i64(LANES), _i64(1), LANES)
                a = _get(acc[mt][j])
                if path == "vnni":
                    a = a - WS[cols] * _bc(_c(128, "int32"))
                if out_dtype == "int32":
                    v = a
                else:
                    v = tirx.Cast("float32x16", a) * _bc(SX[mrow]) * SC[cols]
                    if B is not None:
                        v = v + _bias_vec(B, b, n)
                _store_row(Y, mrow, b, v, n, nb)

    rows = lambda b0, cnt: _msplit(m, 8, lambda mt, m0: body(mt, m0, b0, cnt))  # noqa: E731
    with T.parallel(_i64(0), _i64(ntiles + (1 if rem else 0))) as t:
        if not rem:
            rows(t * _i64(tile), tile)
        else:
            with T.If(t < _i64(ntiles)):
                with T.Then():
                    rows(t * _i64(tile), tile)
                with T.Else():
                    rows(_i64(ntiles * tile), rem)


def _bias_vec(B, b, n):
    """``bias[16b : 16b+16]`` (zeros past ``n``: the bias buffer has ``n`` entries)."""
    tirx = _tv()[1]
    if n % LANES == 0:
        return B[tirx.Ramp(b * _i64(LANES), _i64(1), LANES)]
    cols = tirx.Ramp(b * _i64(LANES), _i64(1), LANES)
    idx = tirx.min(cols, _bc(_i64(n - 1)))
    return B[idx]


def _store_row(Y, mrow, b, v, n, nb):
    """``y[mrow, 16b : 16b+16] = v``; the last block keeps to the ``n`` columns of ``y``."""
    T = _tv()[3]
    tirx = _tv()[1]
    rem = n % LANES
    cols = tirx.Ramp(b * _i64(LANES), _i64(1), LANES)
    if not rem:
        T.buffer_store(Y, v, [mrow, cols])
        return
    tmp = _vec(str(v.ty.dtype).split("x")[0])
    with T.If(b == _i64(nb - 1)):
        with T.Then():
            _set(tmp, v)
            for j in range(rem):
                T.buffer_store(Y, tmp[_i64(j)], [mrow, b * _i64(LANES) + _i64(j)])
        with T.Else():
            T.buffer_store(Y, v, [mrow, cols])
