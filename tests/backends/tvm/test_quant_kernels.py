"""The quantized linear kernels of the cpu target (``backends/tvm/kernels/quant.py``) against
the formats' own fake quantization: weight-only integer (2/3/4/8 bits, symmetric and
asymmetric, groups and per channel), MX (MXFP4, MXINT8) and W8A8 (bit-exact int32 sums), with a
symbolic row count, once per instruction-set level this host supports (``isa_level``: the
portable 128-bit build, AVX2 and AVX-512 where present), so each schedule — the ``vpermps``
table, the raw-code AVX2 path, plain int32 W8A8 — is checked wherever the suite runs.

The weight-only GEMM path (m >= GEMM_MIN_M) is checked bit for bit: it is the fp32
multiply-add chain, in k order, over the fake-quant weight, then + bias — fused (one rounding
per step) where the build has FMA, a multiply and an add (two) where it has not. Everything
else is checked against a float64 reference within an error bound derived from the
arithmetic the kernel does (:mod:`._bounds`), elementwise."""
from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from qcompile import formats as F  # noqa: E402
from qcompile.backends.tvm.kernels import quant as Q  # noqa: E402
from qcompile.backends.tvm.target import CpuInfo, cpu_target, host_cpu, target_features  # noqa: E402

from ._bounds import U32, assert_within, dot_abs, fp32_dot_bound, gamma  # noqa: E402

# GEMV chunks 1, 4, 8; GEMM 16, 33 (one row chunk, a 3-row leftover tile), 1024 (MiniLM's
# batch 8 x seq 128: a chunk per core) and 1029 (chunks of 516 and 513 rows, leftovers)
MS = (1, 4, 8, 16, 33, 1024, 1029)


@pytest.fixture
def host(isa_level):
    """``(target, CpuInfo)`` of the host CPU capped at ``isa_level``."""
    t = cpu_target()
    return t, host_cpu(t)


def _build(fn, target):
    return tvm.compile(tvm.IRModule({"main": fn}), target=target)


def _run(ex, arrays, out_shape, dtype=np.float32):
    ts = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    ts.append(tvm.runtime.tensor(np.zeros(out_shape, dtype)))
    ex(*ts)
    return torch.from_numpy(ts[-1].numpy())


def _ref(x, wdq, bias=None):
    """``x @ wdqᵀ (+ bias)`` in float64 from the fp32 operands (error ~2^-53: negligible)."""
    y = x.double() @ wdq.double().T
    return y if bias is None else y + bias.double()


def _chain(x, w, bias=None, *, fused: bool):
    """``y[i, j]`` = the fp32 chain ``acc = acc + x[i, k]·w[j, k]`` over ``k = 0 … K-1`` from 0
    (+ bias[j] last). ``fused``: each step one FMA, emulated exactly (the fp64 product of two
    floats is exact, the fp64 sum is rounded to odd — TwoSum tells whether it was exact — and
    from there the rounding to fp32 is correct); otherwise the product is rounded to fp32 and
    then the sum (SSE: ``mulps`` + ``addps``)."""
    x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    acc = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for kk in range(x.shape[1]):
        if not fused:
            acc = acc + x[:, kk, None] * w[None, :, kk]  # float32 ops: two roundings
            continue
        a = acc.astype(np.float64)
        p = x64[:, kk, None] * w64[None, :, kk]
        s = a + p
        bb = s - a
        e = (a - (s - bb)) + (p - bb)
        fix = (e != 0) & ((s.view(np.int64) & 1) == 0)
        s[fix] = np.nextafter(s[fix], np.where(e[fix] > 0, np.inf, -np.inf))
        acc = s.astype(np.float32)
    return torch.from_numpy(acc if bias is None else acc + np.asarray(bias, np.float32))


def _exact(y, x, wdq, target, bias=None):
    fused = "fma" in target_features(target)
    ref = _chain(x, wdq, bias, fused=fused)
    bad = int((y != ref).sum())
    assert bad == 0, (f"{bad} of {ref.numel()} outputs differ from the fp32 "
                      f"{'FMA' if fused else 'multiply-add'} chain")


