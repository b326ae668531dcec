"""Offline weight transform for the LUT kernels: integer codes → bit planes → table indices →
the byte layout a kernel variant streams.

The arithmetic (T-MAC, Wei et al., "T-MAC: CPU Renaissance via Table Lookup for Low-Bit LLM
Deployment on Edge", EuroSys 2025, §3.1–3.2; eq. 1 is the bit-serial split): a weight with
unsigned code ``q ∈ [0, 2^b)`` and zero point ``z`` (``w = s·(q − z)``) is split into ``b`` one-bit
planes, ``q = Σ_i 2^i·β_i``. Each bit becomes a sign ``σ_i = 2β_i − 1 ∈ {−1, +1}``, so

    q = ½ Σ_i 2^i σ_i + (2^b − 1)/2,
    Σ_k x_k (q_k − z) = ½ Σ_i 2^i Σ_j T_j[idx_ij] + ((2^b − 1)/2 − z)·Σ_k x_k,

where ``j`` runs over groups of ``g = 4`` activations, ``T_j[p] = Σ_t σ_t(p)·x_{4j+t}`` is the
16-entry table of signed sums (:mod:`.model`) and ``idx_ij`` is the 4-bit index whose bit ``t``
is plane ``i``'s bit of weight ``4j + t``. The second term is the *bias*: with the per-(row,
group) constant ``sb = s·((2^b − 1)/2 − z)`` it is ``sb·Σx``. Symmetric codes have
``z = 2^(b−1)``, so ``sb = −s/2`` and only ``s`` is stored; the binary format (``int1``,
``w = s·(2q − 1)``) is ``z = ½`` with scale ``2s``: no bias term at all.

Layouts (``LAYOUTS``). Rows are cut into blocks of 16, ``R`` blocks to a tile (``bm = 16R``
rows, zero-padded); ``L`` tables fill one vector register (``L = 4`` with 512-bit, ``2`` with
256-bit vectors), so one *step* covers ``L`` activation groups of 4 (``4L`` values of k). A
*unit* is one (row block, plane, step): 16 rows × ``L`` indices. Within (tile, activation group)
the units run step by step, then row block, then plane; two consecutive units share one
``16L``-byte block, the first in the low nibbles, the second in the high ones. The byte of a
unit's index that holds (row r, group j of its step) is

- ``vpermb``: ``4r + j`` — one 64-entry ``vpermb`` picks from the four tables of the step and
  ``vpdpbusd`` sums a row's four lookups (weighted by ``2^i``) into one int32 lane;
- ``shufb``: ``16j + 2r`` for rows 0–7 and ``16j + 2(r − 8) + 1`` for rows 8–15 — lane ``j`` of
  ``vpshufb`` holds table ``j``; ``vpmaddubsw`` with weights ``2^i`` on even (odd) bytes
  widens rows 0–7 (8–15) to int16.

The portable C kernel reads the ``vpermb`` layout. Scales follow the same order: per (tile,
activation group, row block) 16 floats of ``s``, then — for asymmetric codes — 16 of ``sb``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from qcompile.errors import ConfigError

__all__ = ["LAYOUTS", "ACT_GROUPS", "LutWeight", "PackedWeight", "from_quantized",
           "from_codes", "act_group_for", "pack"]

#: index layouts and the tables per register they assume
LAYOUTS = {"vpermb": 4, "shufb512": 4, "shufb256": 2, "c": 4}
#: activation groups (table-quantization groups) the kernels support, largest first
ACT_GROUPS = (128, 64, 32)
#: bias modes: "sym" (sb = −s/2, not stored), "asym" (sb stored), "none" (binary codes)
MODES = ("sym", "asym", "none")


def act_group_for(weight_group: int, k: int) -> int:
    """The activation group for a weight group of ``weight_group`` codes (``k`` for per-channel
    weights): the largest of 128/64/32 that divides it, so each activation group lies inside
    one weight group and its scales apply unchanged."""
    for a in ACT_GROUPS:
        if weight_group % a == 0:
            return a
    raise ConfigError(f"LUT kernels: weight group {weight_group} is not a multiple of 32",
                      hint="quantize with group_size 32, 64 or 128 (or per channel with K a "
                           "multiple of 32), or use target 'cpu'")


@dataclass
class LutWeight:
    """A weight ready for the LUT kernels, before layout: ``q`` unsigned codes ``[n, kp]``
    (``kp`` = ``k`` padded to a multiple of 32 with zero codes), per (row, activation group)
    ``s`` and ``sb`` (float32 ``[n, kp/group]``), ``bits``, the activation ``group``, ``mode``
    and the real ``k``."""

    q: np.ndarray
    s: np.ndarray
    sb: np.ndarray
    bits: int
    group: int
    mode: str
    k: int

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def kp(self) -> int:
        return self.q.shape[1]

    @property
    def ng(self) -> int:
        return self.kp // self.group

    def dequantize(self) -> np.ndarray:
        """``w[n, k] = s·(q − z)`` in float64 (the weight the kernel computes with, exactly)."""
        rep = np.repeat(np.arange(self.ng), self.group)
        s = self.s.astype(np.float64)[:, rep]
        sb = self.sb.astype(np.float64)[:, rep]
        c = (2 ** self.bits - 1) / 2
        # sb = s·(c − z)  ⇒  s·(q − z) = s·(q − c) + sb
        w = s * (self.q.astype(np.float64) - c) + sb
        return w[:, :self.k]

    def planes(self) -> np.ndarray:
        """``idx[i, n, j]``: plane ``i``'s 4-bit table index for rows ``n``, activation groups of
        four ``j`` (bit ``t`` = plane ``i``'s bit of code ``q[n, 4j + t]``)."""
        q = self.q.reshape(self.n, self.kp // 4, 4)
        out = np.zeros((self.bits, self.n, self.kp // 4), np.uint8)
        for i in range(self.bits):
            bit = (q >> i) & 1
            out[i] = bit[..., 0] | (bit[..., 1] << 1) | (bit[..., 2] << 2) | (bit[..., 3] << 3)
        return out


def from_codes(codes, scale, zero_point=None, *, bits: int, signed: bool, binary: bool = False,
               k: int | None = None, weight_group: int | None = None) -> LutWeight:
    """A :class:`LutWeight` from a format's codes ``[n, k]`` and parameters ``[n, groups]``
    (one column for per-channel weights): signed symmetric codes are offset to unsigned, the
    binary format becomes ``z = ½`` with scale ``2s``, asymmetric zero points give ``sb``."""
    codes = codes.numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    scale = scale.float().numpy() if isinstance(scale, torch.Tensor) else np.asarray(scale)
    if zero_point is not None and isinstance(zero_point, torch.Tensor):
        zero_point = zero_point.numpy()
    if not 1 <= bits <= 4:
        raise ConfigError(f"LUT kernels take 1- to 4-bit weights, got {bits} bits",
                          hint="use target 'cpu' (TVM dequant kernels) for 8-bit weights")
    n, kk = codes.shape
    k = kk if k is None else k
    scale = np.asarray(scale, np.float32).reshape(n, -1)
    wg = weight_group if weight_group is not None else (k if scale.shape[1] == 1 else
                                                         k // scale.shape[1])
    if scale.shape[1] * wg < k:
        raise ConfigError(f"LUT kernels: {scale.shape[1]} scale groups of {wg} do not cover "
                          f"K = {k}")
    kp = -(-k // 32) * 32
    per_channel = scale.shape[1] == 1
    group = act_group_for(kp if per_channel else wg, kp)
    if not per_channel and wg % group:
        raise ConfigError(f"LUT kernels: weight group {wg} is no multiple of 32")
    ng = kp // group
    # each activation group's weight group
    wgi = np.minimum(np.arange(ng) * group // wg, scale.shape[1] - 1) if not per_channel \
        else np.zeros(ng, np.int64)
    s = scale[:, wgi].astype(np.float32)
    c = np.float32((2 ** bits - 1) / 2)
    if binary:
        q = codes.astype(np.uint8)
        s = (s * np.float32(2)).astype(np.float32)
        sb = np.zeros_like(s)
        mode = "none"
    elif zero_point is not None:
        q = codes.astype(np.uint8)
        z = np.asarray(zero_point, np.float32).reshape(n, -1)[:, wgi]
        sb = (s * (c - z)).astype(np.float32)
        mode = "asym"
    else:
        off = 1 << (bits - 1)
        q = (codes.astype(np.int16) + (off if signed else 0)).astype(np.uint8)
        sb = (s * np.float32(-0.5)).astype(np.float32)
        mode = "sym"
    if q.size and int(q.max()) >= (1 << bits):
        raise ConfigError(f"LUT kernels: codes exceed {bits} bits (max {int(q.max())})")
    if kp != k or kk != kp:
        qp = np.zeros((n, kp), np.uint8)
        qp[:, :k] = q[:, :k]
        # padded codes meet zero activations: any value works; keep the zero point's
        q = qp
    return LutWeight(q=np.ascontiguousarray(q), s=s, sb=sb, bits=bits, group=group, mode=mode,
                     k=k)


def from_quantized(qt) -> LutWeight:
    """A :class:`LutWeight` from a :class:`~qcompile.formats.base.QuantizedTensor` of an integer
    format (``intN`` / ``uintN``, N ≤ 4, per group or per channel, blocks along K)."""
    from qcompile.formats.integer import IntFormat
    from qcompile.ir.quant import Granularity
    fmt = qt.format
    if not isinstance(fmt, IntFormat):
        raise ConfigError(f"LUT kernels take integer formats, got {fmt.name}",
                          hint="quantize the weight to int1..int4 / uint1..uint4")
    if fmt.granularity not in (Granularity.PER_GROUP, Granularity.PER_CHANNEL):
        raise ConfigError(f"LUT kernels: {fmt.name} is {fmt.granularity.value}; they need "
                          "per-group or per-channel scales")
    if len(qt.shape) != 2:
        raise ConfigError(f"LUT kernels take 2-D weights, got shape {tuple(qt.shape)}")
    gs = getattr(fmt, "group_size", None) if fmt.granularity == Granularity.PER_GROUP else None
    return from_codes(qt.codes, qt.params["scale"], qt.params.get("zero_point"),
                      bits=fmt.bits, signed=fmt.signed, binary=fmt.binary,
                      weight_group=gs)


@dataclass
class PackedWeight:
    """A weight in one kernel layout: ``w`` (uint8 index blocks), ``sc`` (float32 scales),
    the logical shape and the layout parameters."""

    w: np.ndarray
    sc: np.ndarray
    n: int
    k: int
    kp: int
    bits: int
    group: int
    mode: str
    layout: str
    rb: int  # row blocks per tile (bm = 16·rb)
    meta: dict = field(default_factory=dict)

    @property
    def bm(self) -> int:
        return 16 * self.rb

    @property
    def tiles(self) -> int:
        return -(-self.n // self.bm)

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.sc.nbytes


def pack(lw: LutWeight, layout: str = "vpermb", rb: int = 4) -> PackedWeight:
    """``lw`` in ``layout`` with tiles of ``rb`` row blocks (see the module docstring)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown LUT layout {layout!r}", hint=f"one of {sorted(LAYOUTS)}")
    L = LAYOUTS[layout]
    b, G = lw.bits, lw.group
    bm = 16 * rb
    npad = -(-lw.n // bm) * bm
    tiles, ng = npad // bm, lw.ng
    steps = G // (4 * L)
    idx = np.zeros((b, npad, lw.kp // 4), np.uint8)
    idx[:, :lw.n] = lw.planes()
    # [plane, tile, rb, r, group, step, j] -> units ordered (tile, group, step, rb, plane)
    v = idx.reshape(b, tiles, rb, 16, ng, steps, L)
    v = v.transpose(1, 4, 5, 2, 0, 3, 6)  # tile, group, step, rb, plane, r, j
    units = v.reshape(tiles, ng, steps * rb * b, 16, L)
    if layout in ("vpermb", "c"):
        ub = units.reshape(tiles, ng, steps * rb * b, 16 * L)
    else:
        r = np.arange(16)
        pos = np.where(r < 8, 2 * r, 2 * (r - 8) + 1)
        ub = np.zeros((tiles, ng, steps * rb * b, 16 * L), np.uint8)
        for j in range(L):
            ub[..., 16 * j + pos] = units[..., :, j]
    nu = steps * rb * b
    if nu % 2:  # only when a group has one step: G = 4L·1 (never for G ≥ 32 with L ≤ 4)
        raise ConfigError(f"LUT layout {layout}: {nu} units per group is odd")
    w = ub[:, :, 0::2] | (ub[:, :, 1::2] << 4)
    ns = 2 if lw.mode == "asym" else 1
    s = np.zeros((npad, ng), np.float32)
    s[:lw.n] = lw.s
    sc = [s.reshape(tiles, rb, 16, ng).transpose(0, 3, 1, 2)]
    if ns == 2:
        sb = np.zeros((npad, ng), np.float32)
        sb[:lw.n] = lw.sb
        sc.append(sb.reshape(tiles, rb, 16, ng).transpose(0, 3, 1, 2))
    sc = np.stack(sc, axis=3)  # tile, group, rb, ns, 16
    return PackedWeight(w=np.ascontiguousarray(w.reshape(-1)),
                        sc=np.ascontiguousarray(sc.reshape(-1)), n=lw.n, k=lw.k, kp=lw.kp,
                        bits=b, group=G, mode=lw.mode, layout=layout, rb=rb)
