"""The quantized linear kernels of the cpu target (``backends/tvm/kernels/quant.py``) against
the formats' own fake quantization: weight-only integer (2/3/4/8 bits, symmetric and
asymmetric, groups and per channel), MX (MXFP4, MXINT8) and W8A8 (bit-exact int32 sums), with a
symbolic row count, on the host CPU and on an AVX2 (haswell) build. The weight-only GEMM path
(m >= GEMM_MIN_M) is checked bit for bit: it is the fp32 FMA chain, in k order, over the
fake-quant weight, then + bias."""
from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from qcompile import formats as F  # noqa: E402
from qcompile.backends.tvm.kernels import quant as Q  # noqa: E402
from qcompile.backends.tvm.target import CpuInfo, cpu_target, host_cpu  # noqa: E402

# GEMV chunks 1, 4, 8; GEMM 16, 33 (one row chunk, a 3-row leftover tile), 1024 (MiniLM's
# batch 8 x seq 128: a chunk per core) and 1029 (chunks of 516 and 513 rows, leftovers)
MS = (1, 4, 8, 16, 33, 1024, 1029)
HOST = cpu_target()
AVX2 = cpu_target("haswell")


def _info(target):
    return host_cpu(target)


def _build(fn, target):
    return tvm.compile(tvm.IRModule({"main": fn}), target=target)


def _run(ex, arrays, out_shape, dtype=np.float32):
    ts = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    ts.append(tvm.runtime.tensor(np.zeros(out_shape, dtype)))
    ex(*ts)
    return torch.from_numpy(ts[-1].numpy())


def _close(y, ref, tol=1e-5):
    """Within ``tol`` of the reference, relative to its largest entry (fp32 sums of K products
    in another order differ by ~1e-7 of that)."""
    err = float((y.double() - ref.double()).abs().max() / ref.double().abs().max())
    assert err <= tol, f"max error {err:.2e} > {tol:g} of max |ref|"


def _fma_chain(x, w, bias=None):
    """``y[i, j] = fma(x[i, K-1], w[j, K-1], … fma(x[i, 0], w[j, 0], 0)) (+ bias[j])`` in fp32,
    each FMA emulated exactly: the fp64 product of two floats is exact, the fp64 sum is rounded
    to odd (TwoSum tells whether it was exact), and from there the rounding to fp32 is correct."""
    x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    acc = np.zeros((x.shape[0], w.shape[0]), np.float32)
    for kk in range(x.shape[1]):
        a = acc.astype(np.float64)
        p = x64[:, kk, None] * w64[None, :, kk]
        s = a + p
        bb = s - a
        e = (a - (s - bb)) + (p - bb)
        fix = (e != 0) & ((s.view(np.int64) & 1) == 0)
        s[fix] = np.nextafter(s[fix], np.where(e[fix] > 0, np.inf, -np.inf))
        acc = s.astype(np.float32)
    return torch.from_numpy(acc if bias is None else acc + np.asarray(bias, np.float32))


def _exact(y, x, wdq, bias=None):
    ref = _fma_chain(x, wdq, bias)
    bad = int((y != ref).sum())
    assert bad == 0, f"{bad} of {ref.numel()} outputs differ from the fp32 FMA chain"


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


@pytest.mark.parametrize("name,bits,group,n,k,bias", INT_CASES,
                         ids=[f"{c[0]}-g{c[2] or 'ch'}-n{c[3]}-k{c[4]}{'-bias' if c[5] else ''}"
                              for c in INT_CASES])
def test_int_dequant_matmul(name, bits, group, n, k, bias):
    fmt = _int_format(name, group)
    w = _weights(n, k)
    qt = fmt.quantize(w)
    asym = "zero_point" in qt.params
    pk = Q.pack_int_weight(qt.codes, qt.params["scale"], qt.params.get("zero_point"), bits)
    assert set(pk) == {"qweight", "scales"} | ({"zeros"} if asym else set())
    ex = _build(Q.dequant_matmul(_sym_m(), n, k, bits=bits, group=group, asym=asym, bias=bias,
                                 info=_info(HOST)), HOST)
    wdq = fmt.fake_quant(w)
    b = torch.randn(n, generator=torch.Generator().manual_seed(5))
    consts = [pk[a] for a in Q.INT_ARGS if a in pk] + ([b.numpy()] if bias else [])
    first = (name, bits, group, n, k, bias) == INT_CASES[0]
    for m in MS:
        x = _acts(m, k)
        ref = x @ wdq.T + (b if bias else 0)
        y = _run(ex, [x.numpy(), *consts], (m, n))
        _close(y, ref)
        # the GEMM bit for bit; at 1029 rows (the emulation is slow) for the first case only,
        # on the columns from 60: the last of the first 64-column panel and the partial last one
        if m == 33:
            _exact(y, x, wdq, b if bias else None)
        elif m == 1029 and first:
            _exact(y[:, 60:], x, wdq[60:], b[60:] if bias else None)


def test_gemv_and_gemm_alone_are_correct_for_any_m():
    """Each schedule on its own is exact for every m (the dispatch only picks the faster)."""
    n, k = 64, 256
    fmt = _int_format("uint4", 64)
    w = _weights(n, k)
    qt = fmt.quantize(w)
    pk = Q.pack_int_weight(qt.codes, qt.params["scale"], qt.params["zero_point"], 4)
    wdq = fmt.fake_quant(w)
    for builder in (Q.dequant_gemv, Q.dequant_gemm):
        ex = _build(builder(_sym_m(), n, k, bits=4, group=64, asym=True, info=_info(HOST)), HOST)
        for m in (3, 17):
            x = _acts(m, k)
            y = _run(ex, [x.numpy(), pk["qweight"], pk["scales"], pk["zeros"]], (m, n))
            _close(y, x @ wdq.T)
            if builder is Q.dequant_gemm:
                _exact(y, x, wdq)


