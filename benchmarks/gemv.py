"""Quantized linear kernels of the ``cpu`` target (``backends/tvm/kernels/quant.py``) beside
ONNX Runtime's ``MatMulNBits`` and fp32 BLAS, all in one run.

Kernels, each ``y[m, N] = x[m, K] · Wᵀ`` with fp32 ``x`` and ``y``:

- qcompile W4-g128 (symmetric int4, groups of 128; and the asymmetric uint4 variant), MXFP4
  and W8A8 (dynamic per-token int8 activations, VNNI), built once per shape with a symbolic
  ``m`` (the form the lowering uses) from the codes and scales ``qcompile.formats`` produces;
- ONNX Runtime ``MatMulNBits`` (com.microsoft, 4 bits, block 128, weights packed by ORT's own
  ``quantize_matmul_4bits``), a one-node model, ``intra_op_num_threads`` = ``--threads``: the
  default ``accuracy_level`` 0 (fp32 activations, what our W4 kernel computes) and
  ``accuracy_level=4`` (activations quantized to int8 per block inside the op: faster, not the
  same arithmetic);
- numpy ``x @ w.T`` and ``torch.nn.functional.linear`` on the fp32 weight.

Shapes ``N × K`` = 4096 × 4096 and 11008 × 4096, batches 1, 4, 8, ``--threads`` threads (2).
The other processes on a small machine make single timings noisy, so every kernel is timed
interleaved with the others, ``--rounds`` rounds of ``--inner`` calls (a round's median), and
the table shows the median over rounds and each kernel's time relative to ORT ``MatMulNBits``
(accuracy_level 0) in the same rounds. Effective GB/s = bytes of the packed weights (codes and
scales; fp32 for BLAS) / time. The goal checked (reported, not asserted): qcompile W4-g128 at
batch 1 within 1.1× of ORT's time at both shapes.

GEMM section (compute-bound, what an encoder or a prefill runs): MiniLM's linears
``N × K`` = 384 × 384 (q/k/v/out), 1536 × 384 (FFN up), 384 × 1536 (FFN down) at
``--gemm-m`` rows (1024 = batch 8 × seq 128): qcompile W4-g128 and W8A8 (the same builds as
above), qcompile's fp32 ``dense`` kernel (``kernels/dense.py``, on its packed weight), torch fp32
``F.linear`` (oneDNN) and ORT ``MatMulNBits`` at accuracy levels 0 and 4, interleaved the same
way; times relative to our fp32 ``dense`` (the median of per-round ratios). The goal checked:
qcompile W4-g128 within 1.1× of ``dense`` at all three shapes. Writes ``--out`` (JSON, the
section under ``"gemm"``) and a ``.png`` beside it::

    .venv/bin/python benchmarks/gemv.py            # from the repository root
    .venv/bin/python benchmarks/gemv.py --quick    # smoke run: 1024 x 1024, fewer rounds
    .venv/bin/python benchmarks/gemv.py --gemm-only  # only the GEMM section
"""
from __future__ import annotations

import os
import sys


def _early_threads(argv) -> int:
    """``--threads`` before numpy, torch and TVM start their thread pools."""
    for i, a in enumerate(argv):
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
    return 2


_THREADS = _early_threads(sys.argv)
for _v in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = str(_THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import ROOT, machine, provenance, table  # noqa: E402

from qcompile import formats as F  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096)]
BATCHES = (1, 4, 8)
GOAL = 1.1
OURS_W4 = "qcompile W4-g128"
OURS_W8A8 = "qcompile W8A8"
PEER = "ORT MatMulNBits"
#: the GEMM section: MiniLM-L6's linears (q/k/v/out, FFN up, FFN down) at batch 8 × seq 128
GEMM_SHAPES = [(384, 384), (1536, 384), (384, 1536)]
GEMM_M = 1024
GEMM_REF = "qcompile fp32 dense"


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02


# -- our kernels -------------------------------------------------------------------------------
def build(fn, target):
    import tvm
    return tvm.compile(tvm.IRModule({"main": fn}), target=target)


