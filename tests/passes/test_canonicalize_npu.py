"""canonicalize_npu: finite masks, no NaN guards, no where, erf→gelu and no neutral elements,
each checked structurally and against the interpreter; MiniLM from torch and from ONNX."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qcompile
import qcompile.passes
from qcompile.errors import ConfigError, PassConfigError
from qcompile.interpreter import run_graph
from qcompile.ir import Graph, Provenance, TensorType, verify
from qcompile.passes import all_passes, run_passes
from qcompile.passes.canonicalize_npu import canonicalize_npu

F32 = "float32"


def _ops(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


def _report(g: Graph):
    return g.meta["canonicalize_npu"]


def _counts(g: Graph) -> dict:
    return {k: v for k, v in _report(g).counts.items() if v}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _isnan_nodes(g: Graph) -> list:
    return [n for n in g.nodes if n.op == "ne" and n.inputs[0] is n.inputs[1]]


# -- finite masks, NaN guards -------------------------------------------------------------
def _sdpa_export_graph(mask_const=-math.inf) -> Graph:
    """What the ONNX frontend makes of torch's SDPA export: where(m, 0, -inf) added to the
    scores, softmax, where(isnan(p), 0, p), then p @ v."""
    g = Graph("sdpa")
    s = g.add_input("scores", TensorType((1, 2, 4, 4), F32))
    m = g.add_input("keep", TensorType((1, 1, 4, 4), "bool"))
    v = g.add_input("v", TensorType((1, 2, 4, 8), F32))
    zero = g.add_constant("zero", torch.zeros(1))
    ninf = g.add_constant("ninf", torch.tensor([mask_const]))
    prov = Provenance(module="encoder.layer.0.attention.self", origin="/attn/Where")
    mask = g.add("where", m, zero, ninf, name="Where", provenance=prov)
    p = g.add("softmax", g.add("add", s, mask, name="Add"), name="Softmax")
    guard = g.add("where", g.add("ne", p, p, name="IsNaN"), g.add_constant("zero2", torch.zeros(1)),
                  p, name="Where_1", provenance=Provenance(origin="/attn/Where_1"))
    g.outputs = [g.add("matmul", guard, v, name="MatMul")]
    verify(g)
    return g


def _mask_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(1, 1, 4, 4, generator=gen) > 0.4
    keep[..., 0] = True  # no row masked entirely (that row is 0 with -inf, an average with -50)
    return (torch.randn(1, 2, 4, 4, generator=gen) * 4, keep, torch.randn(1, 2, 4, 8, generator=gen))


def test_sdpa_export_mask_becomes_finite_and_where_free():
    g = _sdpa_export_graph()
    h = canonicalize_npu(g)
    verify(h)
    assert "where" not in _ops(h) and not _isnan_nodes(h)
    assert _counts(h) == {"finite_mask": 1, "where": 1, "nan_guard": 1}
    assert _report(h).refused == []
    assert float(h.constants["ninf"]) == -50.0
    assert float(g.constants["ninf"]) == -math.inf  # the input graph is untouched
    # where(m, 0, M) -> (1 - cast(m)) * M; the new nodes keep the where's provenance
    mul = h.nodes[_ops(h).index("add") - 1]
    assert mul.op == "mul" and mul.provenance.origin == "/attn/Where"
    assert {n.op for n in h.nodes if n.provenance.origin == "/attn/Where"} == {"cast", "sub", "mul"}
    for seed in range(3):
        x = _mask_inputs(seed)
        # exp(-50) ≈ 2e-22 is below fp32 rounding of the unmasked weights
        torch.testing.assert_close(run_graph(h, *x)[0], run_graph(g, *x)[0], rtol=1e-6, atol=1e-7)


def test_mask_value_option_and_finfo_min():
    g = _sdpa_export_graph(torch.finfo(torch.float32).min)
    h = run_passes(g, ["canonicalize_npu"], options={"canonicalize_npu": {"mask_value": -30.0}})
    assert float(h.constants["ninf"]) == -30.0
    x = _mask_inputs(1)
    torch.testing.assert_close(run_graph(h, *x)[0], run_graph(g, *x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-math.inf, 0.0, 3.0, -1e5, math.nan])
def test_bad_mask_value_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="mask_value"):
        canonicalize_npu(_sdpa_export_graph(), mask_value=bad)
    with pytest.raises(PassConfigError, match="in pass canonicalize_npu"):
        run_passes(_sdpa_export_graph(), ["canonicalize_npu"],
                   options={"canonicalize_npu": {"mask_value": bad}})
    assert "canonicalize_npu" in all_passes()


def test_extended_attention_mask_of_finfo_min():
    """BERT's eager attention: (1 - mask) * finfo.min added to the scores."""
    g = Graph("eager")
    s = g.add_input("scores", TensorType((2, 4, 6), F32))
    am = g.add_input("attention_mask", TensorType((2, 1, 6), "int64"))
    inv = g.add("sub", g.add_constant("one", torch.tensor(1.0)), g.add("cast", am, dtype=F32))
    ext = g.add("mul", inv, g.add_constant("fmin", torch.tensor(torch.finfo(torch.float32).min)))
    g.outputs = [g.add("softmax", g.add("add", s, ext))]
    h = canonicalize_npu(g)
    assert _counts(h) == {"finite_mask": 1} and float(h.constants["fmin"]) == -50.0
    x = (torch.randn(2, 4, 6) * 3, torch.tensor([[[1, 1, 1, 1, 0, 0]], [[1, 1, 1, 0, 1, 0]]]))
    torch.testing.assert_close(run_graph(h, *x)[0], run_graph(g, *x)[0], rtol=1e-6, atol=1e-7)


