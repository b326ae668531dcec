"""The kernels: AVX-512 and AVX2 sparse and dense against numpy models (int8 bit-exact; bf16
bit-exact with vdpbf16ps' odd-then-even order), at every ISA level this host runs (the
``isa_level`` fixture), the emulated AMX build against the AVX-512 path, the hardware tiles
where the gate allows them, the compile-only instruction check, the gate, and the emulation's
own SDM checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompile.backends.amx import build as B
from qcompile.backends.amx import format as F
from qcompile.errors import BackendError

F32 = np.float32
needs_amx = pytest.mark.amx


def _w(n, k, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    return w


def _int8(w):
    s = (w.abs().amax(1) / 127).clamp_min(1e-8)
    return torch.round(w / s[:, None]).clamp(-128, 127).to(torch.int8), s


def bf16_model(x, sw, bias):
    """vdpbf16ps per K pair: the odd product added first, then the even one (SDM), fp32."""
    xb = F.from_bf16_bits(F.to_bf16_bits(x))
    wb = F.decode(sw)
    y = np.zeros((x.shape[0], sw.n), F32)
    for r in range(sw.k // 2 + sw.k % 2):
        for h in (1, 0):
            kk = 2 * r + h
            if kk < sw.k:
                y = (y + (xb[:, None, kk] * wb[None, :, kk]).astype(F32)).astype(F32)
    return (y + bias[None]).astype(F32) if bias is not None else y


def int8_model(x, sw, bias):
    a = np.abs(x).max(1).astype(F32)
    sx = (a / F32(127)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        xq = np.where(sx[:, None] > 0, np.rint(x / sx[:, None]), 0).clip(-128, 127)
    acc = xq.astype(np.int64) @ F.decode(sw).astype(np.int64).T
    y = ((acc.astype(F32) * sx[:, None]).astype(F32) * sw.scale[None, :sw.n]).astype(F32)
    return (y + bias[None]).astype(F32) if bias is not None else y


@pytest.fixture(scope="module")
def lib():
    lib = B.library()
    if not lib.has_avx2():
        pytest.skip("this CPU lacks AVX2 and FMA, which every sparse kernel needs")
    return lib


@pytest.fixture(scope="module")
def lib512(lib):
    if not lib.has_avx512():
        pytest.skip("this CPU lacks AVX-512 BF16/VBMI2/VNNI, which the AVX-512 and AMX kernels "
                    "need")
    return lib


#: the sparse kernel kind each ISA level runs on a CPU that has it (generic: none)
LEVEL_KIND = {"generic": None, "avx2": "avx2", "avx512": "avx512", "amx": "amx"}


SHAPES = [(384, 384), (1536, 384), (200, 1536), (1024, 4096)]  # MiniLM, ragged, Llama-like


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_kernels_equal_the_models(lib, sparsity, kind, isa_level):
    """The kind the level runs (its default), bit for bit, at 1, 4 and 16 rows; the AVX2
    kernels' row pairs and odd rows, and N not a multiple of 16 (200) included."""
    want_kind = LEVEL_KIND[isa_level]
    if want_kind == "avx512" and not lib.has_avx512():  # AVX-512 without BF16/VBMI2/VNNI
        want_kind = "avx2"
    if want_kind == "amx" and not B.amx_available():
        want_kind = "avx512"
    assert B.best_kind() == want_kind
    if want_kind is None:
        with pytest.raises(BackendError, match="no sparse kernel runs at this ISA level"):
            lib.matmul(np.ones((1, 32), F32), F.sparse(torch.ones(16, 32), "bf16"))
        return
    rng = np.random.default_rng(int(sparsity * 10))
    for i, (n, k) in enumerate(SHAPES):
        w = _w(n, k, sparsity, i)
        if kind == "int8":
            q, s = _int8(w)
            layouts = [F.sparse(q, "int8", scale=s), F.dense(q, "int8", scale=s)]
            model = int8_model
        else:
            layouts = [F.sparse(w, "bf16"), F.dense(w, "bf16")]
            model = bf16_model
        bias = rng.standard_normal(n).astype(F32)
        for m in (1, 3, 16):
            x = rng.standard_normal((m, k)).astype(F32)
            want = model(x, layouts[0], bias)
            for sw in layouts:
                np.testing.assert_array_equal(lib.matmul(x, sw, bias, nthreads=2), want)


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_emulated_amx_equals_avx512(lib512, kind):
    lib = lib512
    rng = np.random.default_rng(3)
    for sparsity in (0.0, 0.5, 0.9):
        w = _w(200, 384, sparsity, 7)
        if kind == "int8":
            q, s = _int8(w)
            sw = F.sparse(q, "int8", scale=s)
        else:
            sw = F.sparse(w, "bf16")
        for m in (1, 16, 37):  # 37: two row tiles (2×2 blocking) and a partial third
            x = rng.standard_normal((m, 384)).astype(F32)
            a = lib.matmul(x, sw, kind="avx512", nthreads=2)
            e = lib.matmul(x, sw, kind="emulated", nthreads=2)
            if kind == "int8":
                np.testing.assert_array_equal(e, a)
            else:  # the order of the two products of a pair differs (SDM): last-bit changes
                np.testing.assert_allclose(e, a, rtol=0, atol=1e-5 * float(np.abs(a).max()))


