"""The LUT kernels as TVM-FFI functions, so a Relax module calls them with ``call_dps_packed``.

One C translation unit holds the generated kernels (:func:`.codegen.generate`) and, per
configuration, an entry point in TVM-FFI's C ABI (``__tvm_ffi_<name>``, the symbol that
``TVM_FFI_DLL_EXPORT_TYPED_FUNC`` would emit, written against ``tvm/ffi/c_api.h``). The
generated kernels are C, not C++ (implicit ``void*`` conversions), so the shim is C too and
the whole library builds with the system C compiler through :func:`.build.compile_source`
(cached by source and flags; gcc's output was checked to be byte-identical between builds).

An entry takes ``(x, w, sc, y)`` or ``(x, w, sc, bias, y)``: ``x`` float32 ``[..., k]``, ``w``
and ``sc`` the :class:`~.weights.PackedWeight`'s ``w`` (uint8) and ``sc`` (float32), ``y``
float32 ``[..., n]`` (written). ``m`` is the product of ``x``'s leading dims, ``kp`` = ``k``
rounded up to 32 (checked against the sizes of ``w`` and ``sc``). It runs on TVM's thread
pool (``TVMBackendParallelLaunch``), not OpenMP, so the VM's kernels and these share one set
of workers: every task builds the tables of its share of the rows, a barrier, then every
task runs its share of the tiles.

:func:`register` makes each entry the global function :func:`global_name` that the lowered
Relax module calls; that has to happen before the VM runs.
"""
from __future__ import annotations

from pathlib import Path

from qcompile.backends.hooked import FFI_HELPERS
from qcompile.errors import BackendError

from .build import compile_source
from .codegen import KernelConfig, generate

__all__ = ["global_name", "shim_source", "library_source", "compile_library", "load",
           "register", "TAG"]

#: the cache tag (file name prefix) of the FFI libraries
TAG = "lut-ffi"

_COMMON = r"""
/* ---- TVM-FFI entry points (qcompile.backends.lut.ffi): C ABI of tvm/ffi/c_api.h ---- */
#include <stdio.h>
#include <tvm/ffi/c_api.h>
#include <tvm/runtime/c_backend_api.h>

typedef void (*qc_ffi_run_fn)(const uint8_t*, const float*, const float*, const int8_t*,
                              const float*, const float*, float*, int64_t, int64_t, int64_t,
                              int64_t, int64_t);

""" + FFI_HELPERS + r"""
typedef struct {
  qc_ffi_run_fn run;
  const float* x; const uint8_t* w; const float* sc; const float* bias; float* y;
  int8_t* tq; float* tsh; float* xs;
  int64_t m, n, k, kp, G, tiles;
} qc_ffi_job;

/* One worker: the tables of its rows, wait for all tables, then its tiles. */
static int qc_ffi_task(int task, TVMParallelGroupEnv* env, void* data) {
  const qc_ffi_job* j = (const qc_ffi_job*)data;
  const int64_t nt = env->num_task, ng = j->kp / j->G;
  const int64_t r0 = j->m * task / nt, r1 = j->m * (task + 1) / nt;
  if (r1 > r0)
    qc_lut_precompute(j->x + r0 * j->k, r1 - r0, j->k, j->kp, j->G, j->tq + r0 * j->kp * 4,
                      j->tsh + r0 * ng, j->xs + r0 * ng);
  if (nt > 1) TVMBackendParallelBarrier(task, env);
  const int64_t t0 = j->tiles * task / nt, t1 = j->tiles * (task + 1) / nt;
  if (t1 > t0)
    j->run(j->w, j->sc, j->bias, j->tq, j->tsh, j->xs, j->y, j->m, j->n, j->kp, t0, t1);
  return 0;
}

/* y = x . w^T (+ bias) for one configuration: G activation group, bm rows per tile, wg
 * index bytes and sg scale floats per (tile, activation group). */
static int qc_ffi_matmul(const char* fn, qc_ffi_run_fn run, int64_t G, int64_t bm, int64_t wg,
                         int64_t sg, const TVMFFIAny* args, int32_t nargs) {
  if (nargs != 4 && nargs != 5)
    return qc_ffi_fail(fn, NULL, "takes (x, w, sc, y) or (x, w, sc, bias, y)");
  DLTensor* x = qc_ffi_tensor(&args[0]);
  DLTensor* w = qc_ffi_tensor(&args[1]);
  DLTensor* sc = qc_ffi_tensor(&args[2]);
  DLTensor* b = nargs == 5 ? qc_ffi_tensor(&args[3]) : NULL;
  DLTensor* y = qc_ffi_tensor(&args[nargs - 1]);
  const char* e;
  if ((e = qc_ffi_check(x, kDLFloat, 32, " is not float32"))) return qc_ffi_fail(fn, "x", e);
  if ((e = qc_ffi_check(w, kDLUInt, 8, " is not uint8"))) return qc_ffi_fail(fn, "w", e);
  if ((e = qc_ffi_check(sc, kDLFloat, 32, " is not float32"))) return qc_ffi_fail(fn, "sc", e);
  if (nargs == 5 && (e = qc_ffi_check(b, kDLFloat, 32, " is not float32"))) return qc_ffi_fail(fn, "bias", e);
  if ((e = qc_ffi_check(y, kDLFloat, 32, " is not float32"))) return qc_ffi_fail(fn, "y", e);
  const int64_t k = x->shape[x->ndim - 1], n = y->shape[y->ndim - 1];
  const int64_t m = k ? qc_ffi_numel(x) / k : 0;
  const int64_t kp = (k + 31) / 32 * 32, tiles = (n + bm - 1) / bm;
  if (kp % G) return qc_ffi_fail(fn, "x", " (K) is no multiple of the activation group");
  if (qc_ffi_numel(y) != m * n) return qc_ffi_fail(fn, "y", " does not have x's rows");
  if (qc_ffi_numel(w) != tiles * (kp / G) * wg)
    return qc_ffi_fail(fn, "w", " does not match K and N (packed for another shape or kernel?)");
  if (qc_ffi_numel(sc) != tiles * (kp / G) * sg)
    return qc_ffi_fail(fn, "sc", " does not match K and N (packed for another shape or kernel?)");
  if (nargs == 5 && qc_ffi_numel(b) != n) return qc_ffi_fail(fn, "bias", " is not of size N");
  if (m == 0 || n == 0) return 0;
  const int64_t ng = kp / G, tqb = (m * kp * 4 + 63) / 64 * 64;
  int8_t* tq = (int8_t*)aligned_alloc(64, (size_t)tqb);
  float* tsh = (float*)malloc(sizeof(float) * (size_t)(m * ng * 2));
  if (!tq || !tsh) {
    free(tq); free(tsh);
    return qc_ffi_fail(fn, NULL, "out of memory for the activation tables");
  }
  qc_ffi_job job = {run, (const float*)qc_ffi_data(x), (const uint8_t*)qc_ffi_data(w),
                    (const float*)qc_ffi_data(sc), b ? (const float*)qc_ffi_data(b) : NULL,
                    (float*)qc_ffi_data(y), tq, tsh, tsh + m * ng, m, n, k, kp, G, tiles};
  int rc = TVMBackendParallelLaunch(qc_ffi_task, &job, 0);
  free(tq); free(tsh);
  return rc ? qc_ffi_fail(fn, NULL, "the TVM thread pool failed") : 0;
}
"""


