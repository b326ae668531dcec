"""Quantization quality on a real model: all-MiniLM-L6-v2, qcompile's recipes beside ONNX
Runtime's and torch's dynamic int8, in one run.

Calibration: the 64 sentences of ``qcompile.corpus.CALIBRATION``; evaluation: the 128 disjoint
sentences of ``EVALUATION`` (related pairs among unrelated ones), padded to ``--seq`` tokens.
Each configuration is compiled for the ``reference`` target and compared with the fp32 model:

- token cosine: mean (and 5th percentile) cosine of ``last_hidden_state`` over real tokens;
- sentence cosine: cosine of the mean-pooled, normalised sentence embeddings;
- Spearman: rank correlation of the 8128 pairwise sentence similarities, fp32 against
  quantized (how well a retrieval ranking survives).

Goals from the issues, reported and not asserted: W8A8 token cosine ≥ 0.995; W4A16 GPTQ and
AWQ above RTN; pruning rows (bf16/int8 weights at 50–70% sparsity, the ``amx`` target's
inputs) report token cosine against the dense model, Wanda expected above magnitude.

Section ``onnx``: target ``onnx`` W8A8 (static per-tensor int8 activations, with and without
SmoothQuant), its QDQ file run by ONNX Runtime's CPU EP, beside ORT's ``quantize_static`` (QDQ,
per-channel weights, MinMax) of the fp32 export on the same calibration sentences. Section
``npu``: target ``npu`` W8A16 (its default recipe) on the QNN HTP x86 simulator beside ORT's QNN
recipe (``qnn_preprocess_model`` + ``get_qnn_qdq_config`` u16/u8 per channel + ``quantize``) on
the same EP, at batch 1 and 128 tokens, evaluated on ``--npu-eval`` sentences (16: a simulator
run takes seconds), with HTP placement and QNN's relative L2 to the CPU EP on the same file.
Simulator seconds are never NPU latency. ORT's quantizer gets npu.md §3's graph fixes (finite
mask, no NaN guard, no ``Where``), without which its MinMax scales are NaN.

Prints tables, writes a JSON record (``--out``) and a ``.png`` beside it::

    .venv/bin/python benchmarks/quality.py              # from the repository root, ~5 min
    .venv/bin/python benchmarks/quality.py --quick      # a smoke run: fewer sentences and configs
    .venv/bin/python benchmarks/quality.py --only npu   # one section; the others' rows kept
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import ROOT, machine, provenance, table
from scipy.stats import spearmanr
from tqdm import tqdm

import qcompile
from qcompile import zoo
from qcompile.config import QuantConfig
from qcompile.corpus import CALIBRATION, EVALUATION

W4A4 = dict(weights="int4", group_size=None, activations="int4")  # QuaRot's setting (§5)
CONFIGS = [  # (label, QuantConfig options); the first of each family is also the quick set
    ("W8A8 SmoothQuant α=0.5", dict(weights="int8", group_size=None, activations="int8",
                                    smoothquant=0.5)),
    ("W8A8", dict(weights="int8", group_size=None, activations="int8")),
    ("W4A16-g128 RTN", dict(weights="int4", group_size=128)),
    ("W4A16-g128 GPTQ", dict(weights="int4", group_size=128, algorithm="gptq")),
    ("W4A16-g128 AWQ", dict(weights="int4", group_size=128, algorithm="awq")),
    ("W4A8-g128 GPTQ", dict(weights="int4", group_size=128, activations="int8",
                            algorithm="gptq")),
    ("W4A4 RTN", W4A4),
    ("W4A4 Hadamard RTN", dict(W4A4, rotation="hadamard")),
    ("W4A4 random rotation RTN", dict(W4A4, rotation="random")),
    ("W4A4 Hadamard GPTQ (QuaRot)", dict(W4A4, rotation="hadamard", algorithm="gptq")),
    ("W4A4 ResQ (PCA, 1/8 at 8 bit) RTN", dict(W4A4, rotation="pca")),
    ("W4A4 ResQ (PCA, 1/8 at 8 bit) GPTQ", dict(W4A4, rotation="pca", algorithm="gptq")),
    # pruning (passes/sparsify.py), what target amx runs: bf16 or int8 weights, float activations
    ("bf16, 50% Wanda", dict(weights="bf16", sparsity=0.5, sparsity_method="wanda")),
    ("bf16, 50% magnitude", dict(weights="bf16", sparsity=0.5, sparsity_method="magnitude")),
    ("bf16, 2:4 Wanda", dict(weights="bf16", sparsity=0.5, sparsity_method="2:4")),
    ("bf16, 70% Wanda", dict(weights="bf16", sparsity=0.7, sparsity_method="wanda")),
    ("int8 per channel, 50% Wanda", dict(weights="int8", group_size=None, sparsity=0.5,
                                         sparsity_method="wanda")),
]
QUICK = ("W8A8 SmoothQuant α=0.5", "W4A16-g128 RTN", "W4A16-g128 GPTQ", "W4A4 RTN",
         "W4A4 Hadamard RTN", "bf16, 50% Wanda", "bf16, 50% magnitude")
# target onnx (QDQ file on ONNX Runtime's CPU EP): static per-tensor int8 activations, the
# setting ORT's quantize_static also has
W8A8_STATIC = dict(weights="int8", group_size=None, activations="int8",
                   activation_granularity="per_tensor")
ONNX_CONFIGS = [("onnx W8A8 per-tensor", W8A8_STATIC),
                ("onnx W8A8 per-tensor SmoothQuant α=0.5", dict(W8A8_STATIC, smoothquant=0.5))]
ONNX_BATCH = 8  # the onnx export of MiniLM needs static shapes (see onnx_rows)
# target npu (QNN HTP, x86 simulator): its default recipe, uint16 activations everywhere
NPU_W8A16 = dict(weights="int8", group_size=None, activations="uint16",
                 activation_granularity="per_tensor")
NPU_CONFIGS = [("npu W8A16", NPU_W8A16),
               ("npu W8A16 SmoothQuant α=0.5", dict(NPU_W8A16, smoothquant=0.5))]
NPU_SEQ, NPU_ARCH = 128, 73  # batch 1; v73 is what target 'npu' prepares for
SECTIONS = ("reference", "peers", "onnx", "npu")


# -- metrics ------------------------------------------------------------------------------------
def _pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling over real tokens, then L2 normalisation."""
    m = mask[..., None].to(h.dtype)
    e = (h * m).sum(1) / m.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(e, dim=-1)


