"""rotate: the rotated float model equals the original (tiny Llama with and without grouped
KV heads, MiniLM's post-LN stream online, a pre-LN LayerNorm stream centred), structure per
site, ResQ's basis and its 4/8-bit error ordering, outlier suppression, and bad input."""
from __future__ import annotations

import pytest
import torch

from qcompile import formats, zoo
from qcompile.config import QuantConfig
from qcompile.corpus import CALIBRATION, EVALUATION
from qcompile.errors import ConfigError, PassError
from qcompile.hadamard import hadamard_matrix
from qcompile.interpreter import Interpreter
from qcompile.ir import Graph, TensorType
from qcompile.passes import run_passes
from qcompile.passes.pipeline import quantize_graph
from qcompile.passes.rotate import pca_basis, pca_rotation, random_orthogonal


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _rotated(graph, kind="hadamard"):
    return run_passes(graph.clone(), ["fold_norms", "rotate"], options={"rotate": {"kind": kind}})


@pytest.fixture(scope="module")
def llama_mha():
    from qcompile import capture
    model, ex = zoo.tiny_llama(batch=2, seq=12, hidden=64, layers=2, heads=4, kv_heads=4)[:2]
    return capture(model, tuple(ex)), list(ex)


@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("which", ["gqa", "mha"])
def test_llama_r1_to_r4_keeps_the_float_model(llama_graph, llama_mha, which, kind):
    graph, xs = llama_graph if which == "gqa" else llama_mha
    ref = Interpreter(graph).run(*xs)[0]
    g = _rotated(graph, kind)
    assert _rel(Interpreter(g).run(*xs)[0], ref) < 1e-5
    rep = g.meta["rotate"]
    assert rep["r1_fused"] == ["5 norms, width 64"] and not rep["r1_online"]
    assert len(rep["r2"]) == len(rep["r3"]) == len(rep["r4"]) == 2
    # online ops: Q and K after rotary (R3) and the down projection's input (R4), per layer
    assert g.op_histogram()["hadamard"] == 6
    rot = [n for n in g.nodes if n.op == "hadamard"]
    assert {n.inputs[0].producer.op for n in rot} == {"rotary", "mul"}


def test_llama_rotation_spreads_weight_outliers(llama_graph):
    """Incoherence max|W|·√(mn)/‖W‖_F falls after R1 (QuaRot §3)."""
    graph, _ = llama_graph
    g = _rotated(graph)
    inco = lambda w: float(w.abs().max() * w.numel() ** 0.5 / w.norm())
    before = run_passes(graph.clone(), ["fold_norms"])
    q0 = next(n for n in before.nodes if n.op == "linear")
    q1 = next(n for n in g.nodes if n.op == "linear")
    assert inco(g.constants[q1.inputs[1].name]) < inco(before.constants[q0.inputs[1].name])


def test_minilm_post_ln_rotates_online(minilm_graph):
    graph, xs = minilm_graph
    ref = Interpreter(graph).run(*xs)
    g = _rotated(graph)
    out = Interpreter(g).run(*xs)
    assert max(_rel(a, b) for a, b in zip(out, ref)) < 1e-5
    rep = g.meta["rotate"]
    # six layers: embeddings LN → q/k/v, attention LN → intermediate, for every layer
    assert not rep["r1_fused"] and len(rep["r1_online"]) == 12
    assert len(rep["r2"]) == len(rep["r3"]) == len(rep["r4"]) == 6
    sizes = sorted({n.attrs["size"] for n in g.nodes if n.op == "hadamard"})
    assert sizes == [384, 1536]  # 12·32 and 12·128: Kronecker with the order-12 Paley matrix
    # why the streams did not fuse: the post-LN residual reads each norm output through γ
    assert sum("is read by" in why and "(op mul" in why for why in rep["skipped"]) == 12


