"""The generated kernels: every variant this CPU's hardware runs equals the numpy model bit for
bit (bits 1–4 × groups 32/64/128 × batch 1/4/16, non-square shapes, K not a power of two) —
whatever ``QCOMPILE_ISA`` caps, since each kernel carries its own ``target`` attribute — the
variant each instruction-set level picks is independent of threads and tiling, and the
generated C of one small configuration is pinned by a golden file."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from qcompile import formats as F
from qcompile import isa
from qcompile.backends.lut import model as M
from qcompile.backends.lut import weights as W
from qcompile.backends.lut.build import VARIANT_FEATURES, LutLibrary, host_variants
from qcompile.backends.lut.codegen import VARIANT_LAYOUT, KernelConfig, generate

VARIANTS = ["vpermb", "shufb512", "shufb256", "c"]
GOLDEN = Path(__file__).parent / "golden" / "lut_b2_g32.c"
GOLDEN_CONFIGS = [KernelConfig("vpermb", 2, 32, "sym", rb=1, mt=1, u=1),
                  KernelConfig("shufb256", 2, 32, "sym", rb=1, mt=1, u=1),
                  KernelConfig("c", 2, 32, "sym", rb=1, mt=1, u=1)]


def _hardware_variants():
    """The variants this CPU's hardware runs, ignoring the ``QCOMPILE_ISA`` cap (a capped run
    still tests every kernel the machine can execute)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["c"]
    return [v for v, need in VARIANT_FEATURES.items() if need <= isa.host_features()]


def _needs(variant):
    return pytest.mark.skipif(variant not in _hardware_variants(),
                              reason=f"this CPU lacks the instructions of the {variant} kernels")


def _configs(v):
    out = []
    for b in (1, 2, 3, 4):
        for g in (32, 64, 128):
            out.append(KernelConfig(v, b, g, "none" if b == 1 else "sym", rb=2 if g != 64 else 1,
                                    mt=4, u=2 if g == 32 else 1))
    out += [KernelConfig(v, 3, 64, "asym", rb=2, mt=4), KernelConfig(v, 2, 128, "asym", rb=1)]
    return out


@pytest.fixture(scope="module")
def lib():
    cs = [c for v in _hardware_variants() for c in _configs(v)]
    return LutLibrary(cs)


def _weight(bits, group, mode, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    name = {"sym": f"int{bits}", "none": "int1", "asym": f"uint{bits}"}[mode]
    return W.from_quantized(F.get(name, group_size=group).quantize(w))


@pytest.mark.parametrize("variant", [pytest.param(v, marks=_needs(v)) for v in VARIANTS])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_kernels_equal_the_model(lib, variant, bits, group):
    c = next(c for c in _configs(variant) if c.bits == bits and c.group == group)
    n, k = 200, 384  # 200 rows: a partial tile and a partial row block; K = 3·128
    lw = _weight(bits, group, c.mode, n, k, seed=bits + group)
    pw = W.pack(lw, VARIANT_LAYOUT[variant], rb=c.rb)
    rng = np.random.default_rng(bits * group)
    bias = rng.standard_normal(n).astype(np.float32)
    for m in (1, 4, 16, 5):
        x = rng.standard_normal((m, k)).astype(np.float32)
        want = M.lut_matmul(x, lw, bias)
        np.testing.assert_array_equal(lib.matmul(c, x, pw, bias, nthreads=2), want)
        if m == 16:
            assert M.nmse(want, M.reference(x, lw, bias)) <= 5e-4
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_array_equal(lib.matmul(c, x, pw, nthreads=1), M.lut_matmul(x, lw))


@pytest.mark.parametrize("variant", [pytest.param(v, marks=_needs(v)) for v in VARIANTS])
def test_asymmetric_codes_and_padded_k(lib, variant):
    for c in _configs(variant)[-2:]:
        for n, k in ((48, 384), (17, 256)):
            lw = _weight(c.bits, c.group, "asym", n, k)
            pw = W.pack(lw, VARIANT_LAYOUT[variant], rb=c.rb)
            x = np.random.default_rng(n).standard_normal((6, k)).astype(np.float32)
            np.testing.assert_array_equal(lib.matmul(c, x, pw, nthreads=2), M.lut_matmul(x, lw))
    # K = 200 per channel: padded to 224 with activation group 32
    w = torch.randn(40, 200)
    lw = W.from_quantized(F.get("int2", granularity="per_channel").quantize(w))
    c = next(c for c in _configs(variant) if c.bits == 2 and c.group == 32)
    pw = W.pack(lw, VARIANT_LAYOUT[variant], rb=c.rb)
    x = np.random.default_rng(0).standard_normal((2, 200)).astype(np.float32)
    np.testing.assert_array_equal(lib.matmul(c, x, pw, nthreads=2), M.lut_matmul(x, lw))


def test_results_do_not_depend_on_threads_or_tiling(lib, isa_level):
    v = host_variants()[0]  # the level's fastest: vpermb, shufb256 or c
    lw = _weight(4, 128, "sym", 300, 512)
    x = np.random.default_rng(3).standard_normal((4, 512)).astype(np.float32)
    outs = []
    for c in _configs(v):
        if c.bits == 4 and c.group == 128:
            pw = W.pack(lw, VARIANT_LAYOUT[v], rb=c.rb)
            outs += [lib.matmul(c, x, pw, nthreads=t) for t in (1, 2, 3)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@pytest.mark.parametrize("scalar", [False, True])
def test_precompute_equals_the_model(lib, scalar):
    rng = np.random.default_rng(5)
    for group, k, kp in ((32, 96, 96), (128, 384, 384), (64, 100, 128)):
        x = (rng.standard_normal((3, k)) * rng.choice([1e-3, 1.0, 30.0], (3, 1))).astype(np.float32)
        x[1, : min(k, 64)] = 0.0  # an all-zero group: a = 0, inverse 0
        got = lib.precompute(x, group, kp, scalar=scalar)
        for g, w in zip(got, M.precompute(x, group, kp)):
            np.testing.assert_array_equal(g, w)


def test_golden_source():
    """Codegen changes show in review: regenerate with QCOMPILE_REGEN_GOLDEN=1."""
    src = generate(GOLDEN_CONFIGS)
    if os.environ.get("QCOMPILE_REGEN_GOLDEN"):
        GOLDEN.write_text(src)
    assert src == GOLDEN.read_text()


def test_generation_is_deterministic():
    cs = _configs("vpermb")
    assert generate(cs) == generate(list(cs))
    assert generate(cs + cs[:3]) == generate(cs)  # duplicates dropped
