"""The ``reference`` backend: runs the IR with the torch interpreter (the oracle)."""
from __future__ import annotations

from qcompile.backends.base import Backend, register_backend
from qcompile.interpreter import Interpreter
from qcompile.ir.graph import Graph, Node
from qcompile.ir.registry import get_schema
from qcompile.ir.types import DTYPES, eval_dim, numel

__all__ = ["ReferenceBackend"]

# A roofline model of a generic CPU core for the cost hook: the placement pass compares
# relative costs, later backends replace it with measured numbers.
_PEAK_FLOPS = 50e9
_BANDWIDTH = 20e9
_LAUNCH = 2e-6


def _flops(node: Node, size) -> float:
    out = node.outputs[0]
    n_out = size(out.shape)
    if node.op == "linear":
        return 2.0 * n_out * size(node.inputs[1].shape[1:])
    if node.op == "matmul":
        return 2.0 * n_out * size(node.inputs[0].shape[-1:])
    if node.op == "conv":
        w = node.inputs[1].shape
        return 2.0 * n_out * size(w[1:])
    if node.op == "attention":
        q, k = node.inputs[0].shape, node.inputs[1].shape
        return 4.0 * size(q) * size(k[-2:-1])
    return float(n_out)


class ReferenceBackend(Backend):
    name = "reference"
    targets = ("reference",)

    def supports(self, node: Node) -> bool:
        try:
            get_schema(node.op)
            return True
        except Exception:
            return False

    def cost(self, node: Node, device: str = "cpu", env: dict[str, int] | None = None) -> float:
        env = env or {}

        def size(shape) -> float:
            return float(eval_dim(numel(shape), {k: env.get(k, 1) for k in _symbols(shape)}))

        moved = sum(size(v.shape) * DTYPES[v.dtype].itemsize
                    for v in list(node.inputs) + list(node.outputs) if v is not None)
        return _LAUNCH + max(_flops(node, size) / _PEAK_FLOPS, moved / _BANDWIDTH)

    def lower(self, graph: Graph, target: str):
        return Interpreter(graph)


def _symbols(shape):
    from qcompile.ir.types import symbols_of
    out: set[str] = set()
    for d in shape:
        out |= symbols_of(d)
    return out


register_backend(ReferenceBackend())