def test_static_m():
    n, k = 32, 128
    fmt = _int_format("int4", 32)
    w = _weights(n, k)
    qt = fmt.quantize(w)
    pk = Q.pack_int_weight(qt.codes, qt.params["scale"], None, 4)
    wdq = fmt.fake_quant(w)
    for m in (2, 19, 1029):
        ex = _build(Q.dequant_matmul(m, n, k, bits=4, group=32, asym=False, info=_info(HOST)),
                    HOST)
        x = _acts(m, k)
        y = _run(ex, [x.numpy(), pk["qweight"], pk["scales"]], (m, n))
        _close(y, x @ wdq.T)
        if m >= Q.GEMM_MIN_M:
            _exact(y, x, wdq)


AVX2_CASES = [("uint4", 4, 32), ("int4", 4, None), ("int3", 3, 32), ("uint2", 2, 128)]


@pytest.mark.parametrize("name,bits,group", AVX2_CASES,
                         ids=[f"{c[0]}-g{c[2] or 'ch'}" for c in AVX2_CASES])
def test_int_avx2_build(name, bits, group):
    """The AVX2 schedule: no vpermps table, the codes masked, converted and kept raw, the
    zero point (or the offset of symmetric codes) taken out per group with the sums of x."""
    n, k = 48, 384
    fmt = _int_format(name, group)
    w = _weights(n, k)
    qt = fmt.quantize(w)
    asym = "zero_point" in qt.params
    pk = Q.pack_int_weight(qt.codes, qt.params["scale"], qt.params.get("zero_point"), bits)
    info = _info(AVX2)
    assert not info.avx512
    ex = _build(Q.dequant_matmul(_sym_m(), n, k, bits=bits, group=group, asym=asym, bias=True,
                                 info=info), AVX2)
    b = torch.randn(n)
    consts = [pk[a] for a in Q.INT_ARGS if a in pk] + [b.numpy()]
    wdq = fmt.fake_quant(w)
    for m in (1, 5, 16, 1029):
        x = _acts(m, k)
        y = _run(ex, [x.numpy(), *consts], (m, n))
        _close(y, x @ wdq.T + b)
        if m == 16:  # the GEMM, 16-float panels (one block)
            _exact(y, x, wdq, b)


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
        Q.dequant_matmul(1, 16, 128, bits=3, group=16, asym=False, info=_info(HOST))


# -- MX ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt_name", ["mxfp4", "mxint8"])
def test_mx_dequant_matmul(fmt_name):
    n, k = 80, 384
    fmt = F.get(fmt_name)
    w = _weights(n, k)
    w[7] = 0  # all-zero blocks: the smallest scale, 2^-127 (a subnormal)
    qt = fmt.quantize(w)
    pk = Q.pack_mx_weight(qt.codes, qt.params["scale"], fmt_name)
    ex = _build(Q.mx_dequant_matmul(_sym_m(), n, k, fmt=fmt_name, bias=True, info=_info(HOST)),
                HOST)
    wdq = fmt.fake_quant(w)
    b = torch.randn(n)
    for m in MS:
        x = _acts(m, k)
        y = _run(ex, [x.numpy(), pk["qweight"], pk["scales"], b.numpy()], (m, n))
        _close(y, x @ wdq.T + b)
        if m == 33:
            _exact(y, x, wdq, b)
    # the E8M0 NaN scale makes its rows NaN, as the format decodes it
    s = pk["scales"].copy()
    s[0, 2, 5] = 255  # row 5, block 2
    y = _run(ex, [_acts(2, k).numpy(), pk["qweight"], s, b.numpy()], (2, n))
    assert torch.isnan(y[:, 5]).all() and not torch.isnan(y[:, 4]).any()


def test_mxfp4_avx2_build():
    n, k = 32, 256
    fmt = F.get("mxfp4")
    w = _weights(n, k)
    qt = fmt.quantize(w)
    pk = Q.pack_mx_weight(qt.codes, qt.params["scale"], "mxfp4")
    ex = _build(Q.mx_dequant_matmul(_sym_m(), n, k, fmt="mxfp4", info=_info(AVX2)), AVX2)
    for m in (1, 16, 1029):
        x = _acts(m, k)
        _close(_run(ex, [x.numpy(), pk["qweight"], pk["scales"]], (m, n)), x @ fmt.fake_quant(w).T)


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
    per_token`` codes times the weight codes); the float output (bias added) within fp32
    rounding of the fake-quant matmul."""
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
            _close(yf, af.fake_quant(x) @ wf.fake_quant(w).T + b)


def test_w8a8_host():
    _w8a8_check(HOST, _info(HOST))


def test_w8a8_avx2():
    info = _info(AVX2)
    assert not info.vnni
    _w8a8_check(AVX2, info, ms=(1, 5, 16), floats=False)


def test_w8a8_generic_fallback():
    """Plain int32 TIR (the path of CPUs without AVX2, e.g. aarch64), run here on x86."""
    info = CpuInfo("generic", 2, 128, False, False, False, "aarch64-linux-gnu")
    _w8a8_check(AVX2, info, n=32, k=64, m=3)


def test_pack_int8_layout():
    codes = torch.arange(-64, 64, dtype=torch.int8).reshape(2, 64)
    pk = Q.pack_int8_weight(codes, torch.tensor([0.5, 2.0]))
    assert pk["w"].shape == (1, 16, 64)
    assert list(pk["w"][0, 3, 4:8]) == list(codes[1, 12:16].numpy())  # row 1, k = 12..15
    assert pk["wsum"][:2].tolist() == codes.long().sum(1).tolist()
    assert pk["wscale"][:3].tolist() == [0.5, 2.0, 0.0]
