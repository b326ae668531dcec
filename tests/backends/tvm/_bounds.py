"""Error bounds for the kernel tests, derived from the arithmetic the kernels do, not measured on
one machine.

Every kernel computes in fp32 (unit roundoff ``u = 2^-24``); every reference here is computed in
float64 from the same fp32 inputs, so its own error (``~2^-53`` relative) is negligible and the
bound is the kernel's alone. The standard forward-error bound for a dot product evaluated in any
order — recursive, blocked, vector lanes summed at the end, with or without FMA — is

    |fl(Σ_i a_i·b_i) − Σ_i a_i·b_i| ≤ γ_n · Σ_i |a_i|·|b_i|,   γ_n = n·u / (1 − n·u)

(Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §3.1, eq. 3.5): each product
passes through at most ``n`` roundings (one multiply — none when fused — and at most ``n − 1``
additions). An FMA chain, the SSE mul-then-add chain and a tree of vector partials all have
``n ≤ K``, so one bound serves every ISA level; only *what* is summed (``|a|·|b|``) depends on the
kernel's formulation (e.g. raw codes with the offset taken out per group), which the callers
spell out. Bounds are elementwise, not relative to ``max |ref|``: an output whose terms cancel
gets a bound from its own terms, not from the largest output.
"""
from __future__ import annotations

import numpy as np

__all__ = ["U32", "gamma", "dot_abs", "fp32_dot_bound", "assert_within"]

#: unit roundoff of fp32 (round to nearest)
U32 = 2.0 ** -24


def gamma(n: int) -> float:
    """``γ_n = n·u / (1 − n·u)`` for fp32 (Higham, Lemma 3.1)."""
    nu = n * U32
    assert nu < 1, n
    return nu / (1 - nu)


def _f64(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, np.float64)


def dot_abs(x, w) -> np.ndarray:
    """``(|x| @ |w|ᵀ)[i, j] = Σ_k |x[i, k]|·|w[j, k]|`` in float64 (the condition term of a dot)."""
    return np.abs(_f64(x)) @ np.abs(_f64(w)).T


def fp32_dot_bound(x, w, bias=None, *, extra: int = 0) -> np.ndarray:
    """Elementwise bound on ``|fl32(x @ wᵀ + bias) − (x @ wᵀ + bias)|`` for ``x[m, K]``, ``w[n, K]``:
    ``γ_{K+1+extra} · (|x| @ |w|ᵀ + |bias|)`` — the K-term dot in any order (FMA or not) plus the
    bias added last (one more rounding); ``extra`` counts further roundings every term passes
    through (a scale multiply, an epilogue)."""
    k = np.shape(x)[-1]
    t = dot_abs(x, w)
    if bias is not None:
        t = t + np.abs(_f64(bias))[None]
    return gamma(k + 1 + extra) * t


def assert_within(y, ref, bound, what: str = "") -> None:
    """``|y − ref| ≤ bound`` everywhere (float64 arithmetic; NaN anywhere fails)."""
    y, ref = _f64(y), _f64(ref)
    bound = np.broadcast_to(_f64(bound), ref.shape)
    err = np.abs(y - ref)
    bad = ~(err <= bound)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / np.maximum(bound, 1e-300), 0)),
                             ref.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {ref.size} outputs outside the derived bound; worst at "
            f"{tuple(int(v) for v in i)}: |err| {err[i]:.3e} > bound {bound[i]:.3e} "
            f"(y {y[i]:.7g}, ref {ref[i]:.7g})")
