"""The SparAMX-style layout: masks, packed values and offsets decode back to the weight; the
dense layout too; byte counts; bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompile.backends.amx import format as F
from qcompile.errors import ConfigError


def _sparse_w(n, k, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    return w


@pytest.mark.parametrize("n,k", [(16, 32), (40, 100), (200, 384)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_bf16_round_trip(n, k, sparsity):
    w = _sparse_w(n, k, sparsity)
    sw = F.sparse(w, "bf16")
    want = F.from_bf16_bits(F.to_bf16_bits(w.numpy()))
    np.testing.assert_array_equal(F.decode(sw), want)
    np.testing.assert_array_equal(F.decode(F.dense(w, "bf16")), want)
    assert sw.nnz == int((torch.from_numpy(want) != 0).sum())
    assert sw.kp % 32 == 0 and sw.masks.dtype == np.uint32
    assert sw.masks.shape == (-(-n // 16), sw.kp // 2)
    # per column tile: the offsets count the mask bits
    bits = np.array([bin(int(v)).count("1") for v in sw.masks.reshape(-1)]).reshape(sw.masks.shape)
    np.testing.assert_array_equal(np.diff(sw.offsets), bits.sum(1))


def test_vnni_row_order():
    w = torch.arange(16 * 32, dtype=torch.float32).reshape(16, 32) + 1
    sw = F.dense(w, "bf16")
    row0 = F.from_bf16_bits(sw.values[:32])  # pair row 0: (n0: k0, k1), (n1: k0, k1), ...
    np.testing.assert_array_equal(row0[:4], [w[0, 0], w[0, 1], w[1, 0], w[1, 1]])
    q = torch.arange(16 * 64).reshape(16, 64).remainder(100).to(torch.int8)
    sq = F.dense(q, "int8", scale=torch.ones(16))
    np.testing.assert_array_equal(sq.values[:8], [*q[0, :4].tolist(), *q[1, :4].tolist()])


@pytest.mark.parametrize("sparsity", [0.0, 0.7])
def test_int8_round_trip(sparsity):
    w = _sparse_w(48, 200, sparsity)
    s = w.abs().amax(1) / 127
    q = torch.round(w / s[:, None]).to(torch.int8)
    sw = F.sparse(q, "int8", scale=s)
    np.testing.assert_array_equal(F.decode(sw), q.numpy())
    assert sw.masks.dtype == np.uint64 and sw.kp == 256
    np.testing.assert_array_equal(sw.colsum[:48], q.sum(1).numpy())
    assert sw.colsum.shape == sw.scale.shape == (48,)
    np.testing.assert_array_equal(F.decode(F.dense(q, "int8", scale=s)), q.numpy())


def test_bytes_follow_density():
    w = _sparse_w(256, 1024, 0.75)
    sp, de = F.sparse(w, "bf16"), F.dense(w, "bf16")
    ratio = sp.nbytes / de.nbytes
    assert abs(ratio - (0.25 + 1 / 16)) < 0.01


def test_bad_input():
    with pytest.raises(ConfigError, match="unknown sparse weight kind"):
        F.sparse(torch.zeros(16, 32), "fp8")
    with pytest.raises(ConfigError, match="int8 codes"):
        F.sparse(torch.zeros(16, 32), "int8", scale=torch.ones(16))
    with pytest.raises(ConfigError, match="one scale per output"):
        F.sparse(torch.zeros(16, 64, dtype=torch.int8), "int8", scale=torch.ones(4))