def test_causal_full_of_minus_inf_and_float_attention_mask():
    g = Graph("causal")
    q = g.add_input("q", TensorType((1, 2, 5, 8), F32))
    causal = g.add("triu", g.add("full", shape=[5, 5], value=-math.inf, dtype=F32), diagonal=1)
    g.outputs = [g.add("attention", q, q, q, causal)]
    h = canonicalize_npu(g)
    assert _counts(h) == {"finite_mask": 1}
    assert next(n for n in h.nodes if n.op == "full").attrs["value"] == -50.0
    x = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(run_graph(h, x)[0], run_graph(g, x)[0], rtol=1e-6, atol=1e-7)


def test_bool_attention_mask_becomes_additive_once():
    g = Graph("bool_mask")
    q = g.add_input("q", TensorType((1, 2, 4, 8), F32))
    m = g.add_input("keep", TensorType((1, 1, 4, 4), "bool"))
    a1 = g.add("attention", q, q, q, m)
    g.outputs = [g.add("attention", a1, a1, a1, m)]
    h = canonicalize_npu(g)
    verify(h)
    assert _counts(h) == {"bool_mask": 2}
    masks = {n.inputs[3].name for n in h.nodes if n.op == "attention"}
    assert len(masks) == 1 and h.value(masks.pop()).dtype == F32  # one shared additive mask
    assert _ops(h).count("cast") == 1
    x = _mask_inputs(2)
    args = (torch.randn(1, 2, 4, 8), x[1])
    torch.testing.assert_close(run_graph(h, *args)[0], run_graph(g, *args)[0], rtol=1e-6, atol=1e-7)


# -- where ---------------------------------------------------------------------------------
def _where_graph(a_zero=False, b_zero=False) -> Graph:
    g = Graph("where")
    c = g.add_input("c", TensorType((3, 4), "bool"))
    a = g.add_constant("zero", torch.zeros(())) if a_zero else g.add_input("a", TensorType((3, 4), F32))
    b = g.add_constant("zero", torch.zeros(())) if b_zero else g.add_input("b", TensorType((1, 4), F32))
    g.outputs = [g.add("relu", g.add("where", c, a, b, name="sel"))]
    return g


@pytest.mark.parametrize("a_zero,b_zero,ops", [
    (False, False, ["cast", "mul", "sub", "mul", "add", "relu"]),
    (False, True, ["cast", "mul", "relu"]),
    (True, False, ["cast", "sub", "mul", "relu"]),
], ids=["general", "b_zero", "a_zero"])
def test_where_becomes_exact_arithmetic_select(a_zero, b_zero, ops):
    g = _where_graph(a_zero, b_zero)
    h = canonicalize_npu(g)
    verify(h)
    assert _ops(h) == ops and _counts(h) == {"where": 1}
    assert all(n.name.startswith("sel") for n in h.nodes if n.op != "relu")
    c = torch.rand(3, 4) > 0.5
    a = torch.tensor([1e-8, -3.0, 7e5, 0.25]).repeat(3, 1)  # b + (a - b) would round these
    b = torch.tensor([[1.0, 1e8, -2.0, 3.0]])
    args = [c] + ([] if a_zero else [a]) + ([] if b_zero else [b])
    assert torch.equal(run_graph(h, *args)[0], run_graph(g, *args)[0])  # exact, not just close


