"""Orthonormal Hadamard matrices and a fast Walsh–Hadamard transform, for QuaRot-style rotations.

H_n has entries ±1/√n and H Hᵀ = I. An order n = K·2^k is built as H_K ⊗ H_{2^k}, where H_{2^k}
is Sylvester's (J. J. Sylvester 1867, "Thoughts on inverse orthogonal matrices") and the base
order K comes from, in order of preference:

- Paley construction I (R. E. A. C. Paley 1933, "On orthogonal matrices", J. Math. Phys. 12):
  q a prime power ≡ 3 (mod 4) gives order q + 1;
- Paley construction II (same paper): q a prime power ≡ 1 (mod 4) gives order 2(q + 1);
- a Goethals–Seidel array (J. M. Goethals & J. J. Seidel 1967, "Orthogonal matrices with zero
  diagonal", Canad. J. Math. 19) of four circulant ±1 matrices of order K/4, for the orders
  Paley does not reach that ``qcompile._hadamard_data`` lists (92, 116, 156, 172, 260, 292,
  372, 476); ``qcompile._hadamard_search`` finds their sequences.

Quadratic characters are taken over GF(p^m), so prime powers (25, 27, 49, ...) work.
``fwht`` applies the same matrix in O(n log n) for the 2^k factor plus a dense K×K product.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

from qcompile._hadamard_data import GS_SEQUENCES
from qcompile.errors import ConfigError

__all__ = ["hadamard_matrix", "supported", "base_order", "fwht", "random_signs"]


# -- finite fields -----------------------------------------------------------------------
def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, m) with q = p^m, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # smallest prime factor
    m = 0
    while q % p == 0:
        q, m = q // p, m + 1
    return (p, m) if q == 1 else None


def _polymul(a: list[int], b: list[int], p: int) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            out[i + j] = (out[i + j] + ai * bj) % p
    return out


def _polymod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficients lowest degree first, f monic."""
    a = list(a)
    for i in range(len(a) - 1, len(f) - 2, -1):
        c = a[i]
        for j, fj in enumerate(f):
            a[i - len(f) + 1 + j] = (a[i - len(f) + 1 + j] - c * fj) % p
    return a[:len(f) - 1]


