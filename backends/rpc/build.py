"""Build a graph here for a remote CPU: the TVM ``cpu`` backend's code, at the instruction-set
level the remote runs.

The level is the one asked for (``isa=`` / ``?isa=``), else the lower of this machine's
(:func:`qcompile.isa.level`, which ``QCOMPILE_ISA`` caps) and the remote's (from the features
its TVM reports). The TVM backend chooses LLVM's CPU and the kernels from
:func:`qcompile.isa.level` when it builds, so the build runs with ``QCOMPILE_ISA`` set to that
level (and restored after): ``avx2`` builds for ``x86-64-v3`` with the AVX2 kernels, whatever
this host has above it. A level above this host's is refused; so is one above the remote's.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from qcompile.backends.rpc.session import RemoteCpu
from qcompile.errors import BackendError, ConfigError

__all__ = ["choose_level", "isa_level", "build_library", "check_remote_cpu"]


def choose_level(requested: str | None, remote: RemoteCpu | None) -> str:
    """The :mod:`qcompile.isa` level to build at for a remote with CPU ``remote`` (None:
    unknown, this machine's level is assumed)."""
    from qcompile import isa
    host = isa.host_level()
    if remote is not None and remote.arch != _host_arch():
        raise BackendError(f"the remote CPU is {remote.arch} ({remote.triple}); this machine "
                           f"builds {_host_arch()} code for rpc:// targets",
                           hint="use a remote of this machine's architecture")
    if requested is not None:
        if requested not in isa.LEVELS:
            raise ConfigError(f"isa={requested!r} is not an instruction-set level",
                              hint=f"use one of {', '.join(isa.LEVELS)}")
        if isa.LEVELS.index(requested) > isa.LEVELS.index(host):
            raise ConfigError(f"this machine builds code up to instruction-set level {host}, "
                              f"not {requested}", hint=f"ask for isa={host} or lower, or build "
                                                       "on a machine of that level")
        if remote is not None and isa.LEVELS.index(requested) > isa.LEVELS.index(remote.level):
            raise BackendError(f"the remote CPU ({remote.cpu}) runs instruction-set level "
                               f"{remote.level}; code built for {requested} would fault there",
                               hint=f"ask for isa={remote.level} or lower")
        return requested
    levels = [isa.level()] + ([remote.level] if remote is not None else [])
    return min(levels, key=isa.LEVELS.index)


def _host_arch() -> str:
    import platform
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


@contextlib.contextmanager
def isa_level(level: str):
    """Build at ``level``: ``QCOMPILE_ISA`` set to it for the duration (process-wide: no other
    thread should build meanwhile)."""
    from qcompile import isa
    old = os.environ.get(isa.ENV)
    os.environ[isa.ENV] = level
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(isa.ENV, None)
        else:
            os.environ[isa.ENV] = old


def build_library(graph, level: str):
    """(shared library bytes, params, report, isa record) of ``graph`` built by the TVM backend
    for a ``cpu`` at ``level``; the record (``{"level", "features"}``) says which CPU features
    the code may use."""
    from qcompile.backends.tvm import build
    from qcompile.backends.tvm.target import cpu_target, target_features
    with isa_level(level):
        ex, params, lowering = build(graph, "cpu")
        record = {"level": level, "features": target_features(cpu_target())}
    with tempfile.TemporaryDirectory(prefix="qcompile-rpc-") as d:
        path = Path(d) / "model.so"
        ex.export_library(str(path))
        library = path.read_bytes()
    return library, params, lowering.report, record


def check_remote_cpu(record: dict, remote: RemoteCpu | None, where) -> None:
    """Refuse code whose features (``record``) the remote CPU lacks: it would crash the server."""
    if remote is None:
        return
    missing = sorted(set(record.get("features", ())) - remote.features)
    if missing:
        raise BackendError(f"the code was built for instruction-set level {record['level']} and "
                           f"uses {', '.join(missing)}, which the remote CPU at {where} "
                           f"({remote.cpu}) lacks",
                           hint=f"rebuild for it with ?isa={remote.level} in the target")
