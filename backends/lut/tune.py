"""Choosing a kernel configuration per shape: a measured grid search over variant, tile rows
(``rb`` blocks of 16), k-factor (``u`` interleaved int32 accumulators) and activation rows per
pass (``mt``), cached per machine as JSON in the user's cache directory
(``<cache>/lut/tune-<machine>.json``, :func:`~.build.cache_dir`).

Without a cached entry :func:`choose` returns :func:`default_config` (no timing), so builds
stay deterministic and fast unless tuning is asked for (``tune=True``; never in CI).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from qcompile import isa

from .build import LutLibrary, _threads, cache_dir, cpu_model, host_variants
from .codegen import VARIANT_LAYOUT, KernelConfig
from .weights import LutWeight, pack

__all__ = ["default_config", "candidates", "choose", "tune", "machine_key", "cache_path",
           "m_bucket"]

ROW_BLOCKS = (2, 4, 8)
KFACTORS = (1, 2)


def m_bucket(m: int | None) -> int:
    """The activation-row class a configuration is tuned for: 1 (GEMV), 4 (small batch) or 16."""
    if m is None or m <= 1:
        return 1
    return 4 if m < 16 else 16


def machine_key() -> str:
    """A short hash of what a tuning result depends on: CPU model, ISA flags, threads."""
    raw = "|".join([platform.machine(), cpu_model(), " ".join(sorted(isa.host_features())),
                    str(_threads())])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def cache_path() -> Path:
    return cache_dir() / "lut" / f"tune-{machine_key()}.json"


def _key(n: int, kp: int, bits: int, group: int, mode: str, m: int) -> str:
    return f"n{n}_k{kp}_b{bits}_g{group}_{mode}_m{m_bucket(m)}"


def default_config(bits: int, group: int, mode: str, m: int | None = 1,
                   variant: str | None = None) -> KernelConfig:
    """The untuned choice: the host's fastest variant, 4 row blocks per tile, two interleaved
    accumulators for ``vpermb`` GEMV, four activation rows per pass for batches."""
    v = variant or host_variants()[0]
    mb = m_bucket(m)
    mt = 1 if mb == 1 else (4 if v == "vpermb" else 2)
    u = 2 if v == "vpermb" and mb == 1 else 1
    return KernelConfig(v, bits, group, mode, rb=4, mt=mt, u=u)


def candidates(bits: int, group: int, mode: str, m: int | None = 1,
               variants: list[str] | None = None) -> list[KernelConfig]:
    """The grid :func:`tune` measures."""
    vs = variants or [v for v in host_variants() if v != "c"] or ["c"]
    mb = m_bucket(m)
    out = []
    for v in vs:
        for rb in ROW_BLOCKS:
            for u in (KFACTORS if v == "vpermb" else (1,)):
                for mt in ((1,) if mb == 1 else (2, 4)):
                    out.append(KernelConfig(v, bits, group, mode, rb=rb, mt=mt, u=u))
    return out


def _load() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save(data: dict) -> None:
    p = cache_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, p)


def choose(n: int, kp: int, bits: int, group: int, mode: str, m: int | None = 1, *,
           tune_missing: bool = False) -> KernelConfig:
    """The cached tuned configuration for this shape, else :func:`default_config` (or a fresh
    tuning run with ``tune_missing``)."""
    hit = _load().get(_key(n, kp, bits, group, mode, m or 1))
    if hit is not None:
        c = KernelConfig(**hit["config"])
        if c.variant in host_variants():
            return c
    if tune_missing:
        return tune(n, kp, bits, group, mode, m or 1)
    return default_config(bits, group, mode, m)


def _timeit(fn, reps: int, rounds: int) -> float:
    for _ in range(max(2, reps // 4)):
        fn()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        ts.append((time.perf_counter() - t) / reps)
    return float(np.median(ts))


def tune(n: int, kp: int, bits: int, group: int, mode: str, m: int = 1, *,
         variants: list[str] | None = None, threads: int | None = None,
         progress: bool = True, save: bool = True, seed: int = 0) -> KernelConfig:
    """Time every candidate on a random weight of this shape (``m`` rows of activations) and
    cache the fastest. Returns it."""
    from tqdm.auto import tqdm
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 1 << bits, size=(n, kp), dtype=np.uint8)
    ng = kp // group
    s = (rng.random((n, ng), dtype=np.float32) + 0.5).astype(np.float32)
    lw = LutWeight(q=q, s=s, sb=(s * np.float32(-0.5)).astype(np.float32), bits=bits,
                   group=group, mode=mode, k=kp)
    mm = {1: 1, 4: 4, 16: 16}[m_bucket(m)]
    x = rng.standard_normal((mm, kp)).astype(np.float32)
    cands = candidates(bits, group, mode, m, variants)
    lib = LutLibrary(cands)
    out = np.empty((mm, n), np.float32)
    reps = max(3, int(2e7 / max(1, n * kp * bits // 8 * mm)))
    results = []
    packs = {}
    for c in tqdm(cands, desc=f"tuning LUT {n}x{kp} W{bits}", disable=not progress,
                  unit="cfg"):
        lay = VARIANT_LAYOUT[c.variant]
        if (lay, c.rb) not in packs:
            packs[(lay, c.rb)] = pack(lw, lay, rb=c.rb)
        pw = packs[(lay, c.rb)]
        t = _timeit(lambda: lib.matmul(c, x, pw, out=out, nthreads=threads), reps, 5)
        results.append((t, c))
    t, best = min(results, key=lambda r: r[0])
    if save:
        data = _load()
        data[_key(n, kp, bits, group, mode, m)] = {
            "config": {"variant": best.variant, "bits": best.bits, "group": best.group,
                       "mode": best.mode, "rb": best.rb, "mt": best.mt, "u": best.u},
            "seconds": t, "m": mm,
            "all": {c.name: tt for tt, c in results}}
        _save(data)
    return best
