"""compile(model, config=..., calibration=...): the pipeline a QuantConfig asks for, its errors,
and quantized artifacts that save and load."""
from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.config import QuantConfig
from qcompile.errors import ConfigError
from qcompile.passes.pipeline import quantization_pipeline


def test_pipeline_for_configs():
    names, _ = quantization_pipeline(QuantConfig(), None)
    assert names == ["quantize_weights", "quantize_activations"]
    names, opts = quantization_pipeline(QuantConfig(smoothquant=0.5, algorithm="gptq"), [1])
    assert names == ["calibrate", "smoothquant", "calibrate", "quantize_weights",
                     "quantize_activations"]
    assert opts["calibrate"]["hessian"] is True
    with pytest.raises(ConfigError, match="calibration data"):
        quantization_pipeline(QuantConfig(algorithm="awq"), None)
    names, opts = quantization_pipeline(QuantConfig(rotation="pca", activations="int4"), [1])
    assert names == ["fold_norms", "calibrate", "rotate", "quantize_weights",
                     "quantize_activations"]
    assert opts["calibrate"]["hessian"] and opts["rotate"]["kind"] == "pca"
    high = opts["quantize_weights"]["config"].layer("m", "w.resq_high")
    assert (high.weights, high.activations, high.group_size) == ("int8", "int8", None)
    with pytest.raises(ConfigError, match="rotation='pca'"):
        quantization_pipeline(QuantConfig(rotation="pca"), None)


def test_compile_quantized_end_to_end(tiny_mlp, tmp_path):
    x = torch.randn(4, 8)
    cal = [torch.randn(4, 8) for _ in range(3)]
    toml = tmp_path / "q.toml"
    toml.write_text('weights = "int4"\ngroup_size = 8\nactivations = "int8"\n')
    cm = qcompile.compile(tiny_mlp, "reference", example_inputs=(x,), config=toml,
                          calibration=cal)
    layers = cm.summary()["layers"]
    assert [ly["format"] for ly in layers] == ["int4 per_group(axis=1, g=8)"] * 2
    assert all(ly["activations"] == "int8 per_token(axis=-1)" for ly in layers)
    assert "quantize_s" in cm.timings
    y = cm(x)
    with torch.no_grad():
        ref = tiny_mlp(x)
    assert 0 < float((y - ref).norm() / ref.norm()) < 0.2
    cm.save(tmp_path / "art")
    back = qcompile.load(tmp_path / "art")
    assert torch.equal(back(x), y)
    assert back.summary()["layers"] == layers


def test_compile_errors(tiny_mlp):
    x = torch.randn(2, 8)
    with pytest.raises(ConfigError, match="without a quantization config"):
        qcompile.compile(tiny_mlp, example_inputs=(x,), calibration=[x])
    with pytest.raises(ConfigError, match="calibration set is empty"):
        qcompile.compile(tiny_mlp, example_inputs=(x,), config=QuantConfig(algorithm="gptq"),
                         calibration=[])
    with pytest.raises(ConfigError, match="unknown numeric format"):
        qcompile.compile(tiny_mlp, example_inputs=(x,), config={"weights": "int17"})
    with pytest.raises(ConfigError, match="algorithm"):
        qcompile.compile(tiny_mlp, example_inputs=(x,), config={"algorithm": "magic"})


def test_rotated_quantized_llama_saves_and_loads(tmp_path):
    from qcompile import zoo
    model, ex, dyn = zoo.tiny_llama(batch=2, seq=8, hidden=64, layers=1, heads=4, kv_heads=2)
    gen = torch.Generator().manual_seed(4)
    cal = [(torch.randint(0, 1000, (2, 8), generator=gen),) for _ in range(3)]
    cfg = QuantConfig(weights="int4", group_size=None, activations="int4", rotation="pca",
                      kv_cache="int8")
    cm = qcompile.compile(model, "reference", example_inputs=ex, dynamic_shapes=dyn, config=cfg,
                          calibration=cal)
    assert {"hadamard", "slice"} <= set(cm.graph.op_histogram())
    layers = cm.summary()["layers"]
    assert any("int8" in ly["format"] for ly in layers) and any("int4" in ly["format"] for ly in layers)
    x = torch.randint(0, 1000, (3, 8))  # another batch size: the batch stays symbolic
    y = cm(x)
    with torch.no_grad():
        ref = model(x)
    assert 0 < float((y - ref).norm() / ref.norm()) < 0.5
    cm.save(tmp_path / "art")
    assert torch.equal(qcompile.load(tmp_path / "art")(x), y)
