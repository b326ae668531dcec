"""The fp32 matmul kernels (``kernels/dense.py``) against float64 numpy / torch: symbolic row
counts with every tail (1, 3, 17, 128, 1029 rows), N not a multiple of the weight panel, odd K,
every fused epilogue, bias and residual on and off, once per instruction-set level this host
supports (``isa_level``: AVX-512 zmm, AVX2 ymm and plain 128-bit SSE schedules), and
``batch_matmul`` both ways with a symbolic batch. Few functions are compiled; each runs at
several sizes. Bounds are derived from the arithmetic (:mod:`._bounds`), elementwise."""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import tirx  # noqa: E402

from qcompile.backends.tvm.kernels import dense as D  # noqa: E402
from qcompile.backends.tvm.target import CpuInfo, cpu_target, host_cpu  # noqa: E402

from ._bounds import U32, assert_within, fp32_dot_bound  # noqa: E402

ROWS = (1, 3, 17, 128, 1029)
ACT = {None: lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
       "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
       "silu": torch.nn.functional.silu}
#: max |act'(z)| over all z: how far an error in the pre-activation moves the output
#: (GELU: 1.129 at z = ±2.42 for erf, 1.13 for tanh; SiLU: 1.0998 at z = 2.40; ReLU: 1)
LIPSCHITZ = {None: 1.0, "relu": 1.0, "gelu": 1.13, "gelu_tanh": 1.14, "silu": 1.1}
#: the vectorised activations' own error against the exact function, |a(z) − act(z)| ≤
#: ACT_ABS + ACT_REL·|act(z)| for every fp32 z: what ``test_activations_far_out`` checks over
#: ±90 at every level (Cephes expf ~1 ulp and Eigen's erf ≲ 1e-7 absolute, composed with the
#: epilogue's few roundings; relu is exact)
ACT_ABS, ACT_REL = 2e-6, 1e-5


def _target():
    """(CpuInfo, target) of the host capped at the ``isa_level`` in force."""
    t = cpu_target()
    return host_cpu(t), t


@functools.lru_cache(maxsize=None)
def _dense(target_str: str, n: int, k: int, bias: bool, epilogue, residual: bool, m=None,
           schedule=None):
    target = tvm.target.Target(target_str)
    info = host_cpu(target)
    f = D.dense(tirx.Var("m", "int64") if m is None else m, n, k, bias=bias, epilogue=epilogue,
                residual=residual, info=info, schedule=schedule)
    return tvm.compile(f, target=target), info


def _dense_bound(x, w, b, epilogue, act, out):
    """``out = act(x·wᵀ + b) + r``: the pre-activation's dot bound (K FMA or mul-add steps + the
    bias, :func:`fp32_dot_bound`) through the activation's Lipschitz constant, plus the
    activation's own error (on ``|act|``), plus one rounding for the residual add (on
    ``|out|``, doubled to cover the rounded addend)."""
    e = LIPSCHITZ[epilogue] * fp32_dot_bound(x, w, b)
    if epilogue not in (None, "relu"):
        e = e + ACT_ABS + ACT_REL * np.abs(act)
    return e + 2 * U32 * np.abs(out)


def _check_dense(n, k, bias, epilogue, residual, rows, m=None, schedule=None):
    info, target = _target()
    rt, info = _dense(str(target), n, k, bias, epilogue, residual, m, schedule)
    rng = np.random.default_rng(n * 1000 + k)
    w = rng.standard_normal((n, k), np.float32)
    wp = D.pack_dense_weight(w, info, schedule)
    b = rng.standard_normal(n, np.float32)
    for mm in rows:
        x = rng.standard_normal((mm, k), np.float32) * 2  # GELU/SiLU tails: |pre-act| up to ~40
        r = rng.standard_normal((mm, n), np.float32)
        ref = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0)
        act = ACT[epilogue](torch.from_numpy(ref)).numpy()
        ref = act + (r if residual else 0)
        args = [x, wp] + [b] * bias + [r] * residual + [np.full((mm, n), np.nan, np.float32)]
        t = [tvm.runtime.tensor(a) for a in args]
        rt(*t)
        bound = _dense_bound(x, w, b if bias else None, epilogue, act, ref)
        assert_within(t[-1].numpy(), ref, bound,
                      f"{target} m={mm} n={n} k={k} {epilogue}")


@pytest.mark.parametrize("n,k,bias,epilogue,residual", [
    (70, 19, True, "gelu", True),        # tail panel of 6 columns, odd K, everything fused
    (64, 33, False, None, False),        # one exact panel, plain GEMM
    (150, 8, True, "relu", False),
    (20, 5, False, "silu", True),        # a panel narrower than one AVX-512 panel
    (100, 31, True, "gelu_tanh", False),
])
def test_dense_symbolic_rows(isa_level, n, k, bias, epilogue, residual):
    _check_dense(n, k, bias, epilogue, residual, ROWS)


def test_dense_static_rows(isa_level):
    _check_dense(96, 24, True, None, True, (200,), m=200)  # two row chunks, 2 left over


