"""Target ``npu`` on all-MiniLM-L6-v2 (batch 1, seq 128): what building and loading cost, and
how much of the model the QNN HTP takes.

For each model: build time split into qcompile's passes, the capability probe (a QNN session
with the op trace) and the ahead-of-time context compile; then the artifact's load time —
a session from the QDQ file (graph preparation, what a plain ONNX deployment pays at every
start) against a session from the stored QNN context binary (what ``qcompile.load`` does).
The HTP runs in Qualcomm's x86 simulator here: its seconds per run are printed for scale,
labelled as such, and are **not** NPU latency. Prints a table and writes JSON::

    .venv/bin/python benchmarks/npu.py            # from the repository root
    .venv/bin/python benchmarks/npu.py --quick    # the MLP only
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _common import ROOT, machine, provenance, table

import qcompile
from qcompile import zoo
from qcompile.backends.onnx import qnn


def _best(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _measure(label, model, example, cal, runs: int) -> dict:
    t0 = time.perf_counter()
    cm = qcompile.compile(model, "npu", example_inputs=example, calibration=cal)
    build = time.perf_counter() - t0
    exe = cm._exec
    arch = exe.meta["htp_arch"]
    with tempfile.TemporaryDirectory() as d:
        out = cm.save(Path(d) / "a")
        t0 = time.perf_counter()
        loaded = qcompile.load(out)
        load_total = time.perf_counter() - t0
        ctx_s = loaded._exec.load_seconds
    prep_s = _best(lambda: qnn.session(exe.model_bytes, htp_arch=arch), 2)
    ctx_best = _best(lambda: qnn.session_from_context(exe.context, htp_arch=arch), 3)
    args = list(example.values()) if isinstance(example, dict) else list(example)
    loaded.run(*args)
    sim = _best(lambda: loaded.run(*args), runs)
    return {"model": label, "build_s": build, "passes_s": cm.timings.get("quantize_s"),
            "context_compile_s": exe.prepare_seconds,
            "nodes_on_htp": exe.meta["nodes_on_htp"], "onnx_nodes": exe.meta["onnx_nodes"],
            "qnn_subgraphs": exe.meta["qnn_subgraphs"],
            "session_from_qdq_s": prep_s, "session_from_context_s": ctx_best,
            "load_artifact_s": load_total, "load_context_s": ctx_s,
            "simulator_s_per_run": sim, "htp_arch": arch}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the MLP only")
    ap.add_argument("--runs", type=int, default=2, help="simulator runs (best of)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "npu.json"))
    a = ap.parse_args(argv)
    ok, why = qnn.available()
    if not ok:
        raise SystemExit(f"the QNN EP cannot run here: {why}")
    warnings.filterwarnings("ignore")
    rows = []
    m, inputs, _ = zoo.mlp(batch=8)
    cal = [(torch.randn(8, 64, generator=torch.Generator().manual_seed(i)),) for i in range(8)]
    rows.append(_measure("MLP 64-128-64-10, batch 8", m, inputs, cal, a.runs))
    if not a.quick:
        from qcompile.corpus import CALIBRATION, EVALUATION
        m, _, _ = zoo.minilm()
        cal = zoo.minilm_batches(CALIBRATION[:8], batch=1, seq=128)
        ev = zoo.minilm_batches(EVALUATION[:1], batch=1, seq=128)[0]
        rows.append(_measure("MiniLM-L6, batch 1, seq 128", m, ev, cal, a.runs))
    table(["model", "HTP nodes", "build s", "context compile s", "session from QDQ s",
           "session from context s", "simulator s/run (not NPU latency)"],
          [[r["model"], f"{r['nodes_on_htp']}/{r['onnx_nodes']}", f"{r['build_s']:.1f}",
            f"{r['context_compile_s']:.2f}", f"{r['session_from_qdq_s']:.2f}",
            f"{r['session_from_context_s']:.3f}", f"{r['simulator_s_per_run']:.2f}"]
           for r in rows])
    rec = {"benchmark": "npu", "machine": machine(qnn=qnn.versions()), **provenance(),
           "note": "QNN HTP x86 simulator: simulator_s_per_run is not NPU latency",
           "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
