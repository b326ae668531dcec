"""The sparse backend (target ``amx``): SparAMX-style sparse weights and kernels.

``format`` builds the layout (VNNI-ordered rows, bitmasks, packed non-zeros, per-tile
offsets) from bf16 or int8 weights; ``csrc/sparamx.cc`` holds the AVX-512 sparse and dense
kernels and the AMX kernels (hardware tiles and an SDM emulation from the same source);
``build`` compiles them and calls them through ctypes.

Target ``amx`` runs a whole model on the TVM ``cpu`` backend, with its pruned linears (bf16
weights, or int8 weights under int8 per-token activations) on these kernels (``lower``: a
``linear_hook`` of the TVM lowering; pruned weights the kernels cannot take fall back to target
``cpu``'s kernels, on record in ``AmxExecutable.fallbacks``); ``ffi`` builds the kernels with
TVM-FFI entry points that the Relax module calls with ``call_dps_packed``, choosing AMX tiles or
AVX-512 when they run (so an artifact moves between AMX and AVX-512 machines). An artifact
holds TVM's ``model.so`` and parameters plus ``amx_kernels.so`` and ``amx_kernels.json`` (the
entries it calls, registered before the VM runs).
"""
from __future__ import annotations

import json

from qcompile.backends.base import register_backend
from qcompile.backends.hooked import HookedCpuBackend, load_library_bytes, read_kernel_files
from qcompile.backends.tvm import TVMExecutable, isa_record
from qcompile.errors import ArtifactError, ConfigError
from qcompile.ir.graph import Graph

__all__ = ["AmxBackend", "AmxExecutable", "build_model", "LIBRARY", "KERNELS"]

#: the artifact's kernel library and the entries it calls (beside TVM's files)
LIBRARY, KERNELS = "amx_kernels.so", "amx_kernels.json"


def _require_tvm():
    try:
        import tvm  # noqa: F401
        import tvm_ffi  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"target 'amx' runs whole models on the TVM Relax VM and needs "
                          f"Apache TVM ({e})",
                          hint="pip install 'qcompile[tvm]'; without TVM the kernels still run "
                               "standalone: qcompile.backends.amx.build.AmxLibrary") from None


def build_model(graph: Graph):
    """(relax executable, params, lowering, :class:`~.lower.AmxLinears`, library path or
    None): ``graph`` lowered for TVM ``cpu`` with its pruned linears on the sparse kernels."""
    _require_tvm()
    from qcompile.backends.tvm import build as tvm_build

    from . import ffi
    from .lower import AmxLinears
    hook = AmxLinears()
    ex, params, L = tvm_build(graph, "cpu", linear_hook=hook)
    hook.finish(graph, L.report)
    lib = ffi.compile_library() if hook.kernels else None
    return ex, params, L, hook, lib


def _kernels_json(kernels) -> bytes:
    from . import ffi
    rows = [{"kernel": k, "function": ffi.global_name(k)} for k in kernels]
    return (json.dumps({"kernels": rows}, indent=1, sort_keys=True) + "\n").encode()


class AmxExecutable(TVMExecutable):
    """A TVM ``cpu`` executable whose Relax module calls the sparse kernels of ``library``
    (bytes of the shared library, loaded as ``module``); they are registered before the VM
    starts."""

    def __init__(self, graph: Graph, target: str, ex, params, kernels, library: bytes | None,
                 module, report=None, fallbacks=None, taken=None,
                 isa=None):
        super().__init__(graph, target, ex, params, report, isa)
        self.kernels = list(kernels)
        self.library = library
        self.module = module
        self.fallbacks = dict(fallbacks or {})
        #: linear node name -> the kernel it runs on (empty for a loaded artifact)
        self.taken = dict(taken or {})

    @property
    def kernel_kind(self) -> str | None:
        """``"amx"`` or ``"avx512"``: what the sparse kernels run on here (None: no kernels,
        or a CPU that cannot run them)."""
        from . import ffi
        return ffi.kind(self.module) if self.module is not None else None

    def _ready(self):
        if self._vm is None and self.kernels:
            from . import ffi
            ffi.register(self.module, self.kernels)
        return super()._ready()

    def files(self) -> dict[str, bytes]:
        out = super().files()
        if self.kernels:
            out[LIBRARY] = self.library
            out[KERNELS] = _kernels_json(self.kernels)
        return out

    @staticmethod
    def from_files(graph: Graph, target: str, files: dict[str, bytes]) -> "AmxExecutable":
        from . import ffi
        kernels, lib = read_kernel_files(files, target, LIBRARY, KERNELS,
                                         lambda rows: [str(r["kernel"]) for r in rows])
        module = None
        if lib is not None:
            unknown = sorted(set(kernels) - set(ffi.KERNELS))
            if unknown:
                raise ArtifactError(f"{KERNELS} names kernels this qcompile does not have: "
                                    f"{', '.join(unknown)}",
                                    hint="rebuild it with this version (qcompile build "
                                         "--target amx)")
            module = load_library_bytes(lib, LIBRARY, ffi.load, "qcompile-amx-")
        base = TVMExecutable.from_files(graph, target, files)
        return AmxExecutable(graph, target, base.ex, base.params, kernels, lib, module)


class AmxBackend(HookedCpuBackend):
    """Target ``amx``: TVM ``cpu`` for the model, the sparse kernels for its pruned linears."""

    name = "amx"
    targets = ("amx",)
    executable = AmxExecutable

    def lower(self, graph: Graph, target: str):
        from . import ffi
        ex, params, L, hook, lib = build_model(graph)
        module = ffi.load(lib) if lib is not None else None
        return AmxExecutable(graph, target, ex, params, hook.kernels,
                             lib.read_bytes() if lib is not None else None, module, L.report,
                             hook.fallbacks, hook.taken, isa=isa_record("cpu"))


register_backend(AmxBackend())