def _gemv_bound(x, vs, zs, group: int, bias, wdq):
    """Bound on the GEMV schedule's error: it computes ``y = Σ_g s_g·(Σ_{k∈g} x_k·v_k +
    zc_g·Σ_{k∈g} x_k) (+ bias)`` — ``v`` the values its decode yields (centred codes, MX element
    values, or on the raw path the raw codes with ``zc`` taking out the offset), ``s``, ``zc``
    exact fp32. Each term passes through at most G − 1 additions in its group sum (of ``x·v``,
    or of ``x`` for ``Σx``), one multiply (by ``v`` or ``zc``), one add of the two, one multiply
    by ``s``, ng additions across groups and one of the bias: γ_{G+ng+4} of ``Σ_g |s_g|·(Σ_k
    |x_k|·|v_k| + |zc_g|·Σ_k |x_k|) + |bias|`` (Higham §3.1). The raw path's terms are larger than
    the centred ones (|v| up to 2^b − 1 and |zc|·Σ|x| both cancel in the exact result): that is
    the AVX2 error issue 15 saw. The reference multiplies by the fake-quant weight
    ``fl(v_c·s)``, not by ``s`` after the sum: one more ``u·Σ|x|·|wdq|``.

    ``vs[n, K] = |v|·|s|`` (the scale of each k's group), ``zs[n, ng] = |zc|·|s|``."""
    xa = np.abs(x.double().numpy())
    m, k = xa.shape
    ng = zs.shape[1]
    xg = np.zeros((m, ng))
    for g in range(ng):
        xg[:, g] = xa[:, g * group:(g + 1) * group].sum(1)
    terms = xa @ vs.T + xg @ zs.T
    if bias is not None:
        terms = terms + np.abs(bias.double().numpy())[None]
    return gamma(group + ng + 4) * terms + U32 * dot_abs(x, wdq)


def _int_terms(qt, bits, asym, raw, k):
    """``(|v|·|s| [n, K], |zc|·|s| [n, ng], group)`` of the GEMV over integer codes, as the
    kernel decodes them: centred ``v = q − 2^(b−1)·asym``, ``zc = 2^(b−1) − z`` (asymmetric) or
    none; on the raw path (no ``vpermps`` table, below AVX-512) ``v = q + 2^(b−1)·sym`` and
    ``zc = −z`` or ``−2^(b−1)``."""
    q = qt.codes.double().numpy()
    s = np.abs(qt.params["scale"].double().numpy().reshape(q.shape[0], -1))
    ng = s.shape[1]
    group = -(-k // ng)
    off = float(1 << (bits - 1))
    z = qt.params["zero_point"].double().numpy().reshape(s.shape) if asym else 0.0 * s
    if raw:
        v, zc = (q, -z) if asym else (q + off, -off + 0 * s)
    else:
        v, zc = (q - off, off - z) if asym else (q, 0 * s)
    sk = np.repeat(s, group, axis=1)[:, :k]
    return np.abs(v) * sk, np.abs(zc) * s, group


def _sym_m():
    return tvm.tirx.Var("m", "int64")


def _weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[3] *= 40  # one large row: its own scales
    return w


def _acts(m, k, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed + m))


# -- weight-only integer -----------------------------------------------------------------------
INT_CASES = [  # (registry name, bits, group or None = per channel, n, k, bias)
    ("int4", 4, 128, 100, 384, True),    # partial last block of rows, n % 16 != 0
    ("uint4", 4, 32, 128, 1536, False),
    ("int4", 4, None, 128, 384, True),   # per channel
    ("int2", 2, 32, 128, 384, False),
    ("uint2", 2, 128, 64, 1536, True),
    ("int3", 3, 128, 128, 384, True),    # K not a multiple of the 512-code word group
    ("uint3", 3, 32, 48, 384, False),
    ("int8", 8, 128, 128, 384, True),
    ("uint8", 8, None, 128, 384, False),
]


def _int_format(name, group):
    opts = {"group_size": group} if group else {"granularity": "per_channel"}
    return F.get(name, **opts)


def _int_case(name, bits, group, n, k, info):
    """Weight, quantized tensor, packed arrays, fake-quant weight and the GEMV's bound terms."""
    fmt = _int_format(name, group)
    w = _weights(n, k)
    qt = fmt.quantize(w)
    asym = "zero_point" in qt.params
    pk = Q.pack_int_weight(qt.codes, qt.params["scale"], qt.params.get("zero_point"), bits)
    raw = Q._int_plan(n, k, bits, group, asym, info).raw
    return asym, pk, fmt.fake_quant(w), _int_terms(qt, bits, asym, raw, k)


def _check(y, x, wdq, b, m, terms, what):
    """Within the bound of the schedule ``dequant_matmul`` runs for ``m`` rows."""
    ref = _ref(x, wdq, b)
    if m < Q.GEMM_MIN_M:
        bound = _gemv_bound(x, *terms, b, wdq)
    else:  # the decoded weight is wdq exactly (the bit-exact checks): a K-term dot + bias
        bound = fp32_dot_bound(x, wdq, b)
    assert_within(y, ref, bound, f"{what} m={m}")


@pytest.mark.parametrize("name,bits,group,n,k,bias", INT_CASES,
                         ids=[f"{c[0]}-g{c[2] or 'ch'}-n{c[3]}-k{c[4]}{'-bias' if c[5] else ''}"
                              for c in INT_CASES])
