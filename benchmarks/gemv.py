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
qcompile W4-g128 within 1.1× of ``dense`` at all three shapes.

LUT section (issue 6; the two above have their weights cache-resident, this one in DRAM):
the T-MAC-style kernels of ``backends/lut`` (int1..int4, groups of 128, int8 activation
tables) at T-MAC's shapes ``N × K`` = 4096 × 4096, 11008 × 4096, 4096 × 11008, batches 1, 4,
8, at 1 and 2 threads (``--lut-threads``; a thread count other than ``--threads`` runs in a
fresh process of this script, merged here: TVM and OpenBLAS size their pools at start),
against ORT ``MatMulNBits`` (4 bits, block 128 and 32, accuracy levels 0 and 4), our TVM
W4-g128 dequant kernel, numpy/torch fp32 and torch bf16, in the same interleaved rounds, with:

- tuned LUT configurations (``tune.choose``: the cached grid search, run with a progress bar
  where missing; ``--tune-only`` fills the cache without measuring; ``--no-tune``: defaults);
  the LUT kernels are called through the library's C entry with fixed pointers;
- checks before timing: every LUT output against the exact fp64 product (NMSE ≤ 5e-4) and bit
  for bit against ``model.lut_matmul`` (the first row of every batch, the last of the largest),
  the others against their own dequantized weights (within 1e-5, int8/bf16 arithmetic 3e-2);
- weights rotated: each call takes the next of enough copies that they add up to more than
  32 MiB + L3 (``--rotate-mib``), so every call reads its weight from DRAM (ORT: one session
  whose graph holds one node per copy, run together, time / copies); the LUT kernels also on
  one copy (``(L3)``, batch 1);
- a streaming read (a C loop summing a buffer of that many bytes, OpenMP over the same threads,
  timed in the same rounds) as the bandwidth roof; effective GB/s = (index bytes + scales;
  fp32/bf16 for BLAS) / time, and its fraction of the streaming read's, per round;
