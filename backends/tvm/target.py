"""TVM targets for qcompile's target names: the host CPU (features detected, threads = cores),
cross CPUs for build-only use, and CUDA architectures."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from qcompile.errors import BackendError, ConfigError

__all__ = ["CpuInfo", "host_cpu", "cpu_target", "cuda_target", "require_tvm", "CROSS"]

#: build-only cross targets: name -> (mtriple, mcpu)
CROSS = {"aarch64": ("aarch64-linux-gnu", "cortex-a76")}


def require_tvm():
    """``tvm``, or a ``ConfigError`` saying which extra to install. TVM's thread pool starts
    with half the CPUs unless told otherwise; qcompile uses every core (``TVM_NUM_THREADS``
    wins when set), so it is set before the pool first starts."""
    os.environ.setdefault("TVM_NUM_THREADS", str(_threads()))
    try:
        import tvm
    except ImportError as e:
        raise ConfigError(f"the cpu/cuda targets need Apache TVM ({e})",
                          hint="pip install 'qcompile[tvm]' (apache-tvm>=0.27)") from None
    return tvm


@dataclass(frozen=True)
class CpuInfo:
    """What the kernels' schedules need to know about a CPU target."""

    mcpu: str
    cores: int
    vector_bits: int  # 512 with AVX-512, 256 with AVX2, 128 otherwise
    avx512: bool
    vnni: bool  # AVX512-VNNI (vpdpbusd)
    amx: bool
    triple: str = ""

    @property
    def lanes32(self) -> int:
        """fp32 / int32 lanes of one vector register."""
        return self.vector_bits // 32


def _threads() -> int:
    env = os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_target(mcpu: str | None = None, *, triple: str | None = None, cores: int | None = None):
    """A ``tvm.target.Target`` for an LLVM CPU; defaults to the host CPU and its core count."""
    tvm = require_tvm()
    from tvm.target import codegen
    spec = {"kind": "llvm", "mcpu": mcpu or codegen.llvm_get_system_cpu(),
            "num-cores": cores or _threads()}
    if triple:
        spec["mtriple"] = triple
    return tvm.target.Target(spec)


@functools.lru_cache(maxsize=None)
def _info(mcpu: str, triple: str, cores: int) -> CpuInfo:
    from tvm.target import codegen
    t = cpu_target(mcpu, triple=triple or None, cores=cores)
    has = lambda f: bool(codegen.llvm_cpu_has_features(f, t))  # noqa: E731
    x86 = not triple or triple.startswith(("x86_64", "i686"))
    avx512 = x86 and has("avx512f") and has("avx512bw")
    width = 512 if avx512 else 256 if x86 and has("avx2") else 128
    return CpuInfo(mcpu, cores, width, avx512, avx512 and has("avx512vnni"),
                   x86 and has("amx-int8"), triple)


def host_cpu(target=None) -> CpuInfo:
    """Features of ``target`` (default: the host CPU)."""
    if target is None:
        target = cpu_target()
    attrs = target.attrs
    return _info(str(attrs.get("mcpu", "")), str(attrs.get("mtriple", "")),
                 int(attrs.get("num-cores", 1)))


def cuda_target(arch: str = "sm_80"):
    tvm = require_tvm()
    if arch not in ("sm_80", "sm_86", "sm_89", "sm_90"):
        raise ConfigError(f"unsupported CUDA architecture {arch!r}",
                          hint="use sm_80, sm_86, sm_89 or sm_90")
    import shutil
    if shutil.which("nvcc") is None:
        raise BackendError("the cuda target needs nvcc to build",
                           hint="install the CUDA toolkit (nvcc on PATH)")
    return tvm.target.Target({"kind": "cuda", "arch": arch})
