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


def lower_layer_norm(L, n, a, axes):
    from tvm import relax
    x, g, b = a
    v = n.inputs[0]
    g = g if g is not None else _ones(L, v, 1.0, len(axes))
    b = b if b is not None else _ones(L, v, 0.0, len(axes))
    return relax.op.nn.layer_norm(x, g, b, axes, float(n.attrs["eps"]))


def lower_rms_norm(L, n, a, axes):
    from tvm import relax
    x, w = a
    w = w if w is not None else _ones(L, n.inputs[0], 1.0, len(axes))
    return relax.op.nn.rms_norm(x, w, axes, float(n.attrs["eps"]))


def lower_softmax(L, n, a):
    from tvm import relax
    fn = relax.op.nn.softmax if n.op == "softmax" else relax.op.nn.log_softmax
    return fn(a[0], axis=n.attrs["axis"])