def test_int_dequant_matmul(host, name, bits, group, n, k, bias):
    target, info = host
    asym, pk, wdq, terms = _int_case(name, bits, group, n, k, info)
    assert set(pk) == {"qweight", "scales"} | ({"zeros"} if asym else set())
    ex = _build(Q.dequant_matmul(_sym_m(), n, k, bits=bits, group=group, asym=asym, bias=bias,
                                 info=info), target)
    b = torch.randn(n, generator=torch.Generator().manual_seed(5)) if bias else None
    consts = [pk[a] for a in Q.INT_ARGS if a in pk] + ([b.numpy()] if bias else [])
    first = (name, bits, group, n, k, bias) == INT_CASES[0]
    for m in MS:
        x = _acts(m, k)
        y = _run(ex, [x.numpy(), *consts], (m, n))
        _check(y, x, wdq, b, m, terms, name)
        # the GEMM bit for bit; at 1029 rows (the emulation is slow) for the first case only,
        # on the columns from 60: the last of the first 64-column panel and the partial last one
        if m == 33:
            _exact(y, x, wdq, target, b)
        elif m == 1029 and first:
            _exact(y[:, 60:], x, wdq[60:], target, b[60:])


def test_gemv_and_gemm_alone_are_correct_for_any_m(host):
    """Each schedule on its own is right for every m (the dispatch only picks the faster)."""
    target, info = host
    n, k = 64, 256
    asym, pk, wdq, terms = _int_case("uint4", 4, 64, n, k, info)
    for builder in (Q.dequant_gemv, Q.dequant_gemm):
        ex = _build(builder(_sym_m(), n, k, bits=4, group=64, asym=True, info=info), target)
        for m in (3, 17):
            x = _acts(m, k)
            y = _run(ex, [x.numpy(), pk["qweight"], pk["scales"], pk["zeros"]], (m, n))
            if builder is Q.dequant_gemm:
                _exact(y, x, wdq, target)
            else:
                assert_within(y, _ref(x, wdq), _gemv_bound(x, *terms, None, wdq), f"gemv m={m}")


def test_static_m(host):
    """A static row count: the GEMV (2 rows) and GEMM (19, 1029) schedules built for it. Issue
    15: the AVX2 build's GEMV missed a fixed 1e-5-of-max|ref| bound (1.75e-5) — the raw-code
    path's error is bounded by its own terms (see ``_gemv_bound``), not by the output's scale."""
    target, info = host
    n, k = 32, 128
    _, pk, wdq, terms = _int_case("int4", 4, 32, n, k, info)
    for m in (2, 19, 1029):
        ex = _build(Q.dequant_matmul(m, n, k, bits=4, group=32, asym=False, info=info), target)
        x = _acts(m, k)
        y = _run(ex, [x.numpy(), pk["qweight"], pk["scales"]], (m, n))
        _check(y, x, wdq, None, m, terms, "int4")
        if m >= Q.GEMM_MIN_M:
            _exact(y, x, wdq, target)


def test_pack_int_layout():
    """The documented layout: code i of word group q of row 16b + r at bits b·i."""
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(20, 2)  # [20, 32]
    pk = Q.pack_int_weight(codes, torch.ones(20, 1), None, 4)
    # 4 word groups + 1 zero word group (room for the kernel's unaligned byte-offset loads)
    assert pk["qweight"].shape == (2, 5, 16) and pk["qweight"].dtype == np.uint32
    assert not pk["qweight"][:, 4].any()
    word = int(pk["qweight"][1, 2, 3])  # row 19, k = 16..23
    assert [(word >> (4 * i)) & 15 for i in range(8)] == [int(c) + 8 for c in codes[19, 16:24]]
    assert pk["scales"].shape == (2, 1, 16) and pk["scales"][1, 0, 4:].sum() == 0  # padding
    assert Q.packed_bytes(pk) == pk["qweight"].nbytes + pk["scales"].nbytes


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="codes must lie"):
        Q.pack_int_weight(torch.full((4, 32), 9, dtype=torch.int8), torch.ones(4, 1), None, 4)
    with pytest.raises(ValueError, match="bits"):
        Q.pack_int_weight(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 1), None, 5)
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.dequant_matmul(1, 16, 128, bits=3, group=16, asym=False, info=host_cpu())


