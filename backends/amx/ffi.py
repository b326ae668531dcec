"""The sparse and dense kernels of ``csrc/sparamx.cc`` as TVM-FFI functions, so a Relax module
calls them with ``call_dps_packed``.

One C++ translation unit holds the kernels (:func:`.build.source`) and four entry points in
TVM-FFI's C ABI (``__tvm_ffi_<name>``, the symbol ``TVM_FFI_DLL_EXPORT_TYPED_FUNC`` would
emit, written against ``tvm/ffi/c_api.h``), one per kernel (:data:`KERNELS`), plus
``qc_amx_kind``. Unlike the LUT kernels nothing is generated per shape, so every model uses
the same library (built once, cached by :func:`.build.compile_source`).

Arguments, in this order (``[...]`` only for some kernels), the arrays of a
:class:`~.format.SparseWeight`: ``x`` float32 ``[..., k]``, ``masks`` (sparse: uint32 for
bf16, uint64 for int8), ``values`` (uint16 bf16 bits or int8 codes), ``offsets`` int64,
``colsum`` int32 and ``scale`` float32 (int8; padded to whole column tiles of 16), optional
``bias`` float32 ``[n]``, and ``y`` float32 ``[..., n]`` (written). ``m`` is the product of
``x``'s leading dims, ``kp`` = ``k`` rounded up to a tile (32 for bf16, 64 for int8); the
arrays' sizes are checked against ``k`` and ``n``.

An entry runs on TVM's thread pool (``TVMBackendParallelLaunch``, no OpenMP), so the VM's
kernels and these share one set of workers: every task converts its share of the rows (bf16
rounding, or per-token int8 quantization with scales), a barrier, then every task runs its
share of (row block × column unit) work units; a column unit is one tile for AVX-512 / AVX2 and
an aligned pair for AMX (its 2×2 blocking), row blocks are only cut when there are fewer column
units than tasks.

The kernel kind is chosen when the entry runs, not when the model is built: AMX tiles where
the runtime gate (``qc_amx_available``: CPUID, ``ARCH_REQ_XCOMP_PERM``, ``QCOMPILE_NO_AMX``)
allows them, else AVX-512, else AVX2, all capped by ``QCOMPILE_ISA`` — the weight layout is the
same, so an artifact built on an AMX machine runs on any AVX2 CPU. :func:`kind` says which one
a library runs.
"""
from __future__ import annotations

from pathlib import Path

from qcompile.backends.hooked import FFI_HELPERS
from qcompile.backends.lut.build import compile_source
from qcompile.errors import BackendError

from .build import KIND_OF, source

__all__ = ["KERNELS", "TAG", "global_name", "kernel_name", "shim_source", "library_source",
           "compile_library", "load", "register", "kind"]

#: the cache tag (file name prefix) of the FFI library
TAG = "amx-ffi"
#: the entry points: name -> (weight kind, sparse layout)
KERNELS = {"bf16_sparse": ("bf16", True), "bf16_dense": ("bf16", False),
           "int8_sparse": ("int8", True), "int8_dense": ("int8", False)}

