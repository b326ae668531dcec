"""Compiling the generated C with the system compiler, caching the shared libraries, and the
standalone (ctypes) entry points.

Libraries are cached under :func:`cache_dir` by the SHA-256 of their source and flags; a
build writes a temporary file and renames it into place, so a crash never leaves a
half-written library behind and concurrent builds agree.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from qcompile.errors import BackendError

from .codegen import KernelConfig, generate
from .weights import PackedWeight

__all__ = ["cache_dir", "host_variants", "VARIANT_FEATURES", "compiler", "compile_source",
           "LutLibrary", "CFLAGS"]

CFLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
          "-fvisibility=hidden", "-fopenmp", "-fno-strict-aliasing")


def cache_dir() -> Path:
    """``$QCOMPILE_CACHE`` or ``$XDG_CACHE_HOME/qcompile`` (default ``~/.cache/qcompile``)."""
    env = os.environ.get("QCOMPILE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "qcompile"


@lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: the instruction-set features each kernel variant needs (LLVM names, :mod:`qcompile.isa`)
VARIANT_FEATURES = {
    "vpermb": frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vbmi",
                         "avx512vnni"}),
    "shufb512": frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"}),
    "shufb256": frozenset({"avx2", "fma"}),
    "c": frozenset(),
}


def host_variants() -> list[str]:
    """Kernel variants this CPU runs at the level ``QCOMPILE_ISA`` allows, fastest first (the
    portable one always)."""
    from qcompile import isa
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["c"]
    have = isa.allowed_features()
    return [v for v, need in VARIANT_FEATURES.items() if need <= have]


def compiler() -> str:
    """The C compiler: ``$CC``, else ``cc``/``gcc``/``clang`` on PATH."""
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    raise BackendError("target 'lut' needs a C compiler and none was found (tried $CC, cc, "
                       "gcc, clang)", hint="install gcc (Debian: apt install gcc) or set CC")


def compile_source(src: str, *, extra: tuple[str, ...] = (), cxx: bool = False,
                   suffix: str = "c", tag: str = "lut", openmp: bool = True) -> Path:
    """Compile ``src`` into a cached shared library and return its path (``openmp=False``
    drops ``-fopenmp``: for libraries whose threads come from elsewhere, e.g. TVM's pool)."""
    cc = os.environ.get("CXX", "c++") if cxx else compiler()
    flags = tuple(f for f in CFLAGS if not (cxx and f.startswith("-std="))
                  and (openmp or f != "-fopenmp")) + tuple(extra)
    if cxx:
        flags = flags + ("-std=c++17",)
    key = hashlib.sha256((src + "\0" + " ".join((cc,) + flags)).encode()).hexdigest()[:24]
    out_dir = cache_dir() / "lut"
    out = out_dir / f"{tag}-{key}.so"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        sp = Path(tmp) / f"k.{suffix}"
        sp.write_text(src)
        so = Path(tmp) / "k.so"
        cmd = [cc, *flags, str(sp), "-o", str(so)]
        # libraries go after the sources for the linker
        libs = [f for f in flags if f.startswith("-l") or f.startswith("-Wl,")]
        cmd = [cc, *[f for f in flags if f not in libs], str(sp), "-o", str(so), *libs]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BackendError(f"compiling the LUT kernels failed ({cc}):\n{r.stderr[-4000:]}",
                               hint="check that the compiler supports AVX-512/AVX2 intrinsics "
                                    "(gcc >= 8); report the error with the generated source")
        os.replace(so, out)
    return out


_P = ctypes.c_void_p
_I = ctypes.c_int64


class LutLibrary:
    """A compiled set of kernel configurations, called through ctypes (no TVM needed)."""

    def __init__(self, configs, *, source: str | None = None):
        self.configs = list(dict.fromkeys(configs))
        self.source = source if source is not None else generate(self.configs)
        self.path = compile_source(self.source)
        self.lib = ctypes.CDLL(str(self.path))
        for c in self.configs:
            f = getattr(self.lib, f"{c.name}_matmul")
            f.argtypes = [_P, _P, _P, _P, _P, _I, _I, _I, _I, ctypes.c_int]
            f.restype = ctypes.c_int
            r = getattr(self.lib, f"{c.name}_run")
            r.argtypes = [_P] * 7 + [_I] * 5
            r.restype = None
        for nm in ("qc_lut_precompute", "qc_lut_precompute_c"):
            p = getattr(self.lib, nm)
            p.argtypes = [_P, _I, _I, _I, _I, _P, _P, _P]
            p.restype = None

    @staticmethod
    def _ptr(a):
        return None if a is None else a.ctypes.data_as(_P)

    def precompute(self, x: np.ndarray, group: int, kp: int, *, scalar: bool = False):
        """The library's tables ``(tq, tsh, xs)`` for ``x[m, k]`` (for the bit-exact tests)."""
        x = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
        m, k = x.shape
        tq = np.empty((m, kp // 4, 16), np.int8)
        tsh = np.empty((m, kp // group), np.float32)
        xs = np.empty((m, kp // group), np.float32)
        fn = self.lib.qc_lut_precompute_c if scalar else self.lib.qc_lut_precompute
        fn(self._ptr(x), m, k, kp, group, self._ptr(tq), self._ptr(tsh), self._ptr(xs))
        return tq, tsh, xs

    def matmul(self, config: KernelConfig, x: np.ndarray, pw: PackedWeight, bias=None,
               nthreads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """``y = x · wᵀ (+ bias)`` with the kernel of ``config`` on weight ``pw``."""
        if config.rb != pw.rb or config.bits != pw.bits or config.group != pw.group:
            raise BackendError(f"kernel {config.name} does not match the packed weight "
                               f"(rb {pw.rb}, {pw.bits} bits, group {pw.group})")
        x = np.ascontiguousarray(x, np.float32)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[1] != pw.k:
            raise BackendError(f"LUT matmul: x has {x2.shape[1]} columns, the weight K = {pw.k}")
        m = x2.shape[0]
        y = out if out is not None else np.empty((m, pw.n), np.float32)
        b = None if bias is None else np.ascontiguousarray(bias, np.float32)
        nt = nthreads or _threads()
        f = getattr(self.lib, f"{config.name}_matmul")
        rc = f(self._ptr(x2), self._ptr(pw.w), self._ptr(pw.sc), self._ptr(b), self._ptr(y),
               m, pw.n, pw.k, pw.kp, nt)
        if rc != 0:
            raise BackendError("LUT matmul: out of memory for the tables")
        return y.reshape(*lead, pw.n)


def _threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS") or os.environ.get("TVM_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
