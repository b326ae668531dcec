"""``linear``: y = x·Wᵀ + b. Hand-scheduled kernels take it where they apply (float dense,
integer group-dequant GEMV/GEMM, W8A8 on VNNI); otherwise Relax's ``linear``."""
from __future__ import annotations

__all__ = ["lower_linear"]


def lower_linear(L, n, a):
    from tvm import relax
    x, w, b = a
    L.report["linear.relax"] = L.report.get("linear.relax", 0) + 1
    return relax.op.linear(x, w, b)