def ours(w: torch.Tensor, target, info, only: tuple[str, ...] | None = None) -> list[dict]:
    """(name, make(x) -> callable, packed bytes, fake-quant weight) of each qcompile kernel:
    those named in ``only``, by default all but the fp32 ``dense`` (the GEMM section's)."""
    import tvm

    from qcompile.backends.tvm.kernels import quant as Q
    n, k = w.shape
    m = tvm.tirx.Var("m", "int64")
    out = []
    want = lambda name: name in only if only is not None else name != GEMM_REF  # noqa: E731

    def entry(name, ex, arrays, wdq, extra=""):
        consts = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]

        def make(x: np.ndarray):
            xt = tvm.runtime.tensor(x)
            yt = tvm.runtime.tensor(np.zeros((x.shape[0], n), np.float32))
            return (lambda: ex(xt, *consts, yt)), (lambda: yt.numpy())
        out.append({"name": name, "make": make, "bytes": int(sum(a.nbytes for a in arrays)),
                    "wdq": wdq, "note": extra})

    for name, reg, opts, asym in ((OURS_W4, "int4", {"group_size": 128}, False),
                                  (OURS_W4 + " asym", "uint4", {"group_size": 128}, True)):
        if not want(name):
            continue
        fmt = F.get(reg, **opts)
        qt = fmt.quantize(w)
        pk = Q.pack_int_weight(qt.codes, qt.params["scale"], qt.params.get("zero_point"), 4)
        ex = build(Q.dequant_matmul(m, n, k, bits=4, group=128, asym=asym, info=info), target)
        entry(name, ex, [pk[a] for a in Q.INT_ARGS if a in pk], fmt.dequantize(qt),
              "fp32 acts, LUT decode" if info.avx512 else "fp32 acts")
    if want("qcompile MXFP4"):
        fmt = F.get("mxfp4")
        qt = fmt.quantize(w)
        pk = Q.pack_mx_weight(qt.codes, qt.params["scale"], "mxfp4")
        ex = build(Q.mx_dequant_matmul(m, n, k, fmt="mxfp4", info=info), target)
        entry("qcompile MXFP4", ex, [pk[a] for a in Q.MX_ARGS], fmt.dequantize(qt), "fp32 acts")
    if want(OURS_W8A8):
        fmt = F.get("int8", granularity="per_channel")
        qt = fmt.quantize(w)
        pk = Q.pack_int8_weight(qt.codes, qt.params["scale"])
        ex = build(Q.int8_matmul(m, n, k, info=info), target)
        entry(OURS_W8A8, ex, [pk[a] for a in Q.W8A8_ARGS], fmt.dequantize(qt),
              "int8 per-token acts, " + ("VNNI" if info.vnni else "no VNNI"))
    if want(GEMM_REF):  # the fp32 kernel of the cpu target, on its packed panels
        from qcompile.backends.tvm.kernels import dense as D
        ex = build(D.dense(m, n, k, info=info), target)
        entry(GEMM_REF, ex, [D.pack_dense_weight(w.numpy(), info)], w,
              "fp32, packed [N/nb, K, nb] panels")
    return out


