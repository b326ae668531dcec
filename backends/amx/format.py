"""The SparAMX-style sparse weight format, built offline from an IR weight (bf16 values or
int8 codes with per-channel scales).

A linear's weight ``W[N, K]`` is cut into *column tiles* of 16 outputs and, along K, into
rows in AMX's VNNI order (Intel SDM vol. 1 §20, "tile matrix multiply"; SparAMX, Abdelfattah
et al. 2025, §3.2):

- **bf16**: a row is one *pair* of K (``k = 2r, 2r+1``) for the 16 outputs, 32 values in the
  order ``(n0: k, k+1), (n1: k, k+1), …`` — 64 bytes, one row of an AMX B tile (16 rows = 32 K)
  and exactly what ``vdpbf16ps`` multiplies by a broadcast activation pair;
- **int8**: a row is one *quad* of K (``k = 4r … 4r+3``), 64 values ``(n0: k … k+3), …`` —
  one B-tile row for ``tdpbssd`` (16 rows = 64 K) and one ``vpdpbusd`` operand.

K is zero-padded to whole tiles (32 for bf16, 64 for int8), N to whole column tiles. Per row a
bitmask says which of its 32 (bf16, ``uint32``) or 64 (int8, ``uint64``) values are non-zero;
the non-zeros are stored packed, row after row, column tile after column tile, and
``offsets[j]`` is where column tile ``j``'s values start (a thread can start at any tile; the
per-thread start offsets of SparAMX are these at its first tile); :data:`PAD` zeros follow the
last non-zero. A row is expanded back with
``vpexpandw`` / ``vpexpandb`` from its mask and the packed values (AVX-512), or by ``pshufb``
with a control looked up per mask byte (AVX2). Bytes against dense bf16:
density + 1/16 (bf16) or density + 1/8 (int8 against dense int8).

The dense layout (:func:`dense`) is the same rows with no masks: the dense kernels stream it.
int8 weights also carry each output's code sum ``Σ_k w[n, k]`` (``vpdpbusd`` multiplies
unsigned activations: the kernels add 128 to them and subtract ``128·Σ_k w``) and scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch

from qcompile.errors import ConfigError

__all__ = ["SparseWeight", "sparse", "dense", "decode", "to_bf16_bits", "from_bf16_bits",
           "ROW_VALUES", "TILE_K", "PAD"]

#: values per row and K per 16-row tile
ROW_VALUES = {"bf16": 32, "int8": 64}
TILE_K = {"bf16": 32, "int8": 64}
_KPR = {"bf16": 2, "int8": 4}  # K per row
#: zero values a sparse layout carries past its last non-zero: the AVX2 kernels expand a row
#: from whole 16-byte loads (``QC_SP_PAD`` in ``csrc/sparamx.cc``)
PAD = 32


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 bit patterns (uint16), rounding to nearest even."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return np.asarray(b, np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)


@dataclass
class SparseWeight:
    """A weight in the sparse (``masks`` not None) or dense layout.

    ``values``: uint16 bf16 bits or int8 codes; ``masks``: uint32/uint64 ``[tiles_n, rows]``;
    ``offsets``: int64 ``[tiles_n + 1]``; ``scale``/``colsum``: per output, zero-padded to whole
    tiles of 16 (int8 only)."""

    kind: str  # "bf16" | "int8"
    n: int
    k: int
    kp: int
    values: np.ndarray
    masks: np.ndarray | None
    offsets: np.ndarray
    scale: np.ndarray | None = None
    colsum: np.ndarray | None = None

    @property
    def tiles_n(self) -> int:
        return -(-self.n // 16)

    @property
    def rows(self) -> int:
        return self.kp // _KPR[self.kind]

    @property
    def nnz(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        out = self.values.nbytes + self.offsets.nbytes
        if self.masks is not None:
            out += self.masks.nbytes
        for a in (self.scale, self.colsum):
            if a is not None:
                out += a.nbytes
        return out


def _rows(w: np.ndarray, kind: str) -> tuple[np.ndarray, int]:
    """``[tiles_n, rows, ROW_VALUES]`` in VNNI order, and the padded K."""
    n, k = w.shape
    tk, kpr = TILE_K[kind], _KPR[kind]
    kp = -(-k // tk) * tk
    np_ = -(-n // 16) * 16
    full = np.zeros((np_, kp), w.dtype)
    full[:n, :k] = w
    # [tile j, col c, row r, h] -> [j, r, c, h]
    t = full.reshape(np_ // 16, 16, kp // kpr, kpr).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(t.reshape(np_ // 16, kp // kpr, 16 * kpr)), kp


def _prepare(w, kind: str, scale=None):
    if kind not in ROW_VALUES:
        raise ConfigError(f"unknown sparse weight kind {kind!r}", hint="use 'bf16' or 'int8'")
    w = w.detach().cpu() if isinstance(w, torch.Tensor) else w
    if kind == "bf16":
        a = to_bf16_bits(np.asarray(w, np.float32))
        return a, None, None
    a = np.asarray(w)
    if a.dtype != np.int8:
        raise ConfigError(f"int8 sparse weights take int8 codes, got {a.dtype}")
    if scale is None:
        raise ConfigError("int8 sparse weights need their per-output scales")
    s = np.asarray(scale.float() if isinstance(scale, torch.Tensor) else scale,
                   np.float32).reshape(-1)
    if s.shape[0] != a.shape[0]:
        raise ConfigError(f"int8 sparse weights need one scale per output ({a.shape[0]}), got "
                          f"{s.shape[0]}", hint="quantize the weight per channel")
    # padded to whole column tiles: the kernels load them 16 at a time
    n16 = -(-a.shape[0] // 16) * 16
    sp = np.zeros(n16, np.float32)
    sp[:a.shape[0]] = s
    cs = np.zeros(n16, np.int32)
    cs[:a.shape[0]] = a.astype(np.int64).sum(1)
    return a, sp, cs


def sparse(w, kind: str = "bf16", *, scale=None) -> SparseWeight:
    """``w`` (float ``[N, K]`` for bf16, int8 codes for int8) in the sparse layout."""
    a, s, cs = _prepare(w, kind, scale)
    n, k = a.shape
    rows, kp = _rows(a, kind)
    nz = rows != 0                                                 # tiles, rows, values
    bits = (np.uint64(1) << np.arange(ROW_VALUES[kind], dtype=np.uint64))
    masks = (nz.astype(np.uint64) * bits).sum(-1, dtype=np.uint64)
    masks = masks.astype(np.uint32 if kind == "bf16" else np.uint64)
    per_tile = nz.reshape(nz.shape[0], -1).sum(1)
    offsets = np.zeros(nz.shape[0] + 1, np.int64)
    offsets[1:] = np.cumsum(per_tile)
    values = np.concatenate([rows[nz], np.zeros(PAD, rows.dtype)])  # tile, row, value; pad
    return SparseWeight(kind, n, k, kp, values, np.ascontiguousarray(masks), offsets, s, cs)


def dense(w, kind: str = "bf16", *, scale=None) -> SparseWeight:
    """``w`` in the dense VNNI-row layout (the dense kernels' input)."""
    a, s, cs = _prepare(w, kind, scale)
    rows, kp = _rows(a, kind)
    per = rows.shape[1] * rows.shape[2]
    offsets = np.arange(rows.shape[0] + 1, dtype=np.int64) * per
    return SparseWeight(kind, a.shape[0], a.shape[1], kp, np.ascontiguousarray(rows.reshape(-1)),
                        None, offsets, s, cs)


def decode(sw: SparseWeight) -> np.ndarray:
    """The ``[N, K]`` weight a layout holds (bf16 bits as float32, int8 codes as int8)."""
    tiles, rows, rv, kpr = sw.tiles_n, sw.rows, ROW_VALUES[sw.kind], _KPR[sw.kind]
    dt = np.uint16 if sw.kind == "bf16" else np.int8
    full = np.zeros((tiles, rows, rv), dt)
    if sw.masks is None:
        full[:] = sw.values.reshape(tiles, rows, rv)
    else:
        bits = (sw.masks.astype(np.uint64)[..., None] >> np.arange(rv, dtype=np.uint64)) & 1
        full[bits.astype(bool)] = sw.values[:sw.nnz]
    w = full.reshape(tiles, rows, 16, kpr).transpose(0, 2, 1, 3).reshape(tiles * 16, rows * kpr)
    w = w[:sw.n, :sw.k]
    return from_bf16_bits(w) if sw.kind == "bf16" else w