# -- MX ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt_name", ["mxfp4", "mxint8"])
def test_mx_dequant_matmul(host, fmt_name):
    target, info = host
    n, k = 80, 384
    fmt = F.get(fmt_name)
    w = _weights(n, k)
    w[7] = 0  # all-zero blocks: the smallest scale, 2^-127 (a subnormal)
    qt = fmt.quantize(w)
    pk = Q.pack_mx_weight(qt.codes, qt.params["scale"], fmt_name)
    ex = _build(Q.mx_dequant_matmul(_sym_m(), n, k, fmt=fmt_name, bias=True, info=info), target)
    wdq = fmt.fake_quant(w)
    # the decode is the element value times 2^e, exact: |v|·|s| = |wdq|, no zero point
    terms = (np.abs(wdq.double().numpy()), np.zeros((n, k // 32)), 32)
    b = torch.randn(n)
    for m in MS:
        x = _acts(m, k)
        y = _run(ex, [x.numpy(), pk["qweight"], pk["scales"], b.numpy()], (m, n))
        _check(y, x, wdq, b, m, terms, fmt_name)
        if m == 33:
            _exact(y, x, wdq, target, b)
    # the E8M0 NaN scale makes its rows NaN, as the format decodes it
    s = pk["scales"].copy()
    s[0, 2, 5] = 255  # row 5, block 2
    y = _run(ex, [_acts(2, k).numpy(), pk["qweight"], s, b.numpy()], (2, n))
    assert torch.isnan(y[:, 5]).all() and not torch.isnan(y[:, 4]).any()


# -- W8A8 --------------------------------------------------------------------------------------
def _w8a8_data(n, k, m):
    w = _weights(n, k)
    wf = F.get("int8", granularity="per_channel")
    qw = wf.quantize(w)
    x = _acts(m, k)
    x[0, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5])  # s = 1: ties round to even
    x[0, 5:] = 0
    if m > 2:
        x[2] = 0  # all-zero row: scale 0, codes 0
    return w, wf, qw, x


def _w8a8_check(target, info, n=100, k=390, ms=MS, m=None, floats=True):
    """int32 sums bit-exact against the integer reference (the interpreter's ``int8
    per_token`` codes times the weight codes); the float output within a K-free bound of the
    fake-quant matmul: the int32 sum is exact (and |Σ q_x·q_w| ≤ 127²·K < 2^24 converts to fp32
    exactly), then ``·s_x``, ``·s_w`` and ``+ bias`` are three roundings; the reference's operands
    ``x̂ = fl(q_x·s_x)``, ``ŵ = fl(q_w·s_w)`` are two more per term: γ_5·(|x̂|·|ŵ|ᵀ + |bias|)."""
    assert 127 * 127 * k < 2 ** 24
    mv = _sym_m() if m is None else m
    exi = _build(Q.int8_matmul(mv, n, k, info=info, out_dtype="int32"), target)
    exf = _build(Q.int8_matmul(mv, n, k, bias=True, info=info), target) if floats else None
    af = F.get("int8", granularity="per_token")
    b = torch.randn(n)
    for rows in (ms if m is None else (m,)):
        w, wf, qw, x = _w8a8_data(n, k, rows)
        pk = Q.pack_int8_weight(qw.codes, qw.params["scale"])
        consts = [pk[a] for a in Q.W8A8_ARGS]
        qx = af.quantize(x)
        exact = qx.codes.long() @ qw.codes.long().T
        yi = _run(exi, [x.numpy(), *consts], (rows, n), np.int32)
        assert torch.equal(yi.long(), exact), "int32 sums differ from the integer reference"
        if exf is not None:
            yf = _run(exf, [x.numpy(), *consts, b.numpy()], (rows, n))
            xh, wh = af.fake_quant(x), wf.fake_quant(w)
            bound = gamma(5) * (dot_abs(xh, wh) + np.abs(b.double().numpy())[None])
            assert_within(yf, _ref(xh, wh, b), bound, f"w8a8 m={rows}")


def test_w8a8(host):
    """VNNI ``vpdpbusd`` at AVX-512 (where the CPU has VNNI), ``vpmaddubsw``/``vpmaddwd`` at AVX2,
    plain int32 at the portable level."""
    target, info = host
    _w8a8_check(target, info)


def test_w8a8_generic_fallback():
    """Plain int32 TIR for a CPU that is not x86 (e.g. aarch64), run here on x86-64."""
    info = CpuInfo("generic", 2, 128, False, False, False, "aarch64-linux-gnu")
    _w8a8_check(cpu_target("x86-64"), info, n=32, k=64, m=3)


def test_pack_int8_layout():
    codes = torch.arange(-64, 64, dtype=torch.int8).reshape(2, 64)
    pk = Q.pack_int8_weight(codes, torch.tensor([0.5, 2.0]))
    assert pk["w"].shape == (1, 16, 64)
    assert list(pk["w"][0, 3, 4:8]) == list(codes[1, 12:16].numpy())  # row 1, k = 12..15
    assert pk["wsum"][:2].tolist() == codes.long().sum(1).tolist()
    assert pk["wscale"][:3].tolist() == [0.5, 2.0, 0.0]