_SHIM = r"""
// ---- TVM-FFI entry points (qcompile.backends.amx.ffi): C ABI of tvm/ffi/c_api.h ----
#include <atomic>
#include <stdio.h>
#include <tvm/ffi/c_api.h>
#include <tvm/runtime/c_backend_api.h>

""" + FFI_HELPERS + r"""
// The kind this machine runs (qc_sp_kind): 1 AMX tiles, 0 AVX-512, 3 AVX2, -1 none.
static int qc_ffi_kind(void) { return qc_sp_kind(); }

struct QcFfiJob {
  int kind, sparse, int8;
  const float* x;
  int64_t m, k, kp, n, tiles;
  const void* masks; const void* vals; const int64_t* offs;
  const int32_t* colsum; const float* sw; const float* bias; float* y;
  uint8_t* xa; float* sx;
  std::atomic<int> rc;
};

// One worker: convert its rows, wait for all rows, then its work units.
static int qc_ffi_task(int task, TVMParallelGroupEnv* env, void* data) {
  QcFfiJob* j = (QcFfiJob*)data;
  const int64_t nt = env->num_task;
  const int64_t r0 = j->m * task / nt, r1 = j->m * (task + 1) / nt;
  if (r1 > r0) {
    if (j->int8)
      qc_sp_prep_int8(j->x + r0 * j->k, r1 - r0, j->k, j->kp, (int8_t*)j->xa + r0 * j->kp,
                      j->sx + r0);
    else
      qc_sp_prep_bf16(j->x + r0 * j->k, r1 - r0, j->k, j->kp, (uint16_t*)j->xa + r0 * j->kp);
  }
  if (nt > 1) TVMBackendParallelBarrier(task, env);
  // AMX pairs column tiles (2x2 blocking) and takes rows 32 at a time; AVX-512 4 at a time
  const bool amx = j->kind == 1 || j->kind == 2;
  const int64_t ut = amx ? 2 : 1, align = amx ? 32 : 4;
  const int64_t cu = (j->tiles + ut - 1) / ut;
  int64_t rb = (nt + cu - 1) / cu;  // row blocks: only when the column units are too few
  const int64_t most = (j->m + align - 1) / align;
  if (rb > most) rb = most;
  if (rb < 1) rb = 1;
  const int64_t rows = ((j->m + rb - 1) / rb + align - 1) / align * align;
  rb = (j->m + rows - 1) / rows;
  const int64_t units = rb * cu, u0 = units * task / nt, u1 = units * (task + 1) / nt;
  for (int64_t u = u0; u < u1;) {
    const int64_t b = u / cu, c0 = u % cu;
    const int64_t c1 = c0 + (u1 - u) < cu ? c0 + (u1 - u) : cu;
    const int64_t a0 = b * rows, a1 = a0 + rows < j->m ? a0 + rows : j->m;
    const int64_t t0 = c0 * ut, t1 = c1 * ut < j->tiles ? c1 * ut : j->tiles;
    const int r = j->int8
        ? qc_sp_int8_run(j->kind, j->sparse, (const int8_t*)j->xa + a0 * j->kp, j->sx + a0,
                         a1 - a0, j->kp, (const uint64_t*)j->masks, (const int8_t*)j->vals,
                         j->offs, j->colsum, j->sw, j->bias, j->y + a0 * j->n, j->n, t0, t1)
        : qc_sp_bf16_run(j->kind, j->sparse, (const uint16_t*)j->xa + a0 * j->kp,
                         a1 - a0, j->kp, (const uint32_t*)j->masks, (const uint16_t*)j->vals,
                         j->offs, j->bias, j->y + a0 * j->n, j->n, t0, t1);
    if (r) j->rc.store(r);
    u += c1 - c0;
  }
  return 0;
}

// y = x . w^T (+ bias) on one kernel: args (x, [masks], values, offsets, [colsum, scale],
// [bias], y), see the module docstring.
static int qc_ffi_matmul(const char* fn, const char* usage, int int8, int sparse,
                         const TVMFFIAny* args, int32_t nargs) {
  const int32_t want = 4 + sparse + 2 * int8;
  if (nargs != want && nargs != want + 1) return qc_ffi_fail(fn, "takes ", usage);
  int i = 0;
  DLTensor* x = qc_ffi_tensor(&args[i++]);
  DLTensor* mk = sparse ? qc_ffi_tensor(&args[i++]) : NULL;
  DLTensor* v = qc_ffi_tensor(&args[i++]);
  DLTensor* of = qc_ffi_tensor(&args[i++]);
  DLTensor* cs = int8 ? qc_ffi_tensor(&args[i++]) : NULL;
  DLTensor* sw = int8 ? qc_ffi_tensor(&args[i++]) : NULL;
  DLTensor* b = nargs == want + 1 ? qc_ffi_tensor(&args[i++]) : NULL;
  DLTensor* y = qc_ffi_tensor(&args[i++]);
  const char* e;
  if ((e = qc_ffi_check(x, kDLFloat, 32, " is not float32"))) return qc_ffi_fail(fn, "x", e);
  if (sparse && (e = int8 ? qc_ffi_check(mk, kDLUInt, 64, " is not uint64")
                          : qc_ffi_check(mk, kDLUInt, 32, " is not uint32")))
    return qc_ffi_fail(fn, "masks", e);
  if ((e = int8 ? qc_ffi_check(v, kDLInt, 8, " is not int8")
                : qc_ffi_check(v, kDLUInt, 16, " is not uint16 (bf16 bits)")))
    return qc_ffi_fail(fn, "values", e);
  if ((e = qc_ffi_check(of, kDLInt, 64, " is not int64"))) return qc_ffi_fail(fn, "offsets", e);
  if (int8 && (e = qc_ffi_check(cs, kDLInt, 32, " is not int32"))) return qc_ffi_fail(fn, "colsum", e);
  if (int8 && (e = qc_ffi_check(sw, kDLFloat, 32, " is not float32"))) return qc_ffi_fail(fn, "scale", e);
  if (b && (e = qc_ffi_check(b, kDLFloat, 32, " is not float32"))) return qc_ffi_fail(fn, "bias", e);
  if ((e = qc_ffi_check(y, kDLFloat, 32, " is not float32"))) return qc_ffi_fail(fn, "y", e);
  const int64_t k = x->shape[x->ndim - 1], n = y->shape[y->ndim - 1];
  const int64_t m = k ? qc_ffi_numel(x) / k : 0;
  const int64_t tk = int8 ? 64 : 32, kpr = int8 ? 4 : 2, rv = int8 ? 64 : 32;
  const int64_t kp = (k + tk - 1) / tk * tk, rows = kp / kpr, tiles = (n + 15) / 16;
  const char* other = " does not match K and N (laid out for another shape or kernel?)";
  if (qc_ffi_numel(y) != m * n) return qc_ffi_fail(fn, "y", " does not have x's rows");
  if (qc_ffi_numel(of) != tiles + 1) return qc_ffi_fail(fn, "offsets", other);
  const int64_t* offs = (const int64_t*)qc_ffi_data(of);
  if (offs[0] != 0 || offs[tiles] + (sparse ? QC_SP_PAD : 0) != qc_ffi_numel(v))
    return qc_ffi_fail(fn, "values", other);
  if (sparse ? qc_ffi_numel(mk) != tiles * rows : qc_ffi_numel(v) != tiles * rows * rv)
    return qc_ffi_fail(fn, sparse ? "masks" : "values", other);
  if (int8 && qc_ffi_numel(cs) != tiles * 16)
    return qc_ffi_fail(fn, "colsum", " is not of N rounded up to 16");
  if (int8 && qc_ffi_numel(sw) != tiles * 16)
    return qc_ffi_fail(fn, "scale", " is not of N rounded up to 16");
  if (b && qc_ffi_numel(b) != n) return qc_ffi_fail(fn, "bias", " is not of size N");
  const int kind = qc_ffi_kind();
  if (kind < 0)
    return qc_ffi_fail(fn, NULL, "no sparse kernel runs here: they need AVX2 and FMA at least "
                                 "(or QCOMPILE_ISA=generic forbids them)");
  if (m == 0 || n == 0) return 0;
  const int64_t esz = int8 ? 1 : 2, xbytes = (m * kp * esz + 63) / 64 * 64;
  uint8_t* xa = (uint8_t*)aligned_alloc(64, (size_t)xbytes);
  float* sx = (float*)malloc(sizeof(float) * (size_t)(m + 1));
  if (!xa || !sx) {
    free(xa); free(sx);
    return qc_ffi_fail(fn, NULL, "out of memory for the converted activations");
  }
  QcFfiJob job;
  job.kind = kind; job.sparse = sparse; job.int8 = int8;
  job.x = (const float*)qc_ffi_data(x);
  job.m = m; job.k = k; job.kp = kp; job.n = n; job.tiles = tiles;
  job.masks = sparse ? qc_ffi_data(mk) : NULL; job.vals = qc_ffi_data(v); job.offs = offs;
  job.colsum = int8 ? (const int32_t*)qc_ffi_data(cs) : NULL;
  job.sw = int8 ? (const float*)qc_ffi_data(sw) : NULL;
  job.bias = b ? (const float*)qc_ffi_data(b) : NULL;
  job.y = (float*)qc_ffi_data(y);
  job.xa = xa; job.sx = sx; job.rc.store(0);
  const int launch = TVMBackendParallelLaunch(qc_ffi_task, &job, 0);
  free(xa); free(sx);
  if (launch) return qc_ffi_fail(fn, NULL, "the TVM thread pool failed");
  switch (job.rc.load()) {
    case 0: return 0;
    case -10: return qc_ffi_fail(fn, NULL, "AMX was refused at run time");
    default: return qc_ffi_fail(fn, NULL, "the AMX tile configuration failed");
  }
}

#define QC_FFI_ENTRY(name, int8, sparse, usage)                                          \
  QC_EXPORT int __tvm_ffi_qc_amx_##name(void* self, const TVMFFIAny* args, int32_t nargs, \
                                        TVMFFIAny* result) {                              \
    (void)self; (void)result;                                                             \
    return qc_ffi_matmul("qc_amx_" #name, usage, int8, sparse, args, nargs);             \
  }
QC_FFI_ENTRY(bf16_sparse, 0, 1, "(x, masks, values, offsets, [bias], y)")
QC_FFI_ENTRY(bf16_dense, 0, 0, "(x, values, offsets, [bias], y)")
QC_FFI_ENTRY(int8_sparse, 1, 1, "(x, masks, values, offsets, colsum, scale, [bias], y)")
QC_FFI_ENTRY(int8_dense, 1, 0, "(x, values, offsets, colsum, scale, [bias], y)")

// () -> 1 AMX tiles, 0 AVX-512, 3 AVX2, -1 none: what the entries above run here now
QC_EXPORT int __tvm_ffi_qc_amx_kind(void* self, const TVMFFIAny* args, int32_t nargs,
                                    TVMFFIAny* result) {
  (void)self; (void)args; (void)nargs;
  result->type_index = kTVMFFIInt;
  result->zero_padding = 0;
  result->v_int64 = qc_ffi_kind();
  return 0;
}
"""