def test_where_that_cannot_be_rewritten_is_left_and_reported():
    g = Graph("left")
    x = g.add_input("x", TensorType((4,), F32))
    i = g.add_input("i", TensorType((4,), "int64"))
    c = g.add("gt", x, g.add_constant("zero", torch.zeros(())))
    prov = Provenance(module="head", source="model.py:12")
    # an infinite non-constant branch that feeds no softmax: -inf must stay -inf (a max below)
    w1 = g.add("where", c, x, g.add("full", shape=[4], value=-math.inf, dtype=F32), name="w_inf",
               provenance=prov)
    w2 = g.add("where", c, g.add("log", x), x, name="w_log")  # log(x) may be -inf/NaN
    w3 = g.add("where", c, i, g.add_constant("k", torch.tensor(7)), name="w_int")
    # a large finite constant that feeds no softmax is no mask: rewritten, value kept
    w4 = g.add("where", c, x, g.add_constant("big", torch.tensor(-1e30)), name="w_big")
    g.outputs = [g.add("amax", w1, axes=[0]), w2, w3, g.add("amax", w4, axes=[0])]
    h = canonicalize_npu(g)
    verify(h)
    assert _ops(h).count("where") == 3 and _counts(h) == {"where": 1}
    assert torch.equal(h.constants["big"], g.constants["big"])
    args = (torch.tensor([-2.0, -60.0, 3.0, -1e3]), torch.arange(4))
    for a, b in zip(run_graph(h, *args), run_graph(g, *args)):
        assert torch.equal(a, b)
    refused = {r.node: r for r in _report(h).refused}
    assert set(refused) == {"w_inf", "w_log", "w_int"}
    assert refused["w_inf"].provenance == prov and "may be ±inf" in refused["w_inf"].reason
    assert "int64" in refused["w_int"].reason
    assert next(n for n in h.nodes if n.op == "full").attrs["value"] == -math.inf


def test_nan_guard_stays_when_the_softmax_input_may_be_infinite():
    g = Graph("guard")
    x = g.add_input("x", TensorType((2, 5), F32))
    p = g.add("softmax", g.add("log", x))
    g.outputs = [g.add("where", g.add("ne", p, p), g.add_constant("z", torch.zeros(1)), p,
                       name="guard")]
    h = canonicalize_npu(g)
    assert _ops(h) == ["log", "softmax", "ne", "where"]
    assert [r.node for r in _report(h).refused] == ["guard"]
    x = torch.tensor([[0.0, 0, 1, 2, 3], [1.0, 2, 3, 4, 5]])  # row 0: softmax of -inf -> NaN
    assert torch.equal(run_graph(h, x)[0], run_graph(g, x)[0])


# -- erf / tanh -> gelu ----------------------------------------------------------------------
SQ2 = math.sqrt(2.0)


class ErfGelu(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, x):
        f = self.form
        if f == "bert":  # transformers' gelu before F.gelu, and the ONNX export of nn.GELU
            return x * 0.5 * (1.0 + torch.erf(x / SQ2))
        if f == "half_first":
            return 0.5 * x * (1.0 + torch.erf(x * (1 / SQ2)))
        if f == "half_of_p":
            return x * (0.5 * (torch.erf(x / SQ2) + 1.0))
        if f == "div2":
            return x * (1.0 + torch.erf(0.7071067811865476 * x)) / 2
        raise ValueError(f)


class TanhGelu(nn.Module):  # transformers' NewGELUActivation (GPT-2)
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


