"""quantize_all_activations: every float value gets a static per-tensor scale from calibration
(data movement shares its input's, constants read as data their own, LayerNorm γ uint8),
block-quantized linears' biases become an add; checked structurally, against the calibrated
ranges and against the float model; refusals; the NPU pipeline selects it."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcompile
from qcompile.config import QuantConfig
from qcompile.errors import ConfigError, PassConfigError
from qcompile.interpreter import Interpreter, run_graph
from qcompile.ir import Graph, TensorType, verify
from qcompile.ir.quant import Granularity, int_range
from qcompile.passes import run_passes
from qcompile.passes.pipeline import quantization_pipeline, quantize_graph
from qcompile.passes.quantize_all_activations import SAME_GRID, activation_values, quantize_all_activations

FLOATS = ("float32", "float16", "bfloat16", "float64")
U16 = QuantConfig(weights="int8", group_size=None, activations="uint16",
                  activation_granularity="per_tensor")
INT4_BLOCKS = QuantConfig(weights="int4", group_size=32, activations="uint16",
                          activation_granularity="per_tensor")


class Small(nn.Module):
    """embedding + positional constant + input → LayerNorm → MLP → reshape/permute → ·2."""

    def __init__(self, zero_fc2_bias=False):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.pos = nn.Parameter(torch.randn(8, 32) * 0.5)
        self.ln = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)  # all positive: uint8 codes fit γ
            self.ln.bias.normal_(0, 0.1)
            if zero_fc2_bias:
                self.fc2.bias.zero_()

    def forward(self, ids, x):
        h = self.ln(self.emb(ids) + self.pos + x)
        h = self.fc2(F.gelu(self.fc1(h)))
        return h.reshape(h.shape[0], 8, 4, 8).permute(0, 2, 1, 3) * 2.0


def _sample(gen):
    return torch.randint(0, 50, (2, 8), generator=gen), torch.randn(2, 8, 32, generator=gen)


def _data(n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [_sample(gen) for _ in range(n)]


def _capture(zero_fc2_bias=False) -> Graph:
    torch.manual_seed(0)
    return qcompile.capture(Small(zero_fc2_bias).eval(), _data(1)[0])


@pytest.fixture(scope="module")
def small():
    return _capture()


def _weights(g: Graph, cfg) -> Graph:
    return run_passes(g.clone(), ["quantize_weights"],
                      options={"quantize_weights": {"config": cfg, "progress": False}})


def _all(g: Graph, cfg, data) -> Graph:
    """quantize_all_activations through the PassManager (which verifies before and after)."""
    return run_passes(g.clone(), ["quantize_all_activations"],
                      options={"quantize_all_activations": {"config": cfg, "data": data,
                                                            "progress": False}})


def _observed(g: Graph, data) -> dict[str, tuple[float, float]]:
    """min/max of every value of the float model (no fake quantization) over ``data``."""
    seen: dict[str, tuple[float, float]] = {}

    def hook(v, t):
        if t.is_floating_point():
            lo, hi = seen.get(v.name, (float("inf"), float("-inf")))
            seen[v.name] = (min(lo, float(t.min())), max(hi, float(t.max())))

    interp = Interpreter(g, fake_quant=False)
    interp.add_hook(hook)
    for item in data:
        interp.run(*item)
    return seen


def _grid(g: Graph, spec) -> tuple[float, float, float]:
    """(lowest, highest, step) that ``spec``'s codes dequantize to."""
    s = float(g.constants[spec.scale])
    z = float(g.constants[spec.zero_point])
    qmin, qmax = int_range(spec.format)
    return (qmin - z) * s, (qmax - z) * s, s


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _float_values(g: Graph):
    yield from (v for v in g.inputs if v.dtype in FLOATS)
    yield from (o for n in g.nodes for o in n.outputs if o.dtype in FLOATS)


def _node(g: Graph, op: str, i=0):
    return [n for n in g.nodes if n.op == op][i]


# -- structure and ranges ----------------------------------------------------------------------
def test_every_float_value_has_a_static_per_tensor_scale(small):
    data = _data()
    w = _weights(small, U16)
    h = _all(w, U16, data)
    verify(h)
    assert [n.op for n in h.nodes] == [n.op for n in small.nodes]  # no block weights: no split
    vals = list(_float_values(h))
    assert {v.name for v in vals} >= {"x", "embedding", "layer_norm", "gelu", "view", "permute"}
    for v in vals:
        q = v.quant
        assert q is not None and not q.dynamic, v.name
        assert q.granularity == Granularity.PER_TENSOR and q.format == "uint16", v.name
        assert h.constants[q.scale].numel() == 1 and float(h.constants[q.scale]) > 0
    # the calibrated range, widened to hold 0 (Jacob et al. 2018, §3), is the grid's to a step
    obs = _observed(w, data)
    own = {v.name for v in activation_values(w)}
    assert own == {v.name for v in vals} - {"embedding", "view", "permute"}
    for v in vals:
        lo, hi = obs[v.name]
        glo, ghi, step = _grid(h, v.quant)
        if v.name in own:
            assert abs(glo - min(lo, 0.0)) <= step and abs(ghi - max(hi, 0.0)) <= step, v.name
        assert glo - step / 2 <= lo and hi <= ghi + step / 2, v.name  # nothing clips


