"""Building the SparAMX-style kernels (``csrc/sparamx.cc``) with the system C++ compiler and
calling them through ctypes.

``kind``: ``"avx512"`` (the kernels that run on any AVX-512 BF16/VBMI2/VNNI CPU), ``"avx2"``
(the same kernels without ``vpexpand``: any AVX2 + FMA CPU), ``"amx"`` (hardware tiles;
refused with a clear error where the runtime gate says no) or ``"emulated"`` (the same AMX
kernel source on the C emulation of the tile registers). :func:`best_kind` is what a model
uses: AMX where the gate allows it, else AVX-512, else AVX2, else none (the pruned linears then
run on target ``cpu``'s dense kernels), each capped by ``QCOMPILE_ISA``.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from qcompile.backends.lut.build import _threads, compile_source
from qcompile.errors import BackendError

from .format import SparseWeight

__all__ = ["source", "library", "AmxLibrary", "amx_available", "best_kind", "KINDS", "KIND_OF",
           "object_instructions", "AMX_FLAGS"]

CSRC = Path(__file__).parent / "csrc"
KINDS = {"avx512": 0, "amx": 1, "emulated": 2, "avx2": 3}
#: the code ``qc_sp_kind`` (the run-time choice) returns -> its kind (-1: none)
KIND_OF = {code: name for name, code in KINDS.items() if name != "emulated"}
#: what each kind needs at run time (``emulated`` runs on the AVX-512 kernels' instructions)
_NEEDS = {"avx512": "avx512", "amx": "avx512", "emulated": "avx512", "avx2": "avx2"}
#: the flags a compile-only check of the AMX code uses (the functions also carry target
#: attributes, so the library builds without them)
AMX_FLAGS = ("-mamx-tile", "-mamx-int8", "-mamx-bf16", "-mavx512bf16", "-mavx512vbmi2",
             "-mavx512vpopcntdq")


def source() -> str:
    """``sparamx.cc`` with its includes from ``csrc/`` inlined (one text, one cache key)."""
    src = (CSRC / "sparamx.cc").read_text()
    return re.sub(r'#include "([a-z_]+\.inc)"', lambda m: (CSRC / m.group(1)).read_text(), src)


@lru_cache(maxsize=None)
def library() -> "AmxLibrary":
    return AmxLibrary()


def object_instructions(extra: tuple[str, ...] = AMX_FLAGS) -> dict[str, int]:
    """Compile the kernels to an object file with ``extra`` flags and count the AMX and
    AVX-512 instructions ``objdump -d`` shows (the compile-only check of the AMX code)."""
    cxx = os.environ.get("CXX", "c++")
    objdump = shutil.which("objdump")
    if objdump is None:
        raise BackendError("objdump is needed to inspect the AMX object code",
                           hint="install binutils (Debian: apt install binutils)")
    with tempfile.TemporaryDirectory() as tmp:
        sp, op = Path(tmp) / "k.cc", Path(tmp) / "k.o"
        sp.write_text(source())
        r = subprocess.run([cxx, "-O2", "-std=c++17", "-fopenmp", "-c", *extra, str(sp), "-o",
                            str(op)], capture_output=True, text=True)
        if r.returncode != 0:
            raise BackendError(f"compiling the AMX kernels failed:\n{r.stderr[-3000:]}")
        dis = subprocess.run([objdump, "-d", str(op)], capture_output=True, text=True).stdout
    names = ("ldtilecfg", "tileloadd", "tdpbf16ps", "tdpbssd", "tilestored", "tilezero",
             "tilerelease", "vpexpandw", "vpexpandb", "vdpbf16ps", "vpdpbusd")
    return {n: len(re.findall(rf"\b{n}\b", dis)) for n in names}


_P = ctypes.c_void_p
_I = ctypes.c_int64


class AmxLibrary:
    """The compiled kernels, called through ctypes."""

    def __init__(self):
        self.path = compile_source(source(), cxx=True, suffix="cc", tag="amx")
        self.lib = ctypes.CDLL(str(self.path))
        f = self.lib.qc_sp_matmul
        f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _I, _I, _I, _P, _P, _P, _P,
                      _P, _P, _P, _I, ctypes.c_int]
        f.restype = ctypes.c_int
        self.lib.qc_amx_available.restype = ctypes.c_int
        self.lib.qc_sp_has_avx512.restype = ctypes.c_int
        self.lib.qc_sp_has_avx2.restype = ctypes.c_int
        self.lib.qc_sp_kind.restype = ctypes.c_int

    def has_avx512(self) -> bool:
        """AVX-512 F/BW/VL with BF16, VBMI2 and VNNI (the AVX-512 and AMX kernels' needs)."""
        return bool(self.lib.qc_sp_has_avx512())

    def has_avx2(self) -> bool:
        return bool(self.lib.qc_sp_has_avx2())

    def runs(self, kind: str) -> bool:
        """Whether the instructions of ``kind``'s kernels run on this CPU (the AMX gate and
        ``QCOMPILE_ISA`` aside)."""
        return self.has_avx512() if _NEEDS[kind] == "avx512" else self.has_avx2()

    @staticmethod
    def _ptr(a):
        return None if a is None else a.ctypes.data_as(_P)

    def matmul(self, x: np.ndarray, sw: SparseWeight, bias=None, *, kind: str | None = None,
               nthreads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """``y = x · wᵀ (+ bias)``: bf16 weights with bf16-rounded activations, or int8 weights
        with per-token int8 activations (``y = Σ x_q w_q · s_x · s_w``); ``kind`` defaults to
        :func:`best_kind`."""
        if kind is None:
            kind = best_kind()
            if kind is None:
                raise BackendError("no sparse kernel runs at this ISA level (they need AVX2 "
                                   "and FMA at least)", hint="unset QCOMPILE_ISA or use target "
                                   "'cpu'")
        if kind not in KINDS:
            raise BackendError(f"unknown AMX kernel kind {kind!r}", hint=f"one of {list(KINDS)}")
        if kind != "amx" and not self.runs(kind):
            need = "AVX-512 with BF16, VBMI2 and VNNI" if _NEEDS[kind] == "avx512" else \
                "AVX2 and FMA"
            raise BackendError(f"the {kind} sparse kernels need {need}; this CPU lacks them",
                               hint="use kind 'avx2' (any AVX2 CPU) or target 'cpu'")
        if kind == "amx" and not amx_available():
            raise BackendError("AMX is not available here (CPUID or the kernel's "
                               "ARCH_REQ_XCOMP_PERM said no)",
                               hint="use kind 'avx512' (what target 'amx' falls back to) or "
                                    "'emulated'")
        x = np.ascontiguousarray(x, np.float32)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[1] != sw.k:
            raise BackendError(f"sparse matmul: x has {x2.shape[1]} columns, the weight K = {sw.k}")
        m = x2.shape[0]
        y = out if out is not None else np.empty((m, sw.n), np.float32)
        b = None if bias is None else np.ascontiguousarray(bias, np.float32)
        int8 = sw.kind == "int8"
        rc = self.lib.qc_sp_matmul(KINDS[kind], int(sw.masks is not None), int(int8),
                                   self._ptr(x2), m, sw.k, sw.kp, self._ptr(sw.masks),
                                   self._ptr(sw.values), self._ptr(sw.offsets),
                                   self._ptr(sw.colsum), self._ptr(sw.scale), self._ptr(b),
                                   self._ptr(y), sw.n, nthreads or _threads())
        if rc != 0:
            what = {-1: "a bad tile configuration", -2: "an unconfigured tile",
                    -3: "mismatched tile shapes", -10: "AMX refused at run time",
                    -20: "out of memory"}.get(rc, f"error {rc}")
            raise BackendError(f"sparse matmul ({kind}) failed: {what}")
        return y.reshape(*lead, sw.n)


def amx_available() -> bool:
    """CPUID says AMX-TILE/INT8/BF16 and the kernel grants the tile state (Linux
    ``arch_prctl(ARCH_REQ_XCOMP_PERM)``); ``QCOMPILE_NO_AMX=1`` forces no."""
    return bool(library().lib.qc_amx_available())


def best_kind() -> str | None:
    """The kind target ``amx`` runs here: ``"amx"``, ``"avx512"``, ``"avx2"`` or None (no
    sparse kernel: the CPU or ``QCOMPILE_ISA`` allows less than AVX2)."""
    from qcompile import isa
    isa.cap()  # an invalid QCOMPILE_ISA is a ConfigError, not a silent "no cap"
    return KIND_OF.get(int(library().lib.qc_sp_kind()))
