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


# -- saving loses nothing ---------------------------------------------------------------------
def _leftovers(parent: Path, keep: set[str]) -> list[str]:
    """Entries of ``parent`` besides ``keep``: temporary or set-aside directories left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def test_save_refuses_to_replace_a_file(compiled, tmp_path):
    cm, x = compiled
    f = tmp_path / "art"
    f.write_text("my notes")
    with pytest.raises(ArtifactError, match="exists and is a file") as ei:
        cm.save(f)
    assert "overwrite=True" in str(ei.value) and "--force" in str(ei.value)
    assert f.read_text() == "my notes" and _leftovers(tmp_path, {"art"}) == []
    cm.save(f, overwrite=True)
    assert torch.equal(qcompile.load(f)(x), cm(x)) and _leftovers(tmp_path, {"art"}) == []


def test_save_refuses_a_foreign_directory_but_uses_an_empty_one(compiled, tmp_path):
    cm, x = compiled
    d = tmp_path / "data"
    d.mkdir()
    (d / "results.csv").write_text("1,2,3\n")
    (d / "manifest.json").write_text('{"name": "not ours"}')  # a manifest, but not qcompile's
    with pytest.raises(ArtifactError, match="non-empty directory that is not a qcompile artifact"):
        cm.save(d)
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "results.csv"]
    assert _leftovers(tmp_path, {"data"}) == []
    cm.save(d, overwrite=True)
    assert sorted(p.name for p in d.iterdir()) == ["graph.json", "manifest.json",
                                                   "params.safetensors"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert torch.equal(qcompile.load(cm.save(empty))(x), cm(x))
    assert _leftovers(tmp_path, {"data", "empty"}) == []


def test_replacing_an_artifact_needs_no_overwrite(compiled, tmp_path, mlp_graph):
    cm, x = compiled
    d = cm.save(tmp_path / "art")
    other = qcompile.compile(mlp_graph)
    assert qcompile.runtime.is_artifact(d)
    other.save(d)  # an artifact is what save() writes, so replacing one loses nothing
    assert qcompile.load(d).graph.name == "mlp" and _leftovers(tmp_path, {"art"}) == []
    (d / "notes.txt").write_text("benchmarked on host A")  # not the artifact's: kept
    with pytest.raises(ArtifactError, match="artifact that also holds files it does not list "
                                            r"\(notes.txt\)"):
        cm.save(d)
    assert (d / "notes.txt").read_text() == "benchmarked on host A"


def test_interrupted_replace_keeps_the_old_artifact_byte_identical(compiled, tmp_path,
                                                                   monkeypatch):
    """The backend fails half way through writing the new artifact's files."""
    from qcompile.backends import get_backend
    cm, x = compiled
    d = cm.save(tmp_path / "art")
    before = _files(d)

    def fail(executable):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(get_backend("reference"), "artifacts", fail)
    with pytest.raises(ArtifactError, match="cannot write the artifact .*No space left"):
        cm.save(d)
    assert _files(d) == before and _leftovers(tmp_path, {"art"}) == []
    assert torch.equal(qcompile.load(d)(x), cm(x))


def test_a_failed_final_rename_restores_the_old_artifact(compiled, tmp_path, monkeypatch):
    """The old artifact is set aside, then the new one cannot be renamed into place: the old
    one is renamed back, whole."""
    import os
    cm, x = compiled
    d = cm.save(tmp_path / "art")
    before = _files(d)
    real = os.rename

    def rename(src, dst):
        if ".tmp-" in Path(src).name:  # the complete new artifact moving into place
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        cm.save(d)
    monkeypatch.undo()
    assert _files(d) == before and _leftovers(tmp_path, {"art"}) == []
    assert torch.equal(qcompile.load(d)(x), cm(x))


def test_unwritable_parent_is_a_clear_error(compiled, tmp_path, monkeypatch):
    """Simulated (tests may run as root, where a read-only mode does not stop writes): the
    permission check up front, and the temporary directory failing to be made."""
    import os
    import tempfile
    cm, _ = compiled
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path
                        else real_access(p, mode))
    with pytest.raises(ArtifactError, match="cannot write the artifact .*Permission denied") as ei:
        cm.save(tmp_path / "art")
    assert f"make {tmp_path} writable" in str(ei.value)
    monkeypatch.setattr(os, "access", real_access)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(ArtifactError, match="cannot write the artifact .*Permission denied"):
        cm.save(tmp_path / "sub" / "art")
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "sub"])  # nothing but the parent


