"""16-bit integer activations (``uint16``/``int16``) on target ``cpu``: the TIR fake quantization
equals the interpreter's bit for bit (per tensor with a stored zero point, and dynamic per
token), so one quantized linear differs from it only by the fp32 sums' order (a derived bound),
and a whole MLP compiled with ``activations="uint16"`` per tensor stays within one uint16 step
of rounding flips."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import qcompile  # noqa: E402
from qcompile import formats as F  # noqa: E402
from qcompile import zoo  # noqa: E402
from qcompile.backends.tvm import TVMExecutable, build  # noqa: E402
from qcompile.config import QuantConfig  # noqa: E402
from qcompile.interpreter import Interpreter  # noqa: E402
from qcompile.ir import Graph, TensorType  # noqa: E402
from qcompile.ir.quant import QuantSpec  # noqa: E402

from ._bounds import assert_within, fp32_dot_bound  # noqa: E402

U16 = QuantConfig(weights="int8", group_size=None, activations="uint16",
                  activation_granularity="per_tensor")


#: relative L2 between the cpu build of a 3-layer MLP and the interpreter (see the MLP test)
BOUND = 2e-6


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _fake_quant_graph(fmt: str, granularity: str) -> Graph:
    """x → identity annotated ``fmt`` → output; per tensor calibrated on [-1.3, 2.9]."""
    g = Graph("fq")
    x = g.add_input("x", TensorType(("batch", 40), "float32"))
    y = g.add("identity", x, name="q")
    if granularity == "per_tensor":
        qt = F.get(fmt).quantize(torch.tensor([-1.3, 2.9]))
        ps = {r: g.add_constant(f"q.act_{r}", t).name for r, t in qt.params.items()}
        y.quant = QuantSpec(fmt, granularity, **ps)
    else:
        y.quant = QuantSpec(fmt, granularity, axis=-1)
    g.outputs = [y]
    return g


@pytest.mark.parametrize("fmt", ["uint16", "int16"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_fake_quant_equals_the_interpreter_bit_for_bit(fmt, granularity):
    """Inputs reach past the calibrated range (saturation at 0 / 65535 or ±32767); a grid of
    16 bits keeps hundreds of distinct levels, so a wrong grid (8 bits, a dropped zero point)
    would not give the same bits."""
    g = _fake_quant_graph(fmt, granularity)
    ex, params, _ = build(g, "cpu")
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(3)) * 2
    out, ref = TVMExecutable(g, "cpu", ex, params)(x)[0], Interpreter(g).run(x)[0]
    assert torch.equal(out, ref)
    assert len(ref.unique()) > 200 and not torch.equal(ref, x)
    if granularity == "per_tensor":  # saturated at the calibrated range (symmetric: ±2.9)
        lo = -1.3 if fmt == "uint16" else -2.9
        assert float(x.min()) < lo - 1 and float(x.max()) > 3.9
        assert lo - 1e-3 < float(ref.min()) and float(ref.max()) < 2.9 + 1e-3


def test_one_linear_differs_from_the_interpreter_by_fp32_sums_only():
    """Both sides read the same fake-quantized activation and the same dequantized int8
    weight, so the bound is a K-term fp32 dot plus the bias (33 rows: the GEMM schedule, whose
    decoded weight is the graph's exactly)."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 40)).eval()
    cal = [(torch.randn(33, 64),)]
    cm = qcompile.compile(model, "cpu", example_inputs=cal[0], config=U16, calibration=cal)
    assert cm._exec.report == {"linear.w8": 1}
    spec = next(n.outputs[0].quant for n in cm.graph.nodes if n.op == "identity")
    assert spec.format == "uint16" and spec.zero_point is not None
    assert cm.graph.constants[spec.zero_point].dtype == torch.int32
    x = torch.randn(33, 64) * 1.2
    it = Interpreter(cm.graph)
    xh = spec.fake_quant(x, cm.graph.constants)
    lin = next(n for n in cm.graph.nodes if n.op == "linear")
    w, b = (cm.graph.constants[v.name] for v in lin.inputs[1:])
    ref = xh.double() @ w.double().T + b.double()
    bound = fp32_dot_bound(xh, w, b)
    assert_within(cm(x), ref, bound, "cpu")
    assert_within(it.run(x)[0], ref, bound, "interpreter")
    # the bound is far tighter than what uint16 quantization itself moves: the test can fail
    moved = np.abs((x.double() @ w.double().T + b.double() - ref).numpy())
    assert float(moved.max()) > 20 * float(bound.max())


@pytest.mark.parametrize("config", [
    U16, QuantConfig(weights="int8", group_size=None, activations="int16",
                     activation_granularity="per_tensor"),
    QuantConfig(weights="int8", group_size=None, activations="int16"),
    QuantConfig(weights="int16", group_size=None, activations="uint16",
                activation_granularity="per_tensor")],
    ids=["w8-u16-tensor", "w8-i16-tensor", "w8-i16-token", "w16-u16-tensor"])
def test_mlp_matches_the_interpreter(config):
    """Three linears: an fp32 sum that differs in the last bit may move a downstream activation
    one 16-bit step ``s`` (about 1e-4 here), which moves an output by about ``s·|w|``; relative
    L2 stays below ``BOUND`` (measured 1.1e-7 to 1.5e-7), while dropping the activation
    quantization moves the interpreter's result by 3.6e-5 (int16 per token) to 6e-2 (per
    tensor, where inputs beyond the calibrated range saturate)."""
    model, ex, dyn = zoo.mlp()
    cal = [(torch.randn(32, 64),) for _ in range(2)]
    cm = qcompile.compile(model, "cpu", example_inputs=ex, dynamic_shapes=dyn, config=config,
                          calibration=cal)
    fmts = {n.outputs[0].quant.format for n in cm.graph.nodes if n.op == "identity"}
    assert fmts == {config.activations}
    x = torch.randn(21, 64)
    ref = Interpreter(cm.graph).run(x)[0]
    assert _rel(cm(x), ref) < BOUND
    # the activation quantization is there to be matched: without it the result is further away
    plain = cm.graph.clone()
    for n in plain.nodes:
        if n.op == "identity":
            n.outputs[0].quant = None
    assert _rel(Interpreter(plain).run(x)[0], ref) > 5 * BOUND
