"""Target ``npu``: whole models on the QNN HTP (ONNX Runtime's QNN EP, x86 simulator), CPU
fallback disabled; refusals, artifacts with the QNN context binary, and MiniLM for real.

Bounds: QNN vs ONNX Runtime's CPU EP on the same QDQ file differ by the HTP's own integer
arithmetic (requantization in fixed point, 16-bit LUT Gelu/Softmax): npu.md §7 measured
0.000–0.007 relative L2 on unit graphs and 0.038 on MiniLM, hence ≤ 0.01 and ≤ 0.06.
Times here are the simulator's, never NPU latency."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import qcompile
from qcompile import QuantConfig, zoo
from qcompile.backends.onnx import ort_session, qnn
from qcompile.errors import ArtifactError, BackendError, ConfigError
from qcompile.interpreter import run_graph

_OK, _WHY = qnn.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"the QNN EP cannot run here: {_WHY}")


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _cpu_ep(cm, *args):
    feeds = cm._exec.feeds(args)
    return [torch.from_numpy(r) for r in ort_session(cm._exec.model_bytes).run(None, feeds)]


def _cal(shape, n=4):
    return [(torch.randn(*shape, generator=torch.Generator().manual_seed(i)),) for i in range(n)]


@pytest.fixture(scope="module")
def mlp_npu():
    m, inputs, _ = zoo.mlp(batch=8)
    return m, inputs[0], qcompile.compile(m, "npu", example_inputs=inputs, calibration=_cal((8, 64)))


def test_mlp_runs_whole_on_the_htp(mlp_npu):
    """The default recipe: uint16 activations everywhere, int8 per-channel weights."""
    m, x, cm = mlp_npu
    meta = cm._exec.meta
    assert meta["nodes_on_htp"] == meta["onnx_nodes"] > 0 and meta["qnn_subgraphs"] == 1
    assert meta["htp_arch"] == 73 and meta["qnn"]["qnn-sdk"]
    types = {n.op_type for n in cm._exec.model.graph.node}
    assert "Gemm" in types and "Add" not in types and "MatMul" not in types
    specs = {str(v.quant).split()[0] for v in cm.graph.values() if v.quant is not None}
    assert {"uint16", "int8"} <= specs
    out = cm(x)
    assert _rel(out, _cpu_ep(cm, x)[0]) <= 0.01
    assert _rel(out, run_graph(cm.graph, x)[0]) <= 0.01
    assert _rel(out, m(x).detach()) <= 0.02  # and still the model: 16-bit activations


def test_zero_bias_linear_relu_stays_exact():
    """npu.md §1: Add(x, 0) on the HTP drops the requantization (0.78 off). The bias lives
    inside Gemm as int32 instead, so a zero bias is harmless."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    with torch.no_grad():
        m[0].bias.zero_()
    m.eval()
    x = torch.randn(8, 32)
    cm = qcompile.compile(m, "npu", example_inputs=(x,), calibration=_cal((8, 32)))
    assert not [n for n in cm._exec.model.graph.node if n.op_type == "Add"]
    assert _rel(cm(x), _cpu_ep(cm, x)[0]) <= 0.01


