"""Decoder LLM generation (issue 18): prefill and decode tokens/s of qcompile beside llama.cpp
and torch eager on one random-weight model of TinyLlama-1.1B's shape, at 1 and 2 threads.

- **qcompile**: ``compile_llm`` with fp32 weights and W8 (int8 per channel) on ``cpu``, W4
  (int4, groups of 128) on ``cpu`` and ``lut``, W3 and W2 (groups of 128) on ``lut``; RTN
  (speed does not depend on how the codes were chosen).
- **llama.cpp** (``llama-cpp-python`` built from its source distribution with
  ``GGML_NATIVE=ON``, a benchmark peer only, found under ``$QCOMPILE_PEERS`` or
  ``~/.cache/qcompile/peers``): the same weights converted by llama.cpp's own
  ``convert_hf_to_gguf.py`` to F16 (with its built-in Llama SentencePiece vocabulary — the
  model has no tokenizer), then quantized by its own ``llama_model_quantize`` to Q8_0, Q4_0,
  Q4_K_M and Q2_K. When it is missing, the benchmark says so and runs the rest.
- **torch** eager ``generate`` (fp32 and bf16, Hugging Face's dynamic cache).

Prefill: one 64-token prompt. Decode: 64 new tokens, one at a time after that prompt.
Effective bandwidth: the bytes one decode step reads (every linear's stored weights with their
scales, the LM head, and the KV cache as the engine reads it) over the step's time, against a
streaming read of 1 GiB measured in the same process.

Writes ``benchmarks/results/llm.json`` and ``llm.png`` (tokens/s against bits per weight)::

    .venv/bin/python benchmarks/llm.py            # TinyLlama shape (~25 min on 2 cores)
    .venv/bin/python benchmarks/llm.py --small    # 8 layers of 1024, to try things (~5 min)

Models, artifacts and GGUF files are cached under ``~/.cache/qcompile/bench``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from _common import ROOT, machine, provenance, table

RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("QCOMPILE_BENCH_CACHE", Path.home() / ".cache" / "qcompile" / "bench"))
PEERS = Path(os.environ.get("QCOMPILE_PEERS", Path.home() / ".cache" / "qcompile" / "peers"))
PROMPT, NEW = 64, 64

SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
}

#: qcompile's runs: name -> (target, quantization config)
QCOMPILE = {
    "fp32": ("cpu", None),
    "W8": ("cpu", {"weights": "int8", "group_size": None}),
    "W4 cpu": ("cpu", {"weights": "int4", "group_size": 128}),
    "W4 lut": ("lut", {"weights": "int4", "group_size": 128}),
    "W3 lut": ("lut", {"weights": "int3", "group_size": 128}),
    "W2 lut": ("lut", {"weights": "int2", "group_size": 128}),
}
#: llama.cpp's: name -> llama_ftype (llama.h)
GGUF_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15, "Q2_K": 10}


# -- the model ---------------------------------------------------------------------------------
def model_dir(shape: str) -> Path:
    """A random-weight Llama of ``shape`` saved as a Hugging Face directory (seed 0), once."""
    d = CACHE / f"llama-{shape}-seed0"
    if (d / "config.json").is_file():
        return d
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    print(f"making the random-weight model {d} ...", flush=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(d)
    return d


def load_hf(d: Path, dtype=torch.float32):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(d, dtype=dtype).eval()


def prompt(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(1))


# -- qcompile -----------------------------------------------------------------------------------
def build_artifacts(d: Path, names: list[str]) -> dict[str, Path]:
    """Compile each qcompile run once (2 threads) and save it; a rebuild reuses the saved."""
    import qcompile
    out, model = {}, None
    for name in names:
        target, config = QCOMPILE[name]
        art = CACHE / "artifacts" / f"{d.name}-{name.replace(' ', '-')}-{qcompile.__version__}"
        if (art / "manifest.json").is_file():
            try:  # a cached build from older code may no longer load: build it again
                qcompile.load(art)
            except qcompile.QCompileError as e:
                print(f"  rebuilding {name}: the cached build does not load ({e})", flush=True)
                (art / "manifest.json").unlink()
        if not (art / "manifest.json").is_file():
            model = model or load_hf(d)
            t0 = time.perf_counter()
            llm = qcompile.compile_llm(model, target, config=config, max_seq_len=PROMPT + NEW + 8,
                                       progress=False)
            print(f"  compiled {name} in {time.perf_counter() - t0:.0f} s", flush=True)
            llm.save(art, overwrite=True)
            del llm
        out[name] = art
    return out


def _decode_bytes(graph, kv_read: int) -> tuple[int, float]:
    """(bytes one decode step reads, bits per weight of the linears) of a step graph."""
    from qcompile.placement.costs import storage_bytes
    weights = params = 0
    for n in graph.nodes:
        if n.op == "linear" and graph.is_constant(n.inputs[1]):
            w = n.inputs[1]
            weights += storage_bytes(graph, w)
            params += int(torch.Size([int(x) for x in w.shape]).numel())
    return int(weights + kv_read), 8 * weights / max(params, 1)


def time_qcompile(art: Path, ids: torch.Tensor) -> dict:
    import qcompile
    llm = qcompile.load(art)
    llm.generate(ids[:, :8], 4, stop_tokens=[])                  # warm up both builds
    t0 = time.perf_counter()
    logits = llm.prefill(ids)
    prefill = time.perf_counter() - t0
    tok = int(logits.argmax())
    t0 = time.perf_counter()
    for _ in range(NEW):
        tok = int(llm.decode_step([tok]).argmax())
    decode = (time.perf_counter() - t0) / NEW
    s = llm.spec
    kv = 2 * s.layers * s.kv_heads * s.max_seq_len * s.head_dim * 4  # the whole cache, masked
    nbytes, bits = _decode_bytes(llm.graph, kv)
    return {"prefill_tok_s": PROMPT / prefill, "decode_tok_s": 1 / decode,
            "decode_bytes": nbytes, "bits_per_weight": bits}


# -- torch --------------------------------------------------------------------------------------
def time_torch(d: Path, ids: torch.Tensor, dtype) -> dict:
    model = load_hf(d, dtype)
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=NEW + 1, min_new_tokens=NEW + 1, do_sample=False)
        total = time.perf_counter() - t0
    decode = max(total - prefill, 1e-9) / NEW
    nbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if n.endswith(".weight") and ("proj" in n or "lm_head" in n))
    return {"prefill_tok_s": PROMPT / prefill, "decode_tok_s": 1 / decode,
            "decode_bytes": int(nbytes), "bits_per_weight": 8 * torch.empty((), dtype=dtype).element_size()}


# -- llama.cpp ----------------------------------------------------------------------------------
def llama_cpp_available() -> str | None:
    """None when llama-cpp-python and llama.cpp's converter are installed, else why not."""
    lib = PEERS / "llama_cpp"
    if str(lib) not in sys.path and lib.is_dir():
        sys.path.insert(0, str(lib))
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001 - not built: say so
        return (f"llama-cpp-python is not installed ({type(e).__name__}: {e}); build it with "
                f"CMAKE_ARGS=-DGGML_NATIVE=ON pip install --no-deps --target {lib} "
                "llama-cpp-python diskcache")
    if not (PEERS / "llama_cpp_tools" / "convert_hf_to_gguf.py").is_file():
        return (f"llama.cpp's convert_hf_to_gguf.py (with conversion/, gguf-py/ and "
                f"models/ggml-vocab-llama-spm.gguf) is not in {PEERS / 'llama_cpp_tools'}: copy "
                "them from the llama-cpp-python sdist's vendor/llama.cpp")
    return None


