"""The op registry: schemas, attribute normalization, and for a table of representative ops,
that the inferred output type equals what the kernel produces and the kernel equals torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from qcompile.errors import VerificationError
from qcompile.hadamard import hadamard_matrix
from qcompile.interpreter import Interpreter
from qcompile.ir import Graph, TensorType, all_ops, get_schema
from qcompile.ir.types import eval_dim, to_torch_dtype


def test_every_op_has_kernel_infer_and_valid_inputs():
    ops = all_ops()
    assert len(ops) > 60 and ops == sorted(ops)
    for name in ops:
        s = get_schema(name)
        assert s.name == name
        assert callable(s.infer) and callable(s.kernel), name
        assert s.doc or s.kernel.__name__, name
        assert all(not i.startswith("*") for i in s.inputs[:-1]), name  # only a variadic tail
        for a in s.attrs.values():
            assert a.kind in ("int", "float", "bool", "str", "ints", "floats", "dim", "dims",
                              "dtype", "any"), name


def test_nn_ops_have_docstrings():
    for name in ("linear", "matmul", "conv", "layer_norm", "rms_norm", "attention", "rotary",
                 "quantize", "dequantize", "take", "gather", "index", "slice"):
        assert len(get_schema(name).doc) > 20, name


# -- attribute normalization -----------------------------------------------------------
def test_normalize_fills_defaults_and_coerces():
    s = get_schema("leaky_relu")
    assert s.normalize_attrs({}, "n") == {"negative_slope": 0.01}
    out = s.normalize_attrs({"negative_slope": 1}, "n")
    assert out == {"negative_slope": 1.0} and isinstance(out["negative_slope"], float)
    sl = get_schema("slice").normalize_attrs({"axis": 0, "end": "batch*2"}, "n")
    assert sl == {"axis": 0, "start": 0, "end": "2*batch", "step": 1}
    assert get_schema("reshape").normalize_attrs({"shape": ("b", 4)}, "n") == {"shape": ["b", 4]}


@pytest.mark.parametrize("op,attrs,needle", [
    ("softmax", {"axis": -1, "dim": 1}, "['dim']"),
    ("slice", {"axis": 0}, "'end'"),
    ("reshape", {}, "'shape'"),
    ("softmax", {"axis": "1"}, "should be int"),
    ("softmax", {"axis": True}, "should be int"),
    ("slice", {"axis": 0, "end": 3, "step": 1.5}, "should be int"),
    ("conv", {"stride": 2, "padding": [0], "dilation": [1]}, "should be ints"),
    ("reshape", {"shape": [2, True]}, "should be dims"),
    ("gelu", {"approximate": None}, "must not be None"),
])
def test_bad_attrs_raise_verification_error(op, attrs, needle):
    with pytest.raises(VerificationError) as ei:
        get_schema(op).normalize_attrs(attrs, "node 'n7'")
    assert needle in str(ei.value) and "n7" in str(ei.value)


def test_add_node_rejects_bad_attrs_and_arity():
    g = Graph()
    x = g.add_input("x", TensorType((2, 3), "float32"))
    with pytest.raises(VerificationError, match="no attribute"):
        g.add_node("relu", [x], {"inplace": True}, name="r")
    with pytest.raises(VerificationError, match="takes inputs"):
        g.add_node("add", [x], name="a")
    with pytest.raises(VerificationError, match="linear input features"):
        g.add_node("linear", [x, g.add_constant("w", torch.zeros(4, 5))], name="fc")


# -- the op table ----------------------------------------------------------------------
B = "batch"


@dataclass
class In:
    """An input of a case: shape (may hold 'batch'), dtype, and how to sample it."""
    shape: tuple
    dtype: str = "float32"
    low: int = 0
    high: int = 0  # for integer inputs: values in [low, high)
    positive: bool = False  # for scales, variances and bases of pow

    def sample(self, env, gen) -> torch.Tensor:
        shape = tuple(eval_dim(d, env) for d in self.shape)
        dt = to_torch_dtype(self.dtype)
        if self.dtype == "bool":
            return torch.rand(shape, generator=gen) > 0.5
        if dt.is_floating_point:
            x = torch.randn(shape, generator=gen, dtype=dt)
            return x.abs() / 8 + 0.05 if self.positive else x
        return torch.randint(self.low, self.high, shape, generator=gen, dtype=dt)


@dataclass
class Case:
    id: str
    op: str
    inputs: list
    attrs: dict
    ref: Callable
    batches: tuple = field(default=(None,))


def _rot(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin


def _quant(x, s, z, qmin, qmax):
    return torch.clamp(torch.round(x / s) + z, qmin, qmax)


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


SYM = (2, 5)  # batch sizes for cases with a symbolic 'batch' dimension
BIG = 2 ** 62
CASES = [
    # elementwise families
    Case("unary_exp", "exp", [In((3, 4))], {}, torch.exp),
    Case("act_silu_sym", "silu", [In((B, 4))], {}, F.silu, SYM),
    Case("gelu_tanh", "gelu", [In((3, 4))], {"approximate": "tanh"},
         lambda x: F.gelu(x, approximate="tanh")),
    Case("leaky_relu", "leaky_relu", [In((3, 4))], {"negative_slope": 0.2},
         lambda x: F.leaky_relu(x, 0.2)),
    Case("clamp_min_only", "clamp", [In((3, 4))], {"min": -0.5}, lambda x: x.clamp(min=-0.5)),
    Case("add_broadcast_sym", "add", [In((B, 1, 4)), In((3, 1))], {}, torch.add, SYM),
    Case("mul_int_float", "mul", [In((2, 3), "int32", -5, 5), In((3,))], {}, torch.mul),
    Case("div_int_true", "div", [In((2, 3), "int64", -9, 9), In((3,), "int64", 1, 4)], {},
         torch.div),
    Case("div_floor", "div", [In((2, 3), "int64", -9, 9), In((3,), "int64", 1, 4)],
         {"rounding_mode": "floor"}, lambda a, b: torch.div(a, b, rounding_mode="floor")),
    Case("pow", "pow", [In((3, 4), positive=True), In((3, 4))], {}, torch.pow),
    Case("lt", "lt", [In((3, 4)), In((4,))], {}, torch.lt),
    Case("logical_and", "logical_and", [In((3, 4), "bool"), In((3, 4), "bool")], {},
         torch.logical_and),
    Case("where_sym", "where", [In((B, 4), "bool"), In((B, 4)), In((4,))], {}, torch.where, SYM),
    Case("cast_to_int8", "cast", [In((3, 4))], {"dtype": "int8"}, lambda x: x.to(torch.int8)),
    # linear algebra
    Case("linear_sym", "linear", [In((B, 3, 8)), In((5, 8)), In((5,))], {}, F.linear, SYM),
    Case("linear_no_bias", "linear", [In((2, 8)), In((5, 8))], {}, F.linear),
    Case("matmul_2d", "matmul", [In((3, 4)), In((4, 5))], {}, torch.matmul),
    Case("matmul_1d_2d", "matmul", [In((4,)), In((4, 5))], {}, torch.matmul),
    Case("matmul_2d_1d", "matmul", [In((3, 4)), In((4,))], {}, torch.matmul),
    Case("matmul_1d_1d", "matmul", [In((4,)), In((4,))], {}, torch.matmul),
    Case("matmul_batched_bcast", "matmul", [In((2, 1, 3, 4)), In((5, 4, 6))], {}, torch.matmul),
    Case("matmul_batched_sym", "matmul", [In((B, 3, 4)), In((4, 2))], {}, torch.matmul, SYM),
    # convolution and pooling
    Case("conv1d_groups_dilation", "conv", [In((2, 4, 11)), In((6, 2, 3)), In((6,))],
         {"stride": [2], "padding": [1], "dilation": [2], "groups": 2},
         lambda x, w, b: F.conv1d(x, w, b, 2, 1, 2, 2)),
    Case("conv2d_sym", "conv", [In((B, 3, 9, 8)), In((4, 3, 3, 2))],
         {"stride": [2, 1], "padding": [1, 0], "dilation": [1, 2]},
         lambda x, w: F.conv2d(x, w, None, (2, 1), (1, 0), (1, 2)), SYM),
    Case("max_pool2d", "max_pool2d", [In((2, 3, 7, 6))],
         {"kernel": [3, 2], "stride": [2, 2], "padding": [1, 0]},
         lambda x: F.max_pool2d(x, (3, 2), 2, (1, 0))),
    Case("max_pool2d_ceil", "max_pool2d", [In((1, 2, 5, 5))],
         {"kernel": [2, 2], "stride": [2, 2], "padding": [1, 1], "ceil_mode": True},
         lambda x: F.max_pool2d(x, 2, 2, 1, ceil_mode=True)),
    Case("max_pool2d_ceil_sym", "max_pool2d", [In((B, 2, 7, 7))],
         {"kernel": [3, 3], "stride": [2, 2], "padding": [0, 0], "ceil_mode": True},
         lambda x: F.max_pool2d(x, 3, 2, 0, ceil_mode=True), SYM),
    Case("avg_pool2d", "avg_pool2d", [In((2, 3, 6, 6))],
         {"kernel": [2, 2], "stride": [2, 2], "padding": [1, 1], "count_include_pad": False},
         lambda x: F.avg_pool2d(x, 2, 2, 1, count_include_pad=False)),
    Case("adaptive_avg_pool2d", "adaptive_avg_pool2d", [In((2, 3, 7, 5))],
         {"output_size": [2, 3]}, lambda x: F.adaptive_avg_pool2d(x, (2, 3))),
    # norms, attention, rotary
    Case("layer_norm", "layer_norm", [In((2, 3, 8)), In((8,)), In((8,))], {"eps": 1e-5},
         lambda x, w, b: F.layer_norm(x, (8,), w, b, 1e-5)),
    Case("layer_norm_2d_sym", "layer_norm", [In((B, 3, 8)), In((3, 8)), None],
         {"normalized_ndim": 2}, lambda x, w, b: F.layer_norm(x, (3, 8), w, None), SYM),
    Case("rms_norm", "rms_norm", [In((2, 3, 8)), In((8,))], {"eps": 1e-6}, _rms),
    Case("batch_norm", "batch_norm",
         [In((2, 3, 4)), In((3,)), In((3,)), In((3,)), In((3,), positive=True)], {},
         lambda x, w, b, m, v: F.batch_norm(x, m, v, w, b, False, 0.0, 1e-5)),
    Case("attention_bool_mask", "attention",
         [In((2, 3, 5, 8)), In((2, 3, 6, 8)), In((2, 3, 6, 4)), In((5, 6), "bool")], {},
         lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)),
    Case("attention_causal_sym", "attention",
         [In((B, 2, 5, 8)), In((B, 2, 5, 8)), In((B, 2, 5, 8))], {"causal": True, "scale": 0.3},
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3), SYM),
    Case("attention_gqa", "attention", [In((1, 4, 5, 8)), In((1, 2, 5, 8)), In((1, 2, 5, 8))],
         {"gqa": True},
         lambda q, k, v: F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                        v.repeat_interleave(2, 1))),
    Case("rotary_sym", "rotary", [In((B, 2, 3, 8)), In((3, 8)), In((3, 8))], {}, _rot, SYM),
    Case("softmax", "softmax", [In((3, 5))], {"axis": 0}, lambda x: torch.softmax(x, 0)),
    Case("hadamard_blocks_sym", "hadamard", [In((B, 3, 24))], {"size": 12},
         lambda x: x @ torch.block_diag(*[hadamard_matrix(12, torch.float32)] * 2), SYM),
    Case("hadamard_transpose", "hadamard", [In((2, 40))], {"size": 40, "transpose": True},
         lambda x: x @ hadamard_matrix(40, torch.float32).T),
    Case("embedding", "embedding", [In((10, 4)), In((2, 3), "int64", 0, 10)], {},
         lambda w, i: w[i]),
    # shape ops
    Case("reshape_minus1_sym", "reshape", [In((B, 4, 6))], {"shape": [B, -1, 3]},
         lambda x: x.reshape(x.shape[0], -1, 3), SYM),
    Case("reshape_minus1_leading", "reshape", [In((B, 4, 6))], {"shape": [-1, 6]},
         lambda x: x.reshape(-1, 6), SYM),
    Case("permute", "permute", [In((2, 3, 4))], {"perm": [2, 0, -2]}, lambda x: x.permute(2, 0, 1)),
    Case("expand", "expand", [In((3, 1))], {"shape": [2, -1, 4]}, lambda x: x.expand(2, -1, 4)),
    Case("slice_neg_start_huge_end_step2", "slice", [In((7, 4))],
         {"axis": 0, "start": -5, "end": BIG, "step": 2}, lambda x: x[-5::2]),
    Case("slice_clamped_end", "slice", [In((3, 7))], {"axis": -1, "start": 2, "end": 100},
         lambda x: x[:, 2:100]),
    Case("slice_sym_step2", "slice", [In((B, 4))], {"axis": 0, "start": 1, "end": BIG, "step": 2},
         lambda x: x[1::2], SYM),
    Case("slice_sym_neg_start", "slice", [In((3, B))], {"axis": 1, "start": -2, "end": BIG},
         lambda x: x[:, -2:], SYM),
    Case("select", "select", [In((2, 3, 4))], {"axis": 1, "index": -1}, lambda x: x[:, -1]),
    Case("concat_sym", "concat", [In((B, 2)), In((B, 3)), In((B, 1))], {"axis": -1},
         lambda *xs: torch.cat(xs, -1), SYM),
    Case("take_neg_idx", "take", [In((5, 4)), In((2, 3), "int64", -5, 5)], {"axis": 0},
         lambda x, i: x[i]),
    Case("take_axis1", "take", [In((3, 5)), In((4,), "int64", 0, 5)], {"axis": 1},
         lambda x, i: x[:, i]),
    Case("gather", "gather", [In((3, 4)), In((3, 2), "int64", 0, 4)], {"axis": 1},
         lambda x, i: torch.gather(x, 1, i)),
    Case("index_consecutive", "index",
         [In((2, 5, 6, 3)), In((4,), "int64", 0, 5), In((4,), "int64", 0, 6)], {"axes": [1, 2]},
         lambda x, i, j: x[:, i, j]),
    Case("index_non_consecutive", "index",
         [In((2, 5, 6, 3)), In((4,), "int64", 0, 2), In((4,), "int64", 0, 6)], {"axes": [0, 2]},
         lambda x, i, j: x[i, :, j]),
    Case("index_negative_axis", "index",
         [In((2, 5, 6, 3)), In((4,), "int64", 0, 5), In((4,), "int64", 0, 3)], {"axes": [1, -1]},
         lambda x, i, j: x[:, i, :, j]),
    Case("pad_constant", "pad", [In((2, 3, 4))], {"pads": [1, 2, 0, 1], "value": 0.5},
         lambda x: F.pad(x, (1, 2, 0, 1), value=0.5)),
    Case("pad_reflect", "pad", [In((2, 3, 4))], {"pads": [2, 1], "mode": "reflect"},
         lambda x: F.pad(x, (2, 1), mode="reflect")),
    Case("tile_more_repeats", "tile", [In((2, 3))], {"repeats": [2, 1, 2]},
         lambda x: x.repeat(2, 1, 2)),
    Case("tile_fewer_repeats", "tile", [In((2, 3))], {"repeats": [3]}, lambda x: x.tile((3,))),
    Case("arange", "arange", [], {"start": 2, "end": 11, "step": 3},
         lambda: torch.arange(2, 11, 3)),
    Case("arange_float", "arange", [], {"end": 4, "dtype": "float32"},
         lambda: torch.arange(4, dtype=torch.float32)),
    Case("full", "full", [], {"shape": [2, 3], "value": 1.5, "dtype": "float32"},
         lambda: torch.full((2, 3), 1.5)),
    Case("full_bool", "full", [], {"shape": [3], "value": True, "dtype": "bool"},
         lambda: torch.ones(3, dtype=torch.bool)),
    Case("cumsum", "cumsum", [In((3, 4))], {"axis": 1}, lambda x: torch.cumsum(x, 1)),
    Case("cumsum_int32", "cumsum", [In((3, 4), "int32", -3, 3)], {"axis": 0},
         lambda x: torch.cumsum(x, 0)),
    # reductions
    Case("sum_keepdim_sym", "sum", [In((B, 3, 4))], {"axes": [1], "keepdim": True},
         lambda x: x.sum(1, keepdim=True), SYM),
    Case("sum_int32", "sum", [In((3, 4), "int32", -3, 3)], {"axes": [1]}, lambda x: x.sum(1)),
    Case("sum_bool_all", "sum", [In((3, 4), "bool")], {}, lambda x: x.sum()),
    Case("mean_all", "mean", [In((3, 4))], {}, lambda x: x.mean()),
    Case("amax", "amax", [In((2, 3, 4))], {"axes": [0, -1]}, lambda x: x.amax((0, 2))),
    Case("amin_int", "amin", [In((3, 4), "int64", -9, 9)], {"axes": [0]}, lambda x: x.amin(0)),
    Case("prod_int32", "prod", [In((3, 4), "int32", -3, 3)], {"axes": [0]}, lambda x: x.prod(0)),
    Case("var", "var", [In((3, 5))], {"axes": [1], "correction": 0.0},
         lambda x: x.var(1, correction=0)),
    Case("argmax_keepdim", "argmax", [In((3, 5))], {"axis": -1, "keepdim": True},
         lambda x: x.argmax(-1, keepdim=True)),
    # quantization
    Case("quantize_per_tensor", "quantize", [In((3, 4)), In((), positive=True)],
         {"format": "int8"}, lambda x, s: _quant(x, s, 0, -128, 127).to(torch.int8)),
    Case("quantize_per_axis_uint4", "quantize",
         [In((3, 4)), In((4,), positive=True), In((4,), "int64", 0, 16)],
         {"axis": 1, "format": "uint4"}, lambda x, s, z: _quant(x, s, z, 0, 15).to(torch.uint8)),
    Case("quantize_block", "quantize", [In((2, 8)), In((2, 2), positive=True)],
         {"axis": 1, "block_size": 4, "format": "int4"},
         lambda x, s: _quant(x, s.repeat_interleave(4, 1), 0, -8, 7).to(torch.int8)),
    Case("dequantize_per_axis", "dequantize", [In((3, 4), "int8", -128, 128), In((3,))],
         {"axis": 0}, lambda q, s: q.float() * s[:, None]),
    Case("dequantize_zero_point", "dequantize",
         [In((3, 4), "uint8", 0, 256), In((), positive=True), In((), "int64", 0, 256)],
         {"format": "uint8"}, lambda q, s, z: (q.float() - z) * s),
]


def _one_node_graph(case: Case) -> tuple[Graph, list]:
    g = Graph(case.id)
    vals = [None if i is None else g.add_input(f"x{k}", TensorType(i.shape, i.dtype))
            for k, i in enumerate(case.inputs)]
    node = g.add_node(case.op, vals, case.attrs, name="n")
    g.outputs = list(node.outputs)
    return g, [v for v in vals if v is not None]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_infer_matches_kernel_and_torch(case: Case):
    g, _ = _one_node_graph(case)
    node = g.nodes[0]
    symbolic = any(B in map(str, i.shape) for i in case.inputs if i is not None)
    assert symbolic == (case.batches != (None,)), "symbolic cases run at two batch sizes"
    for batch in case.batches:
        env = {} if batch is None else {B: batch}
        gen = torch.Generator().manual_seed(1234 + (batch or 0))
        xs = [None if i is None else i.sample(env, gen) for i in case.inputs]
        outs = Interpreter(g).run(*[x for x in xs if x is not None])
        assert len(outs) == len(node.outputs) == 1
        out, t = outs[0], node.outputs[0].type
        assert tuple(out.shape) == tuple(eval_dim(d, env) for d in t.shape), (t, out.shape)
        assert out.dtype == to_torch_dtype(t.dtype), (t, out.dtype)
        expected = case.ref(*xs)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_table_covers_the_op_families():
    ops = {c.op for c in CASES}
    assert len(CASES) >= 25
    for must in ("linear", "matmul", "conv", "max_pool2d", "avg_pool2d", "layer_norm", "rms_norm",
                 "attention", "rotary", "reshape", "permute", "expand", "slice", "select",
                 "concat", "take", "gather", "index", "pad", "tile", "arange", "full", "cumsum",
                 "sum", "mean", "quantize", "dequantize", "where", "cast", "lt", "add"):
        assert must in ops, must


def test_symbolic_inference_keeps_expressions():
    g = Graph()
    x = g.add_input("x", TensorType((B, 4, 6), "float32"))
    assert g.add("reshape", x, shape=[-1, 6]).shape == ("4*batch", 6)
    assert g.add("concat", x, x, axis=0).shape == ("2*batch", 4, 6)
    assert g.add("slice", x, axis=0, start=1, end=BIG, step=2).shape == ("floor(batch/2)", 4, 6)
    assert g.add("pad", x, pads=[0, 0, 0, 0, 1, 1]).shape == ("batch + 2", 4, 6)
    assert g.add("tile", x, repeats=[3, 1, 1]).shape == ("3*batch", 4, 6)


def test_avg_pool_rejects_dilation_its_kernel_ignores():
    g = Graph()
    x = g.add_input("x", TensorType((1, 1, 6, 6), "float32"))
    with pytest.raises(VerificationError, match="dilation"):
        g.add("avg_pool2d", x, kernel=[2, 2], stride=[1, 1], padding=[0, 0], dilation=[2, 2],
              name="pool")