def metrics(hidden: list[torch.Tensor], ref: list[torch.Tensor], masks: list[torch.Tensor]) -> dict:
    tok = torch.cat([torch.nn.functional.cosine_similarity(h[m.bool()], r[m.bool()], dim=-1)
                     for h, r, m in zip(hidden, ref, masks)])
    eq = torch.cat([_pool(h, m) for h, m in zip(hidden, masks)]).double()
    er = torch.cat([_pool(r, m) for r, m in zip(ref, masks)]).double()
    iu = torch.triu_indices(len(eq), len(eq), 1)
    sq, sr = (eq @ eq.T)[iu[0], iu[1]], (er @ er.T)[iu[0], iu[1]]
    return {"token_cos": float(tok.mean()), "token_cos_p5": float(tok.quantile(0.05)),
            "sentence_cos": float((eq * er).sum(-1).mean()),
            "spearman": float(spearmanr(sr.numpy(), sq.numpy()).statistic)}


# -- peers --------------------------------------------------------------------------------------
class _Hidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m.eval()

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def export_fp32(model, example: dict, path: Path, *, dynamic_batch: bool = True) -> Path:
    """The TorchScript export every ORT peer quantizes (opset 17, as npu.md §3 measured)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Hidden(model).eval(), (example["input_ids"], example["attention_mask"]),
                          str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"],
                          dynamic_axes={"input_ids": {0: "b"}, "attention_mask": {0: "b"}}
                          if dynamic_batch else None)
    model.eval()  # the TorchScript exporter leaves the module in training mode (dropout on)
    return path


def ort_graph_fixes(src: Path, dst: Path) -> Path:
    """npu.md §3's two fixes ORT's quantizer needs on MiniLM's SDPA export, done the same way
    for every ORT peer: the -inf mask constant becomes -50 (MinMax calibration of -inf gives a
    NaN scale) and the ``IsNaN → Where`` guards after each Softmax go (a finite mask cannot make
    it NaN); every ``Where`` of two float constants becomes ``b + Cast(c)·(a - b)`` (the HTP
    fails to finalize any ``Where``). fp32 outputs are unchanged."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(str(src))
    g = m.graph

    def finite(t):
        a = numpy_helper.to_array(t)
        if a.dtype.kind == "f" and np.isneginf(a).any():
            t.CopyFrom(numpy_helper.from_array(np.where(np.isneginf(a), -50, a).astype(a.dtype),
                                               t.name))
    consts = {}
    for t in g.initializer:
        finite(t)
        consts[t.name] = t
    for n in g.node:
        if n.op_type == "Constant":
            for at in n.attribute:
                if at.name == "value":
                    finite(at.t)
                    consts[n.output[0]] = at.t
    producer = {o: n for n in g.node for o in n.output}
    rename, drop, nodes = {}, set(), []
    for n in g.node:
        p = producer.get(n.input[0]) if n.op_type == "Where" else None
        if p is not None and p.op_type == "IsNaN" and p.input[0] == n.input[2]:
            rename[n.output[0]] = n.input[2]
            drop.add(p.output[0])
    for n in g.node:
        if n.output[0] in drop or n.output[0] in rename:
            continue
        n.input[:] = [rename.get(i, i) for i in n.input]
        a, b = (consts.get(i) for i in n.input[1:3]) if n.op_type == "Where" else (None, None)
        if a is None or b is None or numpy_helper.to_array(a).dtype.kind != "f":
            nodes.append(n)
            continue
        diff = numpy_helper.to_array(a) - numpy_helper.to_array(b)
        d_name, c_name, p_name = (f"{n.name}/{k}" for k in ("a_minus_b", "cast", "scaled"))
        g.initializer.append(numpy_helper.from_array(diff.astype(np.float32), d_name))
        nodes += [helper.make_node("Cast", [n.input[0]], [c_name], name=c_name,
                                   to=onnx.TensorProto.FLOAT),
                  helper.make_node("Mul", [c_name, d_name], [p_name], name=p_name),
                  helper.make_node("Add", [n.input[2], p_name], list(n.output), name=n.name)]
    for o in g.output:
        if o.name in rename:
            raise ValueError(f"graph output {o.name} is a NaN guard")
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(m, str(dst))
    return dst