def test_artifact_round_trip_and_tampering(mlp_npu, tmp_path):
    _, x, cm = mlp_npu
    first = cm(x)
    out = cm.save(tmp_path / "npu")
    assert {"model.onnx", "qnn_context.onnx", "npu.json"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "npu.json").read_text())
    assert meta["htp_arch"] == 73 and meta["compatibility"].endswith(":73:0:0:0")
    loaded = qcompile.load(out)
    assert torch.equal(loaded(x), first)
    assert loaded._exec.load_seconds is not None
    # the context binary is checked against npu.json's SHA-256 before QNN sees it
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"}
    ctx = bytearray(files["qnn_context.onnx"])
    ctx[len(ctx) // 2] ^= 0xFF
    files["qnn_context.onnx"] = bytes(ctx)
    from qcompile.backends import get_backend
    with pytest.raises(ArtifactError, match="SHA-256"):
        get_backend("npu").load(loaded.graph, "npu", files)
    # and the manifest refuses the tampered file first
    (out / "qnn_context.onnx").write_bytes(bytes(ctx))
    with pytest.raises(ArtifactError, match="SHA-256"):
        qcompile.load(out)


def test_artifact_from_another_qnn_is_refused(mlp_npu, tmp_path):
    _, _, cm = mlp_npu
    files = dict(cm._exec.files())
    meta = json.loads(files["npu.json"])
    meta["qnn"]["qnn-sdk"] = "2.0.0"
    files["npu.json"] = json.dumps(meta).encode()
    from qcompile.backends import get_backend
    with pytest.raises(ArtifactError, match="qnn-sdk 2.0.0"):
        get_backend("npu").load(cm.graph, "npu", files)


def test_refused_nodes_are_named():
    """A standalone erf (no Gelu pattern) is an op the HTP does not have: the error lists it
    by IR node, op, source line and QNN's reason, and suggests the CPU as a second device."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.erf(self.a(x)))

    m = M().eval()
    with pytest.raises(BackendError) as e:
        qcompile.compile(m, "npu", example_inputs=(torch.randn(4, 16),), calibration=_cal((4, 16)))
    msg = str(e.value)
    assert "IR node erf (op erf" in msg and "test_npu.py" in msg
    assert "Erf" in msg and "['npu', 'cpu']" in msg


def test_dynamic_shapes_ask_for_static_ones():
    m, inputs, dyn = zoo.mlp(batch=4)
    with pytest.raises(ConfigError, match="static shapes"):
        qcompile.compile(m, "npu", example_inputs=inputs, dynamic_shapes=dyn,
                         calibration=_cal((4, 64)))


def test_float_models_are_refused():
    m, inputs, _ = zoo.mlp(batch=4)
    with pytest.raises(ConfigError, match="quantized models only"):
        qcompile.compile(m, "npu", example_inputs=inputs)


W4A16 = QuantConfig(weights="int4", group_size=32, activations="uint16",
                    activation_granularity="per_tensor")


def test_int4_blocks_need_v73():
    m, inputs, _ = zoo.mlp(batch=8)
    with pytest.raises(ConfigError, match="htp_arch >= 73") as e:
        qcompile.compile(m, "npu:v68", example_inputs=inputs, config=W4A16,
                         calibration=_cal((8, 64)))
    assert "npu:v75" in str(e.value)
    cm = qcompile.compile(m, "npu", example_inputs=inputs, config=W4A16, calibration=_cal((8, 64)))
    x = inputs[0]
    assert _rel(cm(x), _cpu_ep(cm, x)[0]) <= 0.01


def test_asymmetric_per_channel_weights_are_refused():
    m, inputs, _ = zoo.mlp(batch=8)
    cfg = QuantConfig(weights="uint8", group_size=None, activations="uint16",
                      activation_granularity="per_tensor")
    with pytest.raises(ConfigError, match="symmetric"):
        qcompile.compile(m, "npu", example_inputs=inputs, config=cfg, calibration=_cal((8, 64)))


def test_cli_build_and_run(tmp_path):
    m, inputs, _ = zoo.mlp()  # what qcompile.zoo:mlp gives the CLI: batch 4
    np.savez(tmp_path / "cal.npz", input=np.stack([c[0].numpy() for c in _cal((4, 64))]))
    np.save(tmp_path / "x.npy", inputs[0].numpy())
    (tmp_path / "q.toml").write_text('weights = "int8"\ngroup_size = "none"\nactivations = "uint16"\n'
                                     'activation_granularity = "per_tensor"\n')
    cmd = [sys.executable, "-m", "qcompile", "build", "qcompile.zoo:mlp", "--target", "npu",
           "--config", str(tmp_path / "q.toml"), "--calibration", str(tmp_path / "cal.npz"),
           "-o", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "static shapes" in r.stdout
    r = subprocess.run([sys.executable, "-m", "qcompile", "run", str(tmp_path / "out"), "--input",
                        str(tmp_path / "x.npy")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "float32[4, 10]" in r.stdout


@pytest.mark.slow
def test_minilm_on_the_htp():
    """MiniLM-L6, batch 1, seq 128: every node on the HTP, token cosine to torch fp32 on
    held-out sentences ≥ 0.999, QNN vs CPU EP ≤ 0.06 (npu.md measured 0.038 with ORT's
    quantizer)."""
    from qcompile.corpus import CALIBRATION, EVALUATION
    m, _, _ = zoo.minilm()
    cal = zoo.minilm_batches(CALIBRATION[:8], batch=1, seq=128)
    ev = zoo.minilm_batches(EVALUATION[:2], batch=1, seq=128)
    cm = qcompile.compile(m, "npu", example_inputs=ev[0], calibration=cal)
    meta = cm._exec.meta
    assert meta["nodes_on_htp"] == meta["onnx_nodes"] and meta["qnn_subgraphs"] == 1
    for s in ev:
        with torch.no_grad():
            ref = m(**s).last_hidden_state[0]
        out = cm(s["input_ids"], s["attention_mask"])[0][0]
        cpu = _cpu_ep(cm, s["input_ids"], s["attention_mask"])[0][0]
        keep = s["attention_mask"][0].bool()
        cos = torch.nn.functional.cosine_similarity(out[keep], ref[keep], dim=-1).mean()
        assert cos >= 0.999
        assert _rel(out, cpu) <= 0.06


def test_capability_maps_refusals_to_ir_nodes():
    """What placement will read: refused IR nodes with QNN's reasons; nothing for a graph the
    HTP runs whole."""
    from qcompile.backends import get_backend
    from qcompile.passes.pipeline import quantize_graph
    backend = get_backend("npu")

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 16)

        def forward(self, x):
            return torch.erf(self.a(x))

    x = torch.randn(4, 16)
    g = qcompile.capture(M().eval(), (x,))
    g, _ = quantize_graph(g, backend.default_config(), _cal((4, 16)), target="npu",
                          progress=False)
    refused = backend.capability(g)
    assert list(refused) == ["erf"] and any("Erf" in r for r in refused["erf"])
    m, inputs, _ = zoo.mlp(batch=8)
    g, _ = quantize_graph(qcompile.capture(m, inputs), backend.default_config(), _cal((8, 64)),
                          target="npu", progress=False)
    assert backend.capability(g) == {}


@pytest.mark.parametrize("name", ["cnn", "llama"])
def test_cnn_and_llama_run_whole_on_the_htp(name):
    """The digits CNN (conv, batch norm folded by ORT, pools) and a tiny Llama (RMSNorm, rotary,
    SiLU and grouped-head attention decomposed so every intermediate has a scale; RMSNorm's
    1/√ as a Div, since the HTP's 16-bit Reciprocal is wrong) run whole on the HTP and agree
    with the CPU EP on the same file (measured 5e-5 and 0.006)."""
    if name == "cnn":
        m, x, _, _ = zoo.digits_cnn(epochs=1)
        example, cal = (x[:8],), [(x[i:i + 8],) for i in range(8, 64, 8)]
    else:
        m, example, _ = zoo.tiny_llama(batch=1, seq=8, hidden=64, layers=2, heads=4, kv_heads=2)
        cal = [(torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(i)),)
               for i in range(2)]
    cm = qcompile.compile(m, "npu", example_inputs=example, calibration=cal)
    meta = cm._exec.meta
    assert meta["nodes_on_htp"] == meta["onnx_nodes"] and meta["qnn_subgraphs"] == 1
    out = cm(*example)
    assert _rel(out, _cpu_ep(cm, *example)[0]) <= (0.01 if name == "cnn" else 0.02)
    assert _rel(out, m(*example).detach()) <= 0.05


def test_reciprocal_is_refused_by_the_deny_list():
    """A 16-bit Reciprocal runs wrong on the HTP (0.98 relative to the CPU EP): refused."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 16)

        def forward(self, x):
            return torch.reciprocal(torch.sigmoid(self.a(x)) + 1.0)

    with pytest.raises(BackendError) as e:
        qcompile.compile(M().eval(), "npu", example_inputs=(torch.randn(4, 16),),
                         calibration=_cal((4, 16)))
    assert "IR node reciprocal" in str(e.value) and "WRONG on HTP" in str(e.value)
