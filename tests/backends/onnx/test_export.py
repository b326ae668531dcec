"""Target ``onnx``: the exported QDQ model against the interpreter (the oracle), per activation
(teacher-forced, ``_oracle``), plus refusals and artifacts."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile import QuantConfig, zoo
from qcompile.errors import ArtifactError, ConfigError
from qcompile.interpreter import run_graph

from ._oracle import forced_compare

W8A8 = QuantConfig(weights="int8", group_size=None, activations="int8",
                   activation_granularity="per_tensor")
W8A8U = QuantConfig(weights="int8", group_size=None, activations="uint8",
                    activation_granularity="per_tensor")
W4 = QuantConfig(weights="int4", group_size=32)
W4U = QuantConfig(weights="uint4", group_size=32)


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def models():
    out = {}
    m, inputs, _ = zoo.mlp(batch=8)
    out["mlp"] = (m, inputs, [(torch.randn(8, 64, generator=torch.Generator().manual_seed(i)),)
                              for i in range(4)])
    m, x, _, _ = zoo.digits_cnn(epochs=1)
    out["cnn"] = (m, (x[:8],), [(x[i:i + 8],) for i in range(8, 64, 8)])
    m, inputs, _ = zoo.minilm(batch=2, seq=16)
    out["minilm"] = (m, inputs, zoo.minilm_batches(zoo.SENTENCES, batch=2, seq=16))
    m, inputs, _ = zoo.tiny_llama(batch=1, seq=8, hidden=64, layers=2, heads=4, kv_heads=2)
    out["llama"] = (m, inputs, [(torch.randint(0, 1000, (1, 8),
                                               generator=torch.Generator().manual_seed(i)),)
                                for i in range(2)])
    return out


def _args(inputs):
    return list(inputs.values()) if isinstance(inputs, dict) else list(inputs)


@pytest.mark.parametrize("name", ["mlp", "cnn", "minilm", "llama"])
def test_float_export_equals_interpreter(models, name):
    """fp32 ONNX Runtime vs the interpreter: only summation order differs (≤ 1e-5 relative)."""
    m, inputs, _ = models[name]
    cm = qcompile.compile(m, "onnx", example_inputs=inputs)
    args = _args(inputs)
    ref = run_graph(cm.graph, *args)[0]
    assert _rel(cm.run(*args)[0], ref) <= 1e-5


@pytest.mark.parametrize("cfg", [W8A8, W8A8U], ids=["int8", "uint8"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "minilm", "llama"])
def test_w8a8_within_one_step_per_activation(models, name, cfg):
    """Teacher-forced (see ``_oracle``): every static activation's codes differ from the
    interpreter's by at most one step, in under 1% of its elements; the float output after
    the last quantized activation then agrees to float error plus at most a few flipped codes
    times their weights (≤ 1e-3 of max |y|)."""
    m, inputs, cal = models[name]
    cm = qcompile.compile(m, "reference", example_inputs=inputs, config=cfg, calibration=cal)
    diffs, theirs, ours = forced_compare(cm.graph, _args(inputs))
    assert diffs, "no quantized activation was probed"
    worst = max(d for d, _ in diffs.values())
    frac = max(f for _, f in diffs.values())
    assert worst <= 1, {k: v for k, v in diffs.items() if v[0] > 1}
    assert frac < 0.01
    assert _rel(theirs[0], ours[0]) <= 1e-3


@pytest.mark.parametrize("form", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("cfg", [W4, W4U], ids=["int4", "uint4"])
@pytest.mark.parametrize("name", ["mlp", "minilm"])
def test_weight_only_int4(models, name, cfg, form):
    """Weight-only int4: MatMulNBits (packed nibbles, default zero point 8 for signed codes)
    and int4 DequantizeLinear dequantize to exactly the interpreter's weights, so only the
    GEMM's summation order differs (≤ 1e-5 relative)."""
    m, inputs, cal = models[name]
    cm = qcompile.compile(m, "reference", example_inputs=inputs, config=cfg, calibration=cal)
    from qcompile.backends.onnx import OnnxBackend
    exe = OnnxBackend().lower(cm.graph, "onnx" if form == "matmulnbits" else "onnx:qdq")
    ops = {n.op_type for n in exe.model.graph.node}
    assert ("MatMulNBits" in ops) == (form == "matmulnbits")
    args = _args(inputs)
    assert _rel(exe(*args)[0], run_graph(cm.graph, *args)[0]) <= 1e-5


def test_per_token_activations_export_as_arithmetic(models):
    m, inputs, cal = models["mlp"]
    cfg = QuantConfig(weights="int8", group_size=None, activations="int8")
    cm = qcompile.compile(m, "onnx", example_inputs=inputs, config=cfg)
    args = _args(inputs)
    assert _rel(cm.run(*args)[0], run_graph(cm.graph, *args)[0]) <= 1e-5