class _Reader:
    """ORT's ``CalibrationDataReader`` protocol over tokenized batches."""

    def __init__(self, batches):
        self.it = iter([{k: v.numpy() for k, v in b.items()} for b in batches])

    def get_next(self):
        return next(self.it, None)

    def rewind(self):  # the protocol's optional method
        pass


def ort_run(session, batches) -> list[torch.Tensor]:
    return [torch.from_numpy(session.run(None, {k: v.numpy() for k, v in b.items()})[0])
            for b in batches]


def ort_cpu(path: Path, threads: int | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_quantize_static(fp32: Path, out: Path, cal, *, linear_only: bool = False) -> Path:
    """ONNX Runtime's ``quantize_static`` as its docs show it for CPU: QDQ, int8 activations and
    weights (its defaults), per-channel weights, MinMax, on ``ort_graph_fixes`` of the export.
    ``linear_only``: quantize only the MatMuls with a weight (an initializer), which is what
    qcompile's W8A8 quantizes; otherwise every op ORT knows (Add, Softmax, attention MatMuls…)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_static
    fixed = ort_graph_fixes(fp32, out.with_suffix(".fixed.onnx"))
    opts = {}
    if linear_only:
        g = onnx.load(str(fixed)).graph
        inits = {t.name for t in g.initializer}
        opts = dict(op_types_to_quantize=["MatMul"],
                    nodes_to_quantize=[n.name for n in g.node if n.op_type == "MatMul"
                                       and any(i in inits for i in n.input)])
    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" note
    # (not CalibMaxIntermediateOutputs: ORT 1.32's MinMax drops every full chunk uncounted)
    quantize_static(str(fixed), str(out), _Reader(cal), quant_format=QuantFormat.QDQ,
                    per_channel=True, **opts)
    return out


def peer_ort(model, batches, per_channel: bool) -> list[torch.Tensor]:
    """ONNX Runtime's ``quantize_dynamic`` (int8 weights, dynamic uint8 activations) of the
    TorchScript-exported model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    with tempfile.TemporaryDirectory() as d:
        fp32, q = Path(d) / "minilm.onnx", Path(d) / "minilm.int8.onnx"
        export_fp32(model, batches[0], fp32)
        logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" note
        quantize_dynamic(str(fp32), str(q), weight_type=QuantType.QInt8, per_channel=per_channel)
        return ort_run(ort_cpu(q), batches)


def peer_ort_static(model, cal, batches, linear_only: bool = False) -> list[torch.Tensor]:
    """``ort_quantize_static`` on the CPU EP: the peer of qcompile's target ``onnx``."""
    with tempfile.TemporaryDirectory() as d:
        fp32 = export_fp32(model, batches[0], Path(d) / "minilm.onnx")
        q = ort_quantize_static(fp32, Path(d) / "minilm.qdq.onnx", cal, linear_only=linear_only)
        return ort_run(ort_cpu(q), batches)


def peer_torch_dynamic(model, batches) -> list[torch.Tensor]:
    """``torch.ao.quantization.quantize_dynamic``: int8 nn.Linear weights, dynamic activations."""
    import copy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                   dtype=torch.qint8)
    with torch.no_grad():
        return [q(**b).last_hidden_state for b in batches]