def global_name(c: KernelConfig) -> str:
    """The global function the Relax module calls for configuration ``c``."""
    return f"qcompile.lut.{c.name}"


def _entry(c: KernelConfig) -> str:
    wg, sg = c.pairs * c.vbytes, c.rb * c.ns * 16
    body = (f"QC_EXPORT int __tvm_ffi_{c.name}(void* self, const TVMFFIAny* args, "
            "int32_t nargs,\n"
            f"    TVMFFIAny* result) {{\n"
            "  (void)self; (void)result;\n"
            f'  return qc_ffi_matmul("{c.name}", {c.name}_run, {c.group}, {16 * c.rb}, {wg}, {sg}, '
            "args, nargs);\n}\n")
    return body if c.variant == "c" else f"#if defined(__x86_64__)\n{body}#endif\n"


def shim_source(configs) -> str:
    """The C of the TVM-FFI entry points of ``configs`` (appended to the kernels' source)."""
    cs = list(dict.fromkeys(configs))
    return _COMMON + "\n" + "\n".join(_entry(c) for c in cs)


def library_source(configs) -> str:
    """The whole translation unit: kernels, then entry points."""
    cs = list(dict.fromkeys(configs))
    return generate(cs) + "\n" + shim_source(cs)


def _flags() -> tuple[str, ...]:
    from qcompile.backends.hooked import tvm_ffi_flags
    return tvm_ffi_flags("lut", "qcompile.backends.lut.build.LutLibrary")


def compile_library(configs) -> Path:
    """The cached shared library holding ``configs`` and their TVM-FFI entries."""
    return compile_source(library_source(configs), extra=_flags(), tag=TAG, openmp=False)


def load(path):
    """The library at ``path`` as a TVM-FFI module."""
    from qcompile.backends.tvm.target import require_tvm
    require_tvm()  # loads libtvm_runtime, which the library links
    import tvm_ffi
    try:
        return tvm_ffi.load_module(str(path))
    except Exception as e:  # noqa: BLE001 - the loader's message says what is missing
        raise BackendError(f"loading the LUT kernel library {path} failed: {e}",
                           hint="rebuild with the installed TVM (qcompile build --target lut)"
                           ) from None


def register(module, configs) -> None:
    """Make every configuration's entry of ``module`` its :func:`global_name`."""
    import tvm_ffi
    for c in dict.fromkeys(configs):
        tvm_ffi.register_global_func(global_name(c), getattr(module, c.name), override=True)
