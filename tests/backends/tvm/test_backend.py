"""The TVM backend end to end: models for ``cpu`` against the interpreter in fp32, W8A8 and
W4A16; the CUDA build of MiniLM (source inspected); artifacts; and the bad paths."""
from __future__ import annotations

import json

import pytest
import torch

tvm = pytest.importorskip("tvm")

import qcompile  # noqa: E402
from qcompile import zoo  # noqa: E402
from qcompile.config import QuantConfig  # noqa: E402
from qcompile.errors import ArtifactError, BackendError  # noqa: E402
from qcompile.interpreter import Interpreter  # noqa: E402

W8A8 = QuantConfig(weights="int8", group_size=None, activations="int8")
W4A16 = QuantConfig(weights="int4", group_size=32)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def llama():
    model, ex, dyn = zoo.tiny_llama(batch=2, seq=8, hidden=64, layers=2, heads=4, kv_heads=2)
    gen = torch.Generator().manual_seed(1)
    cal = [(torch.randint(0, 1000, (2, 8), generator=gen),) for _ in range(2)]
    return model, ex, dyn, cal


@pytest.mark.parametrize("config", [None, W8A8, W4A16], ids=["fp32", "w8a8", "w4a16"])
def test_tiny_llama_matches_the_interpreter(llama, config):
    model, ex, dyn, cal = llama
    cm = qcompile.compile(model, "cpu", example_inputs=ex, dynamic_shapes=dyn, config=config,
                          calibration=cal if config else None)
    x = torch.randint(0, 1000, (3, 8))  # another batch size than captured
    ref = Interpreter(cm.graph).run(x)[0]
    # fp32: rounding only; quantized: a value on a rounding tie may land one step away
    assert _rel(cm(x), ref) < (1e-5 if config is None else 2e-3)


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).mean())


def test_minilm_and_digits_cnn_match_the_interpreter():
    model, ex, dyn = zoo.minilm(batch=2, seq=16)
    with torch.no_grad():
        fp32 = model(**ex).last_hidden_state
    cm = qcompile.compile(model, "cpu", example_inputs=ex, dynamic_shapes=dyn)
    ref = Interpreter(cm.graph).run(*ex.values())
    assert max(_rel(a, b) for a, b in zip(cm(**ex), ref)) < 1e-5
    # W8A8 through six layers: a code that flips on a rounding tie (fp32 sums in another order)
    # moves everything after it, so the two implementations agree in quality, not bit for bit
    cm = qcompile.compile(model, "cpu", example_inputs=ex, dynamic_shapes=dyn, config=W8A8,
                          calibration=[ex])
    ref = Interpreter(cm.graph).run(*ex.values())[0]
    assert abs(_cos(cm(**ex)[0], fp32) - _cos(ref, fp32)) < 2e-3  # measured 7e-5
    cm = qcompile.compile(model, "cpu", example_inputs=ex, dynamic_shapes=dyn, config=W4A16)
    assert cm._exec.report.get("linear.w4", 0) == 37  # every linear (and the pooler) on int4
    ref = Interpreter(cm.graph).run(*ex.values())
    assert max(_rel(a, b) for a, b in zip(cm(**ex), ref)) < 1e-5
    cnn, images, _, _ = zoo.digits_cnn(epochs=1)
    dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    for config in (None, W8A8, W4A16):
        cm = qcompile.compile(cnn, "cpu", example_inputs=(images[:8],), dynamic_shapes=dyn,
                              config=config, calibration=[(images[:8],)] if config else None)
        ref = Interpreter(cm.graph).run(images)[0]
        assert _rel(cm(images), ref) < (2e-3 if config is W8A8 else 1e-5)