# -- targets onnx and npu -------------------------------------------------------------------
def _in_batches(fn, batches, n: int) -> list[torch.Tensor]:
    """``fn`` over each batch cut into ``n``-row pieces, outputs joined back per batch."""
    return [torch.cat([fn({k: v[i:i + n] for k, v in b.items()})
                       for i in range(0, len(b["input_ids"]), n)]) for b in batches]


def onnx_rows(model, cal_s, ev, ref, masks, seq: int) -> list[dict]:
    """qcompile's target ``onnx`` (its QDQ file run by ORT's CPU EP) beside ORT's own
    ``quantize_static`` of the TorchScript export, on the same calibration sentences. The
    graph is captured at batch ``ONNX_BATCH`` (as ORT's export is) and the evaluation batches
    run in pieces of that size."""
    cal = zoo.minilm_batches(cal_s, batch=ONNX_BATCH, seq=seq)
    graph = qcompile.capture(model, cal[0])
    rows = []
    for label, opts in ONNX_CONFIGS:
        cfg = QuantConfig(**opts)
        t = time.perf_counter()
        cm = qcompile.compile(graph, "onnx", config=cfg, calibration=cal)
        compile_s = time.perf_counter() - t
        hidden = _in_batches(lambda b: cm(b["input_ids"], b["attention_mask"])[0], ev, ONNX_BATCH)
        rows.append({"label": label, "peer": False, "section": "onnx", "runtime": "ORT CPU EP",
                     "config": cfg.to_dict(), "compile_s": compile_s, "timings": cm.timings,
                     "onnx_nodes": len(cm._exec.model.graph.node), **metrics(hidden, ref, masks)})
    cal8 = zoo.minilm_batches(cal_s, batch=8, seq=seq)
    for label, linear_only in (("ONNX Runtime quantize_static W8A8, per channel", False),
                               ("ONNX Runtime quantize_static W8A8, per channel, linears only",
                                True)):
        t = time.perf_counter()
        hidden = peer_ort_static(model, cal8, ev, linear_only=linear_only)
        rows.append({"label": label, "peer": True, "section": "onnx", "runtime": "ORT CPU EP",
                     "compile_s": time.perf_counter() - t, **metrics(hidden, ref, masks)})
    return rows


