"""Sparse GEMV on the SparAMX-style kernels (``backends/amx``) beside dense kernels and torch.

Shapes 4096×4096 and 11008×4096 (``N × K``), batch 1, ``--threads`` threads (2), unstructured
magnitude sparsity 0–90%. Kernels, all in the same run, interleaved round by round:

- qcompile sparse bf16 / int8 on AVX2 (``pshufb`` expansion from a table per mask byte, FMA /
  ``vpmaddwd``), on AVX-512 (``vpexpandw`` + ``vdpbf16ps``, ``vpexpandb`` + ``vpdpbusd``) and,
  where the AMX gate allows it, on AMX tiles — every kind ``QCOMPILE_ISA`` allows here;
- qcompile dense bf16 / int8 in the same row layout, on the same kinds;
- torch ``F.linear`` in bf16 and fp32 on the pruned weight, and torch sparse CSR (fp32,
  ``torch.sparse.mm``).

Each kernel's output is checked against a float64 product before timing (relative error
≤ 1e-2 for bf16, 3e-2 for int8: both also round the activations). Every kernel cycles through
enough copies of its weight that they exceed the L3 cache + 32 MiB (``--copies-mb``; DRAM-bound,
as a model's weights are).
A round is ``--inner`` calls; the table shows the median over ``--rounds`` rounds, effective
GB/s of the weight bytes (values + masks + offsets) and speed-ups against qcompile's dense
bf16 kernel on the same instruction set (torch's rows: against the widest one) and torch bf16.
The goals checked (reported, not asserted): at 70% sparsity the sparse bf16 kernel ≥ 1.8×
faster than both on AVX-512 / AMX, ≥ 1.5× on AVX2. Writes ``--out`` (JSON) and a ``.png`` of
speed-up against sparsity::

    .venv/bin/python benchmarks/sparse.py            # from the repository root
    .venv/bin/python benchmarks/sparse.py --quick    # 1024 x 1024, fewer rounds
    .venv/bin/python benchmarks/sparse.py --isa avx2 # as on an AVX2-only CPU (below)

``--isa avx2`` runs the whole benchmark as an AVX2-only CPU would: it sets ``QCOMPILE_ISA=avx2``
(qcompile's kernels), ``ATEN_CPU_CAPABILITY=avx2`` (torch's own kernels) and
``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN, behind torch's linear), then re-executes itself so torch
starts with them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, machine, provenance, table

SHAPES = [(4096, 4096), (11008, 4096)]
SPARSITIES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9)
#: the 70%-sparsity goal per instruction set (sparse bf16 over dense bf16 and torch bf16)
GOALS = {"AVX2": 1.5, "AVX-512": 1.8, "AMX": 1.8}
LABEL = {"avx2": "AVX2", "avx512": "AVX-512", "amx": "AMX"}
TORCH_BF16 = "torch bf16 linear"
#: what ``--isa avx2`` sets: qcompile, torch (ATen) and oneDNN capped at AVX2
AVX2_ENV = {"QCOMPILE_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def isa_kinds() -> list[str]:
    """The kernel kinds this CPU runs at the level ``QCOMPILE_ISA`` allows, narrowest first."""
    from qcompile import isa
    from qcompile.backends.amx import build as B
    lib = B.library()
    kinds = ["avx2"] if lib.has_avx2() and isa.at_least("avx2") else []
    if lib.has_avx512() and isa.at_least("avx512"):
        kinds.append("avx512")
    if B.amx_available() and isa.at_least("amx"):
        kinds.append("amx")
    return kinds


def _ref(name: str, kinds: list[str]) -> str:
    """The dense bf16 kernel a row is compared with: the same instruction set's, or the widest."""
    for kd in kinds:
        if name.endswith(f"({LABEL[kd]})"):
            return f"qcompile dense bf16 ({LABEL[kd]})"
    return f"qcompile dense bf16 ({LABEL[kinds[-1]]})"