def global_name(kernel: str) -> str:
    """The global function the Relax module calls for ``kernel`` (a :data:`KERNELS` name)."""
    return f"qcompile.amx.{kernel}"


def kernel_name(weight_kind: str, sparse: bool) -> str:
    return f"{weight_kind}_{'sparse' if sparse else 'dense'}"


def shim_source() -> str:
    """The C++ of the TVM-FFI entry points (appended to the kernels' source)."""
    return _SHIM


def library_source() -> str:
    """The whole translation unit: kernels, then entry points."""
    return source() + "\n" + _SHIM


def _flags() -> tuple[str, ...]:
    from qcompile.backends.hooked import tvm_ffi_flags
    return tvm_ffi_flags("amx", "qcompile.backends.amx.build.AmxLibrary")


def compile_library() -> Path:
    """The cached shared library of the kernels and their TVM-FFI entries."""
    return compile_source(library_source(), cxx=True, suffix="cc", tag=TAG, openmp=False,
                          extra=_flags())


def load(path):
    """The library at ``path`` as a TVM-FFI module."""
    from qcompile.backends.tvm.target import require_tvm
    require_tvm()  # loads libtvm_runtime, which the library links
    import tvm_ffi
    try:
        return tvm_ffi.load_module(str(path))
    except Exception as e:  # noqa: BLE001 - the loader's message says what is missing
        raise BackendError(f"loading the AMX kernel library {path} failed: {e}",
                           hint="rebuild with the installed TVM (qcompile build --target amx)"
                           ) from None


def kind(module) -> str | None:
    """``"amx"``, ``"avx512"`` or ``"avx2"``: what ``module``'s entries run here now (None: no
    sparse kernel can)."""
    return KIND_OF.get(int(module.qc_amx_kind()))


def register(module, kernels) -> None:
    """Make every kernel's entry of ``module`` its :func:`global_name`, after checking that
    this CPU can run them."""
    import tvm_ffi
    if kind(module) is None:
        raise BackendError("the sparse kernels of target 'amx' need AVX2 and FMA at least; this "
                           "CPU (or QCOMPILE_ISA) allows less",
                           hint="rebuild the model here (pruned linears then use the dense cpu "
                                "kernels), or unset QCOMPILE_ISA")
    for k in dict.fromkeys(kernels):
        tvm_ffi.register_global_func(global_name(k), getattr(module, f"qc_amx_{k}"),
                                     override=True)