def _timed(fn, batches) -> tuple[list[torch.Tensor], list[float]]:
    outs, secs = [], []
    for b in batches:
        t = time.perf_counter()
        outs.append(fn(b))
        secs.append(time.perf_counter() - t)
    return outs, secs


def _npu_row(label: str, peer: bool, qnn_out, cpu_out, ref, masks, secs, **extra) -> dict:
    """Metrics of the QNN run, of the same file on the CPU EP, and QNN against the CPU EP
    (relative L2 over every output, padding included, as npu.md §3 and test_npu measure)."""
    q, c = torch.cat(qnn_out), torch.cat(cpu_out)
    return {"label": label, "peer": peer, "section": "npu",
            "runtime": f"QNN HTP v{NPU_ARCH} (x86 simulator)", **metrics(qnn_out, ref, masks),
            "cpu_ep": metrics(cpu_out, ref, masks),
            "rel_l2_qnn_vs_cpu_ep": float((q - c).norm() / c.norm()), **extra,
            # the simulator's wall time on this x86 machine: says nothing about NPU latency
            "simulator_s_per_run_not_npu_latency": statistics.median(secs)}


def npu_qcompile(model, cal1, ev1, ref, masks) -> list[dict]:
    """qcompile's target ``npu``: built (QNN context binary) and run on the HTP simulator."""
    from qcompile.backends.onnx import ort_session
    graph = qcompile.capture(model, ev1[0])
    rows = []
    for label, opts in NPU_CONFIGS:
        cfg = QuantConfig(**opts)
        t = time.perf_counter()
        cm = qcompile.compile(graph, "npu", config=cfg, calibration=cal1)
        compile_s = time.perf_counter() - t
        ex = cm._exec
        _ = ex.session  # load the context binary before the timed runs
        qnn_out, secs = _timed(lambda b: cm(b["input_ids"], b["attention_mask"])[0], ev1)
        cpu = ort_session(ex.model_bytes)
        cpu_out = [torch.from_numpy(cpu.run(None, ex.feeds((b["input_ids"],
                                                            b["attention_mask"])))[0])
                   for b in ev1]
        rows.append(_npu_row(label, False, qnn_out, cpu_out, ref, masks, secs,
                             config=cfg.to_dict(), compile_s=compile_s, timings=cm.timings,
                             nodes_on_htp=ex.meta["nodes_on_htp"], onnx_nodes=ex.meta["onnx_nodes"],
                             qnn_subgraphs=ex.meta["qnn_subgraphs"],
                             session_s=ex.load_seconds))
    return rows