_CONVERT = """
import sys
sys.path.insert(0, {tools!r})
import convert_hf_to_gguf as c
from conversion.llama import LlamaModel
# the random-weight model has no tokenizer: llama.cpp's built-in Llama SentencePiece vocabulary
LlamaModel.set_vocab = lambda self: self._set_vocab_builtin("llama-spm", self.hparams["vocab_size"])
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outfile", {dst!r}, "--outtype", "f16"]
c.main()
"""


def gguf_files(d: Path) -> dict[str, Path]:
    """F16 by llama.cpp's converter, the rest by its quantizer; made once."""
    import llama_cpp
    out = {"F16": CACHE / "gguf" / f"{d.name}-F16.gguf"}
    out["F16"].parent.mkdir(parents=True, exist_ok=True)
    if not out["F16"].is_file():
        tools = str(PEERS / "llama_cpp_tools")
        code = _CONVERT.format(tools=tools, src=str(d), dst=str(out["F16"]))
        r = subprocess.run([sys.executable, "-c", code], cwd=tools, capture_output=True, text=True)
        if r.returncode != 0 or not out["F16"].is_file():
            raise RuntimeError(f"convert_hf_to_gguf failed: {r.stderr[-2000:]}")
    for name, ftype in GGUF_TYPES.items():
        path = CACHE / "gguf" / f"{d.name}-{name}.gguf"
        if not path.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = os.cpu_count() or 1
            rc = llama_cpp.llama_model_quantize(str(out["F16"]).encode(), str(path).encode(), params)
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize to {name} returned {rc}")
        out[name] = path
    return out