def test_dense_k_blocks_and_row_chunks(isa_level):
    """A non-default schedule: K in blocks of 12 (partial sums kept in y, the tail panel's
    too: still one chain per output, the same bound), 4-row tiles, up to 3 row chunks of at
    least 2 tiles, 2-vector panels."""
    s = D.DenseSchedule(lanes=max(4, _target()[0].lanes32), nv=2, mr=4, kc=12, chunks=3,
                        min_chunk_tiles=2)
    _check_dense(50, 23, True, "gelu", True, ROWS, schedule=s)


@pytest.mark.parametrize("kernel", [(70, 19, True, "gelu", True), (20, 5, False, "silu", True),
                                    (100, 31, True, "gelu_tanh", False)])
def test_activations_far_out(isa_level, kernel):
    """The vectorised exp/erf hold over the whole range (x up to ±90; the kernels above, reused,
    with a weight that copies x's first column): absolute error ≤ 2e-6, torch fp32's own class
    (its GELU is off by 5e-7 at x = 4.4 and, like any ``1 + erf`` form, loses relative accuracy
    where the output is tiny)."""
    n, k, bias, epi, residual = kernel
    rt, info = _dense(str(_target()[1]), *kernel, None, None)  # the compiled one
    x = np.zeros((4001, k), np.float32)
    x[:, 0] = np.linspace(-90, 90, len(x), dtype=np.float32)
    w = np.zeros((n, k), np.float32)
    w[:, 0] = 1
    args = [x, D.pack_dense_weight(w, info)] + [np.zeros(n, np.float32)] * bias \
        + [np.zeros((len(x), n), np.float32)] * residual + [np.zeros((len(x), n), np.float32)]
    t = [tvm.runtime.tensor(a) for a in args]
    rt(*t)
    ref = ACT[epi](torch.from_numpy(x[:, :1].astype(np.float64))).numpy()
    np.testing.assert_allclose(t[-1].numpy(), np.broadcast_to(ref, (len(x), n)), rtol=ACT_REL,
                               atol=ACT_ABS, err_msg=epi)


def test_pack_layout():
    info = host_cpu()
    s = D.dense_schedule(70, 5, info)
    w = np.arange(70 * 5, dtype=np.float32).reshape(70, 5)
    p = D.pack_dense_weight(w, info)
    assert p.shape == (-(-70 // s.nb), 5, s.nb) and p.dtype == np.float32
    assert p[1, 2, 3] == w[s.nb + 3, 2] and not p[-1, :, 70 - s.nb * (p.shape[0] - 1):].any()
    assert D.dense_schedule(4096, 4096, CpuInfo("x", 2, 512, True, False, False)).nb == 64
    assert D.dense_schedule(4096, 4096, CpuInfo("x", 2, 256, False, False, False)).nb == 16
    with pytest.raises(ValueError, match="epilogue"):
        D.dense(8, 16, 16, epilogue="tanh", info=info)


def test_micro_kernel_is_fma_on_registers(isa_level):
    """Each level's inner loop: broadcast x, FMA into zmm (AVX-512) or ymm (AVX2)
    accumulators, or ``mulps`` + ``addps`` on xmm (x86-64 has no FMA); no heap workspace."""
    rt, info = _dense(str(_target()[1]), 64, 33, False, None, False)
    asm = rt.mod.inspect_source("asm")
    if isa_level == "generic":
        assert "vfmadd" not in asm and re.search(r"\bmulps\s+[^\n]*xmm", asm) \
            and re.search(r"\baddps\s+[^\n]*xmm", asm)
    else:
        reg = "zmm" if isa_level in ("avx512", "amx") else "ymm"
        assert "zmm" not in asm or reg == "zmm"
        assert re.search(rf"vfmadd231ps\s+[^\n]*{reg}", asm) and "vbroadcastss" in asm
    assert "TVMBackendAllocWorkspace" not in asm  # accumulators stay on the stack / registers


@functools.lru_cache(maxsize=None)
def _bmm(target_str, m, n, k, transpose_b, symbolic_m):
    target = tvm.target.Target(target_str)
    info = host_cpu(target)
    return tvm.compile(D.batch_matmul(tirx.Var("b", "int64"),
                                      tirx.Var("m", "int64") if symbolic_m else m, n, k,
                                      transpose_b=transpose_b, info=info), target=target)


@pytest.mark.parametrize("transpose_b", [True, False])
@pytest.mark.parametrize("m,n,k,symbolic_m", [(13, 37, 9, False), (8, 128, 32, False),
                                              (11, 20, 6, True)])
def test_batch_matmul_symbolic_batch(isa_level, m, n, k, symbolic_m, transpose_b):
    rt = _bmm(str(_target()[1]), m, n, k, transpose_b, symbolic_m)
    rng = np.random.default_rng(m + n + k)
    for b in (1, 3, 7):
        x = rng.standard_normal((b, m, k), np.float32)
        w = rng.standard_normal((b, n, k) if transpose_b else (b, k, n), np.float32)
        wt = w if transpose_b else np.swapaxes(w, 1, 2)  # [b, n, k]
        ref = np.matmul(x.astype(np.float64), np.swapaxes(wt, 1, 2).astype(np.float64))
        t = [tvm.runtime.tensor(a) for a in (x, w, np.full((b, m, n), np.nan, np.float32))]
        rt(*t)
        bound = np.stack([fp32_dot_bound(x[i], wt[i]) for i in range(b)])  # K-term dots
        assert_within(t[-1].numpy(), ref, bound, f"batch_matmul b={b}")