def test_export_is_standard_qdq(models):
    """opset 21, standard-domain Q/DQ, every node named uniquely, int32 bias inside Gemm,
    int8 per-channel weights, and the file passes onnx.checker."""
    m, inputs, cal = models["mlp"]
    cm = qcompile.compile(m, "onnx", example_inputs=inputs, config=W8A8, calibration=cal)
    model = cm._exec.model
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert not any(n.domain for n in model.graph.node)
    inits = {i.name: i for i in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 3
    producers = {o: n for n in model.graph.node for o in n.output}
    for g in gemms:
        w_dq, b_dq = producers[g.input[1]], producers[g.input[2]]
        assert w_dq.op_type == b_dq.op_type == "DequantizeLinear"
        assert inits[w_dq.input[0]].data_type == onnx.TensorProto.INT8
        assert onnx.numpy_helper.to_array(inits[w_dq.input[1]]).ndim == 1  # per channel
        assert inits[b_dq.input[0]].data_type == onnx.TensorProto.INT32
    assert all(cm._exec.origin[n] for n in names if "/" in n and not n.startswith("graph/"))


def test_dynamic_batch(models):
    """Symbolic sizes become Shape-derived tensors: one file serves every batch size."""
    m, inputs, dyn = zoo.mlp(batch=4)
    cm = qcompile.compile(m, "onnx", example_inputs=inputs, dynamic_shapes=dyn)
    for b in (1, 7):
        x = torch.randn(b, 64)
        assert _rel(cm(x), run_graph(cm.graph, x)[0]) <= 1e-5


@pytest.mark.parametrize("weights,nearest", [("mxfp4", "int4"), ("int3", "int4"),
                                             ("int6", "int8"), ("nvfp4", "int4")])
def test_formats_onnx_cannot_carry_are_refused(models, weights, nearest):
    m, inputs, _ = models["mlp"]
    cfg = QuantConfig(weights=weights, group_size=32 if "fp" not in weights else None)
    with pytest.raises(ConfigError) as e:
        qcompile.compile(m, "onnx", example_inputs=inputs, config=cfg)
    msg = str(e.value)
    assert "target 'onnx' cannot carry" in msg and nearest in msg and "linear" in msg


def test_artifact_is_a_plain_onnx_file(models, tmp_path):
    import onnxruntime as ort
    m, inputs, cal = models["cnn"]
    cm = qcompile.compile(m, "onnx", example_inputs=inputs, config=W8A8, calibration=cal)
    out = cm.save(tmp_path / "a")
    x = _args(inputs)[0]
    first = cm(x)
    loaded = qcompile.load(out)
    assert torch.equal(loaded(x), first)
    plain = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = plain.run(None, {cm.input_names[0]: x.numpy()})[0]
    assert np.array_equal(got, first.numpy())
    (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes()[:-1] + b"\0")
    with pytest.raises(ArtifactError, match="SHA-256"):
        qcompile.load(out)


W8A16 = QuantConfig(weights="int8", group_size=None, activations="uint16",
                    activation_granularity="per_tensor")
W4A16 = QuantConfig(weights="int4", group_size=32, activations="uint16",
                    activation_granularity="per_tensor")


@pytest.mark.parametrize("cfg", [W8A16, W4A16], ids=["W8A16", "W4A16"])
@pytest.mark.parametrize("name", ["mlp", "minilm", "llama"])
def test_16bit_activations_within_one_step(models, name, cfg):
    """uint16 activations (and int4 block weights under them, as DequantizeLinear with
    block_size feeding MatMul): the same teacher-forced one-step bound as W8A8."""
    m, inputs, cal = models[name]
    cm = qcompile.compile(m, "reference", example_inputs=inputs, config=cfg, calibration=cal)
    diffs, theirs, ours = forced_compare(cm.graph, _args(inputs))
    assert diffs and max(d for d, _ in diffs.values()) <= 1
    assert max(f for _, f in diffs.values()) < 0.01
    assert _rel(theirs[0], ours[0]) <= 1e-3


def _openvino(model_bytes: bytes, feeds: dict, tmp_path):
    import openvino as ov  # the 'peers' extra, which `make test` installs
    path = tmp_path / "model.onnx"
    path.write_bytes(model_bytes)
    # f32 inference (OpenVINO's CPU plugin defaults to bf16 on AVX512-BF16 hosts) and no
    # dynamic activation quantization of int4-weight MatMuls: the file's own arithmetic
    comp = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                      "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"})
    return torch.from_numpy(comp(feeds)[comp.outputs[0]])


@pytest.mark.parametrize("name,cfg", [("cnn", None), ("cnn", W4), ("cnn", W8A8),
                                      ("minilm", None), ("minilm", W4), ("minilm", W8A16)],
                         ids=["cnn-fp32", "cnn-int4", "cnn-W8A8", "minilm-fp32", "minilm-int4",
                              "minilm-W8A16"])