def time_llama_cpp(path: Path, ids: torch.Tensor, threads: int) -> dict:
    from llama_cpp import Llama
    sys.path.insert(0, str(PEERS / "llama_cpp_tools" / "gguf-py"))
    from gguf import GGUFReader
    llm = Llama(model_path=str(path), n_ctx=PROMPT + NEW + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=PROMPT, verbose=False)
    toks = ids[0].tolist()
    llm.eval(toks[:8])                                          # warm up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(toks)
    prefill = time.perf_counter() - t0
    tok = 5
    t0 = time.perf_counter()
    for _ in range(NEW):
        llm.eval([tok])
    decode = (time.perf_counter() - t0) / NEW
    reader = GGUFReader(str(path))
    nbytes = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight"
                 and t.name.endswith(".weight") and t.n_elements > 1 and len(t.shape) == 2)
    params = sum(int(t.n_elements) for t in reader.tensors if t.name != "token_embd.weight"
                 and t.name.endswith(".weight") and len(t.shape) == 2)
    del llm
    return {"prefill_tok_s": PROMPT / prefill, "decode_tok_s": 1 / decode,
            "decode_bytes": nbytes, "bits_per_weight": 8 * nbytes / max(params, 1)}


# -- one thread count, in its own process ---------------------------------------------------------
def stream_read_gbs() -> float:
    """GB/s of summing 1 GiB of fp32 (torch, this process's threads), best of 5."""
    x = torch.ones(1 << 28)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        float(x.sum())
        best = max(best, x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return best


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    d = Path(args.model)
    spec = json.loads(args.spec)
    ids = prompt(spec["vocab"])
    rows = {"stream_read_gbs": stream_read_gbs(), "runs": []}
    for name, art in spec["artifacts"].items():
        r = time_qcompile(Path(art), ids)
        rows["runs"].append({"engine": "qcompile", "name": name, "target": QCOMPILE[name][0], **r})
        print(f"  [{args.threads}t] qcompile {name}: {r['decode_tok_s']:.2f} tok/s decode", flush=True)
    for name, path in spec.get("gguf", {}).items():
        r = time_llama_cpp(Path(path), ids, args.threads)
        rows["runs"].append({"engine": "llama.cpp", "name": name, **r})
        print(f"  [{args.threads}t] llama.cpp {name}: {r['decode_tok_s']:.2f} tok/s decode", flush=True)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        r = time_torch(d, ids, dtype)
        rows["runs"].append({"engine": "torch", "name": name, **r})
        print(f"  [{args.threads}t] torch {name}: {r['decode_tok_s']:.2f} tok/s decode", flush=True)
    Path(args.out).write_text(json.dumps(rows))


def run_threads(threads: int, d: Path, spec: dict) -> dict:
    out = CACHE / f"llm-{threads}t.json"
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--model", str(d),
           "--spec", json.dumps(spec), "--out", str(out)]
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