@pytest.mark.parametrize("form", ["bert", "half_first", "half_of_p", "div2"])
def test_erf_gelu_becomes_gelu(form):
    m, x = ErfGelu(form), torch.randn(4, 16) * 3
    g = qcompile.capture(m, (x,))
    assert "erf" in _ops(g)
    h = canonicalize_npu(g)
    verify(h)
    assert _ops(h) == ["gelu"] and h.nodes[0].attrs["approximate"] == "none"
    assert h.nodes[0].inputs == h.inputs and _counts(h) == {"gelu": 1}
    assert h.nodes[0].provenance == g.nodes[-1].provenance  # the product it replaces
    # the same function up to fp32 rounding of the decomposed form
    torch.testing.assert_close(run_graph(h, x)[0], F.gelu(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run_graph(h, x)[0], run_graph(g, x)[0], rtol=1e-6, atol=1e-6)


def test_tanh_gelu_becomes_gelu_tanh():
    x = torch.randn(4, 16) * 3
    h = canonicalize_npu(qcompile.capture(TanhGelu(), (x,)))
    assert _ops(h) == ["gelu"] and h.nodes[0].attrs["approximate"] == "tanh"
    torch.testing.assert_close(run_graph(h, x)[0], F.gelu(x, approximate="tanh"), rtol=1e-6, atol=1e-6)


class NotGelu(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.erf(x / 2.0))  # x/2, not x/√2


class GeluPartShared(nn.Module):
    def forward(self, x):
        e = torch.erf(x / SQ2)
        return 0.5 * x * (1.0 + e), e  # erf's output is read twice


@pytest.mark.parametrize("module", [NotGelu(), GeluPartShared()], ids=["wrong_constant", "shared"])
def test_erf_near_misses_stay_and_are_reported(module):
    x = torch.randn(4, 16)
    g = qcompile.capture(module, (x,))
    h = canonicalize_npu(g)
    assert "gelu" not in _ops(h) and _ops(h).count("erf") == 1
    assert [r.op for r in _report(h).refused] == ["erf"]
    for a, b in zip(run_graph(h, x), run_graph(g, x)):
        assert torch.equal(a, b)


# -- neutral elements ----------------------------------------------------------------------
def test_neutral_elements_fold_unless_shape_or_dtype_changes():
    g = Graph("neutral")
    x = g.add_input("x", TensorType((2, 8), F32))
    i = g.add_input("i", TensorType((2, 8), "int64"))
    y = g.add("add", x, g.add_constant("zeros", torch.zeros(8)))
    y = g.add("mul", g.add_constant("ones", torch.ones(1, 8)), y)
    y = g.add("sub", y, g.add_constant("z0", torch.zeros(())))
    y = g.add("div", y, g.add_constant("one", torch.tensor(1.0)))
    y = g.add("relu", g.add("identity", y))
    big = g.add("add", y, g.add_constant("zeros3", torch.zeros(3, 2, 8)), name="enlarges")
    promoted = g.add("add", i, g.add_constant("fz", torch.tensor(0.0)), name="promotes")
    out = g.add("add", y, g.add_constant("zeros_out", torch.zeros(8)), name="is_output")
    g.outputs = [g.add("neg", big), g.add("neg", promoted), out]
    h = canonicalize_npu(g)
    verify(h)
    assert _counts(h) == {"neutral": 5}
    assert _ops(h) == ["relu", "add", "add", "add", "neg", "neg"]
    assert h.nodes[0].inputs == [h.inputs[0]]
    assert [n.name for n in h.nodes if n.op == "add"] == ["enlarges", "promotes", "is_output"]
    args = (torch.randn(2, 8), torch.randint(-5, 5, (2, 8)))
    for a, b in zip(run_graph(h, *args), run_graph(g, *args)):
        assert torch.equal(a, b)


# -- MiniLM ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    from qcompile import zoo
    model, ex = zoo.minilm(batch=1, seq=16)[:2]
    ex = {k: v.clone() for k, v in ex.items()}
    ex["attention_mask"][0, 12:] = 0  # padding, so that the mask matters
    return model, ex


def _check_minilm(g: Graph, inputs: list) -> Graph:
    h = canonicalize_npu(g)
    verify(h)
    hist = h.op_histogram()
    assert not {"where", "erf"} & set(hist) and not _isnan_nodes(h)
    assert _report(h).refused == []
    for a, b in zip(run_graph(h, *inputs), run_graph(g, *inputs)):
        assert _rel(a, b) < 1e-5
    return h


@pytest.mark.slow
def test_minilm_torch_capture(minilm):
    model, ex = minilm
    g = qcompile.capture(model, ex)
    assert [n.inputs[3].dtype for n in g.nodes if n.op == "attention"] == ["bool"] * 6
    h = _check_minilm(g, list(ex.values()))
    assert _counts(h) == {"bool_mask": 6}
    masks = {n.inputs[3] for n in h.nodes if n.op == "attention"}
    assert len(masks) == 1 and masks.pop().dtype == F32


@pytest.mark.slow
def test_minilm_onnx_capture(minilm, tmp_path):
    """torch.onnx.export (TorchScript exporter, opset 17, static shapes) emits the SDPA
    pattern Where(mask, 0, -inf) ... Softmax -> IsNaN -> Where and an Erf GELU per layer."""
    from qcompile.frontends.onnx import capture_onnx
    model, ex = minilm

    class Bert(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path = str(tmp_path / "minilm.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Bert(model).eval(), tuple(ex.values()), path, dynamo=False,
                          opset_version=17, input_names=list(ex))
    model.eval()  # the exporter restores the wrapper's mode; keep the model in eval
    g = capture_onnx(path)
    hist = g.op_histogram()
    assert hist["where"] == 12 and hist["erf"] == 6 and len(_isnan_nodes(g)) == 6
    h = _check_minilm(g, list(ex.values()))
    assert _counts(h) == {"finite_mask": 6, "nan_guard": 6, "where": 6, "gelu": 6}
    assert h.op_histogram()["gelu"] == 6 and h.op_histogram()["cast"] == 2  # one mask cast