def test_openvino_loads_the_same_file(models, name, cfg, tmp_path):
    """The `onnx` target's file is plain ONNX: OpenVINO (device CPU) reads and runs it. fp32
    and weight-only int4 (MatMulNBits) agree with ONNX Runtime to float error (1e-5); with
    quantized activations some codes land one step apart (different summation orders, and
    OpenVINO's low-precision transformations move the dequantization), and free-running
    through six layers those flips add up: ≤ 1e-2 of max |y| (MiniLM W8A16 measured 0.006).
    W8A8 MiniLM is left out: its int8 activations are so coarse that such flips grow through
    the layers (0.3 of max |y| even between ONNX Runtime and the interpreter), whichever
    runtime runs it."""
    m, inputs, cal = models[name]
    cm = qcompile.compile(m, "onnx", example_inputs=inputs, config=cfg,
                          calibration=cal if cfg else None)
    args = _args(inputs)
    got = _openvino(cm._exec.model_bytes, cm._exec.feeds(args), tmp_path)
    ref = cm.run(*args)[0]
    assert _rel(got, ref) <= (1e-5 if cfg is None or cfg.activations is None else 1e-2)


def test_online_hadamard_exports_as_constant_matmul(models):
    """QuaRot's online rotations (``hadamard`` nodes, before down_proj and in attention)
    export as constant MatMuls; the one-step bound holds through them."""
    m, inputs, cal = models["llama"]
    cfg = QuantConfig(weights="int8", group_size=None, activations="int8",
                      activation_granularity="per_tensor", rotation="hadamard")
    cm = qcompile.compile(m, "reference", example_inputs=inputs, config=cfg, calibration=cal)
    assert "hadamard" in cm.graph.op_histogram()
    diffs, theirs, ours = forced_compare(cm.graph, _args(inputs))
    assert max(d for d, _ in diffs.values()) <= 1
    assert _rel(theirs[0], ours[0]) <= 1e-3
    from qcompile.backends.onnx.export import export
    ex = export(cm.graph)
    had = {n.name for n in cm.graph.nodes if n.op == "hadamard"}
    assert had == {ex.origin[n.name] for n in ex.model.graph.node
                   if n.op_type == "MatMul" and ex.origin[n.name] in had}


@pytest.mark.parametrize("lq,lk,causal", [(5, 5, True), (3, 5, True), (4, 4, False)])
def test_attention_export(lq, lk, causal):
    """attention as MatMul/Softmax: causal is SDPA's top-left-aligned mask, also for
    Lq != Lk; no mask input at all works too."""

    class A(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    q, k, v = torch.randn(1, 2, lq, 8), torch.randn(1, 2, lk, 8), torch.randn(1, 2, lk, 8)
    cm = qcompile.compile(A().eval(), "onnx", example_inputs=(q, k, v))
    assert "attention" in cm.graph.op_histogram()
    assert _rel(cm(q, k, v), A()(q, k, v)) <= 1e-5


def test_dynamic_batch_minilm():
    """MiniLM captured with a symbolic batch: the mask's advanced indexing computes its flat
    index from run-time sizes; one file serves batch 1 and 3."""
    m, inputs, dyn = zoo.minilm(batch=2, seq=16)
    cm = qcompile.compile(m, "onnx", example_inputs=inputs, dynamic_shapes=dyn)
    assert any(isinstance(d, str) for d in cm.graph.inputs[0].shape)
    for b in (1, 3):
        batch = zoo.minilm_batches((zoo.SENTENCES * 2)[:b], batch=b, seq=16)[0]
        args = [batch["input_ids"], batch["attention_mask"]]
        assert _rel(cm.run(*args)[0], run_graph(cm.graph, *args)[0]) <= 1e-5


def _qdq_model(axis_scales, codes_out: bool, qtype=onnx.TensorProto.INT8):
    """x [4, 3] → QuantizeLinear(per channel along axis 1) → DequantizeLinear → Relu; with
    ``codes_out`` the codes are an output too (the IR keeps an explicit ``quantize``)."""
    h = onnx.helper
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q", axis=1),
             h.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq", axis=1),
             h.make_node("Relu", ["d"], ["y"], name="relu")]
    zp = np.array([0, 1, -2], np.int8) if qtype == onnx.TensorProto.INT8 else \
        np.array([0, 100, 200], np.uint8)
    inits = [onnx.numpy_helper.from_array(np.asarray(axis_scales, np.float32), "s"),
             h.make_tensor("z", qtype, [3], zp.astype(np.int64).tolist())]
    outs = [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 3])]
    if codes_out:
        outs.append(h.make_tensor_value_info("q", qtype, [4, 3]))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 3])],
                     outs, inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)])


@pytest.mark.parametrize("codes_out", [False, True])
@pytest.mark.parametrize("qtype", [onnx.TensorProto.INT8, onnx.TensorProto.UINT8],
                         ids=["int8", "uint8"])
def test_imported_per_channel_qdq_round_trips(codes_out, qtype):
    """An imported QDQ file (per-channel activation scales along axis 1 of a [4, 3] tensor, so
    a wrong axis cannot go unnoticed) exports back with its axis and code type, and ONNX
    Runtime's output equals the interpreter's."""
    model = _qdq_model([0.01, 0.02, 0.05], codes_out, qtype)
    cm = qcompile.compile(model, "onnx")
    x = torch.randn(4, 3) * 3
    ref = run_graph(cm.graph, x)
    got = cm.run(x)
    for r, g in zip(ref, got):
        assert torch.equal(r.to(g.dtype), g) if not r.is_floating_point() else _rel(g, r) <= 1e-6
