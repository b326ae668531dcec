"""The QNN HTP runtime layer: sessions, capability reports, the deny-list, EPContext.

Graphs are hand-built QDQ ONNX (opset 21, standard-domain Q/DQ, uint16 activations, symmetric
per-channel int8 weights, every node named), each small enough that a QNN session opens in
well under a second on the x86 HTP simulator. Tests that open QNN sessions skip only where
``qnn.available()`` says the EP cannot be used; the deny-list tests need onnx alone.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto as T  # noqa: E402
from onnx import helper as h  # noqa: E402
from onnx import numpy_helper as nh  # noqa: E402

from qcompile.backends.onnx import qnn  # noqa: E402
from qcompile.errors import BackendError, ConfigError  # noqa: E402

_OK, _WHY = qnn.available()
needs_qnn = pytest.mark.skipif(not _OK, reason=f"QNN EP unavailable: {_WHY}")


# --------------------------------------------------------------------------- graph builder

class _QDQ:
    """Builds a QDQ ONNX graph with named nodes: x: float[4, K] -> ... -> y."""

    def __init__(self, k: int = 32):
        self.nodes, self.inits, self.k = [], [], k
        self.rng = np.random.default_rng(0)

    def const(self, name, value):
        self.inits.append(nh.from_array(np.asarray(value), name))
        return name

    def act(self, x, tag, lo=-4.0, hi=4.0):
        """uint16 Q -> DQ of ``x`` over [lo, hi]; returns the dequantized value's name."""
        s = (hi - lo) / 65535
        z = int(round(-lo / s))
        self.const(f"{tag}_s", np.float32(s))
        self.const(f"{tag}_z", np.uint16(z))
        sn, zn = f"{tag}_s", f"{tag}_z"
        self.nodes += [h.make_node("QuantizeLinear", [x, sn, zn], [f"{tag}_q"], name=f"{tag}_Q"),
                       h.make_node("DequantizeLinear", [f"{tag}_q", sn, zn], [f"{tag}_dq"], name=f"{tag}_DQ")]
        return f"{tag}_dq"

    def weight(self, tag, w, axis, zp=None, qtype=np.int8):
        """Per-channel DQ of ``w`` along ``axis`` (symmetric int8 unless ``zp``/``qtype`` say)."""
        red = tuple(i for i in range(w.ndim) if i != axis)
        s = (np.abs(w).max(red) / 127).astype(np.float32)
        z = np.zeros_like(s, np.int64) if zp is None else np.asarray(zp, np.int64)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / s.reshape(shape)) + z.reshape(shape), *(
            (-128, 127) if qtype == np.int8 else (0, 255))).astype(qtype)
        self.const(f"{tag}_wq", q)
        self.const(f"{tag}_ws", s)
        self.const(f"{tag}_wz", z.astype(qtype))
        self.nodes.append(h.make_node("DequantizeLinear", [f"{tag}_wq", f"{tag}_ws", f"{tag}_wz"],
                                      [f"{tag}_w"], name=f"{tag}_wDQ", axis=axis))
        return f"{tag}_w", s

    def gemm(self, x, tag, n, x_scale, bias=None):
        """Gemm(x, W^T, int32 bias) with int8 symmetric per-channel W [n, K]."""
        w = (self.rng.normal(size=(n, self.k)) * 0.2).astype(np.float32)
        wname, ws = self.weight(tag, w, axis=0)
        b = self.rng.normal(size=n) * 0.05 if bias is None else np.asarray(bias)
        bs = (x_scale * ws).astype(np.float32)
        self.const(f"{tag}_bq", np.round(b / bs).astype(np.int32))
        self.const(f"{tag}_bs", bs)
        self.const(f"{tag}_bz", np.zeros(n, np.int32))
        self.nodes.append(h.make_node("DequantizeLinear", [f"{tag}_bq", f"{tag}_bs", f"{tag}_bz"],
                                      [f"{tag}_b"], name=f"{tag}_bDQ", axis=0))
        self.nodes.append(h.make_node("Gemm", [x, wname, f"{tag}_b"], [tag], name=tag, transB=1))
        return tag

    def node(self, op, inputs, name, **attrs):
        self.nodes.append(h.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def model(self, y, n_out):
        g = h.make_graph(self.nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [4, self.k])],
                         [h.make_tensor_value_info(y, T.FLOAT, [4, n_out])], self.inits)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
        m.ir_version = 10
        onnx.checker.check_model(m, full_check=True)
        return m


