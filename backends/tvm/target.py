"""TVM targets for qcompile's target names: the host CPU (features detected, threads = cores),
cross CPUs for build-only use, and CUDA architectures."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from qcompile.errors import BackendError, ConfigError

__all__ = ["CpuInfo", "host_cpu", "cpu_target", "cuda_target", "require_tvm", "target_features",
           "CROSS", "CAPPED_MCPU", "RELEVANT"]

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


#: the LLVM CPU a build capped below the host's level uses (runs on any CPU of that level)
CAPPED_MCPU = {"generic": "x86-64", "avx2": "x86-64-v3"}
#: x86 features an artifact may depend on, checked against the loading CPU
RELEVANT = ("sse4.2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi", "bmi2", "avx512f",
            "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512vnni", "avx512bf16",
            "avx512vbmi", "avx512vbmi2", "avx512vpopcntdq", "avx512ifma", "avx512bitalg",
            "avx512fp16", "amx-tile", "amx-int8", "amx-bf16")


def _host_mcpu_spec() -> dict:
    """``mcpu`` (and ``mattr``) for the host CPU at :func:`qcompile.isa.level`: the host's own
    CPU when uncapped; a generic x86-64 level when ``QCOMPILE_ISA`` caps it below AVX-512;
    the host's CPU without AMX when capped at ``avx512`` on an AMX machine."""
    from tvm.target import codegen

    from qcompile import isa
    host = codegen.llvm_get_system_cpu()
    lv = isa.level()
    if lv == isa.host_level():
        return {"mcpu": host}
    if lv in CAPPED_MCPU:
        return {"mcpu": CAPPED_MCPU[lv]}
    return {"mcpu": host, "mattr": ["-amx-tile", "-amx-int8", "-amx-bf16"]}


def cpu_target(mcpu: str | None = None, *, triple: str | None = None, cores: int | None = None):
    """A ``tvm.target.Target`` for an LLVM CPU; defaults to the host CPU (capped by
    ``QCOMPILE_ISA``, see :mod:`qcompile.isa`) and its core count."""
    tvm = require_tvm()
    spec = {"kind": "llvm", **({"mcpu": mcpu} if mcpu else _host_mcpu_spec()),
            "num-cores": cores or _threads()}
    if triple:
        spec["mtriple"] = triple
    return tvm.target.Target(spec)


def target_features(target) -> list[str]:
    """The :data:`RELEVANT` x86 features code built for ``target`` may use (what a loading CPU
    must have); empty for other architectures."""
    from tvm.target import codegen
    triple = str(target.attrs.get("mtriple", ""))
    if triple and not triple.startswith(("x86_64", "i686")):
        return []
    return [f for f in RELEVANT if codegen.llvm_cpu_has_features(f, target)]


@functools.lru_cache(maxsize=None)
def _info(mcpu: str, mattr: tuple[str, ...], triple: str, cores: int) -> CpuInfo:
    from tvm.target import codegen
    t = cpu_target(mcpu, triple=triple or None, cores=cores)
    if mattr:
        t = require_tvm().target.Target({**t.export(), "mattr": list(mattr)})
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
    return _info(str(attrs.get("mcpu", "")), tuple(str(a) for a in attrs.get("mattr", ()) or ()),
                 str(attrs.get("mtriple", "")), int(attrs.get("num-cores", 1)))


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