def test_data_movement_shares_its_input_spec(small):
    h = _all(_weights(small, U16), U16, _data())
    emb, view, perm = _node(h, "embedding"), _node(h, "reshape"), _node(h, "permute")
    assert {"embedding", "reshape", "permute"} <= SAME_GRID
    assert view.outputs[0].quant is view.inputs[0].quant  # the same object: no requantization
    assert perm.outputs[0].quant is view.outputs[0].quant
    assert view.inputs[0].quant is _node(h, "linear", 1).outputs[0].quant
    # an embedding's rows are its table's values: the table's own scale, from its own min/max
    table = emb.inputs[0]
    assert emb.outputs[0].quant is table.quant and h.is_constant(table)
    t = h.constants[table.name]
    glo, ghi, step = _grid(h, table.quant)
    assert abs(glo - min(float(t.min()), 0)) <= step and abs(ghi - float(t.max())) <= step


def test_constants_norm_weights_and_linear_weights(small):
    h = _all(_weights(small, U16), U16, _data())
    ln = _node(h, "layer_norm")
    gamma, beta = ln.inputs[1], ln.inputs[2]
    assert gamma.quant.format == "uint8" and gamma.quant.granularity == Granularity.PER_TENSOR
    assert h.constants[gamma.quant.zero_point].dtype == torch.uint8
    t = h.constants[gamma.name]
    glo, ghi, step = _grid(h, gamma.quant)
    assert glo == 0.0 and abs(ghi - float(t.max())) <= step  # γ > 0: the range is [0, max γ]
    assert beta.quant is None  # exported as int32 at s_x·s_γ
    for lin in (n for n in h.nodes if n.op == "linear"):
        wq = lin.inputs[1].quant
        assert wq.format == "int8" and wq.granularity == Granularity.PER_CHANNEL
        assert lin.inputs[2].quant is None  # int32 bias at export
    # constants read as data: the positional add's table and the ·2 scalar, each its own scale
    pos = _node(h, "add").inputs[1]
    two = _node(h, "mul").inputs[1]
    for c in (pos, two):
        assert h.is_constant(c) and c.quant.format == "uint16"
        assert c.quant.scale == f"{c.name}.act_scale"
        t = h.constants[c.name]
        glo, ghi, step = _grid(h, c.quant)
        assert abs(glo - min(float(t.min()), 0)) <= step and abs(ghi - float(t.max())) <= step
    torch.testing.assert_close(two.quant.fake_quant(h.constants[two.name], h.constants),
                               torch.tensor(2.0), rtol=0, atol=1e-4)


def test_output_close_to_float(small):
    data = _data()
    h = _all(_weights(small, U16), U16, data)
    for x in data:  # within the calibrated ranges: 1 - cos ≈ 1.5e-5 (uint8 activations: 2e-4)
        ref, y = run_graph(small, *x)[0], run_graph(h, *x)[0]
        assert not torch.equal(y, ref)  # the fake quantization is there
        assert _cos(y, ref) > 0.9999
    gen = torch.Generator().manual_seed(7)  # held out: some values clip at the calibrated range
    for _ in range(3):
        x = _sample(gen)
        assert _cos(run_graph(h, *x)[0], run_graph(small, *x)[0]) > 0.999


# -- block-quantized linears: bias as an add -------------------------------------------------
def test_block_linear_bias_becomes_an_add_and_zero_bias_is_dropped():
    g = _capture(zero_fc2_bias=True)
    data = _data()
    w = _weights(g, INT4_BLOCKS)
    fc1, fc2 = [n for n in w.nodes if n.op == "linear"]
    assert fc1.inputs[1].quant.granularity == Granularity.PER_GROUP
    b1 = fc1.inputs[2]
    h = _all(w, INT4_BLOCKS, data)
    verify(h)
    lin = [n for n in h.nodes if n.op == "linear"]
    assert all(len(n.inputs) < 3 or n.inputs[2] is None for n in lin)
    i = h.nodes.index(lin[0])
    add = h.nodes[i + 1]
    assert add.op == "add" and add.inputs[0] is lin[0].outputs[0] and add.inputs[1].name == b1.name
    assert add.provenance == lin[0].provenance and add.name == f"{lin[0].name}.bias"
    assert _node(h, "gelu").inputs[0] is add.outputs[0]
    assert h.nodes[h.nodes.index(lin[1]) + 1].op == "reshape"  # zero bias: no add(x, 0)
    assert [n.op for n in h.nodes].count("add") == [n.op for n in w.nodes].count("add") + 1
    # the sum before the bias and the sum after it each get their own calibrated scale
    for v in (lin[0].outputs[0], add.outputs[0], add.inputs[1]):
        assert v.quant is not None and not v.quant.dynamic and v.quant.format == "uint16"
    assert lin[0].outputs[0].quant.scale != add.outputs[0].quant.scale
    # the same function without fake quantization; close to float with it
    x = _data(1, seed=7)[0]
    torch.testing.assert_close(Interpreter(h, fake_quant=False).run(*x)[0],
                               Interpreter(w, fake_quant=False).run(*x)[0], rtol=1e-5, atol=1e-6)
    assert _cos(run_graph(h, *x)[0], run_graph(w, *x)[0]) > 0.999


