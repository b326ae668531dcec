"""CompiledModel: calling conventions, summary, and artifacts that save deterministically and
atomically and refuse to load when tampered with."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import qcompile
import qcompile.runtime
from qcompile.errors import ArtifactError, InputError


@pytest.fixture
def compiled(tiny_mlp):
    x = torch.randn(3, 8)
    return qcompile.compile(tiny_mlp, example_inputs=(x,)), x


def test_call_with_torch_numpy_and_names(compiled, tiny_mlp):
    cm, x = compiled
    ref = tiny_mlp(x).detach()
    y = cm(x)
    assert isinstance(y, torch.Tensor) and not y.requires_grad
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    assert torch.equal(cm(x.numpy()), y)
    (name,) = cm.input_names
    assert torch.equal(cm(**{name: x}), y)
    assert torch.equal(cm.run(x)[0], y)
    with pytest.raises(InputError, match="unknown input name"):
        cm(nope=x)
    with pytest.raises(InputError):
        cm(torch.randn(4, 8))  # captured without dynamic shapes: the batch is static


def test_summary_lists_layers(compiled):
    cm, _ = compiled
    s = cm.summary()
    assert s["target"] == "reference" and s["nodes"] == 3
    assert s["parameters"] == 8 * 16 + 16 + 16 * 4 + 4
    assert s["ops"] == {"linear": 2, "relu": 1}
    layers = s["layers"]
    assert [(la["op"], la["format"], la["target"]) for la in layers] == [
        ("linear", "float32", "reference")] * 2
    assert [la["name"] for la in layers] == [n.name for n in cm.graph.nodes if n.op == "linear"]
    assert "capture_s" in s["timings"] and "lower_s" in s["timings"]


def test_save_load_identical_outputs(compiled, tmp_path):
    cm, x = compiled
    out = cm.save(tmp_path / "art")
    assert out == (tmp_path / "art").resolve()
    assert sorted(p.name for p in out.iterdir()) == ["graph.json", "manifest.json",
                                                     "params.safetensors"]
    back = qcompile.load(out)
    assert back.target == "reference" and back.input_names == cm.input_names
    assert torch.equal(back(x), cm(x))
    assert str(back.graph) == str(cm.graph)


def _files(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_saving_twice_is_byte_identical(compiled, tmp_path):
    cm, _ = compiled
    a = _files(cm.save(tmp_path / "a"))
    b = _files(cm.save(tmp_path / "b"))
    assert a.keys() == b.keys() and len(a) == 3
    for name in a:
        assert a[name] == b[name], name
    again = _files(cm.save(tmp_path / "a"))  # overwriting an artifact in place
    assert again == a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.fixture
def saved(compiled, tmp_path, monkeypatch):
    """A saved artifact, and a record of whether load() got as far as reading the graph."""
    cm, x = compiled
    d = cm.save(tmp_path / "art")
    calls = []
    real = qcompile.runtime.load_graph
    monkeypatch.setattr(qcompile.runtime, "load_graph", lambda p: calls.append(p) or real(p))
    return d, calls


def test_tampered_params_rejected_before_loading(saved):
    d, calls = saved
    p = d / "params.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0x01  # one bit of one weight
    p.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="params.safetensors .* does not match its SHA-256"):
        qcompile.load(d)
    assert calls == []


def _edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_tampered_manifest_hash_rejected(saved):
    d, calls = saved
    _edit_manifest(d, lambda m: m["files"].__setitem__("graph.json", "0" * 64))
    with pytest.raises(ArtifactError, match="graph.json .* does not match"):
        qcompile.load(d)
    assert calls == []


def test_other_torch_version_rejected(saved):
    d, calls = saved
    _edit_manifest(d, lambda m: m["versions"].__setitem__("torch", "1.0.0"))
    with pytest.raises(ArtifactError, match="built with torch 1.0.0") as ei:
        qcompile.load(d)
    assert "rebuild" in str(ei.value) and calls == []


def test_other_manifest_problems_rejected(saved):
    d, _ = saved
    (d / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="differ from the manifest"):
        qcompile.load(d)
    (d / "extra.bin").unlink()
    qcompile.load(d)  # fine again
    (d / "manifest.json").write_text("{")
    with pytest.raises(ArtifactError, match="corrupt"):
        qcompile.load(d)


def test_interrupted_save_leaves_nothing(compiled, tmp_path, monkeypatch):
    cm, _ = compiled

    def fail(graph, directory):
        (Path(directory) / "graph.json").write_text("half")  # something was written already
        raise RuntimeError("disk full")

    monkeypatch.setattr(qcompile.runtime, "save_graph", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        cm.save(tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_artifact(compiled, tmp_path, monkeypatch):
    cm, x = compiled
    d = cm.save(tmp_path / "art")
    before = _files(d)
    monkeypatch.setattr(qcompile.runtime, "save_graph",
                        lambda g, p: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        cm.save(d)
    assert _files(d) == before and [p.name for p in tmp_path.iterdir()] == ["art"]


def test_load_without_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        qcompile.load(tmp_path)
    with pytest.raises(ArtifactError, match="not a qcompile artifact"):
        qcompile.load(tmp_path / "missing")


def test_bfloat16_model_saves_and_loads(tmp_path):
    from qcompile.ir import Graph, TensorType
    g = Graph()
    x = g.add_input("x", TensorType((2, 4), "bfloat16"))
    w = g.add_constant("w", torch.randn(3, 4, dtype=torch.bfloat16))
    g.outputs = [g.add("linear", x, w)]
    cm = qcompile.compile(g)
    xb = torch.randn(2, 4, dtype=torch.bfloat16)
    back = qcompile.load(cm.save(tmp_path / "bf16"))
    assert torch.equal(back(xb), cm(xb)) and back(xb).dtype == torch.bfloat16


def test_numpy_float64_is_accepted(compiled):
    cm, x = compiled
    y = cm(x.numpy().astype(np.float64))
    assert y.dtype == torch.float32 and torch.allclose(y, cm(x), atol=1e-6)
