"""Lowering for target ``lut``: the TVM ``cpu`` lowering, with every linear whose constant
weight is an integer format of 1–4 bits (``int1..int4`` / ``uint1..uint4``, per group of a
multiple of 32 or per channel: whatever :func:`.weights.from_quantized` takes) replaced by a
``call_dps_packed`` of the LUT kernel's TVM-FFI function (:mod:`.ffi`).

The weight is packed at compile time into the layout of the kernel that
:func:`.tune.choose` picks for its shape (``m = 1``; no timing unless the user tuned): its
index bytes and scales become parameters of ``main``; the bias is passed in.

A weight the LUT kernels cannot take falls back, silently but on record
(:attr:`LutLinears.fallbacks`, ``report["linear.lut.fallback"]``), to what target ``cpu``
does with it: the TVM group-dequant kernel (2/3/4/8 bits), else the fp32 dense kernel on the
stored (dequantized) weight. Before a weight goes to LUT, the codes it was transformed to
are checked to dequantize to the graph's weight, so a format detail the transform does not
model can only cost speed, never accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qcompile.errors import ConfigError

from . import ffi
from .codegen import VARIANT_LAYOUT, KernelConfig

__all__ = ["LutLinears", "MAX_BITS"]

MAX_BITS = 4
#: how far (relative to the largest weight) the LUT weight may dequantize from the graph's
_DEQUANT_RTOL = 1e-5


@dataclass
class LutLinears:
    """The ``linear_hook`` of one lowering; collects the kernel configurations it used."""

    configs: list[KernelConfig] = field(default_factory=list)
    #: linear node name -> why it did not go to the LUT kernels
    fallbacks: dict[str, str] = field(default_factory=dict)

    def __call__(self, L, n, x, b, k: int, nout: int):
        from tvm import relax

        from qcompile.backends.tvm.linear import _count, _rows
        lw = self._weight(L, n)
        if lw is None:
            if n.name in self.fallbacks:
                _count(L, "linear.lut.fallback")
            return None
        from .tune import choose
        from .weights import pack
        c = choose(lw.n, lw.kp, lw.bits, lw.group, lw.mode, m=1)
        pw = pack(lw, VARIANT_LAYOUT[c.variant], rb=c.rb)
        wv, xv, out = n.inputs[1], n.inputs[0], n.outputs[0]
        x2, rows = _rows(L, x, xv)
        args = [x2, L.add_param(f"{wv.name}.lut_w", pw.w), L.add_param(f"{wv.name}.lut_sc", pw.sc)]
        if b is not None:
            args.append(L.emit(L.cast(b, "float32")) if L.dtype(b) != "float32" else b)
        L.consumed.add(wv.name)
        if c not in self.configs:
            if not self.configs:
                from .build import compiler
                compiler()  # no C compiler: say so now, before TVM builds anything
            self.configs.append(c)
        y = L.emit(relax.call_dps_packed(ffi.global_name(c), args,
                                         relax.TensorType([rows, nout], "float32")))
        _count(L, f"linear.lut.w{lw.bits}")
        return L.emit(relax.op.reshape(y, L.shape(out))) if out.type.rank != 2 else y

    def _weight(self, L, n):
        """The node's weight as a :class:`~.weights.LutWeight`, or None (reason recorded)."""
        from qcompile.backends.tvm.quantized import _codes
        from qcompile.formats.integer import IntFormat

        from .weights import from_quantized
        wv = n.inputs[1]
        fmt = wv.quant.fmt
        if not isinstance(fmt, IntFormat) or fmt.bits > MAX_BITS:
            return None  # not low-bit integer: not LUT's business, nothing to record
        try:
            lw = from_quantized(_codes(L, wv))
        except ConfigError as e:
            self.fallbacks[n.name] = str(e).split("\n", 1)[0]  # the what, not the hint
            return None
        ref = L.graph.constants[wv.name].float().numpy()
        err = float(np.abs(lw.dequantize() - ref).max()) if ref.size else 0.0
        if err > _DEQUANT_RTOL * max(float(np.abs(ref).max()), 1e-30):
            self.fallbacks[n.name] = (f"{fmt.name}: the LUT codes dequantize {err:.3g} away from "
                                      "the weight")
            return None
        return lw
