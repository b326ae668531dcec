"""Lowering for target ``amx``: the TVM ``cpu`` lowering, with every pruned linear (its weight
carries the :class:`~qcompile.ir.SparsitySpec` of ``passes/sparsify.py``) whose weight the
kernels take replaced by a ``call_dps_packed`` of a TVM-FFI entry of :mod:`.ffi`:

- **bf16** weights (``weights="bf16"``): bf16 × bf16 products summed in fp32; the activations
  are rounded to bf16 in the kernel (the interpreter keeps them fp32: that rounding is this
  target's only difference from it);
- **int8** per-channel symmetric weights read by an ``int8 per_token`` dynamic activation
  copy (W8A8, what ``backends/tvm/quantized.py`` calls ``w8a8``): the kernel quantizes the
  float rows itself, as the interpreter's fake quantization does, and sums exactly in int32.

A weight is laid out sparse (:func:`.format.sparse`: bitmasks and packed non-zeros) when that
moves at least :data:`MIN_SAVING` fewer bytes than the dense layout (:func:`.format.dense`),
counting its zeros: bytes ≈ density + 1/16 (bf16) or + 1/8 (int8) of dense, so sparse from
about 11% (bf16) or 18% (int8) zeros on; int8 weights built for the AVX2 kernels stay dense
(:func:`choose_sparse`).

A pruned weight the kernels cannot take (int8 weight-only, other formats, a float32 weight)
falls back, on record (:attr:`AmxLinears.fallbacks`, ``report["linear.amx.fallback"]``), to
what target ``cpu`` does with it. So does every pruned linear where no sparse kernel runs (a
CPU, or a ``QCOMPILE_ISA`` cap, below AVX2: :func:`.build.best_kind` is None), with one
warning per build; the kernel kind itself (AMX, AVX-512 or AVX2) is chosen at run time.
Linears that were not pruned are not this target's business and lower as on ``cpu``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from . import ffi
from . import format as F

__all__ = ["AmxLinears", "MIN_SAVING", "MASK_BYTES", "choose_sparse"]

#: the sparse layout's mask bytes per dense byte
MASK_BYTES = {"bf16": 1 / 16, "int8": 1 / 8}
#: the sparse layout is used when it saves at least this fraction of the dense bytes
MIN_SAVING = 0.05
#: how far (relative to the largest weight) the int8 codes may dequantize from the graph's
_DEQUANT_RTOL = 1e-5


def choose_sparse(kind: str, zeros: float, kernel: str | None = "avx512") -> bool:
    """Sparse layout for a weight of ``kind`` with this fraction of zeros, for the kernel kind
    the build is for (:func:`.build.best_kind`)? By bytes, except int8 on AVX2: without
    ``vpexpandb`` its expansion (a table lookup per mask byte) costs more than the bytes it
    saves at any sparsity (``benchmarks/sparse.py --isa avx2``: the dense int8 kernel is the
    faster one from 0% to 90%), so int8 weights stay dense there."""
    if kind == "int8" and kernel == "avx2":
        return False
    return (1.0 - zeros) + MASK_BYTES[kind] <= 1.0 - MIN_SAVING


def _pad16(a: np.ndarray, dtype) -> np.ndarray:
    """Per-output values padded to whole column tiles (the kernels read 16 at a time)."""
    out = np.zeros(-(-a.shape[0] // 16) * 16, dtype)
    out[:a.shape[0]] = a
    return out


@dataclass
class AmxLinears:
    """The ``linear_hook`` of one lowering; collects the kernels it used."""

    #: the :data:`.ffi.KERNELS` used, in first-use order
    kernels: list[str] = field(default_factory=list)
    #: linear node name -> the kernel it runs on
    taken: dict[str, str] = field(default_factory=dict)
    #: linear node name -> why it did not go to the sparse kernels
    fallbacks: dict[str, str] = field(default_factory=dict)
    #: the sparse kernel kind this build is for (:func:`.build.best_kind`; "" for none), and
    #: why no sparse kernel runs ("" when one does); both set on first use
    _kernel: str | None = None
    _no_kernel: str = ""

    def _kernel_kind(self) -> str | None:
        if self._kernel is None:
            from qcompile import isa

            from .build import best_kind
            self._kernel = best_kind() or ""
            if not self._kernel:
                self._no_kernel = (f"no sparse kernel runs at ISA level {isa.level()!r} (they "
                                   "need AVX2 and FMA)")
        return self._kernel or None

    def __call__(self, L, n, x, b, k: int, nout: int):
        from tvm import relax

        from qcompile.backends.tvm.linear import _count, _rows
        got = self._layout(L, n)
        if got is None:
            if n.name in self.fallbacks:
                _count(L, "linear.amx.fallback")
            return None
        sw, src = got
        name = ffi.kernel_name(sw.kind, sw.masks is not None)
        wv, out = n.inputs[1], n.outputs[0]
        x2, rows = _rows(L, x if src is n.inputs[0] else L.get(src), src)
        args = [x2]
        if sw.masks is not None:
            args.append(L.add_param(f"{wv.name}.amx_masks", sw.masks))
        args += [L.add_param(f"{wv.name}.amx_values", sw.values),
                 L.add_param(f"{wv.name}.amx_offsets", sw.offsets)]
        if sw.kind == "int8":
            args += [L.add_param(f"{wv.name}.amx_colsum", _pad16(sw.colsum, np.int32)),
                     L.add_param(f"{wv.name}.amx_scale", _pad16(sw.scale, np.float32))]
        if b is not None:
            args.append(L.emit(L.cast(b, "float32")) if L.dtype(b) != "float32" else b)
        L.consumed.add(wv.name)
        if not self.kernels:
            _require_cxx()  # no C++ compiler: say so now, before TVM builds anything
        if name not in self.kernels:
            self.kernels.append(name)
        self.taken[n.name] = name
        y = L.emit(relax.call_dps_packed(ffi.global_name(name), args,
                                         relax.TensorType([rows, nout], "float32")))
        _count(L, f"linear.amx.{name}")
        return L.emit(relax.op.reshape(y, L.shape(out))) if out.type.rank != 2 else y

    def _layout(self, L, n):
        """(:class:`~.format.SparseWeight`, the value the kernel reads) for the node, or None
        (the reason recorded when the weight was pruned)."""
        from qcompile.backends.tvm.quantized import _codes, _w8a8
        wv, xv = n.inputs[1], n.inputs[0]
        if wv.sparsity is None:
            return None  # not pruned: not this target's business
        if self._kernel_kind() is None:
            self.fallbacks[n.name] = self._no_kernel
            return None
        fmt = wv.quant.fmt
        w = L.graph.constants[wv.name]
        if fmt.name == "bf16":
            a = w.float().numpy()
            if not np.array_equal(F.from_bf16_bits(F.to_bf16_bits(a)), a, equal_nan=True):
                self.fallbacks[n.name] = "bf16: the stored weight is not bf16-exact"
                return None
            kind, scale, src = "bf16", None, xv
        elif fmt.name == "int8":
            raw = xv.producer.inputs[0] if xv.producer is not None and \
                xv.producer.op == "identity" else None
            if not (_w8a8(fmt, xv.quant) and raw is not None and raw.dtype == "float32"):
                self.fallbacks[n.name] = ("int8: the int8 kernels are W8A8 and this weight is "
                                          "read by float activations (quantize them int8 per "
                                          "token, or use weights='bf16')")
                return None
            qt = _codes(L, wv)
            codes = qt.codes.to(torch.int8).numpy()
            scale = qt.params["scale"].float().reshape(-1).numpy()
            ref = w.float().numpy()
            err = float(np.abs(codes * scale[:, None] - ref).max()) if ref.size else 0.0
            if err > _DEQUANT_RTOL * max(float(np.abs(ref).max()), 1e-30):
                self.fallbacks[n.name] = (f"int8: the codes dequantize {err:.3g} away from the "
                                          "weight")
                return None
            a, kind, src = codes, "int8", raw
        else:
            self.fallbacks[n.name] = (f"{fmt.name}: the sparse kernels take bf16 weights or "
                                      "int8 (W8A8) weights")
            return None
        zeros = float((a == 0).mean()) if a.size else 0.0
        lay = F.sparse if choose_sparse(kind, zeros, self._kernel_kind()) else F.dense
        return lay(a, kind, scale=scale), src

    def finish(self, graph, report: dict) -> None:
        """Record the pruned linears the hook was never asked about (float32 weights: the
        TVM lowering asks only about annotated ones)."""
        for n in graph.nodes:
            if n.op == "linear" and n.inputs[1].sparsity is not None and \
                    n.name not in self.taken and n.name not in self.fallbacks:
                q = n.inputs[1].quant
                self.fallbacks[n.name] = (f"{q.fmt.name if q is not None else 'float32'}: the "
                                          "sparse kernels take bf16 weights or int8 (W8A8) "
                                          "weights (weights='bf16')")
                report["linear.amx.fallback"] = report.get("linear.amx.fallback", 0) + 1
        isa_fallbacks = [k for k, v in self.fallbacks.items() if v == self._no_kernel]
        if self._no_kernel and isa_fallbacks:
            warnings.warn(f"target 'amx': {len(isa_fallbacks)} pruned linear(s) fall back to "
                          f"the dense cpu kernels: {self._no_kernel}", stacklevel=2)


def _require_cxx() -> None:
    import os
    import shutil

    from qcompile.errors import BackendError
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BackendError(f"target 'amx' needs a C++ compiler and {cxx!r} was not found",
                           hint="install g++ (Debian: apt install g++) or set CXX")