- median of round medians, p10/p90 of all timed calls (ORT: of the runs' means); each round
  times ``--lut-budget-ms`` of calls per kernel (at least 3 calls or one ORT run, at most
  ``--inner``).

Goals (issue 6; ratios in the JSON under ``"lut"``, not asserted), at batch 1 per shape and
thread count against the fastest ORT variant in the same rounds: LUT W2 ≤ 0.47× its time,
W4 ≤ 1.0×, W2 / W4 ≤ 0.6, every width's effective bandwidth ≥ 60% of the streaming read's.

Writes ``--out`` (JSON; sections under ``"rows"``, ``"gemm"``, ``"lut"``), a ``.png`` beside it
and ``<out>_lut.png`` (latency against bits, one panel per shape)::

    .venv/bin/python benchmarks/gemv.py            # from the repository root
    .venv/bin/python benchmarks/gemv.py --quick    # smoke run: small shapes, fewer rounds
    .venv/bin/python benchmarks/gemv.py --gemm-only  # only the GEMM section
    .venv/bin/python benchmarks/gemv.py --sections lut  # only the LUT section
    .venv/bin/python benchmarks/gemv.py --tune-only     # tune the LUT section's kernels
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
import ctypes  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
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
SECTIONS = ("gemv", "gemm", "lut")


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02


def n_copies(nbytes: int, rotate_bytes: int) -> int:
    """Copies of a weight to cycle through so that one cycle reads more than ``rotate_bytes``
    (the LUT section: 32 MiB + L3, so every call finds its weight in DRAM); 0: one copy, the
    cache-resident case of the GEMV and GEMM sections."""
    return 1 if rotate_bytes <= 0 else max(3, -(-rotate_bytes // max(nbytes, 1)))


def rotating(calls):
    """One zero-argument call per invocation, cycling through ``calls`` (one per weight copy)."""
    if len(calls) == 1:
        return calls[0]
    nxt = itertools.cycle(calls).__next__
    return lambda: nxt()()


# -- our kernels -------------------------------------------------------------------------------
def build(fn, target):
    import tvm
    return tvm.compile(tvm.IRModule({"main": fn}), target=target)


def ours(w: torch.Tensor, target, info, only: tuple[str, ...] | None = None,
         rotate_bytes: int = 0) -> list[dict]:
    """(name, make(x) -> callable, packed bytes, fake-quant weight) of each qcompile kernel:
    those named in ``only``, by default all but the fp32 ``dense`` (the GEMM section's); with
    ``rotate_bytes``, each call takes the next of :func:`n_copies` copies of the weight."""
    import tvm

    from qcompile.backends.tvm.kernels import quant as Q
    n, k = w.shape
    m = tvm.tirx.Var("m", "int64")
    out = []
    want = lambda name: name in only if only is not None else name != GEMM_REF  # noqa: E731

    def entry(name, ex, arrays, wdq, extra=""):
        nbytes = int(sum(a.nbytes for a in arrays))
        copies = [[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
                  for _ in range(n_copies(nbytes, rotate_bytes))]

        def make(x: np.ndarray):
            xt = tvm.runtime.tensor(x)
            yt = tvm.runtime.tensor(np.zeros((x.shape[0], n), np.float32))
            return (rotating([functools.partial(ex, xt, *c, yt) for c in copies]),
                    (lambda: yt.numpy()))
        out.append({"name": name, "make": make, "bytes": nbytes, "copies": len(copies),
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
def _external(name: str, dtype: int, a: np.ndarray):
    """An initializer whose bytes the session options hand over (nothing serialized)."""
    from onnx import TensorProto
    t = TensorProto(name=name, data_type=dtype, dims=a.shape,
                    data_location=TensorProto.EXTERNAL)
    for key, val in (("location", "memory"), ("offset", "0"), ("length", str(a.nbytes))):
        t.external_data.add(key=key, value=val)
    return t


def ort_pack4(w: torch.Tensor, block: int = 128):
    """ORT's own 4-bit packing of ``w`` (``quantize_matmul_4bits``, symmetric, zero point 8):
    codes, scales and the weight they stand for."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits
    n, k = w.shape
    g = block
    packed = np.zeros((n, k // g, g // 2), np.uint8)
    sc = np.zeros((n, k // g), np.float32)
    zp = np.zeros((n, (k // g + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w.numpy().T), sc, zp, g, n, k, True)
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, k).astype(np.float32)
    wdq = torch.from_numpy(((codes.reshape(n, -1, g) - 8) * sc[..., None]).reshape(n, k))
    return packed, sc, wdq


def _distinct(a: np.ndarray, i: int) -> np.ndarray:
    b = a.copy()
    b.flat[(i * 7919) % b.size] ^= 0x11
    return b


def ort_matmulnbits(w: torch.Tensor, threads: int, accuracy_level: int = 0, block: int = 128,
                    rotate_bytes: int = 0, packing=None):
    """A ``MatMulNBits`` session (4 bits, ``block``) on ORT's own packing of ``w`` (``packing``:
    :func:`ort_pack4`'s, to share it between sessions). With ``rotate_bytes`` the graph holds
    :func:`n_copies` nodes, each on its own copy of the packed weight, all reading ``x``: ORT
    runs every node of a session whatever the fetches, so one ``run`` makes ``calls`` calls in
    order and its time / ``calls`` is a call's."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    n, k = w.shape
    g = block
    packed, sc, wdq = packing or ort_pack4(w, block)
    copies = n_copies(packed.nbytes + sc.nbytes, rotate_bytes)
    attrs = {"K": k, "N": n, "bits": 4, "block_size": g}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    nodes, inits, names, values, keep = [], [], [], [], []
    for i in range(copies):
        # each copy differs in one code: ORT shares byte-identical initializers, which made
        # the "rotated" copies one cache-resident weight (measured: 0.40 against 1.17 ms)
        b, s = (packed, sc) if i == 0 else (_distinct(packed, i), sc.copy())
        keep += [b, s]  # the session reads these buffers: they live as long as it
        inits += [_external(f"B{i}", TensorProto.UINT8, b),
                  _external(f"S{i}", TensorProto.FLOAT, s)]
        names += [f"B{i}", f"S{i}"]
        values += [ort.OrtValue.ortvalue_from_numpy(b), ort.OrtValue.ortvalue_from_numpy(s)]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"B{i}", f"S{i}"], [f"y{i}"],
                                      domain="com.microsoft", **attrs))
    graph = helper.make_graph(
        nodes, "matmulnbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["M", n])
         for i in range(copies)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_external_initializers(names, values)
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])

    def make(x):
        box = {}

        def run():
            box["y"] = sess.run(None, {"x": x})
        def get():  # the first copy's output (the others hold one changed code each)
            return box["y"][0]
        return run, get
    return {"make": make, "bytes": packed.nbytes + sc.nbytes, "wdq": wdq, "copies": copies,
            "calls": copies, "keep": keep, "session": sess}


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


def make_jobs(kernels: list[dict], xs: dict[int, np.ndarray]) -> list[tuple]:
    """``(kernel, batch, run, get)`` for every kernel and each of its batches (``"batches"``,
    default all), kernel-major: one library's jobs stay together."""
    return [(kn, b, *kn["make"](xs[b])) for kn in kernels for b in xs
            if b in kn.get("batches", xs)]


def check_jobs(jobs: list[tuple], xs: dict[int, np.ndarray]) -> None:
    """Each job's output after three calls, before any timing: ``kernel["verify"](x, y)`` (a
    dict with ``ok``) where given, else the relative error against the kernel's own
    dequantized weight ``wdq`` in fp64 (``ok`` when within ``tol``, if the kernel has one)."""
    cache: dict = {}
    for kn, b, run, get in jobs:
        for _ in range(max(1, math.ceil(3 / kn.get("calls", 1)))):
            run()
        if "verify" in kn:
            kn.setdefault("check", {})[b] = kn["verify"](xs[b], get())
            kn.setdefault("check_ok", {})[b] = bool(kn["check"][b]["ok"])
            continue
        if cache.get("wdq") is not kn["wdq"]:  # one fp64 copy of one weight at a time
            cache = {"wdq": kn["wdq"], "w": kn["wdq"].double()}
        err = rel(get(), torch.from_numpy(xs[b]).double() @ cache["w"].T)
        kn.setdefault("check", {})[b] = err
        kn.setdefault("check_ok", {})[b] = bool(err <= kn.get("tol", math.inf))


def time_jobs(jobs: list[tuple], rounds: int, inner: int, settle_s: float = 0.01,
              switch_s: float = 0.15, budget_s: float | None = None, min_inner: int = 3) -> None:
    """Interleaved timing: every round runs every job ``inner`` times, after ``settle_s`` of
    untimed calls, ``switch_s`` when the previous job was another library's: the thread pools
    of ORT, TVM, OpenBLAS and libgomp spin for a while (libgomp for tens of ms) after their
    last call and would steal the first timed calls' cores. With ``budget_s`` a job's count is
    what fills that time (from two untimed calls), between ``min_inner`` (1 for a ``run``
    that makes several calls: ORT with copies, whose time is divided by ``calls``) and
    ``inner``. Stores per job the round medians (``rounds``) and every timed run (``times``)."""
    for kn, b, run, _ in jobs:
        n_in = inner
        if budget_s is not None:
            t = time.perf_counter()
            run()
            run()
            least = 1 if kn.get("calls", 1) > 1 else min_inner
            n_in = min(inner, max(least, math.ceil(budget_s / max(
                (time.perf_counter() - t) / 2, 1e-9))))
        kn.setdefault("inner", {})[b] = n_in
        kn.setdefault("rounds", {})[b] = []
        kn.setdefault("times", {})[b] = []
    prev = None
    for _ in range(rounds):
        for kn, b, run, _ in jobs:
            lib = kn.get("lib") or _lib(kn["name"])
            t_end = time.perf_counter() + (settle_s if lib == prev else switch_s)
            prev = lib
            run()
            while time.perf_counter() < t_end:
                run()
            per = kn.get("calls", 1)
            ts = []
            for _ in range(kn["inner"][b]):
                t = time.perf_counter()
                run()
                ts.append((time.perf_counter() - t) / per)
            kn["rounds"][b].append(statistics.median(ts))
            kn["times"][b].extend(ts)


def measure(kernels: list[dict], xs: dict[int, np.ndarray], rounds: int, inner: int,
            settle_s: float = 0.01, switch_s: float = 0.15) -> None:
    """:func:`check_jobs`, then :func:`time_jobs` with ``inner`` calls per round."""
    jobs = make_jobs(kernels, xs)
    check_jobs(jobs, xs)
    time_jobs(jobs, rounds, inner, settle_s, switch_s)


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


# -- LUT section (issue 6): T-MAC-style kernels at 1-4 bits, weights in DRAM ---------------------
LUT_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
LUT_QUICK_SHAPES = [(1024, 1024), (2048, 1024), (1024, 2048)]
LUT_BITS = (1, 2, 3, 4)
LUT_THREADS = (1, 2)
LUT_BATCHES = (1, 4, 8)
LUT_GROUP = 128
STREAM = "stream read"
#: issue 6's goals at batch 1 (reported, not asserted): LUT time / the fastest ORT MatMulNBits
#: variant's (median of per-round ratios), LUT W2 / W4, and effective / streaming bandwidth
LUT_GOALS = {"w2_vs_ort": 0.47, "w4_vs_ort": 1.0, "w2_vs_w4": 0.6, "bw_frac": 0.6}
NMSE_MAX = 5e-4  # T-MAC's kernel acceptance threshold, against the exact product

_STREAM_SRC = r"""
#include <stdint.h>
/* A plain streaming read: the sum of a buffer's 64-bit words (summed in pairs, so that the
   compiler vectorizes it), OpenMP static split over the threads. */
__attribute__((visibility("default")))
uint64_t qc_stream_read(const uint64_t* p, int64_t n, int nthreads) {
  uint64_t total = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:total)
  for (int64_t i = 0; i < n; i += 8)
    total += ((p[i] + p[i + 1]) + (p[i + 2] + p[i + 3])) +
             ((p[i + 4] + p[i + 5]) + (p[i + 6] + p[i + 7]));
  return total;
}
"""


def l3_bytes() -> int:
    """The last-level cache the kernel sees (sysfs, else sysconf; 0 if unknown)."""
    try:
        s = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(s.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(s[-1], 0)
    except (OSError, ValueError):
        try:
            return max(int(os.sysconf("SC_LEVEL3_CACHE_SIZE")), 0)
        except (ValueError, OSError, AttributeError):
            return 0


def stream_kernel(nbytes: int, threads: int) -> dict:
    """:data:`_STREAM_SRC` over a ``nbytes`` buffer (gcc ``-O3 -march=native -fopenmp``)."""
    from qcompile.backends.lut.build import compile_source
    f = ctypes.CDLL(str(compile_source(_STREAM_SRC, extra=("-march=native",),
                                       tag="stream"))).qc_stream_read
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    f.restype = ctypes.c_uint64
    buf = np.ones(max(nbytes // 64, 1) * 8, np.uint64)  # written: every page is mapped

    def make(_x):
        box = {}

        def run():
            box["s"] = f(buf.ctypes.data, buf.size, threads)
        return run, (lambda: box["s"])
    return {"name": STREAM, "family": "stream", "lib": "stream", "bits": None, "make": make,
            "bytes": buf.nbytes, "copies": 1, "batches": (1,), "buf": buf,
            "verify": lambda _x, s: {"ok": s == buf.size, "sum": int(s)},
            "note": "C loop, Σ of uint64 words"}


def lut_mode(bits: int) -> str:
    return "none" if bits == 1 else "sym"  # int1 is binary; intN symmetric


def lut_configs(shapes, bits_list, batches, tuned: bool) -> dict:
    """The kernel configuration per (N, K, bits, batch class): :func:`tune.choose` (the cached
    grid search, run now where missing, with a progress bar) or the untuned default."""
    from qcompile.backends.lut import tune as T
    out = {}
    for n, k in shapes:
        kp = -(-k // 32) * 32
        for b in bits_list:
            for m in sorted({T.m_bucket(bb) for bb in batches}):
                out[(n, k, b, m)] = (
                    T.choose(n, kp, b, LUT_GROUP, lut_mode(b), m, tune_missing=True) if tuned
                    else T.default_config(b, LUT_GROUP, lut_mode(b), m))
    return out


def _dequant64(lw) -> np.ndarray:
    """``LutWeight.dequantize`` (``s·(q − c) + sb`` in float64), broadcast per group."""
    w = lw.q.reshape(lw.n, lw.ng, lw.group).astype(np.float64)
    w -= (2 ** lw.bits - 1) / 2
    w *= lw.s[:, :, None]
    w += lw.sb[:, :, None]
    return w.reshape(lw.n, lw.kp)[:, :lw.k]


def lut_kernels(w: torch.Tensor, lib, cfgs: dict, bits_list, x_all: np.ndarray, batches,
                threads: int, rotate_bytes: int) -> list[dict]:
    """The LUT kernels on ``w`` at each width: rotating over copies of the packed weight
    (DRAM-bound), then each on one copy (``(L3)``, batch 1), called through the library's C
    entry with fixed pointers. ``verify``: NMSE against the exact fp64 product ≤ NMSE_MAX, and
    bit-equality with the numpy model (``model.lut_matmul``) on row 0 of every batch and the
    last row of the largest (the batches' rows are nested, ``x_b = x_all[:b]``)."""
    from qcompile.backends.lut import model as LM
    from qcompile.backends.lut import weights as LW
    from qcompile.backends.lut.codegen import VARIANT_LAYOUT
    from qcompile.backends.lut.tune import m_bucket
    n, k = w.shape
    rows = sorted({0, len(x_all) - 1})
    dram, l3 = [], []
    for b in bits_list:
        lw = LW.from_quantized(F.get(f"int{b}", group_size=LUT_GROUP).quantize(w))
        per_b = {bb: cfgs[(n, k, b, m_bucket(bb))] for bb in batches}
        packs = {}
        for c in dict.fromkeys(per_b.values()):
            key = (VARIANT_LAYOUT[c.variant], c.rb)
            if key not in packs:
                p0 = LW.pack(lw, key[0], rb=key[1])
                packs[key] = [p0] + [dataclasses.replace(p0, w=p0.w.copy(), sc=p0.sc.copy())
                                     for _ in range(n_copies(p0.nbytes, rotate_bytes) - 1)]
        ref = x_all.astype(np.float64) @ _dequant64(lw).T
        exact = dict(zip(rows, LM.lut_matmul(x_all[rows], lw)))

        def verify(x, y, ref=ref, exact=exact):
            nm = LM.nmse(y, ref[:len(x)])
            rs = [r for r in exact if r < len(x)]
            same = all(np.array_equal(y[r], exact[r]) for r in rs)
            return {"nmse": nm, "nmse_max": NMSE_MAX, "bit_exact": same, "bit_exact_rows": rs,
                    "ok": bool(nm <= NMSE_MAX and same)}

        def make(x, per_b=per_b, packs=packs, single=False):
            c = per_b[x.shape[0]]
            ps = packs[(VARIANT_LAYOUT[c.variant], c.rb)][:1 if single else None]
            f = getattr(lib.lib, f"{c.name}_matmul")
            x = np.ascontiguousarray(x, np.float32)
            y = np.empty((x.shape[0], n), np.float32)
            calls = [functools.partial(f, x.ctypes.data, p.w.ctypes.data, p.sc.ctypes.data,
                                       None, y.ctypes.data, x.shape[0], n, k, p.kp, threads)
                     for p in ps]
            return rotating(calls), (lambda x=x, ps=ps: y.copy())  # x, ps stay alive
        p1 = packs[(VARIANT_LAYOUT[per_b[batches[0]].variant], per_b[batches[0]].rb)]
        base = {"family": "lut", "lib": "lut", "bits": b, "bytes": p1[0].nbytes,
                "config": {bb: c.name for bb, c in per_b.items()}, "verify": verify,
                "note": f"int{b} g{LUT_GROUP}, int8 tables"}
        dram.append({**base, "name": f"LUT W{b}-g{LUT_GROUP}", "make": make,
                     "copies": len(p1)})
        if 1 in batches:
            l3.append({**base, "name": f"LUT W{b}-g{LUT_GROUP} (L3)", "resident": "l3",
                       "make": functools.partial(make, single=True), "copies": 1,
                       "batches": (1,)})
    return dram + l3


def ort_kernels(w: torch.Tensor, threads: int, rotate_bytes: int) -> list[dict]:
    """``MatMulNBits`` at blocks 128 and 32, accuracy levels 0 and 4 (one packing per block)."""
    out = []
    try:
        for g in (128, 32):
            packing = ort_pack4(w, g)
            for acc in (0, 4):
                p = ort_matmulnbits(w, threads, acc, g, rotate_bytes, packing)
                name = PEER + ("" if g == 128 else f" b{g}") + (f" acc{acc}" if acc else "")
                out.append({"name": name, **p, "family": "ort", "bits": 4,
                            "tol": 1e-5 if acc == 0 else 3e-2,
                            "note": f"block {g}, " + ("fp32 acts" if acc == 0 else
                                                       "int8 acts (accuracy_level 4)")})
    except ImportError as e:  # the onnx extra is optional
        print(f"skipping ONNX Runtime: {e}")
    return out


def fp32_kernels(w: torch.Tensor, rotate_bytes: int) -> list[dict]:
    """numpy ``matmul`` and torch ``F.linear`` on (copies of) the fp32 weight, torch on bf16."""
    wn = w.numpy()
    ws = [wn] + [wn.copy() for _ in range(n_copies(wn.nbytes, rotate_bytes) - 1)]
    wts = [torch.from_numpy(a) for a in ws]  # the same buffers as numpy's
    wb = w.to(torch.bfloat16)
    wbs = [wb] + [wb.clone() for _ in range(n_copies(wb.nbytes, rotate_bytes) - 1)]
    lin = torch.nn.functional.linear

    def np_make(x):
        y = np.empty((x.shape[0], wn.shape[0]), np.float32)
        return (rotating([functools.partial(np.matmul, x, a.T, out=y) for a in ws]),
                (lambda: y.copy()))

    def torch_make(x, weights=wts, dtype=torch.float32):
        xt, box = torch.from_numpy(x).to(dtype), {}

        def call(wt):
            with torch.inference_mode():
                box["y"] = lin(xt, wt)
        return (rotating([functools.partial(call, wt) for wt in weights]),
                (lambda: box["y"].float().numpy()))
    return [{"name": "numpy fp32 matmul", "family": "numpy", "bits": 32, "make": np_make,
             "bytes": wn.nbytes, "copies": len(ws), "wdq": w, "tol": 1e-5, "note": "x @ w.T"},
            {"name": "torch fp32 linear", "family": "torch", "lib": "torch", "bits": 32,
             "make": torch_make, "bytes": wn.nbytes, "copies": len(ws), "wdq": w, "tol": 1e-5,
             "note": "F.linear"},
            {"name": "torch bf16 linear", "family": "torch", "lib": "torch", "bits": 16,
             "make": functools.partial(torch_make, weights=wbs, dtype=torch.bfloat16),
             "bytes": wb.nbytes, "copies": len(wbs), "wdq": wb.float(), "tol": 3e-2,
             "note": "F.linear, bf16 x and w"}]


def lut_section(target, info, threads: int, shapes, bits_list, batches, rounds: int,
                inner: int, rotate_bytes: int, tuned: bool, budget_s: float) -> dict:
    """One thread count's part of the LUT section: per shape, every kernel on weights rotated
    through ``rotate_bytes`` (DRAM), interleaved with a streaming read of that many bytes."""
    from qcompile.backends.lut.build import LutLibrary
    t0 = time.perf_counter()
    cfgs = lut_configs(shapes, bits_list, batches, tuned)
    tune_s = time.perf_counter() - t0
    lib = LutLibrary(list(dict.fromkeys(cfgs.values())))
    rows, goals, setup = [], {}, {}
    for n, k in shapes:
        ts = time.perf_counter()
        w = weight(n, k)
        x_all = np.random.default_rng(1).standard_normal((max(batches), k)).astype(np.float32)
        xs = {b: np.ascontiguousarray(x_all[:b]) for b in batches}
        kernels = [stream_kernel(rotate_bytes, threads)]
        kernels += lut_kernels(w, lib, cfgs, bits_list, x_all, batches, threads, rotate_bytes)
        for kn in ours(w, target, info, only=(OURS_W4,), rotate_bytes=rotate_bytes):
            kernels.append({**kn, "family": "tvm", "bits": 4, "tol": 1e-5})
        kernels += ort_kernels(w, threads, rotate_bytes)
        kernels += fp32_kernels(w, rotate_bytes)
        jobs = make_jobs(kernels, xs)
        check_jobs(jobs, xs)
        for kn in kernels:  # the fp64 references are done with: free them before timing
            for key in ("wdq", "verify"):
                kn.pop(key, None)
        gc.collect()
        setup[f"{n}x{k}"] = time.perf_counter() - ts
        time_jobs(jobs, rounds, inner, budget_s=budget_s)
        rows += lut_rows(kernels, n, k, threads, batches)
        goals[f"{n}x{k}"] = lut_goals(rows, n, k, threads)
        print(f"LUT section {n}x{k}, {threads} thread(s): setup {setup[f'{n}x{k}']:.1f} s, "
              f"timed {time.perf_counter() - ts - setup[f'{n}x{k}']:.1f} s")
        del kernels, jobs, w
        gc.collect()
    return {"threads": threads, "rows": rows, "goals": goals,
            "configs": {f"{n}x{k} W{b} m{m}": c.name for (n, k, b, m), c in cfgs.items()},
            "tune_s": tune_s, "setup_s": setup, "wall_s": time.perf_counter() - t0,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median([x / y for x, y in zip(a, b)])


def lut_rows(kernels: list[dict], n: int, k: int, threads: int, batches) -> list[dict]:
    """One row per (kernel, batch): median of round medians, p10/p90 of all timed calls,
    effective GB/s = (packed weight bytes: codes + scales; fp32/bf16 for BLAS) / median time,
    its fraction of the streaming read's in the same rounds, and time / the fastest ORT
    variant at that batch (both medians of per-round ratios)."""
    stream = next(kn for kn in kernels if kn["family"] == "stream")
    s_r = stream["rounds"][1]
    out = []
    for b in batches:
        orts = [kn for kn in kernels if kn["family"] == "ort" and b in kn["rounds"]]
        best = min(orts, key=lambda kn: statistics.median(kn["rounds"][b]), default=None)
        for kn in kernels:
            if b not in kn.get("rounds", {}):
                continue
            rs, ts = kn["rounds"][b], kn["times"][b]
            med = statistics.median(rs)
            p10, p90 = np.percentile(ts, [10, 90])
            chk = kn["check"][b]
            out.append({
                "name": kn["name"], "family": kn["family"], "bits": kn["bits"], "N": n, "K": k,
                "batch": b, "threads": threads, "resident": kn.get("resident", "dram"),
                "median_ms": med * 1e3, "p10_ms": p10 * 1e3, "p90_ms": p90 * 1e3,
                "min_ms": min(ts) * 1e3, "gb_s": kn["bytes"] / med / 1e9,
                "stream_frac": _ratio([kn["bytes"] / t for t in rs],
                                      [stream["bytes"] / t for t in s_r]),
                "vs_ort_best": _ratio(rs, best["rounds"][b]) if best else None,
                "ort_best": best["name"] if best else None,
                "weight_bytes": kn["bytes"], "copies": kn.get("copies", 1),
                "timed_runs": len(ts), "calls_per_run": kn.get("calls", 1),
                "config": kn.get("config", {}).get(b),
                "check": chk if isinstance(chk, dict) else
                {"rel_err": chk, "tol": kn.get("tol"), "ok": kn["check_ok"][b]},
                "rounds_ms": [t * 1e3 for t in rs], "note": kn.get("note", "")})
    return out


def lut_goals(rows: list[dict], n: int, k: int, threads: int) -> dict:
    """:data:`LUT_GOALS` at batch 1 for one shape and thread count, from the per-round times."""
    sel = {r["name"]: r for r in rows if (r["N"], r["K"], r["threads"], r["batch"])
           == (n, k, threads, 1) and r["resident"] == "dram"}
    orts = [r for r in sel.values() if r["family"] == "ort"]
    if not orts:
        return {}
    ref = min(orts, key=lambda r: r["median_ms"])
    rr = lambda a, b: _ratio(a["rounds_ms"], b["rounds_ms"])  # noqa: E731
    out: dict = {"ort_reference": ref["name"]}

    def goal(key, v, le=True):
        lim = LUT_GOALS[key]
        out[key] = {"value": v, ("max" if le else "min"): lim,
                    "met": bool(v <= lim if le else v >= lim)}
    w2, w4 = sel.get(f"LUT W2-g{LUT_GROUP}"), sel.get(f"LUT W4-g{LUT_GROUP}")
    if w2:
        goal("w2_vs_ort", rr(w2, ref))
        out["w2_vs_each_ort"] = {o["name"]: rr(w2, o) for o in orts}
    if w4:
        goal("w4_vs_ort", rr(w4, ref))
        out["w4_vs_each_ort"] = {o["name"]: rr(w4, o) for o in orts}
    if w2 and w4:
        goal("w2_vs_w4", rr(w2, w4))
    fr = {f"W{r['bits']}": r["stream_frac"] for r in sel.values() if r["family"] == "lut"}
    if fr:
        goal("bw_frac", min(fr.values()), le=False)
        out["bw_frac"]["per_bits"] = fr
    out["met_all"] = all(v["met"] for v in out.values() if isinstance(v, dict) and "met" in v)
    return out


def run_lut_children(a, threads_list) -> list[dict]:
    """The LUT section at other thread counts: this script again in a fresh process (TVM's
    and OpenBLAS's pools take their size at start), one after another, before anything else
    runs here; each writes its part to a temporary JSON file."""
    fwd = ["--quick"] * a.quick + ([] if a.tune is None else ["--tune" if a.tune else "--no-tune"])
    for opt, val in (("--rounds", a.rounds), ("--inner", a.inner), ("--mcpu", a.mcpu),
                     ("--rotate-mib", a.rotate_mib), ("--lut-budget-ms", a.lut_budget_ms)):
        if val is not None:
            fwd += [opt, str(val)]
    for opt, vals in (("--lut-batches", a.lut_batches), ("--lut-bits", a.lut_bits),
                      ("--lut-shapes", a.lut_shapes)):
        if vals:
            fwd += [opt, *map(str, vals)]
    parts = []
    for t in threads_list:
        with tempfile.TemporaryDirectory() as d:
            part = Path(d) / "lut.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(t),
                   "--sections", "lut", "--lut-part", str(part), *fwd]
            print(f"LUT section, {t} thread(s): {' '.join(cmd[1:])}", flush=True)
            rc = subprocess.run(cmd).returncode
            if part.exists():
                parts.append({**json.loads(part.read_text()), "returncode": rc})
            else:
                print(f"the {t}-thread LUT run failed (exit {rc}) and wrote nothing")
                parts.append({"threads": t, "rows": [], "goals": {}, "configs": {},
                              "returncode": rc})
    return parts


def print_lut(lut: dict) -> None:
    """The LUT section's tables: batch-1 latency and bandwidth per (shape, threads), larger
    batches, the streaming read, the goals."""
    rows = lut["rows"]
    shapes = list(dict.fromkeys((r["N"], r["K"]) for r in rows))
    cols = sorted({(r["N"], r["K"], r["threads"]) for r in rows},
                  key=lambda c: (shapes.index(c[:2]), c[2]))
    names = list(dict.fromkeys(r["name"] for r in rows))
    at = {(r["name"], r["N"], r["K"], r["threads"], r["batch"]): r for r in rows}
    head = ["kernel"] + [f"{n}x{k} {t}T" for n, k, t in cols]
    print(f"\nLUT section, batch 1: median ms (p10-p90 in the JSON) and effective bandwidth as % "
          f"of the streaming read in the same rounds; weights rotated through "
          f"{lut['config']['rotate_bytes'] / 2**20:.0f} MiB of copies (DRAM) unless '(L3)'; "
          f"{lut['config']['rounds']} rounds")
    table(head, [[nm] + [(f"{r['median_ms']:.3f} {100 * r['stream_frac']:3.0f}%"
                          if (r := at.get((nm, n, k, t, 1))) else "-") for n, k, t in cols]
                 for nm in names if any((nm, n, k, t, 1) in at for n, k, t in cols)])
    big = sorted({r["batch"] for r in rows} - {1})
    if big:
        print("\nLUT section, larger batches: median ms")
        table(["kernel", "batch"] + head[1:],
              [[nm, b] + [(f"{r['median_ms']:.3f}" if (r := at.get((nm, n, k, t, b))) else "-")
                          for n, k, t in cols]
               for b in big for nm in names if any((nm, n, k, t, b) in at for n, k, t in cols)])
    print("\nStreaming read (GB/s, median and p10-p90 of calls):")
    table(["shape", "threads", "GB/s", "p10-p90", "buffer MiB"],
          [[f"{r['N']}x{r['K']}", r["threads"], f"{r['gb_s']:.1f}",
            f"{r['weight_bytes'] / r['p90_ms'] / 1e6:.1f}-"
            f"{r['weight_bytes'] / r['p10_ms'] / 1e6:.1f}", f"{r['weight_bytes'] / 2**20:.0f}"]
           for r in rows if r["family"] == "stream"])
    g = LUT_GOALS
    print(f"\nGoals at batch 1 (LUT time / the fastest ORT W4 in the same rounds; W2 ≤ "
          f"{g['w2_vs_ort']}×, W4 ≤ {g['w4_vs_ort']}×, W2/W4 ≤ {g['w2_vs_w4']}, "
          f"bandwidth ≥ {g['bw_frac']:.0%} of the streaming read):")
    fmt = lambda d, key, pct=False: ("-" if key not in d else (  # noqa: E731
        f"{d[key]['value']:.0%}" if pct else f"{d[key]['value']:.2f}")
        + ("" if d[key]["met"] else " MISS"))
    table(["shape", "threads", "ORT reference", "W2/ORT", "W4/ORT", "W2/W4", "min bw", "all"],
          [[s, t, d.get("ort_reference", "-"), fmt(d, "w2_vs_ort"), fmt(d, "w4_vs_ort"),
            fmt(d, "w2_vs_w4"), fmt(d, "bw_frac", True),
            "met" if d.get("met_all") else "not met"]
           for s, per in lut["goals"].items() for t, d in sorted(per.items())])
    bad = [f"{r['name']} {r['N']}x{r['K']} b{r['batch']} {r['threads']}T" for r in rows
           if not r["check"]["ok"]]
    print("Checks before timing (LUT: NMSE ≤ 5e-4 against fp64 and bit-exact with "
          "model.lut_matmul; others: error against their own dequantized weight): "
          + ("all passed" if not bad else "FAILED: " + ", ".join(bad)))


def lut_markdown(lut: dict) -> str:
    """The README's tables for the LUT section: batch-1 ms (and % of the streaming read) per
    shape and thread count, the streaming read's GB/s, and the goals."""
    rows = [r for r in lut["rows"] if r["batch"] == 1]
    shapes = list(dict.fromkeys((r["N"], r["K"]) for r in rows))
    cols = sorted({(r["N"], r["K"], r["threads"]) for r in rows},
                  key=lambda c: (shapes.index(c[:2]), c[2]))
    at = {(r["name"], r["N"], r["K"], r["threads"]): r for r in rows}
    names = [nm for nm in dict.fromkeys(r["name"] for r in rows) if nm != STREAM]
    out = ["| kernel | " + " | ".join(f"{n}×{k}, {t}T" for n, k, t in cols) + " |",
           "| --- " * (len(cols) + 1) + "|"]
    for nm in names:
        out.append(f"| {nm} | " + " | ".join(
            f"{r['median_ms']:.3f} ({100 * r['stream_frac']:.0f}%)"
            if (r := at.get((nm, n, k, t))) else "—" for n, k, t in cols) + " |")
    out.append("| streaming read, GB/s | " + " | ".join(
        f"{r['gb_s']:.1f}" if (r := at.get((STREAM, n, k, t))) else "—" for n, k, t in cols)
        + " |")
    g = LUT_GOALS
    out += ["", f"| shape | threads | W2 / ORT (≤ {g['w2_vs_ort']}) | W4 / ORT (≤ "
                f"{g['w4_vs_ort']}) | W2 / W4 (≤ {g['w2_vs_w4']}) | least bandwidth "
                f"(≥ {g['bw_frac']:.0%}) | fastest ORT |", "| --- " * 7 + "|"]
    cell = lambda d, key, pct=False: "—" if key not in d else (  # noqa: E731
        (f"{d[key]['value']:.0%}" if pct else f"{d[key]['value']:.2f}")
        + (" ✓" if d[key]["met"] else " ✗"))
    for sh, per in lut["goals"].items():
        for t, d in sorted(per.items()):
            out.append(f"| {sh.replace('x', '×')} | {t} | {cell(d, 'w2_vs_ort')} | "
                       f"{cell(d, 'w4_vs_ort')} | {cell(d, 'w2_vs_w4')} | "
                       f"{cell(d, 'bw_frac', True)} | {d.get('ort_reference', '—')} |")
    return "\n".join(out)


def plot_lut(lut: dict, path: Path) -> None:
    """Latency against weight bits at batch 1, one panel per shape: LUT lines per thread count
    (and the streaming roofline, packed bytes / streaming GB/s), ORT and TVM W4 points at 4
    bits, fp32/bf16 BLAS as horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in lut["rows"] if r["batch"] == 1]
    shapes = list(dict.fromkeys((r["N"], r["K"]) for r in rows))
    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 5), squeeze=False)
    style = {t: ("-" if t == max(threads) else "--") for t in threads}
    point_names = list(dict.fromkeys(r["name"] for r in rows if r["family"] in ("ort", "tvm")))
    colors = dict(zip(point_names, ("tab:orange", "tab:blue", "tab:cyan", "tab:green",
                                    "tab:purple", "tab:pink")))
    flat = list(dict.fromkeys(r["name"] for r in rows if r["family"] in ("numpy", "torch")))
    fcolors = dict(zip(flat, ("tab:gray", "tab:brown", "tab:olive")))
    for ax, (n, k) in zip(axes[0], shapes):
        sel = [r for r in rows if (r["N"], r["K"]) == (n, k)]
        for t in threads:
            st = {r["family"]: r for r in sel if r["threads"] == t and r["family"] == "stream"}
            for res, alpha in (("dram", 1.0), ("l3", 0.45)):
                lr = sorted((r for r in sel if r["threads"] == t and r["family"] == "lut"
                             and r["resident"] == res), key=lambda r: r["bits"])
                if lr:
                    ax.plot([r["bits"] for r in lr], [r["median_ms"] for r in lr], style[t],
                            marker="o", color="tab:red", alpha=alpha,
                            label=f"LUT, {t}T" + (" (L3-resident)" if res == "l3" else ""))
                if lr and res == "dram" and "stream" in st:
                    gbs = st["stream"]["gb_s"]
                    ax.plot([r["bits"] for r in lr], [r["weight_bytes"] / gbs / 1e6 for r in lr],
                            style[t], color="black", lw=0.8,
                            label=f"LUT bytes / stream {gbs:.0f} GB/s, {t}T")
            for i, nm in enumerate(point_names):
                r = next((r for r in sel if r["threads"] == t and r["name"] == nm), None)
                if r:
                    ax.plot(4 + 0.06 * (i - len(point_names) / 2), r["median_ms"],
                            "o" if t == max(threads) else "^", color=colors[nm],
                            mfc=colors[nm] if t == max(threads) else "none",
                            label=f"{nm}, {t}T")
            for nm in flat:
                r = next((r for r in sel if r["threads"] == t and r["name"] == nm), None)
                if r:
                    ax.axhline(r["median_ms"], ls=style[t], color=fcolors[nm], lw=1,
                               label=f"{nm}, {t}T")
        ax.set(xlabel="weight bits", ylabel="latency, ms (median; batch 1)", yscale="log",
               xticks=[1, 2, 3, 4], title=f"GEMV N×K = {n}×{k}, weights in DRAM")
        ax.grid(True, which="both", alpha=.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    fig.suptitle("LUT kernels against ORT MatMulNBits, TVM W4 and BLAS "
                 "(solid/filled: most threads, dashed/open: fewer)")
    fig.tight_layout(rect=(0, 0.05 + 0.022 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=_THREADS,
                    help="threads of every library (default 2)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 9; quick 3)")
    ap.add_argument("--inner", type=int, help="calls per round (default 30; quick 10; the LUT "
                    "section's most)")
    ap.add_argument("--batches", type=int, nargs="+", help=f"rows of x (default {BATCHES})")
    ap.add_argument("--gemm-m", type=int, default=GEMM_M,
                    help=f"rows of x in the GEMM section (default {GEMM_M})")
    ap.add_argument("--gemm-inner", type=int, help="GEMM calls per round (default 10; quick 3)")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                    help="which sections to run (default all)")
    ap.add_argument("--no-gemm", action="store_true", help="skip the GEMM section")
    ap.add_argument("--gemm-only", action="store_true", help="only the GEMM section")
    ap.add_argument("--lut-threads", type=int, nargs="+", default=list(LUT_THREADS),
                    help=f"LUT section thread counts (default {LUT_THREADS}); the others than "
                    "--threads run in a fresh process of this script")
    ap.add_argument("--lut-batches", type=int, nargs="+",
                    help=f"LUT section batches (default {LUT_BATCHES}; quick 1 4)")
    ap.add_argument("--lut-bits", type=int, nargs="+", help=f"LUT widths (default {LUT_BITS})")
    ap.add_argument("--rotate-mib", type=int, help="MiB each LUT-section kernel's weight "
                    "copies add up to, and the streaming read's buffer (default 32 MiB + L3; "
                    "quick 16 MiB)")
    ap.add_argument("--lut-budget-ms", type=float, help="LUT section: timed ms per kernel and "
                    "round (default 20), at least 3 calls, at most --inner")
    ap.add_argument("--lut-shapes", nargs="+", metavar="NxK",
                    help="LUT section shapes (default " + " ".join(f"{n}x{k}" for n, k in
                                                                  LUT_SHAPES) + ")")
    ap.add_argument("--tune", action=argparse.BooleanOptionalAction, help="LUT section: tuned "
                    "kernel configurations (the cached grid search, run where missing; the "
                    "default) or the untuned defaults (--no-tune; the default with --quick, so "
                    "that smoke runs neither tune nor fill the cache with small shapes)")
    ap.add_argument("--tune-only", action="store_true", help="only tune (and cache) the LUT "
                    "section's kernel configurations, at every --lut-threads")
    ap.add_argument("--lut-part", type=Path, help=argparse.SUPPRESS)  # a child's output
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gemv.json",
                    help="JSON record; the plots go beside it (default benchmarks/results/). "
                    "A section not run is carried over from an existing record, and marked so")
    ap.add_argument("--mcpu", help="build qcompile's kernels for this LLVM CPU (default: the "
                    "host's; e.g. haswell for the AVX2 schedules, which run here too)")
    ap.add_argument("--quick", action="store_true", help="small shapes, fewer rounds")
    a = ap.parse_args(argv)
    sections = set(a.sections)
    if a.gemm_only:
        sections = {"gemm"}
    if a.no_gemm:
        sections.discard("gemm")
    rounds, inner = a.rounds or (3 if a.quick else 9), a.inner or (10 if a.quick else 30)
    ginner = a.gemm_inner or (3 if a.quick else 10)
    shapes = [(1024, 1024)] if a.quick else SHAPES
    batches = tuple(a.batches or BATCHES)
    lut_shapes = ([tuple(map(int, s.lower().split("x"))) for s in a.lut_shapes] if a.lut_shapes
                  else LUT_QUICK_SHAPES if a.quick else LUT_SHAPES)
    tuned = a.tune if a.tune is not None else not a.quick
    lut_batches = tuple(a.lut_batches or ((1, 4) if a.quick else LUT_BATCHES))
    lut_bits = tuple(a.lut_bits or LUT_BITS)
    l3 = l3_bytes()
    rotate = (a.rotate_mib << 20 if a.rotate_mib is not None else
              16 << 20 if a.quick else (32 << 20) + l3)
    budget_s = (a.lut_budget_ms if a.lut_budget_ms is not None else 20) / 1e3
    torch.set_num_threads(a.threads)
    others = [t for t in dict.fromkeys(a.lut_threads) if t != a.threads]
    if a.tune_only:
        if a.lut_part is None and others:
            for t in others:
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--threads",
                                str(t), "--tune-only", "--lut-threads", str(t),
                                *(["--quick"] * a.quick),
                                *(["--lut-batches", *map(str, a.lut_batches)]
                                  if a.lut_batches else []),
                                *(["--lut-bits", *map(str, a.lut_bits)] if a.lut_bits else []),
                                *(["--lut-shapes", *a.lut_shapes] if a.lut_shapes else [])],
                               check=True)
        if a.threads in a.lut_threads:
            cfgs = lut_configs(lut_shapes, lut_bits, lut_batches, tuned=True)
            table(["shape", "bits", "batch class", f"config ({a.threads} threads)"],
                  [[f"{n}x{k}", b, m, c.name] for (n, k, b, m), c in cfgs.items()])
        return

    from qcompile.backends.tvm.target import cpu_target, host_cpu
    target = cpu_target(a.mcpu, cores=a.threads)
    info = host_cpu(target)
    t0 = time.perf_counter()
    lut_parts = []
    if "lut" in sections and a.lut_part is None and others:
        lut_parts += run_lut_children(a, others)  # first, while nothing else runs here
    rows = gemv_section(target, info, a.threads, shapes, batches, rounds, inner) \
        if "gemv" in sections else []
    grows = gemm_section(target, info, a.threads, a.gemm_m, rounds, ginner) \
        if "gemm" in sections else []
    if "lut" in sections and a.threads in a.lut_threads:
        lut_parts.append(lut_section(target, info, a.threads, lut_shapes, lut_bits, lut_batches,
                                     rounds, inner, rotate, tuned, budget_s))
    wall = time.perf_counter() - t0
    if a.lut_part is not None:  # a child: hand the part back, nothing else
        part = lut_parts[0]
        a.lut_part.write_text(json.dumps(part))
        sys.exit(0 if all(r["check"]["ok"] for r in part["rows"]) else 1)

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
    if rows or grows:
        print("'err' = ||y - x·deq(W)ᵀ|| / ||x·deq(W)ᵀ|| against the kernel's own "
              "dequantized weight in fp64 (W8A8: its weight, the activation quantization "
              "included)")
    lut = None
    if lut_parts:
        blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        lut = {"config": {"shapes": lut_shapes, "bits": lut_bits, "group": LUT_GROUP,
                          "threads": sorted(p["threads"] for p in lut_parts),
                          "batches": lut_batches, "rounds": rounds, "inner_max": inner,
                          "budget_ms": budget_s * 1e3, "rotate_bytes": rotate, "l3_bytes": l3,
                          "tuned": tuned, "quick": a.quick,
                          "numpy_blas": f"{blas.get('name')} {blas.get('version')}"},
               "rows": [r for p in lut_parts for r in p["rows"]],
               "goals_ref": LUT_GOALS,
               "goals": {s: {f"{p['threads']}T": p["goals"][s] for p in lut_parts
                             if s in p["goals"]}
                         for s in dict.fromkeys(s for p in lut_parts for s in p["goals"])},
               "configs": {f"{p['threads']}T": p["configs"] for p in lut_parts},
               "timing_s": {f"{p['threads']}T": {k: p.get(k) for k in
                                                  ("tune_s", "setup_s", "wall_s",
                                                   "max_rss_mib")}
                            for p in lut_parts}}
        if lut["rows"]:
            print_lut(lut)
            print("\nREADME tables (LUT section, batch 1: ms and % of the streaming read):\n"
                  + lut_markdown(lut) + "\n")
    print(f"wall time {wall:.1f} s; CPU {info.mcpu}, {os.cpu_count()} CPUs")

    a.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(a.out.read_text()) if a.out.exists() else {}
    record = {"benchmark": "gemv", **provenance(),
              "machine": machine(cpu=info.mcpu, avx512=info.avx512, vnni=info.vnni,
                                 threads=a.threads, l3_bytes=l3),
              "config": {"shapes": shapes, "batches": batches, "rounds": rounds, "inner": inner,
                         "quick": a.quick, "seed": 0, "scale": 0.02},
              "rows": rows, "goal": {"ratio_max": GOAL, "batch1_vs_ort_median_best": goal},
              "gemm": {"m": a.gemm_m, "shapes": GEMM_SHAPES, "rounds": rounds,
                       "inner": ginner, "reference": GEMM_REF, "rows": grows,
                       "goal": {"ratio_max": GOAL, "w4_vs_dense_median_best": ggoal}},
              "lut": lut, "wall_s": wall}
    carried = []
    if "gemv" not in sections and old.get("rows"):
        for key in ("config", "rows", "goal"):
            record[key] = old[key]
        carried.append("gemv")
    if "gemm" not in sections and (old.get("gemm") or {}).get("rows"):
        record["gemm"] = old["gemm"]
        carried.append("gemm")
    if "lut" not in sections and (old.get("lut") or {}).get("rows"):
        record["lut"] = old["lut"]
        carried.append("lut")
    if carried:  # what was not measured in this run, and from which run it comes
        record["carried_over"] = {"sections": carried, "commit": old.get("commit"),
                                  "dirty": old.get("dirty")}
    a.out.write_text(json.dumps(record, indent=1))
    written = [a.out]
    if record["rows"] or record["gemm"]["rows"]:
        plot(record["rows"], a.out.with_suffix(".png"), record["gemm"]["rows"])
        written.append(a.out.with_suffix(".png"))
    if record["lut"] and record["lut"]["rows"]:
        lut_png = a.out.with_name(a.out.stem + "_lut.png")
        plot_lut(record["lut"], lut_png)
        written.append(lut_png)
    print("wrote " + ", ".join(map(str, written)))
    failed = [p["threads"] for p in lut_parts if p.get("returncode", 0)] + [
        r["name"] for r in (lut or {}).get("rows", []) if not r["check"]["ok"]]
    if failed:
        sys.exit(f"checks failed or a LUT run failed: {failed}")


if __name__ == "__main__":
    main()
