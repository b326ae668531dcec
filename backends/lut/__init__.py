"""The LUT backend (target ``lut``): T-MAC-style table-lookup kernels for 1–4-bit weights.

``weights`` turns integer codes into bit-plane table indices in a kernel's layout, ``model``
is the kernels' arithmetic in numpy (bit-exact), ``codegen`` writes the C (AVX-512 ``vpermb``
and ``vpshufb``, AVX2 ``vpshufb``, portable), ``build`` compiles and caches it and calls it
through ctypes (standalone, no TVM needed).

Target ``lut`` runs a whole model on the TVM ``cpu`` backend, with its 1–4-bit integer linears
on these kernels (``lower``: a ``linear_hook`` of the TVM lowering; weights that do not fit fall
back to target ``cpu``'s kernels, on record in ``LutExecutable.fallbacks``); ``ffi`` builds the
kernels with TVM-FFI entry points that the Relax module calls with ``call_dps_packed``. An
artifact holds TVM's ``model.so`` and parameters plus ``lut_kernels.so`` and
``lut_kernels.json`` (the configurations, registered before the VM runs).
"""
from __future__ import annotations

import json

from qcompile.backends.base import register_backend
from qcompile.backends.hooked import HookedCpuBackend, load_library_bytes, read_kernel_files
from qcompile.backends.tvm import TVMExecutable, isa_record
from qcompile.errors import BackendError, ConfigError
from qcompile.ir.graph import Graph

__all__ = ["LutBackend", "LutExecutable", "build_model", "LIBRARY", "KERNELS"]

#: the artifact's kernel library and the configurations it holds (beside TVM's files)
LIBRARY, KERNELS = "lut_kernels.so", "lut_kernels.json"


def _require_tvm():
    try:
        import tvm  # noqa: F401
        import tvm_ffi  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"target 'lut' runs whole models on the TVM Relax VM and needs "
                          f"Apache TVM ({e})",
                          hint="pip install 'qcompile[tvm]'; without TVM the kernels still run "
                               "standalone: qcompile.backends.lut.build.LutLibrary") from None


def build_model(graph: Graph):
    """(relax executable, params, lowering, :class:`~.lower.LutLinears`, library path or
    None): ``graph`` lowered for TVM ``cpu`` with its low-bit linears on LUT kernels."""
    _require_tvm()
    from qcompile.backends.tvm import build as tvm_build

    from . import ffi
    from .lower import LutLinears
    hook = LutLinears()
    ex, params, L = tvm_build(graph, "cpu", linear_hook=hook)
    lib = ffi.compile_library(hook.configs) if hook.configs else None
    return ex, params, L, hook, lib


def _config_json(configs) -> bytes:
    from . import ffi
    rows = [{"variant": c.variant, "bits": c.bits, "group": c.group, "mode": c.mode, "rb": c.rb,
             "mt": c.mt, "u": c.u, "function": ffi.global_name(c)} for c in configs]
    return (json.dumps({"kernels": rows}, indent=1, sort_keys=True) + "\n").encode()


class LutExecutable(TVMExecutable):
    """A TVM ``cpu`` executable whose Relax module calls LUT kernels of ``library`` (bytes of
    the shared library, loaded as ``module``); the kernels are registered before the VM
    starts."""

    def __init__(self, graph: Graph, target: str, ex, params, configs, library: bytes | None,
                 module, report=None, fallbacks=None, isa=None):
        super().__init__(graph, target, ex, params, report, isa)
        self.configs = list(configs)
        self.library = library
        self.module = module
        self.fallbacks = dict(fallbacks or {})

    def _ready(self):
        if self._vm is None and self.configs:
            from . import ffi
            ffi.register(self.module, self.configs)
        return super()._ready()

    def files(self) -> dict[str, bytes]:
        out = super().files()
        if self.configs:
            out[LIBRARY] = self.library
            out[KERNELS] = _config_json(self.configs)
        return out

    @staticmethod
    def from_files(graph: Graph, target: str, files: dict[str, bytes]) -> "LutExecutable":
        from . import ffi
        from .build import host_variants
        from .codegen import KernelConfig
        rows_to_configs = lambda rows: [KernelConfig(**{k: r[k] for k in (  # noqa: E731
            "variant", "bits", "group", "mode", "rb", "mt", "u")}) for r in rows]
        configs, lib = read_kernel_files(files, target, LIBRARY, KERNELS, rows_to_configs)
        module = None
        if lib is not None:
            missing = sorted({c.variant for c in configs} - set(host_variants()))
            if missing:
                raise BackendError(f"this artifact's LUT kernels use the {', '.join(missing)} "
                                   "instructions, which this CPU lacks",
                                   hint="rebuild the artifact on this machine (qcompile build "
                                        "--target lut)")
            module = load_library_bytes(lib, LIBRARY, ffi.load, "qcompile-lut-")
        base = TVMExecutable.from_files(graph, target, files)
        return LutExecutable(graph, target, base.ex, base.params, configs, lib, module)


class LutBackend(HookedCpuBackend):
    """Target ``lut``: TVM ``cpu`` for the model, LUT kernels for its 1–4-bit linears."""

    name = "lut"
    targets = ("lut",)
    executable = LutExecutable

    def lower(self, graph: Graph, target: str):
        from . import ffi
        ex, params, L, hook, lib = build_model(graph)
        module = ffi.load(lib) if lib is not None else None
        return LutExecutable(graph, target, ex, params, hook.configs,
                             lib.read_bytes() if lib is not None else None, module, L.report,
                             hook.fallbacks, isa=isa_record("cpu"))


register_backend(LutBackend())