def npu_ort_peer(model, cal1, ev1, ref, masks) -> dict:
    """ONNX Runtime's QNN recipe (npu.md §2, §3): ``qnn_preprocess_model`` (LayerNorm fused),
    ``ort_graph_fixes``, ``get_qnn_qdq_config`` (uint16 activations, uint8 per-channel weights,
    MinMax) and ``quantize``, run on the same QNN EP (v73, no CPU fallback)."""
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    from qcompile.backends.onnx import qnn
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t = time.perf_counter()
        fp32 = export_fp32(model, ev1[0], d / "minilm.onnx", dynamic_batch=False)
        qnn_preprocess_model(str(fp32), str(d / "pre.onnx"), fuse_layernorm=True)
        fixed = ort_graph_fixes(d / "pre.onnx", d / "pre.fixed.onnx")
        logging.getLogger().setLevel(logging.ERROR)
        cfg = get_qnn_qdq_config(str(fixed), _Reader(cal1), activation_type=QuantType.QUInt16,
                                 weight_type=QuantType.QUInt8, per_channel=True)
        quantize(str(fixed), str(d / "qdq.onnx"), cfg)
        compile_s = time.perf_counter() - t
        (d / "trace").mkdir()
        t = time.perf_counter()
        sess = qnn.session(d / "qdq.onnx", htp_arch=NPU_ARCH, trace_dir=d / "trace")
        session_s = time.perf_counter() - t
        summary = json.loads((d / "trace" / "qnn_op_trace.json").read_text()).get("summary", {})
        qnn_out, secs = _timed(lambda b: ort_run(sess, [b])[0], ev1)
        cpu_out = ort_run(ort_cpu(d / "qdq.onnx"), ev1)
    return _npu_row("ONNX Runtime QNN recipe W8A16 (u16 act., u8 per channel)", True,
                    qnn_out, cpu_out, ref, masks, secs, compile_s=compile_s,
                    nodes_on_htp=summary.get("supported_nodes"),
                    onnx_nodes=summary.get("total_onnx_nodes"),
                    qnn_subgraphs=summary.get("qnn_subgraphs"), session_s=session_s)


def npu_rows(model, cal_s, ev_s) -> list[dict]:
    """Target ``npu`` and ORT's QNN recipe at batch 1, ``NPU_SEQ`` tokens: calibrated on the
    same sentences, evaluated on ``ev_s`` (a few: each simulator run takes seconds)."""
    cal1 = zoo.minilm_batches(cal_s, batch=1, seq=NPU_SEQ)
    ev1 = zoo.minilm_batches(ev_s, batch=1, seq=NPU_SEQ)
    masks = [b["attention_mask"] for b in ev1]
    with torch.no_grad():
        ref = [model(**b).last_hidden_state for b in ev1]
    return npu_qcompile(model, cal1, ev1, ref, masks) + [npu_ort_peer(model, cal1, ev1, ref, masks)]


