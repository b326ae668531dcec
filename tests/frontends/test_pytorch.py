"""The torch frontend: capture through torch.export (and the fx fallback), interpreter
against torch eager, symbolic batch, round trip, and the bad paths."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile.interpreter import Interpreter
from qcompile.ir import load_graph, save_graph, verify
from qcompile.zoo import minilm, mlp, tiny_llama


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-12))


def test_mlp_export_and_fx_agree_with_torch():
    model, (x,), dyn = mlp()
    ref = model(x)
    for method in ("export", "fx"):
        g = qcompile.capture(model, (x,), dynamic_shapes=dyn if method == "export" else None,
                             method=method)
        verify(g)
        assert g.op_histogram() == {"linear": 3, "relu": 2}
        assert _rel(Interpreter(g).run(x)[0], ref) < 1e-5


@pytest.fixture(scope="module")
def digits_cnn():
    from qcompile.zoo import digits_cnn
    return digits_cnn()


def test_digits_cnn(digits_cnn):
    model, x, _, acc = digits_cnn
    assert acc > 0.8
    g = qcompile.capture(model, (x[:8],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    hist = g.op_histogram()
    assert hist["conv"] == 2 and hist["batch_norm"] == 1 and hist["max_pool2d"] == 1
    out = Interpreter(g).run(x)[0]  # captured at batch 8, run on all held-out images
    with torch.no_grad():
        assert _rel(out, model(x)) < 1e-5


@pytest.fixture(scope="module")
def minilm_capture():
    model, inputs, dyn = minilm(batch=2, seq=32)
    inputs["attention_mask"][1, 20:] = 0  # padding exercises the mask path
    return model, inputs, qcompile.capture(model, inputs, dynamic_shapes=dyn)


def test_minilm_matches_torch(minilm_capture):
    model, inputs, g = minilm_capture
    hist = g.op_histogram()
    assert hist["linear"] == 37 and hist["layer_norm"] == 13 and hist["attention"] == 6
    assert g.inputs[0].type.shape == ("batch", 32)
    with torch.no_grad():
        ref = model(**inputs)
    out = Interpreter(g).run(inputs["input_ids"], inputs["attention_mask"])
    assert _rel(out[0], ref.last_hidden_state) < 1e-5
    assert _rel(out[1], ref.pooler_output) < 1e-5
    assert g.nodes[0].provenance.module is not None


@pytest.mark.parametrize("batch", [1, 4])
def test_minilm_symbolic_batch(minilm_capture, batch):
    model, _, g = minilm_capture
    ids = torch.randint(0, 30000, (batch, 32), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones(batch, 32, dtype=torch.int64)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert _rel(Interpreter(g).run(ids, mask)[0], ref) < 1e-5


def test_minilm_round_trip(minilm_capture, tmp_path):
    _, inputs, g = minilm_capture
    save_graph(g, tmp_path)
    g2 = load_graph(tmp_path)
    assert str(g2) == str(g)
    a = Interpreter(g).run(inputs["input_ids"], inputs["attention_mask"])
    b = Interpreter(g2).run(inputs["input_ids"], inputs["attention_mask"])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_llama_matches_torch_and_keeps_high_level_ops(kv_heads):
    model, (ids,), dyn = tiny_llama(kv_heads=kv_heads)
    g = qcompile.capture(model, (ids,), dynamic_shapes=dyn)
    hist = g.op_histogram()
    assert hist["rms_norm"] == 9 and hist["rotary"] == 8 and hist["attention"] == 4
    assert hist["linear"] == 29 and "rsqrt" not in hist
    with torch.no_grad():
        ref = model(ids)
        ref3 = model(ids[:1].repeat(3, 1))
    assert _rel(Interpreter(g).run(ids)[0], ref) < 1e-5
    assert _rel(Interpreter(g).run(ids[:1].repeat(3, 1))[0], ref3) < 1e-5


class UsesFFT(nn.Module):
    def forward(self, x):
        return torch.fft.rfft(x).abs()  # the line the error must point at


def test_unsupported_op_names_op_and_source_line():
    with pytest.raises(qcompile.UnsupportedOpError) as e:
        qcompile.capture(UsesFFT(), (torch.randn(2, 16),))
    msg = str(e.value)
    assert "_fft_r2c" in msg
    assert "test_pytorch.py:" in msg and "torch.fft.rfft(x)" in msg


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_untraceable_model_raises_capture_error_with_both_reasons():
    with pytest.raises(qcompile.CaptureError) as e:
        with pytest.warns(UserWarning, match="falling back"):
            qcompile.capture(DataDependent(), (torch.randn(3),))
    assert "symbolic_trace" in str(e.value) and "torch.export failed" in str(e.value)


def test_training_batch_norm_is_put_in_eval_and_restored():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    g = qcompile.capture(model, (torch.randn(2, 1, 5, 5),))
    assert model.training and "batch_norm" in g.op_histogram()


def test_numpy_inputs_and_errors_at_run_time():
    model, (x,), dyn = mlp()
    cm = qcompile.compile(model, example_inputs=(x,), dynamic_shapes=dyn)
    out = cm(x.numpy())
    assert np.allclose(out.numpy(), model(x).detach().numpy(), atol=1e-6)
    with pytest.raises(qcompile.InputError) as e:
        cm(torch.randn(4, 63))
    assert "input" in str(e.value) and "[4, 63]" in str(e.value) and "[batch, 64]" in str(e.value)
