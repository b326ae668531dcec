"""LayerNorm, RMSNorm and softmax lowerings (Relax ops; fused reductions come from the
kernels where they apply)."""
from __future__ import annotations

__all__ = ["lower_layer_norm", "lower_rms_norm", "lower_softmax"]


def _ones(L, v, value: float, ndim: int):
    """The affine a norm without one implies, over its ``ndim`` normalized axes."""
    import numpy as np
    from tvm import relax
    shape = [int(d) for d in v.type.shape[len(v.type.shape) - ndim:]]
    return relax.const(np.full(shape, value, dtype=v.dtype), v.dtype)


def _kernel_norm(L, n, a, axes):
    """The row-norm kernel's result, or None when it does not apply."""
    from tvm import relax

    from qcompile.backends.tvm.kernels import norms as K
    from qcompile.backends.tvm.linear import _flat_type, _rows, kernel_rows
    v = n.inputs[0]
    width = v.type.shape[-1]
    if not (L.kernels and L.info is not None and len(axes) == 1 and v.dtype == "float32"
            and isinstance(width, int) and all(x is None or L.dtype(x) == "float32"
                                               for x in a[1:])):
        return None
    x2, rows = _rows(L, a[0], v)
    params = [x for x in a[1:] if x is not None]
    if n.op == "layer_norm":
        func = L.kernel(K.layer_norm, kernel_rows(rows), width, eps=float(n.attrs["eps"]),
                        weight=a[1] is not None, bias=a[2] is not None, info=L.info)
    else:
        func = L.kernel(K.rms_norm, kernel_rows(rows), width, eps=float(n.attrs["eps"]),
                        weight=a[1] is not None, info=L.info)
    from qcompile.ir.graph import Value
    out = n.outputs[0]
    y = L.call_kernel(func, [x2] + params, Value(out.name, _flat_type(out)), n.op)
    L.report[f"{n.op}.kernel"] = L.report.get(f"{n.op}.kernel", 0) + 1
    return relax.op.reshape(y, L.shape(out)) if out.type.rank != 2 else y


def lower_layer_norm(L, n, a, axes):
    fused = _kernel_norm(L, n, a, axes)
    if fused is not None:
        return fused
    from tvm import relax
    x, g, b = a
    v = n.inputs[0]
    g = g if g is not None else _ones(L, v, 1.0, len(axes))
    b = b if b is not None else _ones(L, v, 0.0, len(axes))
    return relax.op.nn.layer_norm(x, g, b, axes, float(n.attrs["eps"]))


def lower_rms_norm(L, n, a, axes):
    fused = _kernel_norm(L, n, a, axes)
    if fused is not None:
        return fused
    from tvm import relax
    x, w = a
    w = w if w is not None else _ones(L, n.inputs[0], 1.0, len(axes))
    return relax.op.nn.rms_norm(x, w, axes, float(n.attrs["eps"]))


def lower_softmax(L, n, a):
    from tvm import relax
    fn = relax.op.nn.softmax if n.op == "softmax" else relax.op.nn.log_softmax
    return fn(a[0], axis=n.attrs["axis"])
