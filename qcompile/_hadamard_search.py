"""Search for the Goethals–Seidel sequences stored in ``qcompile._hadamard_data``.

A Goethals–Seidel array (Goethals & Seidel 1967) turns four ±1 sequences a, b, c, d of odd
length n whose periodic autocorrelations sum to zero at every non-zero shift into a
Hadamard matrix of order 4n. Searching all 2^(4n) quadruples is hopeless, so, as in
Djokovic's searches for supplementary difference sets with a multiplier group, each sequence
is taken constant on the orbits of a cyclic subgroup H = <h> of the units mod n acting on
Z_n by multiplication. That leaves 2^(orbits) candidates per sequence; those whose power
spectrum exceeds 4n somewhere cannot be part of a solution and are dropped, the row sums
must satisfy a² + b² + c² + d² = 4n, and the pairs (a, b) and (c, d) are matched on their
summed autocorrelations (meet in the middle). Every order in ``ORDERS`` takes well under a
second.

Regenerate the data module with ``python -m qcompile._hadamard_search > qcompile/_hadamard_data.py``.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = ["ORDERS", "find_gs_sequences", "search", "paf_sum"]

# odd n with 4n <= 476 that neither Paley construction nor a Kronecker factor of 2 reaches
ORDERS = (23, 29, 39, 43, 65, 73, 93, 119)
_MAX_ORBITS = 16  # 2^16 candidates per sequence keeps each search small


def _orbits(n: int, h: int) -> list[list[int]]:
    seen: set[int] = set()
    out = []
    for x in range(n):
        if x not in seen:
            orbit = [x]
            while (y := orbit[-1] * h % n) != x:
                orbit.append(y)
            seen.update(orbit)
            out.append(orbit)
    return out


def _subgroup_generators(n: int) -> list[int]:
    """One generator per cyclic subgroup of the units mod n, largest subgroup first."""
    groups: dict[frozenset, int] = {}
    for u in range(2, n):
        if math.gcd(u, n) == 1:
            powers, y = {1}, u
            while y != 1:
                powers.add(y)
                y = y * u % n
            groups.setdefault(frozenset(powers), u)
    return [u for g, u in sorted(groups.items(), key=lambda kv: -len(kv[0]))]


def _odd_four_squares(t: int) -> list[tuple[int, ...]]:
    """Sorted positive odd (a, b, c, d) with a² + b² + c² + d² = t (the row sums)."""
    odd = range(1, math.isqrt(t) + 1, 2)
    return [s for s in itertools.combinations_with_replacement(odd, 4) if sum(v * v for v in s) == t]


def paf_sum(seqs) -> np.ndarray:
    """The summed periodic autocorrelation of ±1 sequences (rows), at shifts 0..n-1."""
    f = np.abs(np.fft.fft(np.asarray(seqs, dtype=np.float64), axis=-1)) ** 2
    return np.rint(np.fft.ifft(f, axis=-1).real).astype(np.int64).reshape(-1, f.shape[-1]).sum(0)


def search(n: int, h: int) -> np.ndarray | None:
    """Four ±1 rows constant on the orbits of <h>, with zero summed autocorrelation, or None."""
    orbits = _orbits(n, h)
    member = np.zeros((len(orbits), n), np.int64)
    for i, o in enumerate(orbits):
        member[i, o] = 1
    bits = (np.arange(2 ** len(orbits))[:, None] >> np.arange(len(orbits))) & 1
    x = (1 - 2 * bits) @ member
    x = x[x.sum(1) > 0]  # -x has the same autocorrelation: keep one sign
    psd = np.abs(np.fft.fft(x, axis=1)) ** 2
    fits = (psd <= 4 * n + 1e-6).all(1)  # each spectrum is part of a sum that is 4n everywhere
    x, psd = x[fits], psd[fits]
    paf = np.rint(np.fft.ifft(psd, axis=1).real).astype(np.int64)[:, 1:(n + 1) // 2]
    weights = np.array([pow(6364136223846793005, i + 1, 2 ** 63) for i in range(paf.shape[1])])
    key = paf @ weights  # a hash of the autocorrelation (wraps mod 2^64); hits are re-checked
    rows = {s: np.nonzero(x.sum(1) == s)[0] for s in np.unique(x.sum(1))}
    for sums in _odd_four_squares(4 * n):
        if not all(s in rows for s in sums):
            continue
        ra, rb, rc, rd = (rows[s] for s in sums)
        left = (key[ra][:, None] + key[rb][None, :]).ravel()
        right = -(key[rc][:, None] + key[rd][None, :]).ravel()
        _, hits_left, hits_right = np.intersect1d(left, right, return_indices=True)
        for u, v in zip(hits_left, hits_right):
            quad = x[[ra[u // len(rb)], rb[u % len(rb)], rc[v // len(rd)], rd[v % len(rd)]]]
            if not paf_sum(quad)[1:].any():
                return quad
    return None


def find_gs_sequences(n: int) -> tuple[int, np.ndarray]:
    """The first (h, sequences) found over the subgroups of the units mod n, largest first."""
    for h in _subgroup_generators(n):
        if len(_orbits(n, h)) <= _MAX_ORBITS and (quad := search(n, h)) is not None:
            return h, quad
    raise ValueError(f"no Goethals–Seidel sequences of length {n} with <= {_MAX_ORBITS} orbits")


def to_hex(seq) -> str:
    """Bit i of the hex number is 1 where element i is -1."""
    return format(sum(1 << i for i, v in enumerate(seq) if v < 0), "x")


def main() -> None:
    print('"""Goethals–Seidel sequences for Hadamard orders 4n that Paley does not reach.\n\n'
          "Generated by ``python -m qcompile._hadamard_search > qcompile/_hadamard_data.py``;\n"
          "do not edit. ``GS_SEQUENCES[n] = (h, (a, b, c, d))``: four ±1 sequences of length n,\n"
          "constant on the orbits of multiplication by h mod n, as hex numbers whose bit i is 1\n"
          'where element i is -1."""\n\n__all__ = ["GS_SEQUENCES"]\n\nGS_SEQUENCES = {')
    for n in ORDERS:
        h, quad = find_gs_sequences(n)
        print(f"    {n}: ({h}, (")
        for s in quad:
            print(f'        "{to_hex(s)}",')
        print("    )),")
    print("}")


if __name__ == "__main__":
    main()