def _pre_ln(d=32, vocab=50, seq=8) -> Graph:
    """A pre-LN LayerNorm transformer MLP stack (GPT-2 style), the final norm also an output."""
    gen = torch.Generator().manual_seed(7)
    r = lambda *s, k=1.0: g.add_constant("c", torch.randn(*s, generator=gen) * k)
    g = Graph("pre_ln")
    ids = g.add_input("ids", TensorType(("b", seq), "int64"))
    h = g.add("add", g.add("embedding", r(vocab, d), ids), r(1, seq, d, k=0.1))
    for i in range(2):
        gamma = g.add_constant("gamma", torch.rand(d, generator=gen) + 0.5)
        n = g.add("layer_norm", h, gamma, r(d, k=0.1), name=f"ln{i}")
        up = g.add("linear", n, r(4 * d, d, k=d ** -0.5), r(4 * d, k=0.1), name=f"up{i}")
        down = g.add("linear", g.add("gelu", up), r(d, 4 * d, k=0.1), r(d, k=0.1), name=f"down{i}")
        h = g.add("add", h, down)
    nf = g.add("layer_norm", h, name="ln_f")
    g.outputs = [g.add("linear", nf, r(vocab, d, k=d ** -0.5), name="head"), nf]
    return g


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_pre_ln_layernorm_stream_is_centred_and_fused(kind):
    graph = _pre_ln()
    ids = torch.randint(0, 50, (3, 8))
    ref = Interpreter(graph).run(ids)
    g = _rotated(graph, kind)
    out = Interpreter(g).run(ids)
    assert max(_rel(a, b) for a, b in zip(out, ref)) < 1e-5
    assert g.meta["rotate"]["r1_fused"] == ["3 norms, width 32, centred"]
    hist = g.op_histogram()
    assert "layer_norm" not in hist and hist["rms_norm"] == 3
    assert g.outputs[1].producer.op == "matmul"  # the stream is rotated back where it leaves
    assert g.meta["rotate"]["r4"] == ["down0", "down1"]


def test_without_fold_norms_the_stream_goes_online(llama_graph):
    graph, xs = llama_graph
    ref = Interpreter(graph).run(*xs)[0]
    g = run_passes(graph.clone(), ["rotate"])
    assert _rel(Interpreter(g).run(*xs)[0], ref) < 1e-5
    rep = g.meta["rotate"]
    assert not rep["r1_fused"] and rep["r1_online"]
    assert "fold_norms" in " ".join(rep["skipped"])


def test_pca_basis_diagonalises_the_covariance():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=gen, dtype=torch.float64) @ torch.randn(32, 32, generator=gen,
                                                                                   dtype=torch.float64)
    cov = x.T @ x / x.shape[0]
    u = pca_basis(cov)
    d = u.T @ cov @ u
    off = d - torch.diag(torch.diagonal(d))
    assert float(off.abs().max()) < 1e-9 * float(d.abs().max())
    assert torch.all(torch.diff(torch.diagonal(d)) >= 0)  # ascending: the top subspace is last
    r = pca_rotation(cov, 4, seed=1)
    torch.testing.assert_close(r.T @ r, torch.eye(32, dtype=torch.float64))
    # the last 4 coordinates of x·R span the top-4 eigenvectors
    top = u[:, -4:]
    torch.testing.assert_close(top @ top.T, r[:, -4:] @ r[:, -4:].T)


def _split_error(x, r, high, lo="int4", hi="int8"):
    """Relative error of per-token quantization of x·R with the last ``high`` coordinates in
    ``hi`` and the rest in ``lo`` (ResQ's mixed precision)."""
    y = x @ r
    d = y.shape[1]
    q = torch.cat([formats.get(lo, granularity="per_token").fake_quant(y[:, :d - high]),
                   formats.get(hi, granularity="per_token").fake_quant(y[:, d - high:])], 1)
    return float((q @ r.T - x).norm() / x.norm())


def test_resq_mixed_precision_error_ordering():
    gen = torch.Generator().manual_seed(3)
    d, high = 128, 16
    spectrum = torch.logspace(0, -2, d, dtype=torch.float64)  # a few directions dominate
    basis = random_orthogonal(d, 5)
    x = (torch.randn(2048, d, generator=gen, dtype=torch.float64) * spectrum.sqrt()) @ basis.T
    x = x.float()
    cov = x.double().T @ x.double() / x.shape[0]
    pca = pca_rotation(cov, high, seed=0).float()
    rnd = random_orthogonal(d, 9).float()
    e_pca = _split_error(x, pca, high)
    e_rnd = _split_error(x, rnd, high)
    e4 = _split_error(x, pca, high, hi="int4")
    e8 = _split_error(x, pca, high, lo="int8")
    assert e8 < e_pca < e4 and e_pca < 0.8 * e_rnd, (e8, e_pca, e_rnd, e4)


