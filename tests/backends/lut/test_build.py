"""Building and calling the kernels: the cache, the ctypes entry's checks, compiler errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompile import formats as F
from qcompile.backends.lut import build as B
from qcompile.backends.lut import weights as W
from qcompile.backends.lut.codegen import KernelConfig
from qcompile.errors import BackendError


def test_host_variants_end_with_the_portable_kernel():
    vs = B.host_variants()
    assert vs[-1] == "c" and len(set(vs)) == len(vs)


def test_libraries_are_cached_by_source(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    src = "int qc_probe(void) { return 7; }\n"
    p1 = B.compile_source(src)
    mtime = p1.stat().st_mtime_ns
    assert B.compile_source(src) == p1 and p1.stat().st_mtime_ns == mtime
    assert B.compile_source(src + "\n") != p1
    assert p1.parent == tmp_path / "lut"
    assert not [f for f in p1.parent.iterdir() if f.is_dir()]  # no temporary leftovers


def test_a_compile_error_names_the_compiler_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    with pytest.raises(BackendError, match="compiling the LUT kernels failed"):
        B.compile_source("this is not C\n")
    assert list((tmp_path / "lut").iterdir()) == []


def test_no_compiler(monkeypatch):
    monkeypatch.setenv("CC", "")
    monkeypatch.setattr(B.shutil, "which", lambda name: None)
    with pytest.raises(BackendError, match="needs a C compiler") as e:
        B.compiler()
    assert "apt install gcc" in e.value.hint


def test_matmul_checks_its_arguments():
    v = B.host_variants()[0]
    c = KernelConfig(v, 2, 32, "sym", rb=1)
    lib = B.LutLibrary([c])
    lw = W.from_quantized(F.get("int2", group_size=32).quantize(torch.randn(16, 64)))
    with pytest.raises(BackendError, match="does not match the packed weight"):
        lib.matmul(c, np.zeros((1, 64), np.float32), W.pack(lw, "vpermb", rb=2))
    pw = W.pack(lw, {"c": "c"}.get(v, v), rb=1)
    with pytest.raises(BackendError, match="x has 32 columns, the weight K = 64"):
        lib.matmul(c, np.zeros((1, 32), np.float32), pw)
    y = lib.matmul(c, np.zeros((2, 3, 64), np.float32), pw)
    assert y.shape == (2, 3, 16) and not y.any()