@needs_amx
@pytest.mark.skipif(not B.amx_available(), reason="no AMX here (CPUID or ARCH_REQ_XCOMP_PERM)")
@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_hardware_amx(lib512, kind):
    lib = lib512
    rng = np.random.default_rng(4)
    w = _w(200, 1536, 0.7, 8)
    if kind == "int8":
        q, s = _int8(w)
        sw = F.sparse(q, "int8", scale=s)
    else:
        sw = F.sparse(w, "bf16")
    for m in (1, 16, 37):
        x = rng.standard_normal((m, 1536)).astype(F32)
        a = lib.matmul(x, sw, kind="avx512", nthreads=2)
        h = lib.matmul(x, sw, kind="amx", nthreads=2)
        if kind == "int8":
            np.testing.assert_array_equal(h, a)
        else:
            np.testing.assert_allclose(h, a, rtol=0, atol=1e-5 * float(np.abs(a).max()))


def test_object_code_has_the_tile_instructions():
    counts = B.object_instructions()
    for ins in ("ldtilecfg", "tileloadd", "tdpbf16ps", "tdpbssd", "tilestored", "tilerelease",
                "vpexpandw", "vpexpandb", "vdpbf16ps", "vpdpbusd"):
        assert counts[ins] > 0, ins


def test_emulation_follows_the_sdm(lib):
    f = lib.lib.qc_amx_emu_check
    assert [f(i) for i in range(4)] == [1, 1, 2, 3]
    assert f(4) == 1 and f(5) == 1


def test_gate_can_be_refused(lib, monkeypatch):
    import subprocess
    import sys
    code = ("from qcompile.backends.amx import build as B; import numpy as np, torch; "
            "from qcompile.backends.amx import format as F; print(B.amx_available(), B.best_kind());"
            "sw = F.sparse(torch.ones(16, 32), 'bf16');"
            "\ntry:\n B.library().matmul(np.ones((1, 32), np.float32), sw, kind='amx')\n"
            "except Exception as e: print(type(e).__name__)")
    env = {**__import__("os").environ, "QCOMPILE_NO_AMX": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    from qcompile import isa
    best = "avx512" if lib.has_avx512() and isa.at_least("avx512") else "avx2"
    assert out.stdout.split() == ["False", best, "BackendError"], out.stderr


def test_int8_extremes_are_exact(lib):
    """Full-range codes (−128 included, ``full_range`` formats make them) against activations
    quantized to ±127: products the AVX2 kernel's vpmaddwd sums without saturation (a
    vpmaddubsw pair could reach −65280 and saturate at −32768), bit for bit."""
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-128, 128, (48, 256), generator=g, dtype=torch.int8)
    q[:, :64] = -128
    q[torch.rand(48, 256, generator=g) < 0.5] = 0
    s = torch.rand(48, generator=g) + 0.5
    x = np.where(np.arange(256) % 2, -1.0, 1.0).astype(F32)[None].repeat(3, 0)
    x[1] *= -1
    kinds = ["avx2"] + (["avx512"] if lib.has_avx512() else [])
    for sw in (F.sparse(q, "int8", scale=s), F.dense(q, "int8", scale=s)):
        for kind in kinds:
            np.testing.assert_array_equal(lib.matmul(x, sw, kind=kind, nthreads=2),
                                          int8_model(x, sw, None), err_msg=kind)


def test_sparse_layout_is_padded_for_whole_loads():
    """The AVX2 kernels expand a row from 16-byte loads: a sparse layout carries F.PAD zero
    values past its non-zeros (and the FFI entries check for them)."""
    sw = F.sparse(torch.eye(16, 32), "bf16")
    assert sw.nnz == 16 and sw.values.shape == (16 + F.PAD,) and not sw.values[16:].any()
    np.testing.assert_array_equal(F.decode(sw), torch.eye(16, 32).numpy())


def test_argument_checks(lib):
    sw = F.sparse(torch.ones(16, 32), "bf16")
    with pytest.raises(BackendError, match="x has 8 columns"):
        lib.matmul(np.ones((1, 8), F32), sw)
    with pytest.raises(BackendError, match="unknown AMX kernel kind"):
        lib.matmul(np.ones((1, 32), F32), sw, kind="sve")
    y = lib.matmul(np.zeros((2, 3, 32), F32), sw)
    assert y.shape == (2, 3, 16) and not y.any()