X_LO, X_HI = -4.0, 4.0
X_SCALE = (X_HI - X_LO) / 65535


def mlp_model():
    """QDQ Gemm (int32 bias) -> Relu -> Gemm: the recipe of npu.md §7."""
    b = _QDQ()
    x = b.act("x", "x")
    g1 = b.act(b.gemm(x, "fc1", 32, X_SCALE), "fc1o")
    r = b.act(b.node("Relu", [g1], "relu1"), "relu1o", 0.0, 4.0)
    y = b.act(b.gemm(r, "fc2", 16, 4.0 / 65535), "y")
    return b.model(y, 16)


def zero_bias_model(form: str):
    """npu.md §1: x -> MatMul(W) -> Add(zeros) -> Q(out [0, 4]) (Relu folded into the Q), or
    the same as one Gemm whose int32 bias is zero."""
    b = _QDQ()
    x = b.act("x", "x")
    if form == "gemm":
        y = b.gemm(x, "fc", 32, X_SCALE, bias=np.zeros(32))
    else:
        wname, _ = b.weight("fc", (b.rng.normal(size=(b.k, 32)) * 0.2).astype(np.float32), axis=1)
        mm = b.act(b.node("MatMul", [x, wname], "fc"), "fco")
        # as quantize_static leaves it with uint16 activations: an all-zero constant of the
        # activation type. (A uint8 zero constant next to uint16 activations runs right.)
        b.const("zeros_q", np.zeros(32, np.uint16))
        b.const("zeros_s", np.float32(1.0))
        b.const("zeros_z", np.uint16(0))
        zeros = b.node("DequantizeLinear", ["zeros_q", "zeros_s", "zeros_z"], "zeros_DQ")
        y = b.node("Add", [mm, zeros], "add_bias")
    return b.model(b.act(y, "y", 0.0, 4.0), 32)


def where_model():
    b = _QDQ()
    x = b.act("x", "x")
    c = b.node("Greater", [x, b.const("zero", np.float32(0))], "gt")
    return b.model(b.act(b.node("Where", [c, x, "zero"], "where1"), "y"), 32)


def erf_model():
    b = _QDQ()
    x = b.act("x", "x")
    e = b.act(b.node("Erf", [x], "erf1"), "erfo", -1.0, 1.0)
    return b.model(b.act(b.node("Relu", [e], "relu1"), "y", 0.0, 1.0), 32)


def layernorm_model(gamma_type):
    b = _QDQ()
    x = b.act("x", "x")
    gamma = b.rng.uniform(0.5, 1.5, 32).astype(np.float32)
    s = np.float32(gamma.max() / (127 if gamma_type == np.int8 else 255))
    b.const("g_q", np.round(gamma / s).astype(gamma_type))
    b.const("g_s", s)
    b.const("g_z", gamma_type(0))
    b.nodes.append(h.make_node("DequantizeLinear", ["g_q", "g_s", "g_z"], ["gamma"], name="gamma_DQ"))
    return b.model(b.act(b.node("LayerNormalization", [x, "gamma"], "ln1", axis=-1), "y"), 32)