def test_linear_without_bias_input():
    """A hand-built linear may leave the optional bias out altogether (two inputs)."""
    g = Graph("nobias")
    x = g.add_input("x", TensorType((4, 32), "float32"))
    w = g.add_constant("w", torch.randn(16, 32, generator=torch.Generator().manual_seed(0)))
    g.outputs = [g.add("linear", x, w)]
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 32, generator=gen),) for _ in range(2)]
    h = _all(_weights(g, INT4_BLOCKS), INT4_BLOCKS, data)
    assert [n.op for n in h.nodes] == ["linear"] and h.outputs[0].quant.format == "uint16"


# -- refusals -----------------------------------------------------------------------------------
def test_missing_calibration_is_a_config_error(small):
    w = _weights(small, U16)
    with pytest.raises(ConfigError, match="needs calibration statistics"):
        quantize_all_activations(w.clone(), config=U16, progress=False)
    # calibrate's default statistics cover only the linears' inputs, not the graph input x
    part = run_passes(w.clone(), ["calibrate"],
                      options={"calibrate": {"data": _data(), "progress": False}})
    with pytest.raises(PassConfigError, match=r"in pass quantize_all_activations.*%x needs"):
        run_passes(part, ["quantize_all_activations"],
                   options={"quantize_all_activations": {"config": U16}})


@pytest.mark.parametrize("acts", [
    {"activations": "int8", "activation_granularity": "per_token"},
    {"activations": None},
], ids=["per_token", "none"])
def test_dynamic_or_no_activations_are_a_config_error(small, acts):
    cfg = QuantConfig(weights="int8", group_size=None, **acts)
    with pytest.raises(ConfigError, match="static per-tensor"):
        quantize_all_activations(small.clone(), config=cfg, data=_data(), progress=False)


# -- the pipeline a target selects ------------------------------------------------------------
def test_npu_pipeline_quantizes_everything_cpu_does_not(small):
    data = _data()
    names, opts = quantization_pipeline(U16, data, target="npu", progress=False)
    assert {"canonicalize_npu", "decompose_attention", "quantize_all_activations"} <= set(names)
    assert "quantize_activations" not in names
    assert names.index("quantize_weights") < names.index("quantize_all_activations")
    assert names.index("decompose_attention") < names.index("quantize_all_activations")
    assert opts["quantize_all_activations"]["data"] is data
    cpu, _ = quantization_pipeline(U16, data, target="cpu", progress=False)
    assert "quantize_activations" in cpu
    assert not {"canonicalize_npu", "decompose_attention", "quantize_all_activations"} & set(cpu)
    # the whole NPU chain on the captured model
    h, records = quantize_graph(small.clone(), U16, data, target="npu", progress=False)
    assert [r.name for r in records] == names
    assert all(v.quant is not None and not v.quant.dynamic for v in _float_values(h))
    x = _data(1, seed=7)[0]
    assert _cos(run_graph(h, *x)[0], run_graph(small, *x)[0]) > 0.999


@pytest.mark.parametrize("fmt,sig,tanh", [("uint16", (1 / 65536, 0), (1 / 32768, 32768)),
                                          ("int16", (1 / 32768, None), (1 / 32768, None))])
def test_sigmoid_and_tanh_get_fixed_16bit_scales(fmt, sig, tanh):
    """16-bit Sigmoid/Tanh outputs take the fixed encodings of ORT's QNN configuration
    (their whole range), not a calibrated one; 8-bit ones stay calibrated."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return torch.sigmoid(self.fc(x)) + torch.tanh(x)

    x = torch.randn(4, 8)
    g = qcompile.capture(M().eval(), (x,))
    cfg = QuantConfig(weights="int8", group_size=None, activations=fmt,
                      activation_granularity="per_tensor")
    g = _all(_weights(g, cfg), cfg, [(torch.randn(4, 8),) for _ in range(2)])
    for op, (scale, zero) in (("sigmoid", sig), ("tanh", tanh)):
        spec = _node(g, op).outputs[0].quant
        assert float(g.constants[spec.scale]) == pytest.approx(scale, rel=1e-7)
        assert (spec.zero_point is None) == (zero is None)
        if zero is not None:
            assert int(g.constants[spec.zero_point]) == zero
    g8 = _all(_weights(qcompile.capture(M().eval(), (x,)), cfg),
              QuantConfig(weights="int8", group_size=None, activations="uint8",
                          activation_granularity="per_tensor"), [(torch.randn(4, 8),)])
    spec = _node(g8, "sigmoid").outputs[0].quant
    assert float(g8.constants[spec.scale]) != pytest.approx(1 / 256)