def _irreducible(p: int, m: int) -> list[int]:
    """The first monic irreducible polynomial of degree m over GF(p) (no factor of degree <= m/2)."""
    def monic(d):
        for low in range(p ** d):
            yield [low // p ** i % p for i in range(d)] + [1]
    for f in monic(m):
        if not any(not any(_polymod(f, g, p)) for d in range(1, m // 2 + 1) for g in monic(d)):
            return f
    raise AssertionError("an irreducible polynomial of every degree exists")


def _quadratic_character(q: int) -> torch.Tensor:
    """χ(a - b) for all a, b in GF(q) (elements numbered by their base-p digits): 0, ±1."""
    p, m = _prime_power(q)
    f = _irreducible(p, m)
    digits = [[e // p ** i % p for i in range(m)] for e in range(q)]
    squares = {sum(c * p ** i for i, c in enumerate(_polymod(_polymul(d, d, p), f, p)))
               for d in digits[1:]}
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[sorted(squares)] = 1
    chi[0] = 0
    dig = torch.tensor(digits)
    diff = (dig[:, None, :] - dig[None, :, :]) % p  # subtraction is digit-wise in GF(p^m)
    return chi[(diff * p ** torch.arange(m)).sum(-1)]


# -- base constructions (±1 entries, float64) ---------------------------------------------
def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q ≡ 3 (mod 4): H = I + S, S = [[0, 1ᵀ], [-1, Q]] skew, S Sᵀ = qI."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _quadratic_character(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q ≡ 1 (mod 4): the symmetric conference matrix C = [[0, 1ᵀ], [1, Q]]
    becomes H = C ⊗ [[1, 1], [1, -1]] + I ⊗ [[1, -1], [-1, -1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _quadratic_character(q)
    one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    eye = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), eye)


def _gs_rows(n: int) -> list[torch.Tensor]:
    """The four stored ±1 sequences of length n (hex bit i set means element i is -1)."""
    return [torch.tensor([-1.0 if int(h, 16) >> i & 1 else 1.0 for i in range(n)],
                         dtype=torch.float64) for h in GS_SEQUENCES[n][1]]


def _goethals_seidel(n: int) -> torch.Tensor:
    """Order 4n from circulants A, B, C, D with AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4nI and the
    back-diagonal permutation R (the array of Goethals & Seidel 1967)."""
    idx = (torch.arange(n)[None, :] - torch.arange(n)[:, None]) % n
    a, b, c, d = (row[idx] for row in _gs_rows(n))  # circulant: X[i, j] = x[j - i]
    r = torch.eye(n, dtype=torch.float64).flip(1)
    return torch.cat([
        torch.cat([a, b @ r, c @ r, d @ r], 1),
        torch.cat([-b @ r, a, d.T @ r, -c.T @ r], 1),
        torch.cat([-c @ r, -d.T @ r, a, b.T @ r], 1),
        torch.cat([-d @ r, c.T @ r, -b.T @ r, a], 1),
    ])


def _construction(k: int):
    """How the base order k is built (a zero-argument builder), or None."""
    if k == 1:
        return lambda: torch.ones(1, 1, dtype=torch.float64)
    if k == 2:
        return lambda: torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if k % 4:
        return None
    if _prime_power(k - 1) and (k - 1) % 4 == 3:
        return lambda: _paley1(k - 1)
    if _prime_power(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return lambda: _paley2(k // 2 - 1)
    if k // 4 in GS_SEQUENCES:
        return lambda: _goethals_seidel(k // 4)
    return None


@functools.lru_cache(maxsize=None)
def _base(k: int) -> torch.Tensor:
    """The ±1 base matrix of order k (cached; never handed out without a copy)."""
    return _construction(k)()


@functools.lru_cache(maxsize=64)
def _scaled_base(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return (_base(k) / math.sqrt(k)).to(dtype=dtype, device=device)


# -- orders --------------------------------------------------------------------------------
def _factor(n: int) -> tuple[int, int] | None:
    power = n & -n  # largest power of two dividing n; try it first, then smaller ones
    while power >= 1:
        if _construction(n // power) is not None:
            return n // power, power
        power //= 2
    return None


def _order(n) -> int | None:
    """n as a positive int (numpy integers included), or None."""
    ok = isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1
    return int(n) if ok else None


def supported(n: int) -> bool:
    """Whether ``hadamard_matrix(n)`` and ``fwht(..., n)`` can be built."""
    return _order(n) is not None and _factor(int(n)) is not None


def _nearest(n: int) -> str:
    below = next((m for m in range(n - 1, 0, -1) if supported(m)), None)
    above = next(m for m in range(n + 1, 4 * n + 8) if supported(m))
    return ", ".join(str(m) for m in (below, above) if m is not None)


def base_order(n: int) -> tuple[int, int]:
    """(K, 2^k) with n = K·2^k and H_n = H_K ⊗ H_{2^k}, taking the largest power of two.

    Raises ``ConfigError`` naming the nearest supported orders when n is not supported."""
    if _order(n) is None:
        raise ConfigError(f"a Hadamard order must be a positive integer, got {n!r}")
    n = _order(n)
    factor = _factor(n)
    if factor is not None:
        return factor
    if n > 2 and n % 4:
        why = "Hadamard matrices exist only for orders 1, 2 and multiples of 4"
    else:
        why = ("qcompile builds K·2^k for K = 1, Paley orders (q+1 for a prime power q ≡ 3 mod 4, "
               "2(q+1) for q ≡ 1 mod 4) and the Goethals–Seidel orders "
               f"{sorted(4 * m for m in GS_SEQUENCES)}")
    raise ConfigError(f"no Hadamard matrix of order {n}: {why}",
                      hint=f"the nearest supported orders are {_nearest(n)}")


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal Hadamard matrix H_n = H_K ⊗ H_{2^k} / √n (deterministic).

    Not symmetric in general: Sylvester factors are, Paley and Goethals–Seidel ones are not.
    """
    k, power = base_order(n)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(power.bit_length() - 1):
        sylvester = torch.kron(sylvester, _base(2))
    h = torch.kron(_base(k), sylvester)  # ±1, exact; then one rounding to ±1/√n
    return h.mul_(1.0 / math.sqrt(n)).to(dtype)


# -- the transform -------------------------------------------------------------------------
def _sylvester(x: torch.Tensor) -> torch.Tensor:
    """x @ H_{2^k} along the last axis: log2 rounds of butterflies over pairs (i, i + h)."""
    lead, m = x.shape[:-1], x.shape[-1]
    h = 1
    while h < m:
        pairs = x.reshape(*lead, m // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, m)
        h *= 2
    return x * (1.0 / math.sqrt(m))


def fwht(x: torch.Tensor, size: int | None = None, *, transpose: bool = False) -> torch.Tensor:
    """``x @ (I ⊗ H_size)`` along the last axis: ``H_size`` applied to each contiguous chunk of
    ``size`` elements (``size=None``: the whole axis); ``transpose=True`` applies H_sizeᵀ, the
    inverse. O(n log n) for the 2^k factor of size, a dense K×K product for the rest. Keeps the
    dtype and is differentiable."""
    if not x.is_floating_point():
        raise TypeError(f"fwht needs a floating-point tensor, got {x.dtype}")
    d = x.shape[-1]
    k, power = base_order(d if size is None else size)
    n = k * power
    if d % n:
        raise ValueError(f"Hadamard size {n} does not divide the last dimension {d}")
    y = _sylvester(x.reshape(*x.shape[:-1], d // n, k, power))
    if k > 1:  # y[c, e] = Σ_a H_K[a, c] y[a, e]: H_Kᵀ on the K axis (H_K for the transpose)
        hk = _scaled_base(k, x.dtype, x.device)
        y = (hk if transpose else hk.T) @ y
    return y.reshape(x.shape)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n random ±1 (float64) from ``torch.Generator().manual_seed(seed)``; diag(s)·H is a
    randomized Hadamard rotation (QuaRot, Ashkboos et al. 2024)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
