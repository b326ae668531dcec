"""``linear``: y = x·Wᵀ + b, on the hand-scheduled kernels where they apply:

- integer weight-only formats (``intN``/``uintN`` per group or channel) on the group-dequant
  GEMV/GEMM (codes packed at compile time, dequantization fused in the inner loop);
- W8A8 — an ``int8 per_token`` activation copy feeding an ``int8`` per-channel weight — on the
  int8 kernel (VNNI where the CPU has it), which quantizes the activation rows itself;
- every other constant weight on the packed fp32 ``dense`` kernel, with a following
  activation (relu, GELU, SiLU) or residual ``add`` fused into its write-back.

Anything else (a weight computed at run time, the CUDA target) is Relax's ``linear``. Inputs of
rank > 2 run as ``[rows, features]`` (rows = batch × sequence, symbolic) and are reshaped back.
"""
from __future__ import annotations

import numpy as np

from qcompile.ir.graph import Node, Value

__all__ = ["lower_linear", "fusable_epilogue", "kernel_rows"]

_ACTS = {"relu": "relu", "silu": "silu"}


def _count(L, key: str) -> None:
    L.report[key] = L.report.get(key, 0) + 1


def _single_reader(L, v: Value) -> Node | None:
    users = L.users.get(v, [])
    return users[0] if len(users) == 1 and v not in L.graph.outputs and v.quant is None else None


def fusable_epilogue(L, n: Node):
    """(epilogue name, node absorbed, residual value) for the dense kernel's write-back."""
    r = _single_reader(L, n.outputs[0])
    if r is None:
        return None, None, None
    if r.op in _ACTS or (r.op == "gelu" and r.attrs["approximate"] in ("none", "tanh")):
        kind = "gelu" if r.op == "gelu" and r.attrs["approximate"] == "none" else \
            "gelu_tanh" if r.op == "gelu" else _ACTS[r.op]
        if r.outputs[0].dtype == n.outputs[0].dtype:
            return kind, r, None
    if r.op == "add" and r.outputs[0].type.same_as(n.outputs[0].type):
        other = r.inputs[1] if r.inputs[0] is n.outputs[0] else r.inputs[0]
        if other is not n.outputs[0] and other.type.same_as(n.outputs[0].type) \
                and (id(other) in L.values or L.graph.is_constant(other)):
            return None, r, other
    return None, None, None


def kernel_rows(rows):
    """The row count a kernel is built for: the number when static, else a fresh variable
    (a kernel binds its sizes from its buffers' shapes; ``batch·seq`` is not a variable)."""
    from tvm import tirx
    return int(rows.value) if isinstance(rows, tirx.IntImm) else tirx.Var("m", "int64")


def _rows(L, x, v: Value):
    """``x`` as ``[rows, features]`` and the rows expression."""
    from tvm import relax
    shape = L.shape(v)
    rows = shape[0]
    for d in shape[1:-1]:
        rows = rows * d
    if len(shape) == 2:
        return x, rows
    return L.emit(relax.op.reshape(x, [rows, shape[-1]])), rows


def _const_np(L, v: Value) -> np.ndarray:
    from qcompile.backends.tvm.lower import _np
    return _np(L.graph.constants[v.name])


def lower_linear(L, n: Node, a):
    from tvm import relax
    x, w, b = a
    xv, wv = n.inputs[0], n.inputs[1]
    float_x = xv.dtype == "float32" and n.outputs[0].dtype == "float32"
    if L.kernels and L.info is None and L.graph.is_constant(wv) and float_x:
        from qcompile.backends.tvm.quantized import lower_gpu_dequant_linear
        gpu = lower_gpu_dequant_linear(L, n, x, b, int(wv.type.shape[1]), int(wv.type.shape[0]))
        if gpu is not None:
            return gpu
    if not (L.kernels and L.info is not None and L.graph.is_constant(wv) and float_x):
        _count(L, "linear.relax")
        return relax.op.linear(x, w if w is not None else L.get(wv), b)
    k = int(wv.type.shape[1])
    nout = int(wv.type.shape[0])
    quant = _quant_kernel(L, n, x, b, k, nout)
    if quant is not None:
        return quant
    from qcompile.backends.tvm.kernels import dense as K
    epi, absorbed, residual = fusable_epilogue(L, n)
    x2, rows = _rows(L, x, xv)
    packed = L.add_param(f"{wv.name}.packed", K.pack_dense_weight(_const_np(L, wv), L.info))
    L.consumed.add(wv.name)
    args = [x2, packed]
    if b is not None:
        args.append(b)
    if residual is not None:
        r = L.get(residual)
        args.append(_rows(L, r, residual)[0])
    func = L.kernel(K.dense, kernel_rows(rows), nout, k, bias=b is not None, epilogue=epi,
                    residual=residual is not None, info=L.info)
    out_v = absorbed.outputs[0] if absorbed is not None else n.outputs[0]
    flat = Value(out_v.name, _flat_type(out_v))
    y = L.call_kernel(func, args, flat, "dense")
    y = L.emit(relax.op.reshape(y, L.shape(out_v))) if out_v.type.rank != 2 else y
    _count(L, "linear.dense" + (f"+{epi}" if epi else "") + ("+residual" if residual else ""))
    if absorbed is not None:
        L.absorb(absorbed, y)
    return y


def _flat_type(v: Value):
    from qcompile.ir.types import TensorType, dim_mul
    shape = v.type.shape
    return TensorType((dim_mul(*shape[:-1]) if len(shape) > 1 else 1, shape[-1]), v.dtype)


def _quant_kernel(L, n: Node, x, b, k: int, nout: int):
    """The quantized kernels, when the weight's (and input's) annotation fits one."""
    from qcompile.backends.tvm import quantized
    return quantized.lower_quantized_linear(L, n, x, b, k, nout)
