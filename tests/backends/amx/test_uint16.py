"""Target ``amx`` with ``activations="uint16"`` per tensor: pruned bf16 weights run on the sparse
kernels, which read the activation the TVM lowering fake-quantized to uint16 — the
interpreter's bits, so the VM equals the interpreter running the ctypes kernels bit for bit;
unpruned int8 weights are the cpu build and match the interpreter within fp32 rounding."""
from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

import qcompile
from qcompile import isa, zoo
from qcompile.backends.amx import format as F
from qcompile.config import QuantConfig
from qcompile.interpreter import Interpreter

pytestmark = pytest.mark.skipif(find_spec("tvm") is None, reason="target amx needs Apache TVM")
needs_avx2 = pytest.mark.skipif(not {"avx2", "fma"} <= isa.host_features(),
                                reason="the sparse kernels need AVX2 and FMA at least")

U16 = dict(activations="uint16", activation_granularity="per_tensor")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


class _KernelLinear:
    """A linear schema that runs the ctypes kernels on its (fake-quantized) input."""

    def __init__(self, sw, kind):
        self.sw, self.kind = sw, kind

    def run(self, args, attrs, env):
        from qcompile.backends.amx import build as B
        x, b = args[0], args[2] if len(args) > 2 else None
        y = B.library().matmul(x.reshape(-1, x.shape[-1]).numpy(), self.sw,
                               None if b is None else b.numpy(), kind=self.kind, nthreads=2)
        return [torch.from_numpy(y).reshape(*x.shape[:-1], -1)]


def _kernel_oracle(graph, kind) -> Interpreter:
    it = Interpreter(graph)
    for i, n in enumerate(graph.nodes):
        if n.op == "linear" and n.inputs[1].sparsity is not None:
            it._schemas[i] = _KernelLinear(F.sparse(graph.constants[n.inputs[1].name], "bf16"),
                                           kind)
    return it


@pytest.fixture(scope="module")
def mlp():
    model, ex, dyn = zoo.mlp()
    cal = [(torch.randn(32, 64, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    return model, ex, dyn, cal


@needs_avx2
def test_pruned_bf16_weights_on_the_sparse_kernels_bit_for_bit(mlp):
    model, ex, dyn, cal = mlp
    cfg = QuantConfig(weights="bf16", sparsity=0.5, sparsity_method="magnitude", **U16)
    cm = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn, config=cfg,
                          calibration=cal)
    e = cm._exec
    assert e.report == {"linear.amx.bf16_sparse": 3} and not e.fallbacks
    assert {n.outputs[0].quant.format for n in cm.graph.nodes if n.op == "identity"} == {"uint16"}
    x = torch.randn(21, 64)
    out = cm(x)
    assert torch.equal(out, _kernel_oracle(cm.graph, e.kernel_kind).run(x)[0])
    plain = cm.graph.clone()  # float inputs to the kernels give other bits: the codes matter
    for n in plain.nodes:
        if n.op == "identity":
            n.outputs[0].quant = None
    assert not torch.equal(out, _kernel_oracle(plain, e.kernel_kind).run(x)[0])


def test_int8_weights_are_the_cpu_build_and_match_the_interpreter(mlp):
    """Not pruned: no sparse kernel, the cpu lowering (tests/backends/tvm/test_uint16.py); a
    downstream uint16 code may flip one step, relative L2 below 2e-6 (measured ~1e-7)."""
    model, ex, dyn, cal = mlp
    cfg = QuantConfig(weights="int8", group_size=None, **U16)
    cm = qcompile.compile(model, "amx", example_inputs=ex, dynamic_shapes=dyn, config=cfg,
                          calibration=cal)
    assert cm._exec.report == {"linear.w8": 3} and not cm._exec.fallbacks
    x = torch.randn(21, 64)
    assert _rel(cm(x), Interpreter(cm.graph).run(x)[0]) < 2e-6