# -- report -------------------------------------------------------------------------------------
def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.38 * len(rows) + 1.5), sharey=True)
    labels = [_short(r) for r in rows]
    colors = ["tab:gray" if r["peer"] else "tab:blue" for r in rows]
    for ax, key, name in ((axes[0], "token_cos", "1 − token cosine"),
                          (axes[1], "spearman", "1 − Spearman of pairwise similarities")):
        ax.barh(labels, [max(1 - r[key], 1e-6) for r in rows], color=colors)
        ax.set(xscale="log", xlabel=f"{name} (lower is better)")
        ax.grid(True, axis="x", which="both", alpha=.3)
    axes[0].axvline(0.005, color="tab:red", ls="--", lw=1, label="W8A8 goal (cos 0.995)")
    axes[0].legend(fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("all-MiniLM-L6-v2: quantized against fp32 (blue qcompile, gray peers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _section(r: dict) -> str:
    return r.get("section") or ("peers" if r["peer"] else "reference")


def _short(r: dict) -> str:
    """A row's label, with the evaluation it had when that differs from the main one."""
    return r["label"] + (f" [QNN sim., {r['evaluation']} sent., seq {NPU_SEQ}]"
                         if _section(r) == "npu" else "")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=80, help="tokens per sentence (the corpus' longest "
                                                        "is 72)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json",
                    help="JSON record; the plot goes beside it")
    ap.add_argument("--quick", action="store_true",
                    help="16 + 32 sentences, five configs, no npu rows")
    ap.add_argument("--only", type=lambda t: t.split(","), default=list(SECTIONS),
                    help=f"sections to measure, comma-separated, of {','.join(SECTIONS)}; the "
                         "rows of the others are carried over from --out")
    ap.add_argument("--npu-eval", type=int, default=16,
                    help="evaluation sentences for the npu rows (a simulator run takes seconds)")
    a = ap.parse_args(argv)
    if bad := set(a.only) - set(SECTIONS):
        ap.error(f"unknown sections {sorted(bad)}; known: {','.join(SECTIONS)}")
    only = [x for x in SECTIONS if x in a.only]
    if a.quick and "npu" in only:
        only.remove("npu")
        print("--quick: npu rows skipped (each QNN simulator run takes seconds)")
    cal_s, ev_s = (CALIBRATION[:16], EVALUATION[:32]) if a.quick else (CALIBRATION, EVALUATION)
    configs = [c for c in CONFIGS if not a.quick or c[0] in QUICK]
    t0 = time.perf_counter()
    model, _, dyn = zoo.minilm(batch=8, seq=a.seq)
    cal = zoo.minilm_batches(cal_s, batch=8, seq=a.seq)
    ev = zoo.minilm_batches(ev_s, batch=16, seq=a.seq)
    masks = [b["attention_mask"] for b in ev]
    with torch.no_grad():
        ref = [model(**b).last_hidden_state for b in ev]
    rows = []
    if "reference" in only:
        graph = qcompile.capture(model, cal[0], dynamic_shapes=dyn)
        for label, opts in tqdm(configs, desc="configs", unit="config"):
            cfg = QuantConfig(**opts)
            t = time.perf_counter()
            cm = qcompile.compile(graph, "reference", config=cfg, calibration=cal)
            compile_s = time.perf_counter() - t
            with torch.no_grad():
                hidden = [cm(**b)[0] for b in ev]
            rows.append({"label": label, "peer": False, "section": "reference",
                         "runtime": "reference", "config": cfg.to_dict(),
                         "compile_s": compile_s, **metrics(hidden, ref, masks)})
    if "peers" in only:
        peers = [("ONNX Runtime quantize_dynamic int8", lambda: peer_ort(model, ev, False)),
                 ("ONNX Runtime quantize_dynamic int8, per channel",
                  lambda: peer_ort(model, ev, True)),
                 ("torch quantize_dynamic int8", lambda: peer_torch_dynamic(model, ev))]
        for label, fn in tqdm(peers, desc="peers", unit="peer"):
            t = time.perf_counter()
            hidden = fn()
            rows.append({"label": label, "peer": True, "section": "peers",
                         "runtime": "torch" if label.startswith("torch") else "ORT CPU EP",
                         "compile_s": time.perf_counter() - t, **metrics(hidden, ref, masks)})
    if "onnx" in only:
        rows += onnx_rows(model, cal_s, ev, ref, masks, a.seq)
    if "npu" in only:
        from qcompile.backends.onnx import qnn
        ok, why = qnn.available()
        if ok:
            npu_ev = ev_s[:a.npu_eval]
            rows += [dict(r, evaluation=len(npu_ev), calibration=len(cal_s), seq=NPU_SEQ, batch=1)
                     for r in npu_rows(model, cal_s, npu_ev)]
        else:
            print(f"npu rows skipped: {why}")
    wall = time.perf_counter() - t0

    carried = {}
    if set(only) != set(SECTIONS) and a.out.exists():  # keep the other sections' rows
        old = json.loads(a.out.read_text())
        kept = [r for r in old["results"] if _section(r) not in only]
        if kept:
            carried = {"sections": sorted({_section(r) for r in kept}, key=SECTIONS.index),
                       "commit": old.get("commit"), "dirty": old.get("dirty"),
                       "config": old.get("config"), "wall_s": old.get("wall_s")}
            rows = sorted(kept + rows, key=lambda r: SECTIONS.index(_section(r)))

    print(f"\nall-MiniLM-L6-v2 against fp32: {len(cal_s)} calibration and {len(ev_s)} evaluation "
          f"sentences, {a.seq} tokens; peers below the line")
    if carried:
        print(f"(sections {', '.join(carried['sections'])} carried over from {a.out.name}, commit "
              f"{(carried['commit'] or '?')[:10]}; measured now: {', '.join(only)})")
    main_rows = [r for r in rows if _section(r) != "npu"]
    ours = [r for r in main_rows if not r["peer"]]
    theirs = [r for r in main_rows if r["peer"]]
    fmt = lambda r: [r["label"], r.get("runtime", "reference" if not r["peer"] else "-"),  # noqa: E731
                     f"{r['token_cos']:.4f}", f"{r['token_cos_p5']:.4f}",
                     f"{r['sentence_cos']:.4f}", f"{r['spearman']:.4f}", f"{r['compile_s']:.2f}"]
    table(["configuration", "runs on", "token cos", "p5", "sentence cos", "Spearman",
           "quantize s"], [fmt(r) for r in ours] + [["-" * 6] * 7] + [fmt(r) for r in theirs])
    npu = [r for r in rows if _section(r) == "npu"]
    if npu:
        r0 = npu[0]
        print(f"\nnpu: QNN HTP v{NPU_ARCH} x86 simulator, no CPU fallback; batch 1, {NPU_SEQ} "
              f"tokens, {r0['calibration']} calibration and {r0['evaluation']} evaluation "
              "sentences; 'CPU EP' runs the same QDQ file on ORT's CPU EP; simulator seconds "
              "are not NPU latency")
        table(["configuration", "token cos", "p5", "Spearman", "CPU EP token cos",
               "rel L2 QNN/CPU EP", "HTP nodes", "quantize s", "simulator s/run, not NPU latency"],
              [[r["label"], f"{r['token_cos']:.4f}", f"{r['token_cos_p5']:.4f}",
                f"{r['spearman']:.4f}", f"{r['cpu_ep']['token_cos']:.4f}",
                f"{r['rel_l2_qnn_vs_cpu_ep']:.4f}", f"{r['nodes_on_htp']}/{r['onnx_nodes']}",
                f"{r['compile_s']:.1f}", f"{r['simulator_s_per_run_not_npu_latency']:.2f}"]
               for r in npu])
    by = {r["label"]: r for r in rows}
    goals = {}
    if "W8A8 SmoothQuant α=0.5" in by:
        goals["w8a8_token_cos_ge_0.995"] = by["W8A8 SmoothQuant α=0.5"]["token_cos"] >= 0.995
    for algo in ("GPTQ", "AWQ"):
        if f"W4A16-g128 {algo}" in by and "W4A16-g128 RTN" in by:
            goals[f"w4a16_{algo.lower()}_above_rtn"] = (
                by[f"W4A16-g128 {algo}"]["token_cos"] > by["W4A16-g128 RTN"]["token_cos"])
    if "bf16, 50% Wanda" in by and "bf16, 50% magnitude" in by:
        goals["wanda_50_above_magnitude_50"] = (by["bf16, 50% Wanda"]["token_cos"]
                                                > by["bf16, 50% magnitude"]["token_cos"])
    print("goals: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in goals.items()))
    print(f"wall time {wall:.1f} s")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "quality", **provenance(), "machine": machine(),
              "config": {"model": "all-MiniLM-L6-v2", "seq": a.seq, "calibration": len(cal_s),
                         "evaluation": len(ev_s), "quick": a.quick, "measured": only,
                         "targets": {"reference": "reference", "onnx": "onnx (ORT CPU EP)",
                                     "npu": f"npu (QNN HTP v{NPU_ARCH} simulator)"},
                         "npu": {"batch": 1, "seq": NPU_SEQ, "calibration": len(cal_s),
                                 "evaluation": min(a.npu_eval, len(ev_s))}},
              "results": rows, "goals": goals, "wall_s": wall}
    if carried:
        record["carried_over"] = carried
    a.out.write_text(json.dumps(record, indent=1))
    plot(rows, a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
