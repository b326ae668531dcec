"""Target ``lut`` with ``activations="uint16"`` per tensor: int4 weights go to the LUT kernels,
which read the activation the TVM lowering fake-quantized to uint16 — the interpreter's bits, so
the VM equals the interpreter running the kernels' numpy model bit for bit; int8 weights fall to
the cpu kernels and match the interpreter within fp32 rounding."""
from __future__ import annotations

from importlib.util import find_spec

import pytest
import torch

import qcompile
from qcompile import zoo
from qcompile.config import QuantConfig
from qcompile.interpreter import Interpreter

from .test_backend import _lut_oracle, _rel

pytestmark = pytest.mark.skipif(find_spec("tvm") is None, reason="target lut needs Apache TVM")


def _cfg(weights, group_size):
    return QuantConfig(weights=weights, group_size=group_size, activations="uint16",
                       activation_granularity="per_tensor")


@pytest.fixture(scope="module")
def mlp():
    model, ex, dyn = zoo.mlp()
    cal = [(torch.randn(32, 64, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    return model, ex, dyn, cal


def test_int4_weights_on_the_lut_kernels_bit_for_bit(mlp):
    model, ex, dyn, cal = mlp
    cm = qcompile.compile(model, "lut", example_inputs=ex, dynamic_shapes=dyn,
                          config=_cfg("int4", 32), calibration=cal)
    assert cm._exec.report == {"linear.lut.w4": 3} and not cm._exec.fallbacks
    assert {n.outputs[0].quant.format for n in cm.graph.nodes if n.op == "identity"} == {"uint16"}
    x = torch.randn(7, 64)
    out = cm(x)
    assert torch.equal(out, _lut_oracle(cm.graph).run(x)[0])
    # the oracle with float inputs to the linears is another result: the uint16 codes matter
    plain = cm.graph.clone()
    for n in plain.nodes:
        if n.op == "identity":
            n.outputs[0].quant = None
    assert not torch.equal(out, _lut_oracle(plain).run(x)[0])


def test_int8_weights_fall_to_the_cpu_kernels_and_match_the_interpreter(mlp):
    """As target ``cpu``: same fake-quantized activations, fp32 sums in another order, which may
    flip a downstream uint16 code one step (tests/backends/tvm/test_uint16.py); relative L2
    below 2e-6 (measured ~1e-7)."""
    model, ex, dyn, cal = mlp
    cm = qcompile.compile(model, "lut", example_inputs=ex, dynamic_shapes=dyn,
                          config=_cfg("int8", None), calibration=cal)
    assert cm._exec.report == {"linear.w8": 3}
    x = torch.randn(21, 64)
    assert _rel(cm(x), Interpreter(cm.graph).run(x)[0]) < 2e-6
