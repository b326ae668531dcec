"""Exact makespan placement: HiGHS (``placement.milp``) against CP-SAT (``placement.cpsat``),
and DiviML-style splitting (``placement.split``) against the whole-graph MILP.

Part 1, same instances for every solver, each under ``--time-limit`` seconds:

- random layered DAGs of 10–40 nodes on 3–4 devices (a CPU that runs everything, GPUs and
  an NPU that each miss ~20% of the ops), edges carrying 0–4 kB over links of 0.2 s +
  bytes/2 kB/s (transfers as long as the ops), seeds fixed;
- transformer-like block chains (``qcompile.placement.synthetic.transformer_chain``,
  18-node blocks) of 1–2 blocks on 3–4 devices.

Solvers: HiGHS through ``scipy.optimize.milp`` (its MIP search is single-threaded), CP-SAT
with 1 worker (the like-for-like comparison on this 2-core machine) and with 2 workers.
A solver *proves* an instance when it stops with status ``optimal`` inside the limit. The
table shows seconds, status and makespan per solver; the summary gives, per solver, the
instances proved, and on the instances both proved the geometric mean of HiGHS time over
CP-SAT time.

Part 2: block chains of 1–4 and 28 blocks (19–505 nodes) on 4 devices, every block with
its own costs (no reuse) and with repeated costs, solved whole by ``milp.solve`` (under
``--time-limit``) and by ``split.solve`` (default segment solvers, brute force and HiGHS;
and with CP-SAT segments): seconds and the makespan ratio split / milp (split is exact, so
a ratio below 1 means the MILP stopped at its limit).

    .venv/bin/python benchmarks/placement_solvers.py             # ~7 min on 2 cores
    .venv/bin/python benchmarks/placement_solvers.py --quick     # smaller, 5 s limit
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time

import networkx as nx
from _common import ROOT, machine, provenance, table

from qcompile.placement import Link, Problem, check_plan, cpsat, milp, split
from qcompile.placement.synthetic import transformer_chain


def random_dag(n: int, nd: int, seed: int) -> Problem:
    """``n`` ops in layers of 1–4, each reading 1–2 ops of earlier layers (mostly the last)."""
    rng = random.Random(seed)
    names = ["cpu", "gpu0", "gpu1", "npu"][:nd]
    speed = {"cpu": 1.0, "gpu0": 0.3, "gpu1": 0.45, "npu": 0.35}
    g = nx.DiGraph()
    layers, i = [], 0
    while i < n:
        width = min(rng.randint(1, 4), n - i)
        layers.append(list(range(i, i + width)))
        i += width
    for k, layer in enumerate(layers):
        for v in layer:
            work = rng.uniform(1.0, 10.0)
            cost = {d: round(work * speed[d] * rng.uniform(0.8, 1.25), 3) for d in names
                    if d == "cpu" or rng.random() > 0.2}
            g.add_node(v, cost=cost)
            if k:
                pool = layers[k - 1] + (layers[k - 2] if k > 1 and rng.random() < 0.3 else [])
                for u in rng.sample(pool, min(len(pool), rng.randint(1, 2))):
                    g.add_edge(u, v, bytes=float(rng.randint(0, 4000)))
    return Problem(g, names, default_link=Link(0.2, 2000.0))


def instances(quick: bool) -> list[tuple[str, Problem]]:
    sizes = (10, 20, 30) if quick else (10, 15, 20, 25, 30, 40)
    out = [(f"dag n={n} d={nd} s={s}", random_dag(n, nd, 100 * n + 10 * nd + s))
           for n in sizes for nd in (3, 4) for s in range(1 if quick else 2)]
    out += [(f"blocks b={b} d={nd}", transformer_chain(b, devices=("cpu", "gpu0", "gpu1", "npu")[:nd],
                                                       repeat=False, seed=b))
            for b in ((1,) if quick else (1, 2)) for nd in (3, 4)]
    return out


def run(solver, problem, **kw) -> dict:
    t0 = time.perf_counter()
    plan = solver(problem, **kw)
    seconds = time.perf_counter() - t0
    assert check_plan(problem, plan) == [], check_plan(problem, plan)
    return {"seconds": seconds, "status": plan.status, "makespan": plan.makespan,
            "lower_bound": plan.lower_bound, "info": {k: v for k, v in plan.info.items()
                                                      if isinstance(v, (int, float, str))}}


def geomean(xs):
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else None


def part1(args) -> dict:
    solvers = {"highs": lambda p: run(milp.solve, p, time_limit=args.time_limit),
               "cpsat1": lambda p: run(cpsat.solve, p, time_limit=args.time_limit, workers=1),
               "cpsat2": lambda p: run(cpsat.solve, p, time_limit=args.time_limit, workers=2)}
    rows, records = [], []
    for name, problem in instances(args.quick):
        rec = {"instance": name, "nodes": len(problem.order), "edges": problem.graph.number_of_edges(),
               "devices": len(problem.names)}
        for key, solve in solvers.items():
            rec[key] = solve(problem)
        records.append(rec)
        rows.append([name, rec["nodes"]] + [f"{rec[k]['seconds']:.2f} {rec[k]['status'][:3]} "
                                             f"{rec[k]['makespan']:.3f}" for k in solvers])
        print(*rows[-1], sep="  ", flush=True)
    print()
    table(["instance", "V"] + [f"{k}: s status makespan" for k in solvers], rows)
    summary = {}
    for k in solvers:
        proved = [r for r in records if r[k]["status"] == "optimal"]
        summary[k] = {"proved": len(proved), "of": len(records),
                      "median_s": statistics.median(r[k]["seconds"] for r in records)}
    for k in ("cpsat1", "cpsat2"):
        both = [r for r in records if r["highs"]["status"] == "optimal" and r[k]["status"] == "optimal"]
        ratios = [r["highs"]["seconds"] / r[k]["seconds"] for r in both]
        summary[k]["both_proved"] = len(both)
        summary[k]["highs_over_this_geomean"] = geomean(ratios)
        summary[k]["highs_over_this_min_max"] = [min(ratios), max(ratios)] if ratios else None
        summary[k]["same_makespan"] = all(abs(r["highs"]["makespan"] - r[k]["makespan"]) <= 1e-6 *
                                          max(1.0, r["highs"]["makespan"]) for r in both)
        worse = [r[k]["makespan"] / r["highs"]["makespan"] for r in records
                 if "optimal" not in (r["highs"]["status"], r[k]["status"])]
        summary[k]["makespan_ratio_when_neither_proved"] = worse
    print()
    for k, s in summary.items():
        line = f"{k}: proved {s['proved']}/{s['of']}, median {s['median_s']:.2f} s"
        if "both_proved" in s and s["highs_over_this_geomean"]:
            lo, hi = s["highs_over_this_min_max"]
            line += (f"; on the {s['both_proved']} both proved, HiGHS time / {k} time: "
                     f"geomean {s['highs_over_this_geomean']:.1f}x (min {lo:.2f}x, max {hi:.1f}x), "
                     f"same makespan: {s['same_makespan']}")
        print(line)
    return {"records": records, "summary": summary}


def part2(args) -> dict:
    rows, records = [], []
    for blocks in ((1, 2) if args.quick else (1, 2, 3, 4, 28)):
        for repeat in (False, True):
            problem = transformer_chain(blocks, repeat=repeat, seed=blocks)
            whole = run(milp.solve, problem, time_limit=args.time_limit)
            parts = run(split.solve, problem)
            parts_cp = run(split.solve, problem, segment_solver=cpsat.solve)
            rec = {"blocks": blocks, "repeat": repeat, "nodes": len(problem.order), "devices": 4,
                   "milp": whole, "split": parts, "split_cpsat": parts_cp,
                   "makespan_ratio": parts["makespan"] / whole["makespan"],
                   "speedup": whole["seconds"] / parts["seconds"],
                   "unique_segments": parts["info"]["unique_segments"],
                   "segments": parts["info"]["segments"]}
            records.append(rec)
            rows.append([f"{blocks} blocks{' repeated' if repeat else ''}", rec["nodes"],
                         f"{whole['seconds']:.2f} {whole['status'][:3]}", f"{parts['seconds']:.2f}",
                         f"{parts_cp['seconds']:.2f}", f"{rec['speedup']:.0f}x",
                         f"{rec['makespan_ratio']:.4f}"])
            print(*rows[-1], sep="  ", flush=True)
    print()
    table(["graph (4 devices)", "V", "milp s", "split s", "split+cpsat s", "milp/split time",
           "split/milp makespan"], rows)
    return {"records": records}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, smaller instances")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds per solve (default 30, quick 5)")
    ap.add_argument("--out", type=str,
                    default=str(ROOT / "benchmarks" / "results" / "placement_solvers.json"))
    args = ap.parse_args()
    args.time_limit = args.time_limit or (5.0 if args.quick else 30.0)
    import ortools
    import scipy
    warm = random_dag(6, 3, 0)           # load the libraries and solver code outside the timings
    for solve in (milp.solve, cpsat.solve, split.solve):
        solve(warm)
    t0 = time.perf_counter()
    print(f"== HiGHS vs CP-SAT, {args.time_limit:.0f} s per solve ==")
    one = part1(args)
    print(f"\n== split vs whole-graph MILP ({args.time_limit:.0f} s limit on the MILP) ==")
    two = part2(args)
    rec = {"benchmark": "placement_solvers", **provenance(),
           "machine": machine(scipy=scipy.__version__, ortools=ortools.__version__),
           "config": {"time_limit_s": args.time_limit, "quick": args.quick,
                      "cpsat_workers": [1, 2], "highs": "scipy.optimize.milp, mip_rel_gap 1e-9",
                      "split_brute_max_nodes": split.BRUTE_MAX_NODES},
           "highs_vs_cpsat": one, "split_vs_milp": two, "seconds": time.perf_counter() - t0}
    with open(args.out, "w") as f:
        json.dump(rec, f, indent=1, default=str)
    print(f"wrote {args.out} ({rec['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
