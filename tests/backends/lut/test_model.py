"""The numpy model of the int8-table arithmetic: table properties, and accuracy against the
float64 product (T-MAC's acceptance bound, NMSE ≤ 5e-4)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile import formats as F
from qcompile.backends.lut import model as M
from qcompile.backends.lut import weights as W


def test_tables_are_mirrored_and_in_range():
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32) * 5
    tq, tsh, xs = M.precompute(x, 64)
    np.testing.assert_array_equal(tq[..., ::-1], -tq)  # T[15 - p] = -T[p]
    assert np.abs(tq).max() == 127  # the largest entry of every group hits the bound
    assert tq.shape == (3, 64, 16) and tsh.shape == xs.shape == (3, 4)


def test_table_scale_is_the_largest_absolute_sum():
    x = np.random.default_rng(1).standard_normal((2, 128)).astype(np.float32)
    _, tsh, xs = M.precompute(x, 32)
    a = np.abs(x.reshape(2, 4, 8, 4))
    amax = (((a[..., 0] + a[..., 1]) + a[..., 2]) + a[..., 3]).max(-1)
    np.testing.assert_array_equal(tsh, (amax / np.float32(254)).astype(np.float32))
    np.testing.assert_allclose(xs, x.reshape(2, 4, 32).sum(-1), rtol=1e-5)


def test_entries_are_the_signed_sums():
    x = np.random.default_rng(2).standard_normal((1, 32)).astype(np.float32)
    tq, tsh, _ = M.precompute(x, 32)
    p = np.arange(16)
    sg = np.stack([np.where((p >> t) & 1, 1.0, -1.0) for t in range(4)], -1)
    T = x.reshape(8, 4).astype(np.float64) @ sg.T  # 8 groups × 16 entries
    np.testing.assert_allclose(tq[0].astype(np.float64) * 2 * tsh[0, 0], T, atol=float(tsh[0, 0]) * 1.0001)


def test_zero_activations_give_the_bias():
    lw = W.from_quantized(F.get("int3", group_size=32).quantize(torch.randn(20, 64)))
    b = np.arange(20, dtype=np.float32)
    np.testing.assert_array_equal(M.lut_matmul(np.zeros((2, 64), np.float32), lw, b),
                                  np.broadcast_to(b, (2, 20)))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 4, 16])
def test_nmse_against_float64(bits, group, m):
    w = torch.randn(96, 384)
    lw = W.from_quantized(F.get(f"int{bits}", group_size=group).quantize(w))
    x = np.random.default_rng(bits * 100 + m).standard_normal((m, 384)).astype(np.float32)
    ref = M.reference(x, lw)
    assert M.nmse(M.lut_matmul(x, lw), ref) <= 5e-4
    # the float-table variant differs from the exact product only by float rounding:
    # table quantization is the whole error
    assert M.nmse(M.lut_matmul_float(x, lw), ref) < 1e-12


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 4), asym=st.booleans(), n=st.integers(1, 70),
       kq=st.integers(1, 6), m=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
def test_error_within_the_table_rounding_bound(bits, asym, n, kq, m, seed):
    """Each table entry is off by at most half a step ``a/127``; plane ``i`` weighs ``2^(i-1)``,
    so an output is off by at most ``Σ_g |s_g|·(2^b − 1)·(G/4)·a_g/254 / 2`` (+ float rounding)."""
    gen = torch.Generator().manual_seed(seed)
    k = 32 * kq
    w = torch.randn(n, k, generator=gen)
    name = f"uint{bits}" if asym and bits > 1 else f"int{bits}"
    lw = W.from_quantized(F.get(name, group_size=32).quantize(w))
    x = torch.randn(m, k, generator=gen).numpy()
    _, tsh, _ = M.precompute(x, lw.group, lw.kp)
    a = tsh.astype(np.float64) * 254                                  # m, ng
    bound = (np.abs(lw.s).astype(np.float64)[None] * a[:, None, :]).sum(-1) \
        * (2 ** bits - 1) * (lw.group / 4) / 254 / 2
    slack = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(lw.dequantize()).T) + 1e-6
    err = np.abs(M.lut_matmul(x, lw) - M.reference(x, lw))
    assert (err <= bound * 1.0001 + slack).all()
