"""The LUT kernels' arithmetic in numpy, operation for operation: the generated C reproduces
:func:`lut_matmul` bit for bit (every kernel variant, any tiling, any thread count).

**Table precompute** (T-MAC, Wei et al., EuroSys 2025, §3.2 "table precomputation" and §4.2
"mirror consolidation" and "table quantization"), per activation row and group of four
``x0..x3``: the 16 signed sums ``T[p] = Σ_t σ_t(p)·x_t`` (``σ_t = +1`` where bit ``t`` of ``p``
is set) satisfy ``T[15 − p] = −T[p]`` exactly in floating point, so only the eight with
``x3``'s sign positive are computed, ``E[e] = ((σ0·x0 + σ1·x1) + σ2·x2) + x3`` for
``p = 8 + e``, and the other eight are their negations. Quantization is per activation group
of ``G`` values (``G/4`` tables): ``a = max |E|`` — which equals ``max_j (((|x0| + |x1|) + |x2|)
+ |x3|)`` exactly, the sign pattern of ``x`` being one of the entries — the entries become
``rint(E · (127 / a))`` (round half to even; every entry lies in ``[−127, 127]``), the step is
kept halved, ``tsh = a / 254``, and the group's float *bias* ``xs = Σ x`` is summed from the
entries ``E_j[7] = ((x0 + x1) + x2) + x3``: the even tables in order, the odd ones in order, then
the two sums added.

**Kernel** per output ``(m, n)``: for each activation group ``g`` in order, the integer
``acc = Σ_j Σ_i 2^i · Tq_j[idx_ij]`` (exact in int32), then
``y ← y + (float(acc)·tsh_g)·s[n, g]`` and ``y ← y + sb[n, g]·xs_g`` (symmetric codes:
``y ← y + s[n, g]·(−½·xs_g)``, the same number; binary codes have no such term), each
operation rounded to float32 on its own (the C is built with ``-ffp-contract=off``); the
bias of the linear, if any, is added last.

:func:`lut_matmul_float` is the same algorithm with float tables (no table quantization),
for accuracy comparison; :func:`reference` is the exact product in float64.
"""
from __future__ import annotations

import numpy as np

from .weights import LutWeight

__all__ = ["precompute", "lut_matmul", "lut_matmul_float", "reference", "nmse"]

F32 = np.float32


def _entries(x: np.ndarray) -> np.ndarray:
    """``E[..., j, e]`` (float32) for ``x[..., 4j + t]``: the eight table entries ``p = 8 + e``."""
    x = np.asarray(x, F32)
    x4 = x.reshape(*x.shape[:-1], -1, 4)
    x0, x1, x2, x3 = (x4[..., t:t + 1] for t in range(4))
    e = np.arange(8)
    sg = [np.where((e >> t) & 1, F32(1), F32(-1)).astype(F32) for t in range(3)]
    return ((sg[0] * x0 + sg[1] * x1) + sg[2] * x2) + x3  # multiplying by ±1 is exact


def _pad(x: np.ndarray, kp: int) -> np.ndarray:
    x = np.asarray(x, F32)
    if x.shape[-1] == kp:
        return x
    out = np.zeros((*x.shape[:-1], kp), F32)
    out[..., :x.shape[-1]] = x
    return out


