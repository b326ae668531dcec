"""What the backends whose kernels take some linears of a TVM ``cpu`` model share (targets
``lut`` and ``amx``): the backend methods that defer to ``cpu``, and reading the kernel library
and kernel list they add to an artifact beside TVM's files."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from qcompile.backends.base import Backend
from qcompile.errors import ArtifactError
from qcompile.ir.graph import Graph, Node

__all__ = ["HookedCpuBackend", "read_kernel_files", "load_library_bytes", "tvm_ffi_flags",
           "FFI_HELPERS"]

#: C (also valid C++) that both backends' TVM-FFI entry points use: raising an error, the
#: DLTensor of an argument, its size, checking dtype/device/layout, its data pointer
FFI_HELPERS = r"""
/* ---- shared by the lut and amx entry points (qcompile.backends.hooked) ---- */
static int qc_ffi_fail(const char* fn, const char* arg, const char* what) {
  char msg[320];
  snprintf(msg, sizeof msg, "%s: %s%s", fn, arg ? arg : "", what);
  TVMFFIErrorSetRaisedFromCStr("ValueError", msg);
  return -1;
}

/* The DLTensor of an argument (a Tensor object or a raw DLTensor*), else NULL. */
static DLTensor* qc_ffi_tensor(const TVMFFIAny* a) {
  if (a->type_index == kTVMFFITensor)
    return (DLTensor*)((char*)a->v_obj + sizeof(TVMFFIObject));
  if (a->type_index == kTVMFFIDLTensorPtr) return (DLTensor*)a->v_ptr;
  return NULL;
}

static int64_t qc_ffi_numel(const DLTensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

/* NULL when t is a compact row-major CPU tensor of the dtype, else what is wrong. */
static const char* qc_ffi_check(const DLTensor* t, uint8_t code, uint8_t bits,
                                const char* not_it) {
  if (!t) return " is not a tensor";
  if (t->device.device_type != kDLCPU) return " is not on the CPU";
  if (t->dtype.code != code || t->dtype.bits != bits || t->dtype.lanes != 1) return not_it;
  if (t->ndim < 1) return " is a scalar";
  if (t->strides) {
    int64_t s = 1;
    for (int i = t->ndim - 1; i >= 0; --i) {
      if (t->shape[i] != 1 && t->strides[i] != s) return " is not contiguous";
      s *= t->shape[i];
    }
  }
  return NULL;
}

static void* qc_ffi_data(const DLTensor* t) { return (char*)t->data + t->byte_offset; }
"""


class HookedCpuBackend(Backend):
    """A backend that runs the model on TVM ``cpu`` with its own kernels for some linears.
    Subclasses set ``name``/``targets`` and ``executable`` (a class with ``from_files``)."""

    versioned = ("tvm",)
    executable: Any = None

    def supports(self, node: Node) -> bool:
        from qcompile.backends import get_backend
        return get_backend("cpu").supports(node)

    def cost(self, node: Node, device: str = "cpu", env=None) -> float:
        from qcompile.backends import get_backend
        return get_backend("reference").cost(node, device, env)

    def artifacts(self, executable) -> dict[str, bytes]:
        return executable.files()

    def load(self, graph: Graph, target: str, files: dict[str, bytes]):
        from qcompile.backends.tvm import LIBRARY as TVM_LIBRARY
        from qcompile.backends.tvm import PARAMS
        if TVM_LIBRARY not in files or PARAMS not in files:
            raise ArtifactError(f"a {target} artifact needs {TVM_LIBRARY} and {PARAMS}",
                                hint=f"rebuild it with qcompile build --target {target}")
        return self.executable.from_files(graph, target, files)


def read_kernel_files(files: dict[str, bytes], target: str, library: str, kernels: str,
                      parse: Callable[[list], list]) -> tuple[list, bytes | None]:
    """(``parse`` of the kernel list's rows, the library's bytes) from an artifact's files, or
    ``([], None)`` when it has neither (a model none of whose linears took the kernels)."""
    if kernels not in files and library not in files:
        return [], None
    if kernels not in files or library not in files:
        raise ArtifactError(f"a {target} artifact has both {library} and {kernels} or neither",
                            hint=f"rebuild it with qcompile build --target {target}")
    try:
        parsed = parse(json.loads(files[kernels])["kernels"])
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{kernels} is corrupt: {e}") from None
    return parsed, files[library]


def load_library_bytes(data: bytes, name: str, load: Callable[[Path], Any], prefix: str):
    """``load`` a shared library given as bytes: written to a temporary file, mapped, and the
    file removed (the mapping outlives it)."""
    d = tempfile.mkdtemp(prefix=prefix)
    try:
        path = Path(d) / name
        path.write_bytes(data)
        return load(path)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def tvm_ffi_flags(target: str, standalone: str) -> tuple[str, ...]:
    """Compiler flags for a kernel library with TVM-FFI entry points: the headers of TVM-FFI
    (errors) and of the TVM runtime (thread pool), and both libraries linked by name without an
    rpath — ``tvm`` loads them (RTLD_GLOBAL) before the kernel library, so the loader finds them
    already mapped and the file carries no path of this machine. ``standalone`` names the
    class that runs the kernels without TVM, for the hint."""
    from qcompile.errors import BackendError
    try:
        import tvm
        import tvm_ffi.libinfo as ffi_info
    except ImportError as e:
        raise BackendError(f"target {target!r} needs Apache TVM and apache-tvm-ffi ({e})",
                           hint="pip install 'qcompile[tvm]' (or call the kernels standalone "
                                f"with {standalone})") from None
    tvm_root = Path(tvm.__file__).parent
    ffi_lib = Path(ffi_info.find_libtvm_ffi()).parent
    incs = dict.fromkeys([ffi_info.find_include_path(), ffi_info.find_dlpack_include_path(),
                          str(tvm_root / "include")])
    return (*(f"-I{i}" for i in incs), f"-L{ffi_lib}", f"-L{tvm_root / 'lib'}",
            "-ltvm_ffi", "-ltvm_runtime")