# -- report -------------------------------------------------------------------------------------
def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(res["threads"]), figsize=(6 * len(res["threads"]), 4), squeeze=False)
    marks = {"qcompile": "o", "llama.cpp": "s", "torch": "^"}
    for ax, (t, part) in zip(axes[0], res["threads"].items()):
        for eng in marks:
            runs = [r for r in part["runs"] if r["engine"] == eng]
            ax.scatter([r["bits_per_weight"] for r in runs], [r["decode_tok_s"] for r in runs],
                       marker=marks[eng], label=eng)
            for r in runs:
                ax.annotate(r["name"], (r["bits_per_weight"], r["decode_tok_s"]), fontsize=7)
        ax.set_xlabel("bits per weight (stored, scales included)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{res['model']}, {t} thread(s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def goals(part: dict) -> dict:
    """The issue's ratios for one thread count (None where a run is missing)."""
    def get(engine, name, key="decode_tok_s"):
        return next((r[key] for r in part["runs"] if r["engine"] == engine and r["name"] == name), None)

    def ratio(a, b):
        return a / b if a is not None and b else None
    w4 = max(filter(None, [get("qcompile", "W4 lut"), get("qcompile", "W4 cpu")]), default=None)
    w4_name = "W4 lut" if w4 == get("qcompile", "W4 lut") else "W4 cpu"
    w4_bw = next((r["decode_bytes"] * r["decode_tok_s"] / 1e9 for r in part["runs"]
                  if r["engine"] == "qcompile" and r["name"] == w4_name), None)
    return {"w4_decode_over_q4_0": ratio(w4, get("llama.cpp", "Q4_0")),
            "w2_decode_over_q4_0": ratio(get("qcompile", "W2 lut"), get("llama.cpp", "Q4_0")),
            "w2_decode_over_q2_k": ratio(get("qcompile", "W2 lut"), get("llama.cpp", "Q2_K")),
            "w4_bandwidth_over_stream": ratio(w4_bw, part["stream_read_gbs"]),
            "w4_prefill_over_q4_0": ratio(get("qcompile", w4_name, "prefill_tok_s"),
                                          get("llama.cpp", "Q4_0", "prefill_tok_s"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="8 layers of 1024 instead of TinyLlama")
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        llama_cpp_available()  # puts llama_cpp on sys.path where it is installed
        return worker(a)
    warnings.filterwarnings("ignore")
    shape = "small" if a.small else "tinyllama"
    d = model_dir(shape)
    res = {"machine": machine(), **provenance(), "model": f"Llama, {shape} shape, random weights",
           "shape": SHAPES[shape], "prompt_tokens": PROMPT, "new_tokens": NEW, "threads": {}}
    print("compiling qcompile's runs ...", flush=True)
    arts = build_artifacts(d, list(QCOMPILE))
    spec = {"vocab": SHAPES[shape]["vocab_size"], "artifacts": {k: str(v) for k, v in arts.items()}}
    why = llama_cpp_available()
    if why is None:
        try:
            spec["gguf"] = {k: str(v) for k, v in gguf_files(d).items()}
        except Exception as e:  # noqa: BLE001 - the peer failed: report it, run the rest
            why = f"llama.cpp conversion failed: {e}"
    if why is not None:
        print(f"llama.cpp: not measured: {why}", flush=True)
        res["llama_cpp"] = why
    for t in (1, 2):
        print(f"timing at {t} thread(s) ...", flush=True)
        part = run_threads(t, d, spec)
        part["goals"] = goals(part)
        res["threads"][str(t)] = part
        table(["engine", "run", "bits/w", "prefill tok/s", "decode tok/s", "GB/s", "of stream"],
              [[r["engine"], r["name"], f"{r['bits_per_weight']:.2f}", f"{r['prefill_tok_s']:.1f}",
                f"{r['decode_tok_s']:.2f}", f"{r['decode_bytes'] * r['decode_tok_s'] / 1e9:.1f}",
                f"{r['decode_bytes'] * r['decode_tok_s'] / 1e9 / part['stream_read_gbs']:.0%}"]
               for r in part["runs"]])
        print(f"streaming read: {part['stream_read_gbs']:.1f} GB/s; goals: "
              + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in part["goals"].items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "llm_small" if a.small else "llm"
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / (name + '.json')} and {name}.png")


if __name__ == "__main__":
    main()