def precompute(x: np.ndarray, group: int, kp: int | None = None):
    """``(tq, tsh, xs)`` for activations ``x[m, k]``: int8 tables ``[m, kp/4, 16]``, halved
    steps and float biases ``[m, kp/group]`` (``x`` zero-padded to ``kp`` columns)."""
    x = _pad(x, kp or x.shape[-1])
    m, k = x.shape
    ng = k // group
    E = _entries(x)                                   # m, k/4, 8
    Eg = E.reshape(m, ng, group // 4, 8)
    a = np.abs(Eg).max(axis=(2, 3)).astype(F32)       # m, ng
    with np.errstate(divide="ignore"):
        inv = np.where(a > 0, F32(127) / a, F32(0)).astype(F32)
    tsh = (a / F32(254)).astype(F32)
    q = np.rint(Eg * inv[:, :, None, None]).clip(-127, 127).astype(np.int8)
    q = q.reshape(m, k // 4, 8)
    tq = np.concatenate([-q[..., ::-1], q], axis=-1)  # p = 0..7 mirrored, then 8..15
    last = Eg[..., 7]                                 # m, ng, G/4: ((x0+x1)+x2)+x3
    ev = np.zeros((m, ng), F32)
    od = np.zeros((m, ng), F32)
    for j in range(group // 4):
        if j % 2 == 0:
            ev = (ev + last[:, :, j]).astype(F32)
        else:
            od = (od + last[:, :, j]).astype(F32)
    xs = (ev + od).astype(F32)
    return tq, tsh, xs


def _accumulate(tab: np.ndarray, lw: LutWeight) -> np.ndarray:
    """``acc[m, n, g] = Σ_{j∈g} Σ_i 2^i · tab[m, j, idx_i(n, j)]`` (int64, or float for float
    tables)."""
    idx = lw.planes()                                  # b, n, kp/4
    m = tab.shape[0]
    J = lw.kp // 4
    acc_dtype = np.int64 if tab.dtype.kind == "i" else np.float64
    total = np.zeros((m, lw.n, J), acc_dtype)
    jj = np.arange(J)[None, :]
    for i in range(lw.bits):
        total += (1 << i) * tab[:, jj, idx[i]].astype(acc_dtype)  # m, n, J
    return total.reshape(m, lw.n, lw.ng, lw.group // 4).sum(-1)


def _epilogue(accf: np.ndarray, tsh: np.ndarray, xs: np.ndarray, lw: LutWeight, bias):
    m = accf.shape[0]
    y = np.zeros((m, lw.n), F32)
    s, sb = lw.s[None], lw.sb[None]
    for g in range(lw.ng):
        t = (accf[:, :, g] * tsh[:, g:g + 1]).astype(F32)
        y = (y + (t * s[:, :, g]).astype(F32)).astype(F32)
        if lw.mode != "none":
            y = (y + (sb[:, :, g] * xs[:, g:g + 1]).astype(F32)).astype(F32)
    if bias is not None:
        y = (y + np.asarray(bias, F32)[None]).astype(F32)
    return y


def lut_matmul(x: np.ndarray, lw: LutWeight, bias=None) -> np.ndarray:
    """``y[m, n]`` exactly as the kernels compute it (float32)."""
    x = np.asarray(x, F32).reshape(-1, np.shape(x)[-1])
    tq, tsh, xs = precompute(x, lw.group, lw.kp)
    acc = _accumulate(tq, lw)
    assert np.abs(acc).max(initial=0) < 2 ** 31
    return _epilogue(acc.astype(F32), tsh, xs, lw, bias)


def lut_matmul_float(x: np.ndarray, lw: LutWeight, bias=None) -> np.ndarray:
    """The float-table variant: tables kept in float64 (mirrored, no quantization), the same
    bit-plane sum and bias; what table quantization costs is the gap to :func:`reference`."""
    x = _pad(np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1]), lw.kp)
    m = x.shape[0]
    x4 = x.reshape(m, -1, 4)
    p = np.arange(16)
    sg = np.stack([np.where((p >> t) & 1, 1.0, -1.0) for t in range(4)], -1)  # 16, 4
    tab = np.einsum("mjt,pt->mjp", x4, sg)
    acc = _accumulate(tab, lw)                          # Σ_i 2^i Σ_j T (float64)
    xs = x.reshape(m, lw.ng, lw.group).sum(-1)
    y = (0.5 * acc * lw.s[None].astype(np.float64)
         + lw.sb[None].astype(np.float64) * xs[:, None, :]).sum(-1)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)[None]
    return y


def reference(x: np.ndarray, lw: LutWeight, bias=None) -> np.ndarray:
    """The exact product ``x · wᵀ`` (+ bias) in float64 with the weight the codes stand for."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    y = x[:, :lw.k] @ lw.dequantize().T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)[None]
    return y


def nmse(y: np.ndarray, ref: np.ndarray) -> float:
    """``‖y − ref‖² / ‖ref‖²`` (T-MAC's kernel acceptance metric)."""
    ref = np.asarray(ref, np.float64)
    d = np.asarray(y, np.float64) - ref
    return float((d * d).sum() / max((ref * ref).sum(), 1e-300))
