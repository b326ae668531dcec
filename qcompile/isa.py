"""The instruction sets qcompile may use on this machine.

A CPU is placed at one of four *levels*, each a superset of the one before:

========== ======================================================== =========================
level      needs (canonical LLVM feature names)                      what runs there
========== ======================================================== =========================
generic    nothing beyond x86-64 (or any non-x86 CPU)                portable C, TVM ``x86-64``
avx2       ``avx avx2 fma``                                          AVX2 kernels, ``x86-64-v3``
avx512     + ``avx512f avx512bw avx512dq avx512vl``                  AVX-512 kernels
amx        + ``amx-tile amx-int8 amx-bf16``                          AMX tile kernels
========== ======================================================== =========================

``QCOMPILE_ISA=generic|avx2|avx512|amx`` caps the level: code generation (TVM ``-mcpu`` /
``-mattr``), the LUT kernel variants and the sparse kernels then use nothing above it, so an
AVX-512 host also builds, runs and tests the AVX2 and portable paths, and an artifact can be
built for machines weaker than the build host. Features are read from ``/proc/cpuinfo`` and
named as LLVM names them (``avx512vnni``, ``amx-int8``); a feature counts at the level of its
family (every ``avx512*`` at ``avx512``), so the cap hides the subsets above it too.
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

from qcompile.errors import ConfigError

__all__ = ["LEVELS", "ENV", "REQUIRES", "host_features", "host_level", "cap", "level",
           "allowed_features", "supported_levels", "feature_level", "at_least", "describe"]

#: the levels, weakest first
LEVELS = ("generic", "avx2", "avx512", "amx")
#: the environment variable that caps the level
ENV = "QCOMPILE_ISA"
#: what each level needs beyond the one below it
REQUIRES = {
    "generic": frozenset(),
    "avx2": frozenset({"avx", "avx2", "fma"}),
    "avx512": frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"}),
    "amx": frozenset({"amx-tile", "amx-int8", "amx-bf16"}),
}
#: features below AVX2 that the AVX2 level brings with it (x86-64-v3)
_V3 = frozenset({"avx", "avx2", "fma", "f16c", "bmi", "bmi2", "lzcnt", "movbe"})


def _canonical(flag: str) -> str:
    """``/proc/cpuinfo`` flag -> LLVM feature name (``avx512_vnni`` -> ``avx512vnni``,
    ``amx_int8`` -> ``amx-int8``, ``sse4_2`` -> ``sse4.2``, ``bmi1`` -> ``bmi``, ``abm`` ->
    ``lzcnt``)."""
    if flag.startswith("amx_"):
        return flag.replace("_", "-")
    if flag.startswith("sse4_"):
        return flag.replace("_", ".")
    return {"bmi1": "bmi", "abm": "lzcnt"}.get(flag, flag.replace("_", ""))


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


@lru_cache(maxsize=None)
def host_features() -> frozenset[str]:
    """Every feature flag of this CPU, LLVM-named (empty where ``/proc/cpuinfo`` is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(_canonical(f) for f in line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def feature_level(feature: str) -> str:
    """The level a feature belongs to (``avx512vnni`` -> ``avx512``, ``sse4.2`` -> generic)."""
    if feature.startswith("amx"):
        return "amx"
    if feature.startswith("avx512"):
        return "avx512"
    if feature in _V3 or feature.startswith("avx"):  # avx, avx2, avxvnni, ...
        return "avx2"
    return "generic"


def _level_of(features: frozenset[str]) -> str:
    if not _is_x86():
        return "generic"
    have = "generic"
    need: frozenset[str] = frozenset()
    for lv in LEVELS[1:]:
        need = need | REQUIRES[lv]
        if not need <= features:
            break
        have = lv
    return have


def host_level() -> str:
    """The highest level this CPU supports, whatever ``QCOMPILE_ISA`` says."""
    return _level_of(host_features())


def cap() -> str | None:
    """``QCOMPILE_ISA`` when set (checked), else None."""
    v = os.environ.get(ENV, "").strip().lower()
    if not v:
        return None
    if v not in LEVELS:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r} is not an instruction-set level",
                          hint=f"use one of {', '.join(LEVELS)} (or unset it for the host's "
                               f"own, {host_level()})")
    return v


def level() -> str:
    """The level qcompile builds and runs at: the host's, capped by ``QCOMPILE_ISA``."""
    host, c = host_level(), cap()
    return host if c is None or LEVELS.index(c) >= LEVELS.index(host) else c


def at_least(lv: str) -> bool:
    """Whether :func:`level` is ``lv`` or above."""
    return LEVELS.index(level()) >= LEVELS.index(lv)


def allowed_features() -> frozenset[str]:
    """The host's features that the current :func:`level` allows code to use."""
    top = LEVELS.index(level())
    return frozenset(f for f in host_features() if LEVELS.index(feature_level(f)) <= top)


def supported_levels() -> list[str]:
    """Every level this host can run, weakest first (what the suite tests on)."""
    return list(LEVELS[:LEVELS.index(host_level()) + 1])


def describe() -> dict:
    """The level, the host's, the cap and the SIMD features in force (for reports)."""
    simd = sorted(f for f in allowed_features() if feature_level(f) != "generic")
    return {"level": level(), "host_level": host_level(), "cap": cap(), "features": simd}