def block_model(zp: int | None, block: int = 32):
    """MatMul with block-quantized weights: int8 (zp None) or uint8 with zero point ``zp``."""
    b = _QDQ(64)
    x = b.act("x", "x")
    q = b.rng.integers(-128, 128, (64, 8))
    b.const("ws", np.full((64 // block, 8), 0.02, np.float32))
    if zp is None:
        b.const("wq", q.astype(np.int8))
        inputs = ["wq", "ws"]
    else:
        b.const("wq", (q + 128).astype(np.uint8))
        b.const("wz", np.full((64 // block, 8), zp, np.uint8))
        inputs = ["wq", "ws", "wz"]
    b.nodes.append(h.make_node("DequantizeLinear", inputs, ["w"], name="w_bq", axis=0, block_size=block))
    return b.model(b.act(b.node("MatMul", [x, "w"], "mm"), "y", -8.0, 8.0), 8)


def _x(seed=1):
    return np.random.default_rng(seed).uniform(-3, 3, (4, 32)).astype(np.float32)


def _cpu(model, x):
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- environment

def test_versions_name_qnn_sdk():
    v = qnn.versions()
    assert set(v) == {"onnxruntime", "onnxruntime-qnn", "qnn-sdk"}
    if _OK:
        assert all(v.values()), v


def test_available_says_why_not(monkeypatch):
    monkeypatch.setattr(qnn, "_devices", None)
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime_qnn", None)  # import fails
    ok, why = qnn.available()
    assert not ok and "onnxruntime-qnn" in why


@needs_qnn
def test_bad_htp_arch_is_a_config_error():
    with pytest.raises(ConfigError, match="htp_arch"):
        qnn.session_options(htp_arch="v73")


# --------------------------------------------------------------------------- deny-list (static)

def test_deny_list_clean_mlp():
    assert qnn.deny_list(mlp_model()) == []
    assert qnn.deny_list(zero_bias_model("gemm")) == []


def test_deny_list_flags_zero_add_where_erf_signed_gamma():
    cases = [(zero_bias_model("add"), "add_bias", "Add"), (where_model(), "where1", "Where"),
             (erf_model(), "erf1", "Erf"), (layernorm_model(np.int8), "ln1", "LayerNormalization")]
    for model, node, op in cases:
        refused = qnn.deny_list(model)
        assert [(r.node, r.op_type, r.source) for r in refused] == [(node, op, "deny-list")], refused
    assert qnn.deny_list(layernorm_model(np.uint8)) == []


def test_deny_list_asymmetric_per_channel_and_arch():
    b = _QDQ()
    x = b.act("x", "x")
    w = (b.rng.normal(size=(b.k, 8)) * 0.2).astype(np.float32)
    wname, _ = b.weight("fc", w, axis=1, zp=np.arange(120, 128), qtype=np.uint8)
    model = b.model(b.act(b.node("MatMul", [x, wname], "mm"), "y"), 8)
    assert [r.node for r in qnn.deny_list(model)] == ["mm"]
    # uint8 per-channel with the symmetric zero point 128 everywhere is fine
    b = _QDQ()
    x = b.act("x", "x")
    wname, _ = b.weight("fc", w, axis=1, zp=np.full(8, 128), qtype=np.uint8)
    assert qnn.deny_list(b.model(b.act(b.node("MatMul", [x, wname], "mm"), "y"), 8)) == []
    # block-quantized weights: refused below v73 (and with the EP's default arch), fine from v73
    model = block_model(zp=None)
    assert [r.node for r in qnn.deny_list(model, htp_arch=None)] == ["w_bq"]
    assert [r.node for r in qnn.deny_list(model, htp_arch=69)] == ["w_bq"]
    assert qnn.deny_list(model, htp_arch=73) == []
    # ... unless they carry zero points, which HTP gets wrong at any arch
    assert [r.node for r in qnn.deny_list(block_model(zp=128), htp_arch=73)] == ["w_bq"]


def test_deny_list_float_gather_and_gelu():
    table = nh.from_array(np.ones((10, 32), np.float32), "table")
    nodes = [h.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             h.make_node("Gelu", ["e"], ["y"], name="gelu1")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("ids", T.INT64, [4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [4, 32])], [table])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    assert [(r.node, r.op_type) for r in qnn.deny_list(model)] == [("embed", "Gather"), ("gelu1", "Gelu")]


# --------------------------------------------------------------------------- sessions (QNN)

@pytest.fixture(scope="module")
def mlp():
    return mlp_model()


@needs_qnn
def test_mlp_all_on_qnn_matches_cpu_ep(mlp):
    rep = qnn.capability(mlp)
    assert rep.ok, str(rep)
    assert rep.supported_nodes == rep.total_nodes == len(mlp.graph.node) and rep.qnn_subgraphs == 1
    x = _x()
    y = qnn.session(mlp).run(None, {"x": x})[0]
    assert _rel(y, _cpu(mlp, x)) <= 0.01


@needs_qnn
def test_zero_bias_gemm_form_matches_and_add_form_is_flagged():
    x = _x()
    gemm = zero_bias_model("gemm")
    assert _rel(qnn.session(gemm).run(None, {"x": x})[0], _cpu(gemm, x)) <= 0.01
    add = zero_bias_model("add")
    rep = qnn.capability(add)
    assert rep.session_ok and not rep.ok  # QNN takes it all; only the deny-list knows better
    assert [(r.node, r.source) for r in rep.refused] == [("add_bias", "deny-list")]
    # The bug itself (npu.md §1). If this starts to pass, QNN fixed it: drop the deny-list entry.
    wrong = _rel(qnn.session(add).run(None, {"x": x})[0], _cpu(add, x))
    assert wrong > 0.1, f"Add(x, 0) now matches the CPU EP (rel {wrong:.4f})"


@needs_qnn
def test_block_quant_zero_point_is_wrong_on_htp():
    x = np.random.default_rng(1).uniform(-3, 3, (4, 64)).astype(np.float32)
    good, bad = block_model(zp=None), block_model(zp=128)  # the same weights, signed / unsigned
    assert _rel(qnn.session(good).run(None, {"x": x})[0], _cpu(good, x)) <= 0.01
    # If this starts to pass, QNN fixed it: drop that deny-list entry.
    wrong = _rel(qnn.session(bad).run(None, {"x": x})[0], _cpu(bad, x))
    assert wrong > 0.1, f"block-quantized uint8 weights with zp 128 now match the CPU EP ({wrong:.4f})"


@needs_qnn
def test_where_refused_without_crash():
    rep = qnn.capability(where_model())
    assert not rep.session_ok and "finalize" in rep.session_error
    assert ("where1", "Where", "deny-list") in {(r.node, r.op_type, r.source) for r in rep.refused}
    with pytest.raises(BackendError, match="finalize"):
        qnn.session(where_model())


@needs_qnn
def test_trace_refusals_named_with_reasons():
    rep = qnn.capability(erf_model())  # the op trace is written: part of the graph goes to QNN
    assert not rep.session_ok and rep.trace is not None
    assert rep.total_nodes == 7 and rep.supported_nodes < 7
    trace = {r.node: r for r in rep.refused if r.source == "trace"}
    assert "erf1" in trace and "Erf" in trace["erf1"].reason and trace["erf1"].op_type == "Erf"
    # Nothing goes to QNN: no trace; the EP log and a fallback probe name the node and QNN's code
    rep = qnn.capability(layernorm_model(np.int8))
    assert not rep.session_ok and rep.supported_nodes == 0 and rep.total_nodes == 6
    ln = [r for r in rep.refused if r.node == "ln1" and r.source != "deny-list"]
    assert ln and "3110" in ln[0].reason, str(rep)
    with pytest.raises(BackendError, match="ln1"):
        qnn.session(layernorm_model(np.int8))
    assert qnn.capability(layernorm_model(np.uint8)).ok


@needs_qnn
def test_epcontext_round_trip_bit_exact(mlp):
    ctx = qnn.compile_context(mlp)
    info = qnn.context_info(ctx)
    assert info["epcontext_nodes"] == 1 and info["other_nodes"] == 0 and info["binary_bytes"] > 0
    assert ":73:" in info["compatibility"]
    x = _x(2)
    ref = qnn.session(mlp).run(None, {"x": x})[0]
    digest = hashlib.sha256(ctx).hexdigest()
    np.testing.assert_array_equal(qnn.session_from_context(ctx, sha256=digest).run(None, {"x": x})[0], ref)
    # a plain model is refused rather than compiled again
    with pytest.raises(BackendError, match="EPContext"):
        qnn.session_from_context(mlp.SerializeToString())
    # a corrupted context binary fails cleanly
    bad = onnx.load_from_string(ctx)
    attr = next(a for a in bad.graph.node[0].attribute if a.name == "ep_cache_context")
    blob = bytearray(attr.s)
    blob[: len(blob) // 2] = bytes(len(blob) // 2)
    attr.s = bytes(blob)
    with pytest.raises(BackendError):
        qnn.session_from_context(bad.SerializeToString())
    # a flipped byte QNN might not notice (or crash on) is caught by the hash before loading
    with pytest.raises(BackendError, match="SHA-256"):
        qnn.session_from_context(bad.SerializeToString(), sha256=digest)
