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
from qcompile.config import QuantConfig
from qcompile.interpreter import Interpreter

from .test_backend import _kernel_oracle, _rel

pytestmark = pytest.mark.skipif(find_spec("tvm") is None, reason="target amx needs Apache TVM")
needs_avx2 = pytest.mark.skipif(not {"avx2", "fma"} <= isa.host_features(),
                                reason="the sparse kernels need AVX2 and FMA at least")

U16 = dict(activations="uint16", activation_granularity="per_tensor")


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