# -- peers -------------------------------------------------------------------------------------
def ort_matmulnbits(w: torch.Tensor, threads: int, accuracy_level: int = 0):
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits
    n, k = w.shape
    g = 128
    packed = np.zeros((n, k // g, g // 2), np.uint8)
    sc = np.zeros((n, k // g), np.float32)
    zp = np.zeros((n, (k // g + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w.numpy().T), sc, zp, g, n, k, True)
    inits = [helper.make_tensor("B", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True),
             helper.make_tensor("S", TensorProto.FLOAT, sc.shape, sc.tobytes(), raw=True)]
    attrs = {"K": k, "N": n, "bits": 4, "block_size": g}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft",
                            **attrs)
    graph = helper.make_graph([node], "matmulnbits",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, k).astype(np.float32)
    wdq = torch.from_numpy(((codes.reshape(n, -1, g) - 8) * sc[..., None]).reshape(n, k))

    def make(x):
        box = {}

        def run():
            box["y"] = sess.run(None, {"x": x})[0]
        return run, (lambda: box["y"])
    return {"make": make, "bytes": packed.nbytes + sc.nbytes, "wdq": wdq}


def peers(w: torch.Tensor, threads: int, numpy_blas: bool = True) -> list[dict]:
    out = []
    try:
        p = ort_matmulnbits(w, threads)
        out.append({"name": PEER, **p, "note": "accuracy_level 0: fp32 acts"})
        p = ort_matmulnbits(w, threads, accuracy_level=4)
        out.append({"name": PEER + " acc4", **p, "note": "accuracy_level 4: int8 acts"})
    except ImportError as e:  # the onnx extra is optional
        print(f"skipping ONNX Runtime: {e}")
    wn = w.numpy()
    wt = torch.nn.functional.linear

    def np_make(x):
        box = {}

        def run():
            box["y"] = x @ wn.T
        return run, (lambda: box["y"])

    def torch_make(x):
        xt, box = torch.from_numpy(x), {}

        def run():
            with torch.inference_mode():
                box["y"] = wt(xt, w)
        return run, (lambda: box["y"].numpy())
    if numpy_blas:
        out.append({"name": "numpy fp32 matmul", "make": np_make, "bytes": wn.nbytes, "wdq": w,
                    "note": "x @ w.T"})
    out.append({"name": "torch fp32 linear", "make": torch_make, "bytes": wn.nbytes, "wdq": w,
                "note": "F.linear"})
    return out


# -- timing ------------------------------------------------------------------------------------
def rel(y: np.ndarray, ref: torch.Tensor) -> float:
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    return float((y - ref).norm() / ref.norm())


def _lib(name: str) -> str:
    return name.split()[0]


def measure(kernels: list[dict], xs: dict[int, np.ndarray], rounds: int, inner: int,
            settle_s: float = 0.01, switch_s: float = 0.15) -> None:
    """Interleaved timing: every round runs every (kernel, batch) ``inner`` times, after
    ``settle_s`` of untimed calls, ``switch_s`` when the previous job was another library's:
    the thread pools of ORT, TVM, OpenBLAS and libgomp spin for a while (libgomp for tens of
    ms) after their last call and would steal the first timed calls' cores."""
    jobs = [(kn, b, *kn["make"](xs[b])) for kn in kernels for b in xs]
    for kn, b, run, get in jobs:
        for _ in range(3):
            run()
        ref = torch.from_numpy(xs[b]).double() @ kn["wdq"].double().T
        kn.setdefault("check", {})[b] = rel(get(), ref)
        kn.setdefault("rounds", {})[b] = []
    prev = None
    for _ in range(rounds):
        for kn, b, run, _ in jobs:
            t_end = time.perf_counter() + (settle_s if _lib(kn["name"]) == prev else switch_s)
            prev = _lib(kn["name"])
            run()
            while time.perf_counter() < t_end:
                run()
            ts = []
            for _ in range(inner):
                t = time.perf_counter()
                run()
                ts.append(time.perf_counter() - t)
            kn["rounds"][b].append(statistics.median(ts))


def plot(rows: list[dict], path: Path, gemm_rows: list[dict] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    shapes = sorted({(r["N"], r["K"]) for r in rows}, key=lambda s: s[0])
    gshapes = list(dict.fromkeys((r["N"], r["K"]) for r in gemm_rows or []))
    ncols = max(len(shapes), len(gshapes), 1)
    nrows = int(bool(shapes)) + int(bool(gshapes))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.8 * nrows), squeeze=False)
    if shapes:
        names = list(dict.fromkeys(r["name"] for r in rows))
        batches = sorted({r["batch"] for r in rows})
        width = 0.8 / len(batches)
        for ax, (n, k) in zip(axes[0], shapes):
            for bi, b in enumerate(batches):
                vals = [next((r["median_ms"] for r in rows if r["name"] == nm and r["N"] == n
                              and r["batch"] == b), np.nan) for nm in names]
                ax.bar(np.arange(len(names)) + bi * width, vals, width, label=f"batch {b}")
            ax.set_xticks(np.arange(len(names)) + width * (len(batches) - 1) / 2)
            ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
            ax.set(yscale="log", ylabel="latency, ms (median of rounds)",
                   title=f"GEMV: N×K = {n}×{k}")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.grid(True, axis="y", which="both", alpha=.3)
            ax.legend(fontsize=8)
        for ax in axes[0][len(shapes):]:
            ax.axis("off")
    if gshapes:
        gax = axes[nrows - 1]
        names = list(dict.fromkeys(r["name"] for r in gemm_rows))
        for ax, (n, k) in zip(gax, gshapes):
            sel = {r["name"]: r for r in gemm_rows if (r["N"], r["K"]) == (n, k)}
            vals = [sel[nm]["median_ms"] if nm in sel else np.nan for nm in names]
            colors = ["tab:red" if nm == OURS_W4 else "tab:gray" if nm == GEMM_REF
                      else "tab:blue" for nm in names]
            ax.bar(np.arange(len(names)), vals, 0.7, color=colors)
            for i, nm in enumerate(names):
                if nm in sel and sel[nm].get("vs_dense") is not None:
                    ax.text(i, vals[i], f"{sel[nm]['vs_dense']:.2f}×", ha="center",
                            va="bottom", fontsize=7)
            ax.set_xticks(np.arange(len(names)))
            ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
            m = gemm_rows[0]["m"]
            ax.set(ylabel="latency, ms (median of rounds)",
                   title=f"GEMM: m = {m}, N×K = {n}×{k} (× = time / fp32 dense)")
            ax.grid(True, axis="y", alpha=.3)
        for ax in gax[len(gshapes):]:
            ax.axis("off")
    fig.suptitle("quantized linear kernels, fp32 activations unless noted")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gemm_section(target, info, threads: int, m: int, rounds: int, inner: int,
                 shapes=GEMM_SHAPES) -> list[dict]:
    """The GEMM rows: every kernel on ``x[m, K]`` per shape, interleaved, against our fp32
    ``dense``."""
    out = []
    for n, k in shapes:
        w = weight(n, k)
        tb = time.perf_counter()
        kernels = ours(w, target, info, only=(OURS_W4, OURS_W8A8, GEMM_REF))
        build_s = time.perf_counter() - tb
        kernels += peers(w, threads, numpy_blas=False)
        x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
        # 0.3 s before a library's first timed call: the previous one's workers spin ~0.2 s
        measure(kernels, {m: x}, rounds, inner, switch_s=0.3)
        ref = next(kn for kn in kernels if kn["name"] == GEMM_REF)["rounds"][m]
        for kn in kernels:
            rs = kn["rounds"][m]
            med = statistics.median(rs)
            out.append({"name": kn["name"], "N": n, "K": k, "m": m, "median_ms": med * 1e3,
                        "min_ms": min(rs) * 1e3, "max_ms": max(rs) * 1e3,
                        "gflop_s": 2 * m * n * k / med / 1e9,
                        "vs_dense": statistics.median([a / b for a, b in zip(rs, ref)]),
                        "vs_dense_best": min(rs) / min(ref), "weight_bytes": kn["bytes"],
                        "rel_err_vs_own_dequant": kn["check"][m], "note": kn["note"]})
        print(f"GEMM {n}x{k}: qcompile kernels built in {build_s:.1f} s")
    return out


def gemv_section(target, info, threads: int, shapes, batches, rounds: int, inner: int
                 ) -> list[dict]:
    rows = []
    for n, k in shapes:
        w = weight(n, k)
        tb = time.perf_counter()
        kernels = ours(w, target, info)
        build_s = time.perf_counter() - tb
        kernels += peers(w, threads)
        rng = np.random.default_rng(1)
        xs = {b: rng.standard_normal((b, k)).astype(np.float32) for b in batches}
        measure(kernels, xs, rounds, inner)
        peer = next((kn for kn in kernels if kn["name"] == PEER), None)
        for kn in kernels:
            for b in batches:
                rs = kn["rounds"][b]
                med = statistics.median(rs)
                ratio = (statistics.median([x / y for x, y in zip(rs, peer["rounds"][b])])
                         if peer else None)
                best = (min(rs) / min(peer["rounds"][b])) if peer else None
                rows.append({"name": kn["name"], "N": n, "K": k, "batch": b,
                             "median_ms": med * 1e3, "min_ms": min(rs) * 1e3,
                             "max_ms": max(rs) * 1e3, "vs_ort": ratio, "vs_ort_best": best,
                             "gb_s": kn["bytes"] / med / 1e9,
                             "gb_s_best": kn["bytes"] / min(rs) / 1e9, "weight_bytes": kn["bytes"],
                             "rel_err_vs_own_dequant": kn["check"][b], "note": kn["note"]})
        print(f"{n}x{k}: qcompile kernels built in {build_s:.1f} s")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=_THREADS,
                    help="threads of every library (default 2)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 9; quick 3)")
    ap.add_argument("--inner", type=int, help="calls per round (default 30; quick 10)")
    ap.add_argument("--batches", type=int, nargs="+", help=f"rows of x (default {BATCHES})")
    ap.add_argument("--gemm-m", type=int, default=GEMM_M,
                    help=f"rows of x in the GEMM section (default {GEMM_M})")
    ap.add_argument("--gemm-inner", type=int, help="GEMM calls per round (default 10; quick 3)")
    sect = ap.add_mutually_exclusive_group()
    sect.add_argument("--no-gemm", action="store_true", help="skip the GEMM section")
    sect.add_argument("--gemm-only", action="store_true", help="only the GEMM section")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gemv.json",
                    help="JSON record; the plot goes beside it (default benchmarks/results/). "
                    "A section not run is carried over from an existing record, and marked so")
    ap.add_argument("--mcpu", help="build qcompile's kernels for this LLVM CPU (default: the "
                    "host's; e.g. haswell for the AVX2 schedules, which run here too)")
    ap.add_argument("--quick", action="store_true", help="1024 x 1024 only, fewer rounds")
    a = ap.parse_args(argv)
    rounds, inner = a.rounds or (3 if a.quick else 9), a.inner or (10 if a.quick else 30)
    ginner = a.gemm_inner or (3 if a.quick else 10)
    shapes = [(1024, 1024)] if a.quick else SHAPES
    batches = tuple(a.batches or BATCHES)
    torch.set_num_threads(a.threads)

    from qcompile.backends.tvm.target import cpu_target, host_cpu
    target = cpu_target(a.mcpu, cores=a.threads)
    info = host_cpu(target)
    t0 = time.perf_counter()
    rows = [] if a.gemm_only else gemv_section(target, info, a.threads, shapes, batches,
                                               rounds, inner)
    grows = [] if a.no_gemm else gemm_section(target, info, a.threads, a.gemm_m, rounds,
                                              ginner)
    wall = time.perf_counter() - t0

    if rows:
        print(f"\nGEMV latency, ms: the median and the best of {rounds} interleaved rounds "
              f"(each the median of {inner} calls); {a.threads} threads. 'vs ORT' = time / ORT "
              f"MatMulNBits (accuracy_level 0): the median of the per-round ratios, and best / "
              f"best (the least disturbed rounds: other processes share the cores); GB/s = "
              f"packed weight bytes / best time")
        table(["kernel", "N x K", "batch", "ms", "best", "vs ORT", "best/best", "GB/s", "err",
               "note"],
              [[r["name"], f"{r['N']}x{r['K']}", r["batch"], f"{r['median_ms']:.3f}",
                f"{r['min_ms']:.3f}", f"{r['vs_ort']:.2f}" if r["vs_ort"] is not None else "-",
                f"{r['vs_ort_best']:.2f}" if r["vs_ort_best"] is not None else "-",
                f"{r['gb_s_best']:.1f}", f"{r['rel_err_vs_own_dequant']:.0e}", r["note"]]
               for r in rows])
    goal = {f"{r['N']}x{r['K']}": (r["vs_ort"], r["vs_ort_best"]) for r in rows
            if r["name"] == OURS_W4 and r["batch"] == 1 and r["vs_ort"] is not None}
    if goal:
        print(f"\nGoal, {OURS_W4} batch 1 within {GOAL}x of {PEER}: " + ", ".join(
            f"{s} {v:.2f}x median, {bb:.2f}x best "
            f"({'meets it' if max(v, bb) <= GOAL else 'MISSES it'})"
            for s, (v, bb) in goal.items())
            + ("" if not a.quick else " (quick shapes, not the goal's)"))
    if grows:
        print(f"\nGEMM latency at m = {a.gemm_m}, ms: the median and the best of {rounds} "
              f"interleaved rounds (each the median of {ginner} calls); {a.threads} threads. "
              f"'vs dense' = time / {GEMM_REF}: the median of the per-round ratios, and best / "
              f"best; GFLOP/s = 2·m·N·K / median time")
        table(["kernel", "N x K", "ms", "best", "vs dense", "best/best", "GFLOP/s", "err",
               "note"],
              [[r["name"], f"{r['N']}x{r['K']}", f"{r['median_ms']:.3f}", f"{r['min_ms']:.3f}",
                f"{r['vs_dense']:.2f}", f"{r['vs_dense_best']:.2f}", f"{r['gflop_s']:.0f}",
                f"{r['rel_err_vs_own_dequant']:.0e}", r["note"]] for r in grows])
    ggoal = {f"{r['N']}x{r['K']}": (r["vs_dense"], r["vs_dense_best"]) for r in grows
             if r["name"] == OURS_W4}
    if ggoal:
        print(f"\nGoal, {OURS_W4} GEMM (m = {a.gemm_m}) within {GOAL}x of {GEMM_REF}: "
              + ", ".join(f"{s} {v:.2f}x median, {bb:.2f}x best "
                          f"({'meets it' if v <= GOAL else 'MISSES it'})"
                          for s, (v, bb) in ggoal.items()))
    print("'err' = ||y - x·deq(W)ᵀ|| / ||x·deq(W)ᵀ|| against the kernel's own dequantized "
          "weight in fp64 (W8A8: its weight, the activation quantization included)")
    print(f"wall time {wall:.1f} s; CPU {info.mcpu}, {os.cpu_count()} CPUs")

    a.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(a.out.read_text()) if a.out.exists() else {}
    record = {"benchmark": "gemv", **provenance(),
              "machine": machine(cpu=info.mcpu, avx512=info.avx512, vnni=info.vnni,
                                 threads=a.threads),
              "config": {"shapes": shapes, "batches": batches, "rounds": rounds, "inner": inner,
                         "quick": a.quick, "seed": 0, "scale": 0.02},
              "rows": rows, "goal": {"ratio_max": GOAL, "batch1_vs_ort_median_best": goal},
              "gemm": {"m": a.gemm_m, "shapes": GEMM_SHAPES, "rounds": rounds,
                       "inner": ginner, "reference": GEMM_REF, "rows": grows,
                       "goal": {"ratio_max": GOAL, "w4_vs_dense_median_best": ggoal}},
              "wall_s": wall}
    carried = []
    if a.gemm_only and old.get("rows"):
        for key in ("config", "rows", "goal"):
            record[key] = old[key]
        carried.append("gemv")
    if a.no_gemm and old.get("gemm"):
        record["gemm"] = old["gemm"]
        carried.append("gemm")
    if carried:  # what was not measured in this run, and from which run it comes
        record["carried_over"] = {"sections": carried, "commit": old.get("commit"),
                                  "dirty": old.get("dirty")}
    a.out.write_text(json.dumps(record, indent=1))
    plot(record["rows"], a.out.with_suffix(".png"), record["gemm"]["rows"])
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