def pruned(n: int, k: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    if sparsity:
        thr = w.abs().reshape(-1).kthvalue(int(sparsity * w.numel())).values
        w[w.abs() <= thr] = 0
    return w


def kernels(w: torch.Tensor, threads: int, copies_bytes: int):
    """(name, bytes, make() -> (list of callables over copies, check(x) -> y))."""
    from qcompile.backends.amx import build as B
    from qcompile.backends.amx import format as F
    lib = B.library()
    kinds = isa_kinds()
    s = (w.abs().amax(1) / 127).clamp_min(1e-12)
    q = torch.round(w / s[:, None]).clamp(-128, 127).to(torch.int8)
    out = []
    for label, build in (("sparse bf16", lambda: F.sparse(w, "bf16")),
                         ("dense bf16", lambda: F.dense(w, "bf16")),
                         ("sparse int8", lambda: F.sparse(q, "int8", scale=s)),
                         ("dense int8", lambda: F.dense(q, "int8", scale=s))):
        sw = build()
        for kd in kinds:
            name = f"qcompile {label} ({LABEL[kd]})"
            out.append((name, sw.nbytes, _ours(lib, sw, kd, threads, copies_bytes)))
    wb = w.to(torch.bfloat16)
    out.append((TORCH_BF16, wb.numel() * 2, _torch(lambda x, ww: torch.nn.functional.linear(
        x.to(torch.bfloat16), ww).float(), wb, copies_bytes)))
    out.append(("torch fp32 linear", w.numel() * 4, _torch(torch.nn.functional.linear, w,
                                                          copies_bytes)))
    csr = w.to_sparse_csr()
    csr_bytes = csr.values().numel() * 4 + csr.col_indices().numel() * 8 + csr.crow_indices().numel() * 8
    out.append(("torch sparse CSR fp32", csr_bytes, _torch(
        lambda x, ww: torch.sparse.mm(ww, x.T).T, csr, copies_bytes)))
    return out


def _l3_bytes() -> int:
    """The last-level cache (sysfs), 32 MiB where it cannot be read."""
    try:
        txt = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(txt[-1], 1)
        return int(txt.rstrip("KM")) * mult
    except (OSError, ValueError):
        return 32 << 20


def _copies(nbytes: int, budget: int) -> int:
    return max(1, min(64, -(-budget // max(nbytes, 1))))


def _ours(lib, sw, kind, threads, budget):
    import copy as _copy
    ws = [sw] + [_copy.deepcopy(sw) for _ in range(_copies(sw.nbytes, budget) - 1)]
    out = np.empty((1, sw.n), np.float32)

    def make(x):
        xn = x.numpy()
        return [lambda w=w: lib.matmul(xn, w, kind=kind, nthreads=threads, out=out) for w in ws]
    return make


def _torch(fn, w, budget):
    nbytes = (w.values().numel() * 4 if w.layout == torch.sparse_csr else w.numel() * w.element_size())
    ws = [w] + [w.clone() for _ in range(_copies(nbytes, budget) - 1)]

    def make(x):
        return [lambda w=w: fn(x, w) for w in ws]
    return make


def check(name: str, y, x: torch.Tensor, w: torch.Tensor) -> float:
    ref = x.double() @ w.double().T
    y = torch.as_tensor(np.asarray(y)).double().reshape(ref.shape)
    err = float((y - ref).norm() / ref.norm())
    if err > (3e-2 if "int8" in name else 1e-2):
        raise SystemExit(f"{name}: relative error {err:.2e} against float64 — not timing it")
    return err


def measure(n, k, sparsity, args):
    w = pruned(n, k, sparsity)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1))
    ks = kernels(w, args.threads, args.copies_mb << 20)
    calls, errs = {}, {}
    for name, nbytes, make in ks:
        cs = make(x)
        errs[name] = check(name, cs[0](), x, w)
        calls[name] = (cs, nbytes)
    times = {name: [] for name in calls}
    order = list(calls)
    for r in range(args.rounds):
        seq = order if r % 2 == 0 else order[::-1]
        for name in seq:
            cs, _ = calls[name]
            for c in cs[: args.inner // 4 or 1]:
                c()
            t = time.perf_counter()
            for i in range(args.inner):
                cs[i % len(cs)]()
            times[name].append((time.perf_counter() - t) / args.inner)
    rows = []
    for name, ts in times.items():
        med = float(np.median(ts))
        rows.append({"name": name, "N": n, "K": k, "sparsity": sparsity, "median_ms": med * 1e3,
                     "p10_ms": float(np.percentile(ts, 10)) * 1e3,
                     "p90_ms": float(np.percentile(ts, 90)) * 1e3,
                     "weight_bytes": calls[name][1], "gb_s": calls[name][1] / med / 1e9,
                     "rel_err": errs[name], "copies": len(calls[name][0])})
    by = {r["name"]: r["median_ms"] for r in rows}
    kinds = isa_kinds()
    for r in rows:
        r["dense_ref"] = _ref(r["name"], kinds)
        r["speedup_vs_dense"] = by[r["dense_ref"]] / r["median_ms"]
        r["speedup_vs_torch_bf16"] = by[TORCH_BF16] / r["median_ms"]
    return rows


def plot(rows, path: Path, shapes):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes):
        sub = [r for r in rows if (r["N"], r["K"]) == (n, k)]
        for name in dict.fromkeys(r["name"] for r in sub):
            pts = sorted((r["sparsity"], r["speedup_vs_dense"]) for r in sub if r["name"] == name)
            ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=name)
        for g in sorted(set(GOALS.values())):
            ax.axhline(g, ls=":", c="gray")
        ax.set_title(f"{n}×{k}, batch 1")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("speed-up over qcompile dense bf16 (same ISA)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--copies-mb", type=int, default=(_l3_bytes() >> 20) + 32,
                    help="MiB of weight copies each kernel cycles through (default: L3 + 32 MiB)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--isa", choices=["avx2"], help="run as an AVX2-only CPU would (see above)")
    ap.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/sparse.json, sparse_avx2.json "
                         "with --isa avx2)")
    args = ap.parse_args()
    if args.isa == "avx2" and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / \
            ("sparse_avx2.json" if args.isa == "avx2" else "sparse.json")
    shapes, sps = SHAPES, tuple(args.sparsities)
    if args.quick:
        shapes, sps, args.rounds, args.inner, args.copies_mb = [(1024, 1024)], (0.0, 0.7), 3, 5, 8
    torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm
    t0 = time.time()
    rows = []
    for n, k in tqdm([(s, sp) for s in shapes for sp in sps], desc="sparse GEMV", unit="case"):
        rows += measure(*n, k, args)
    head = ["kernel", "N×K", "sparsity", "ms", "p10-p90", "GB/s", "× dense bf16", "× torch bf16"]
    table(head, [[r["name"], f"{r['N']}x{r['K']}", f"{r['sparsity']:.0%}", f"{r['median_ms']:.3f}",
                  f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}", f"{r['gb_s']:.1f}",
                  f"{r['speedup_vs_dense']:.2f}", f"{r['speedup_vs_torch_bf16']:.2f}"] for r in rows])
    goal = {}
    for n, k in shapes:
        at = [r for r in rows if (r["N"], r["K"]) == (n, k) and abs(r["sparsity"] - 0.7) < 1e-9]
        for r in at:
            if r["name"].startswith("qcompile sparse bf16"):
                want = GOALS[r["name"].rsplit("(", 1)[1].rstrip(")")]
                goal[f"{n}x{k} {r['name']}"] = {
                    "vs_dense": r["speedup_vs_dense"], "vs_torch_bf16": r["speedup_vs_torch_bf16"],
                    "goal": want,
                    "met": r["speedup_vs_dense"] >= want and r["speedup_vs_torch_bf16"] >= want}
    for key, g in goal.items():
        print(f"goal at 70%: {key}: {g['vs_dense']:.2f}x over dense bf16 (same ISA), "
              f"{g['vs_torch_bf16']:.2f}x over torch bf16 ({'meets' if g['met'] else 'misses'} "
              f"{g['goal']}x)")
    from qcompile import isa
    from qcompile.backends.amx import build as B
    res = {"benchmark": "sparse", **provenance(),
           "machine": machine(threads=args.threads, amx=B.amx_available()),
           "isa": {**isa.describe(), "kinds": isa_kinds(),
                   "env": {k: os.environ.get(k) for k in AVX2_ENV},
                   "torch_capability": torch.backends.cpu.get_cpu_capability()},
           "config": {"rounds": args.rounds, "inner": args.inner, "copies_mb": args.copies_mb,
                      "shapes": shapes, "sparsities": list(sps)},
           "rows": rows, "goal": {"speedup_min": GOALS, "at_70": goal},
           "wall_s": time.time() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    plot(rows, args.out.with_suffix(".png"), shapes)
    print(f"wall time {time.time() - t0:.1f} s; wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