def test_check_destination_refuses_before_writing(tmp_path):
    from qcompile.runtime import check_destination
    assert check_destination(tmp_path / "new" / "art") == (tmp_path / "new" / "art").resolve()
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArtifactError, match="is not a directory"):
        check_destination(tmp_path / "f" / "art")
    assert check_destination(tmp_path / "f", overwrite=True) == (tmp_path / "f").resolve()


# -- the instruction set an artifact needs --------------------------------------------------
def test_manifest_isa_is_checked_before_any_code_loads(saved, monkeypatch):
    """A manifest's ``isa`` features must all be allowed here; checked from the manifest alone
    (the reference target records none, so one is written in)."""
    d, calls = saved
    _edit_manifest(d, lambda m: m.__setitem__("isa", {"level": "amx",
                                                      "features": ["avx2", "made-up-ext"]}))
    monkeypatch.delenv("QCOMPILE_ISA", raising=False)
    with pytest.raises(ArtifactError, match="level amx .* does not allow: made-up-ext") as ei:
        qcompile.load(d)
    msg = str(ei.value)
    assert "qcompile build MODEL --target reference -o" in msg and "QCOMPILE_ISA=" in msg
    assert calls == []
    _edit_manifest(d, lambda m: m.__setitem__("isa", ["avx2"]))
    with pytest.raises(ArtifactError, match="corrupt: 'isa'"):
        qcompile.load(d)


def _tvm_mlp(tiny_mlp):
    pytest.importorskip("tvm")
    x = torch.randn(3, 8)
    return qcompile.compile(tiny_mlp, "cpu", example_inputs=(x,)), x


def test_cpu_artifact_refused_under_a_lower_isa_cap(tiny_mlp, tmp_path, monkeypatch):
    from qcompile import isa
    from qcompile.backends import get_backend
    monkeypatch.delenv(isa.ENV, raising=False)
    if isa.host_level() == "generic":
        pytest.skip("the host is at level generic: no cap can hide anything")
    cm, x = _tvm_mlp(tiny_mlp)
    assert cm.isa["level"] == isa.host_level() and "avx2" in cm.isa["features"]
    assert cm.summary()["isa"] == isa.host_level()
    d = cm.save(tmp_path / "art")
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["isa"] == cm.isa
    loads = []
    backend = get_backend("cpu")
    real = backend.load
    monkeypatch.setattr(backend, "load", lambda *a: loads.append(a) or real(*a))
    monkeypatch.setenv(isa.ENV, "generic")
    with pytest.raises(ArtifactError, match="does not allow: .*avx2") as ei:
        qcompile.load(d)
    msg = str(ei.value)
    assert f"built for instruction-set level {isa.host_level()}" in msg
    assert "QCOMPILE_ISA=generic hides them" in msg and "unset QCOMPILE_ISA" in msg
    assert "qcompile build MODEL --target cpu -o" in msg and loads == []
    monkeypatch.delenv(isa.ENV)
    back = qcompile.load(d)
    assert back.isa == cm.isa and torch.allclose(back(x), cm(x), atol=1e-6)
    again = back.save(tmp_path / "again")  # a loaded model keeps the record when re-saved
    assert json.loads((again / "manifest.json").read_text())["isa"] == cm.isa
    assert _files(again) == _files(d)  # its compiled files copied as loaded: byte-identical


def test_cpu_artifact_built_under_a_cap_loads_without_it(tiny_mlp, tmp_path, monkeypatch):
    from qcompile import isa
    if "avx2" not in isa.supported_levels():
        pytest.skip("the host has no AVX2")
    monkeypatch.setenv(isa.ENV, "avx2")
    cm, x = _tvm_mlp(tiny_mlp)
    d = cm.save(tmp_path / "art")
    rec = json.loads((d / "manifest.json").read_text())["isa"]
    assert rec["level"] == "avx2" and "avx2" in rec["features"]
    assert not [f for f in rec["features"] if isa.feature_level(f) in ("avx512", "amx")]
    monkeypatch.delenv(isa.ENV)
    back = qcompile.load(d)
    assert back.isa["level"] == "avx2" and torch.allclose(back(x), cm(x), atol=1e-6)
