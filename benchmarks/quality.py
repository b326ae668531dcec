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
inputs) report token cosine against the dense model, Wanda expected above magnitude. Prints
a table, writes a JSON record (``--out``) and a ``.png`` beside it::

    .venv/bin/python benchmarks/quality.py            # from the repository root
    .venv/bin/python benchmarks/quality.py --quick    # a smoke run: fewer sentences and configs
"""
from __future__ import annotations

import argparse
import json
import logging
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


def peer_ort(model, batches, per_channel: bool) -> list[torch.Tensor]:
    """ONNX Runtime's ``quantize_dynamic`` (int8 weights, dynamic uint8 activations) of the
    TorchScript-exported model."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    with tempfile.TemporaryDirectory() as d:
        fp32, q = Path(d) / "minilm.onnx", Path(d) / "minilm.int8.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Hidden(model), (batches[0]["input_ids"], batches[0]["attention_mask"]),
                              str(fp32), dynamo=False, opset_version=17,
                              input_names=["input_ids", "attention_mask"],
                              dynamic_axes={"input_ids": {0: "b"}, "attention_mask": {0: "b"}})
            logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" note
            quantize_dynamic(str(fp32), str(q), weight_type=QuantType.QInt8,
                             per_channel=per_channel)
        model.eval()  # the TorchScript exporter leaves the module in training mode (dropout on)
        s = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(s.run(None, {k: v.numpy() for k, v in b.items()})[0])
                for b in batches]


def peer_torch_dynamic(model, batches) -> list[torch.Tensor]:
    """``torch.ao.quantization.quantize_dynamic``: int8 nn.Linear weights, dynamic activations."""
    import copy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                   dtype=torch.qint8)
    with torch.no_grad():
        return [q(**b).last_hidden_state for b in batches]


# -- report -------------------------------------------------------------------------------------
def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.38 * len(rows) + 1.5), sharey=True)
    labels = [r["label"] for r in rows]
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=80, help="tokens per sentence (the corpus' longest "
                                                        "is 72)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json",
                    help="JSON record; the plot goes beside it")
    ap.add_argument("--quick", action="store_true", help="16 + 32 sentences, five configs")
    a = ap.parse_args(argv)
    cal_s, ev_s = (CALIBRATION[:16], EVALUATION[:32]) if a.quick else (CALIBRATION, EVALUATION)
    configs = [c for c in CONFIGS if not a.quick or c[0] in QUICK]
    t0 = time.perf_counter()
    model, _, dyn = zoo.minilm(batch=8, seq=a.seq)
    cal = zoo.minilm_batches(cal_s, batch=8, seq=a.seq)
    ev = zoo.minilm_batches(ev_s, batch=16, seq=a.seq)
    masks = [b["attention_mask"] for b in ev]
    with torch.no_grad():
        ref = [model(**b).last_hidden_state for b in ev]
    graph = qcompile.capture(model, cal[0], dynamic_shapes=dyn)
    rows = []
    for label, opts in tqdm(configs, desc="configs", unit="config"):
        cfg = QuantConfig(**opts)
        t = time.perf_counter()
        cm = qcompile.compile(graph, "reference", config=cfg, calibration=cal)
        compile_s = time.perf_counter() - t
        with torch.no_grad():
            hidden = [cm(**b)[0] for b in ev]
        rows.append({"label": label, "peer": False, "config": cfg.to_dict(),
                     "compile_s": compile_s, **metrics(hidden, ref, masks)})
    peers = [("ONNX Runtime quantize_dynamic int8", lambda: peer_ort(model, ev, False)),
             ("ONNX Runtime quantize_dynamic int8, per channel", lambda: peer_ort(model, ev, True)),
             ("torch quantize_dynamic int8", lambda: peer_torch_dynamic(model, ev))]
    for label, fn in tqdm(peers, desc="peers", unit="peer"):
        t = time.perf_counter()
        hidden = fn()
        rows.append({"label": label, "peer": True, "compile_s": time.perf_counter() - t,
                     **metrics(hidden, ref, masks)})
    wall = time.perf_counter() - t0

    print(f"\nall-MiniLM-L6-v2 against fp32: {len(cal_s)} calibration and {len(ev_s)} evaluation "
          f"sentences, {a.seq} tokens, target reference; peers below the line")
    ours, theirs = [r for r in rows if not r["peer"]], [r for r in rows if r["peer"]]
    fmt = lambda r: [r["label"], f"{r['token_cos']:.4f}", f"{r['token_cos_p5']:.4f}",  # noqa: E731
                     f"{r['sentence_cos']:.4f}", f"{r['spearman']:.4f}", f"{r['compile_s']:.2f}"]
    table(["configuration", "token cos", "p5", "sentence cos", "Spearman", "quantize s"],
          [fmt(r) for r in ours] + [["-" * 6] * 6] + [fmt(r) for r in theirs])
    by = {r["label"]: r for r in rows}
    goals = {}
    if "W8A8 SmoothQuant α=0.5" in by:
        goals["w8a8_token_cos_ge_0.995"] = by["W8A8 SmoothQuant α=0.5"]["token_cos"] >= 0.995
    for algo in ("GPTQ", "AWQ"):
        if f"W4A16-g128 {algo}" in by:
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
                         "evaluation": len(ev_s), "quick": a.quick, "target": "reference"},
              "results": rows, "goals": goals, "wall_s": wall}
    a.out.write_text(json.dumps(record, indent=1))
    plot(rows, a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