def test_a_quantized_linear_matches_to_rounding():
    """One W8A8 linear: the same input codes on both sides, so only fp32 sums differ."""
    from qcompile.backends.tvm import TVMExecutable, build
    from qcompile.passes.pipeline import quantize_graph
    model = torch.nn.Sequential(torch.nn.Linear(96, 40)).eval()
    x = torch.randn(5, 96)
    g = qcompile.capture(model, (x,))
    g, _ = quantize_graph(g, W8A8, [(x,)], progress=False)
    ex, params, _ = build(g, "cpu")
    out, ref = TVMExecutable(g, "cpu", ex, params)(x)[0], Interpreter(g).run(x)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_artifact_round_trip_tamper_and_determinism(tmp_path):
    model, ex, dyn = zoo.mlp()
    cm = qcompile.compile(model, "cpu", example_inputs=ex, dynamic_shapes=dyn)
    a, b = cm.save(tmp_path / "a"), qcompile.compile(model, "cpu", example_inputs=ex,
                                                     dynamic_shapes=dyn).save(tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    assert {"model.so", "tvm_params.safetensors", "graph.json", "manifest.json"} <= set(files)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)  # same bytes twice
    x = torch.randn(7, 64)
    back = qcompile.load(a)
    assert back.target == "cpu" and torch.equal(back(x), cm(x))
    lib = bytearray((b / "model.so").read_bytes())
    lib[len(lib) // 2] ^= 0xFF
    (b / "model.so").write_bytes(bytes(lib))
    with pytest.raises(ArtifactError, match="model.so.*SHA-256"):
        qcompile.load(b)
    m = json.loads((a / "manifest.json").read_text())
    m["versions"]["tvm"] = "0.1"
    (a / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="built with tvm 0.1"):
        qcompile.load(a)


def _cuda_source(ex) -> str:
    todo, out = [ex.mod], []
    while todo:
        m = todo.pop()
        if m.kind == "cuda":
            out.append(m.inspect_source())
        todo += list(m.imports)
    return "\n".join(out)


def test_cuda_build_of_minilm_here():
    from qcompile.backends.tvm import build
    model, ex, dyn = zoo.minilm(batch=2, seq=16)
    g = qcompile.capture(model, ex, dynamic_shapes=dyn)
    built, _, _ = build(g, "cuda")
    src = _cuda_source(built)
    assert "__global__" in src and "threadIdx.x" in src


@pytest.mark.gpu
def test_cuda_runs_where_a_gpu_is():
    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU on this machine")
    model, ex, dyn = zoo.mlp()
    cm = qcompile.compile(model, "cuda", example_inputs=ex, dynamic_shapes=dyn)
    x = torch.randn(5, 64)
    assert _rel(cm(x), Interpreter(cm.graph).run(x)[0]) < 1e-5


def test_bad_paths(monkeypatch):
    from qcompile.backends.tvm import lower
    model, ex, dyn = zoo.mlp()
    monkeypatch.delitem(lower.LOWERINGS, "linear")
    with pytest.raises(BackendError, match=r"no lowering for op .linear.*\n.*at node"):
        qcompile.compile(model, "cpu", example_inputs=ex, dynamic_shapes=dyn)
    monkeypatch.undo()
    if not tvm.cuda(0).exist:
        cm = qcompile.compile(model, "cuda", example_inputs=ex, dynamic_shapes=dyn)
        with pytest.raises(BackendError, match="needs a CUDA GPU at run time"):
            cm(torch.randn(2, 64))
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(BackendError, match="needs nvcc"):
        qcompile.compile(model, "cuda", example_inputs=ex, dynamic_shapes=dyn)
    cross = qcompile.compile(model, "cpu-aarch64", example_inputs=ex, dynamic_shapes=dyn)
    with pytest.raises(BackendError, match="cross build"):
        cross(torch.randn(2, 64))


def test_gpu_dequant_matmul_decodes_exactly_and_builds_for_cuda():
    """The CUDA lowering of integer weights (packed words decoded inside the matmul): its math
    checked by building the same Relax module for the CPU, its CUDA build inspected."""
    from tvm import relax

    from qcompile.backends.tvm import TVMExecutable, build
    from qcompile.backends.tvm.lower import lower_graph
    from qcompile.backends.tvm.schedule import schedule_cpu_module
    from qcompile.backends.tvm.target import cpu_target
    from qcompile.passes.pipeline import quantize_graph
    model, ex, dyn = zoo.tiny_llama(batch=2, seq=8, hidden=64, layers=1, heads=4, kv_heads=2)
    g = qcompile.capture(model, ex, dynamic_shapes=dyn)
    for cfg in (W4A16, QuantConfig(weights="uint3", group_size=16)):
        gq, _ = quantize_graph(g.clone(), cfg, None, progress=False)
        mod, params, low = lower_graph(gq, None)  # no CPU info: the GPU lowering
        assert low.report["linear.gpu_dequant"] == 8
        tgt = cpu_target()
        with tgt:
            mod = tvm.transform.Sequential([relax.transform.LegalizeOps(),
                                            relax.transform.AnnotateTIROpPattern(),
                                            relax.transform.FuseOps(),
                                            relax.transform.FuseTIR()])(mod)
        ex_cpu = tvm.compile(schedule_cpu_module(mod, tgt, None), target=tgt)
        x = torch.randint(0, 1000, (3, 8))
        out = TVMExecutable(gq, "cpu", ex_cpu, params)(x)[0]
        assert _rel(out, Interpreter(gq).run(x)[0]) < 1e-5
    gq, _ = quantize_graph(g.clone(), W4A16, None, progress=False)
    built, _, _ = build(gq, "cuda")
    src = _cuda_source(built)
    assert "dequant_w4_matmul" in src and ">>" in src
