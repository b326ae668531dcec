"""Mixed precision (passes/mixed_precision.py): solver time, quality against uniform and random
assignments, and latency budgets checked against the compiled model, in one run.

- **solve**: HAWQ-V3's integer program on random instances (layers × choices, an average-bits
  limit), HiGHS through ``scipy.optimize.milp``; goal: 200 layers × 4 choices in ≤ 1 s.
- **quality**: the digits convnet (``zoo.digits_convnet``, trained here; loss: KL of the
  held-out logits to the float model's) and all-MiniLM-L6-v2 (MSE of both outputs to the fp32
  model on the 32 first ``EVALUATION`` sentences) under average-bits budgets: HAWQ-V3, the same
  program on OHQ's measured single-layer sensitivities, and (on the convnet) CLADO, against
  uniform formats and random assignments within 0.5 bit below the budget. The sensitivities
  are computed once per model; the Pareto front re-solves the program per budget and
  measures each result.
- **latency**: MiniLM (batch 1, 32 tokens) on ``cpu`` and a small Llama (batch 1, 8 tokens) on
  ``lut``: per-layer latencies measured from the kernels, budgets at 25/50/75% between the
  cheapest and the dearest assignment; each chosen model, and the reference assignment the
  rest of the model was derived from, is compiled and timed round-robin (median of
  ``--latency-reps`` rounds), and its latency set beside the program's predicted sum (goal:
  within 10%). "gap vs ref" divides out the machine's drift since the per-layer measurements
  (the reference model's own gap).

Prints tables, writes JSON (``--out``) and plots beside it::

    .venv/bin/python benchmarks/mixed_precision.py                 # from the repository root
    .venv/bin/python benchmarks/mixed_precision.py --quick         # a smoke run
    .venv/bin/python benchmarks/mixed_precision.py --sections solve quality
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, machine, provenance, table

import qcompile
from qcompile import Budget, QuantConfig, zoo
from qcompile.interpreter import Interpreter
from qcompile.passes.mixed_precision import PrecisionProblem, plot_plan, solve_ilp
from qcompile.passes.pipeline import quantize_graph
from qcompile.passes.quantize_weights import quantize_weights
from qcompile.passes.sensitivity import make_loss


# -- solve -----------------------------------------------------------------------------------
def random_problem(L: int, bits, seed: int, avg: float = 3.5) -> PrecisionProblem:
    rng = np.random.default_rng(seed)
    bits = np.asarray(bits)
    n = rng.integers(1000, 1_000_000, L)
    omega = rng.random((L, 1)) * np.sort(rng.random((L, len(bits))), axis=1)[:, ::-1] \
        * 2.0 ** -bits[None, :]
    return PrecisionProblem([f"l{i}" for i in range(L)], [f"int{b}" for b in bits], omega,
                            {"avg_bits": n[:, None] * bits[None, :] / n.sum()}, {},
                            {"avg_bits": avg}, np.ones((L, len(bits)), bool),
                            [[i] for i in range(L)])


def section_solve(args) -> list[dict]:
    rows = []
    sizes = [(12, (2, 4, 8)), (50, (2, 3, 4, 8)), (200, (2, 3, 4, 8)), (500, (2, 3, 4, 8)),
             (200, (2, 3, 4, 5, 6, 8))]
    solve_ilp(random_problem(4, (2, 8), 0))  # imports and HiGHS start-up out of the timing
    for L, bits in sizes[:3] if args.quick else sizes:
        ts = []
        for seed in range(args.solve_reps):
            p = random_problem(L, bits, seed)
            t = time.perf_counter()
            a, info = solve_ilp(p)
            ts.append(time.perf_counter() - t)
            assert info["optimal"]
        rows.append({"layers": L, "choices": len(bits), "median_s": statistics.median(ts),
                     "max_s": max(ts), "goal_s": 1.0 if (L, len(bits)) == (200, 4) else None})
    table(["layers × choices", "median s", "max s", "goal"],
          [[f"{r['layers']} × {r['choices']}", f"{r['median_s']:.4f}", f"{r['max_s']:.4f}",
            "≤ 1 s" if r["goal_s"] else ""] for r in rows])
    return rows


# -- quality ---------------------------------------------------------------------------------
def _with_formats(g, plan, formats, cfg):
    qg = g.clone()
    qg.meta["mixed_precision"] = dataclasses.replace(plan, formats=formats)
    return quantize_weights(qg, config=cfg, progress=False)


def _resolve(plan, limit: float):
    p = dataclasses.replace(plan.problem, limits={"avg_bits": limit})
    a, _ = solve_ilp(p)
    return {n: p.choices[c] for n, c in zip(p.layers, a)}, p.objective(a), p.metric("avg_bits", a)


def _randoms(plan, lo, hi, k, seed):
    prob = plan.problem
    rng = np.random.default_rng(seed)
    out, tries = [], 0
    while len(out) < k and tries < 100000:
        tries += 1
        a = prob.assignment_of({gi: int(rng.integers(0, len(prob.choices)))
                                for gi in range(len(prob.groups))})
        if lo <= prob.metric("avg_bits", a) <= hi:
            out.append({n: prob.choices[c] for n, c in zip(prob.layers, a)})
    return out


def _quality_model(name, g, cal, labels, measure, budgets, uniform, args, clado: bool):
    cfg_of = lambda b, method="hawq-v3", sens="trace": QuantConfig(  # noqa: E731
        group_size=None, mixed_precision=Budget(avg_bits=b, samples=len(cal), sensitivity=sens,
                                                max_iters=args.probes, method=method))
    t = time.perf_counter()
    qg, _ = quantize_graph(g.clone(), cfg_of(budgets[0]), cal, labels=labels, progress=True)
    plan = qg.meta["mixed_precision"]
    sens_s = time.perf_counter() - t
    qm, _ = quantize_graph(g.clone(), cfg_of(budgets[0], sens="measured"), cal, labels=labels,
                           progress=True)
    mplan = qm.meta["mixed_precision"]
    rows = []
    for b in budgets:
        fm, pred, got = _resolve(plan, b)
        row = {"model": name, "budget": b, "avg_bits": got, "predicted": pred,
               "hawq": measure(_with_formats(g, plan, fm, cfg_of(b))), "formats": fm}
        mf = _resolve(mplan, b)[0]
        row["measured_sensitivity"] = measure(_with_formats(g, mplan, mf, cfg_of(b)))
        if b in uniform:
            u, _ = quantize_graph(g.clone(), QuantConfig(weights=uniform[b], group_size=None),
                                  None, progress=False)
            row["uniform"] = measure(u)
        rs = [measure(_with_formats(g, plan, f, cfg_of(b)))
              for f in _randoms(plan, b - 0.5, b, args.randoms, seed=int(b * 10))]
        if rs:
            row["random_best"], row["random_median"] = min(rs), statistics.median(rs)
        if clado:
            cq, _ = quantize_graph(g.clone(), cfg_of(b, "clado"), cal, labels=labels,
                                   progress=False)
            row["clado"] = measure(cq)
        rows.append(row)
    return rows, plan, sens_s


def section_quality(args) -> tuple[list[dict], dict]:
    out, plans = [], {}
    # digits convnet
    m, x, y = zoo.digits_convnet()
    g = qcompile.capture(m, (x[:64],), dynamic_shapes=({0: torch.export.Dim("b", max=4096)},))
    held = x[1400:]
    with torch.no_grad():
        ref = Interpreter(g, fake_quant=False).run(held)[0]

    def kl(qg):
        with torch.no_grad():
            o = Interpreter(qg).run(held)[0]
        lp = torch.log_softmax(ref, -1)
        return float((lp.exp() * (lp - torch.log_softmax(o, -1))).sum(-1).mean())
    cal = [x[i:i + 128] for i in range(0, 512, 128)]
    labels = [y[i:i + 128] for i in range(0, 512, 128)]
    budgets = [3.0, 4.0] if args.quick else [2.5, 3.0, 3.5, 4.0, 5.0, 6.0]
    rows, plan, s = _quality_model("digits convnet (KL)", g, cal, labels, kl, budgets,
                                   {3.0: "int3", 4.0: "int4"}, args, clado=True)
    out += rows
    plans["digits convnet"] = (plan, rows, s)
    if not args.quick:
        from qcompile.corpus import CALIBRATION, EVALUATION
        model, ex, dyn = zoo.minilm(batch=2, seq=24)
        g = qcompile.capture(model, ex, dynamic_shapes=dyn)
        cal = [list(b.values()) for b in zoo.minilm_batches(CALIBRATION[:32], batch=16, seq=24)]
        test = [list(b.values()) for b in zoo.minilm_batches(EVALUATION[:32], batch=16, seq=24)]
        loss = make_loss(g, test, None, "mse")

        def mse(qg):
            loss.interp = Interpreter(qg)
            with torch.no_grad():
                return float(loss())
        rows, plan, s = _quality_model("MiniLM (MSE)", g, cal, None, mse,
                                       [2.5, 3.0, 3.5, 4.0, 5.0],
                                       {3.0: "int3", 4.0: "int4"}, args, clado=False)
        out += rows
        plans["MiniLM"] = (plan, rows, s)
    fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    table(["model", "avg bits", "pred ΣΩ", "HAWQ-V3", "ILP + measured Ω", "CLADO", "uniform",
           "random best", "random median"],
          [[r["model"], f"{r['avg_bits']:.2f}", fmt(r["predicted"]), fmt(r["hawq"]),
            fmt(r["measured_sensitivity"]), fmt(r.get("clado")), fmt(r.get("uniform")),
            fmt(r.get("random_best")),
            fmt(r.get("random_median"))] for r in out])
    return out, plans


# -- latency ---------------------------------------------------------------------------------
def _latency_case(name, g, sample, target, candidates, args):
    """Per-layer latencies measured for the program; then the models it picks at three
    budgets, and the reference assignment the rest of the model was derived from, compiled and
    timed round-robin (so that the machine's drift over seconds touches them alike)."""
    from qcompile.backends.latency import time_call
    from qcompile.passes.quantize_activations import quantize_activations
    cfg0 = QuantConfig(group_size=128 if target == "lut" else None,
                       mixed_precision=Budget(latency_ms=1e9, candidates=candidates, samples=1,
                                              max_iters=args.probes // 2 or 1))
    t = time.perf_counter()
    qg, _ = quantize_graph(g.clone(), cfg0, [sample], progress=True, target=target)
    measure_s = time.perf_counter() - t
    plan = qg.meta["mixed_precision"]
    p = plan.problem
    lo = p.least("latency_ms")
    hi = p.offsets["latency_ms"] + sum(float(np.max(p.costs["latency_ms"][gr].sum(0)
                                                    [p.group_allowed(gr)])) for gr in p.groups)
    cfg = dataclasses.replace(cfg0, mixed_precision=None)
    cases = []
    for r in (0.25, 0.5, 0.75, None):
        if r is None:  # the reference: each layer's first allowed choice
            lim, a = None, [int(np.flatnonzero(p.allowed[i])[0]) for i in range(len(p.layers))]
        else:
            lim = lo + r * (hi - lo)
            a, _ = solve_ilp(dataclasses.replace(p, limits={"latency_ms": lim}))
        fm = {n: p.choices[c] for n, c in zip(p.layers, a)}
        cm = qcompile.compile(quantize_activations(_with_formats(g, plan, fm, cfg), config=cfg),
                              target)
        cases.append((lim, a, fm, cm, []))
    for _ in range(args.latency_reps):
        for *_, cm, times in cases:
            times.append(time_call(cm.run, tuple(sample), rounds=1, min_time=0.3))
    ref_pred = p.metric("latency_ms", cases[-1][1])
    ref_ms = statistics.median(cases[-1][4])
    rows = []
    for lim, a, fm, _, times in cases:
        pred, ms = p.metric("latency_ms", a), statistics.median(times)
        rows.append({"model": name if lim is not None else name + " (reference)",
                     "target": target, "budget_ms": lim, "predicted_ms": pred,
                     "measured_ms": ms, "gap": ms / pred - 1,
                     "gap_vs_reference": (ms / ref_ms) / (pred / ref_pred) - 1,
                     "spread_ms": [min(times), max(times)],
                     "formats": {c: list(fm.values()).count(c) for c in candidates},
                     "rest_ms": p.offsets["latency_ms"], "measure_s": measure_s,
                     "correction_ms_per_layer": plan.solve.get("latency_correction_ms")})
    return rows


def section_latency(args) -> list[dict]:
    rows = []
    model, ex, dyn = zoo.minilm(batch=1, seq=32)
    g = qcompile.capture(model, ex)
    rows += _latency_case("MiniLM b1×32", g, list(ex.values()), "cpu", ("int4", "int8"), args)
    if not args.quick:
        lm, ids, _ = zoo.tiny_llama(batch=1, seq=8, hidden=1024, layers=4, heads=16, kv_heads=4)
        g = qcompile.capture(lm, ids)
        rows += _latency_case("Llama h1024×4 b1×8", g, list(ids), "lut",
                              ("int2", "int3", "int4"), args)
    table(["model", "target", "budget ms", "predicted ms", "measured ms", "min-max", "gap",
           "gap vs ref", "formats"],
          [[r["model"], r["target"], "" if r["budget_ms"] is None else f"{r['budget_ms']:.3f}",
            f"{r['predicted_ms']:.3f}", f"{r['measured_ms']:.3f}",
            f"{r['spread_ms'][0]:.2f}-{r['spread_ms'][1]:.2f}", f"{r['gap']:+.1%}",
            f"{r['gap_vs_reference']:+.1%}",
            " ".join(f"{k}:{v}" for k, v in r["formats"].items())] for r in rows])
    return rows


def plot_quality(plans: dict, path: Path) -> list[Path]:
    out = []
    for name, (plan, rows, _) in plans.items():
        mid = min(rows, key=lambda r: abs(r["budget"] - 3.0))
        shown = dataclasses.replace(plan, formats=mid["formats"], layers=[
            dict(r, format=mid["formats"][r["node"]]) for r in plan.layers])
        pareto = [{"budget": r["avg_bits"], "predicted": r["predicted"], "measured": r["hawq"],
                   "uniform": r.get("uniform"), "uniform_at": r["budget"],
                   "unit": "average weight bits"} for r in rows]
        p = path.with_name(f"{path.stem}_{name.split()[0].lower()}.png")
        plot_plan(shown, p, pareto=pareto)
        out.append(p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", nargs="+", default=["solve", "quality", "latency"],
                    choices=["solve", "quality", "latency"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--probes", type=int, default=20, help="Hutchinson probes at most")
    ap.add_argument("--randoms", type=int, default=5)
    ap.add_argument("--solve-reps", type=int, default=5)
    ap.add_argument("--latency-reps", type=int, default=9,
                    help="round-robin timing rounds of the compiled models")
    ap.add_argument("--threads", type=int, default=2, help="TVM and torch threads")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                    "mixed_precision.json")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rec = {"machine": machine(), **provenance(), "args": {k: str(v) for k, v in vars(args).items()}}
    t0 = time.time()
    if "solve" in args.sections:
        rec["solve"] = section_solve(args)
    if "quality" in args.sections:
        rows, plans = section_quality(args)
        rec["quality"] = rows
        rec["sensitivity_s"] = {k: v[2] for k, v in plans.items()}
        rec["plots"] = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)
                        for p in plot_quality(plans, args.out)]
    if "latency" in args.sections:
        rec["latency"] = section_latency(args)
    rec["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=1, default=str))
    print(f"wrote {args.out} ({rec['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