def test_hadamard_suppresses_activation_outliers():
    """512×1024 Gaussian activations with 4 channels ×50: per-token INT4 error falls ≥ 2×
    after a Hadamard rotation (reference/passes.md §1.5: 0.31 → 0.099)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1024, generator=gen)
    x[:, [3, 100, 500, 900]] *= 50
    fmt = formats.get("int4", granularity="per_token")
    h = hadamard_matrix(1024).float()
    plain = float((fmt.fake_quant(x) - x).norm() / x.norm())
    rotated = float((fmt.fake_quant(x @ h) @ h.T - x).norm() / x.norm())
    assert rotated < plain / 2, (plain, rotated)


@pytest.mark.slow
def test_w4a4_rotation_beats_none_on_minilm(minilm_graph):
    graph, _ = minilm_graph
    cal = zoo.minilm_batches(CALIBRATION[:16], batch=2, seq=24)
    ev = zoo.minilm_batches(EVALUATION[:8], batch=2, seq=24)
    names = [v.name for v in graph.inputs]
    refs = [Interpreter(graph).run(*[b[n] for n in names])[0] for b in ev]

    def cosine(rotation):
        cfg = QuantConfig(weights="int4", group_size=None, activations="int4", rotation=rotation)
        g, _ = quantize_graph(graph.clone(), cfg, cal, progress=False)
        cs = []
        for b, r in zip(ev, refs):
            y = Interpreter(g).run(*[b[n] for n in names])[0]
            m = b["attention_mask"].bool()
            cs.append(torch.nn.functional.cosine_similarity(y[m], r[m], dim=-1))
        return float(torch.cat(cs).mean())

    none, had, pca = cosine(None), cosine("hadamard"), cosine("pca")
    assert had > none + 0.08 and pca > none + 0.08, (none, had, pca)  # measured 0.66 / 0.85 / 0.88


def test_pca_splits_readers_into_high_and_low(llama_graph):
    graph, xs = llama_graph
    gen = torch.Generator().manual_seed(1)
    cal = [(torch.randint(0, 1000, (2, 12), generator=gen),) for _ in range(4)]
    ref = Interpreter(graph).run(*xs)[0]
    g = run_passes(graph.clone(), ["fold_norms", "calibrate", "rotate"],
                   options={"calibrate": {"data": cal, "hessian": True, "progress": False},
                            "rotate": {"kind": "pca"}})
    assert _rel(Interpreter(g).run(*xs)[0], ref) < 1e-5
    high = [n for n in g.nodes if n.op == "linear" and ".resq_high" in n.inputs[1].name]
    # q, k, v, gate, up per layer and the lm_head read the stream; 64/8 = 8 high coordinates
    assert len(high) == 11 and all(n.inputs[1].type.shape[-1] == 8 for n in high)
    cfg = QuantConfig(weights="int4", group_size=None, activations="int4", rotation="pca")
    gq, _ = quantize_graph(graph.clone(), cfg, cal, progress=False)
    fmts = {(".resq_high" in n.inputs[1].name, n.inputs[1].quant.format)
            for n in gq.nodes if n.op == "linear" and n.inputs[1].quant is not None}
    assert fmts == {(True, "int8"), (False, "int4")}


def test_bad_input(mlp_graph, llama_graph):
    with pytest.raises(PassError, match="no residual stream.*no LayerNorm/RMSNorm"):
        run_passes(mlp_graph.clone(), ["rotate"])
    with pytest.raises(PassError, match="unknown rotation kind"):
        run_passes(llama_graph[0].clone(), ["rotate"], options={"rotate": {"kind": "fourier"}})
    with pytest.raises(PassError, match="needs the calibration covariance"):
        _rotated(llama_graph[0], "pca")
    with pytest.raises(ConfigError, match="resq"):
        QuantConfig(rotation="pca", resq={"bits": 8})
    with pytest.raises(ConfigError, match="fraction"):
        QuantConfig(rotation="pca", resq={"fraction": 1.5})
