"""LLM quantization quality (issue 18): perplexity on real English text of a small
Llama-architecture model trained here, for fp32 and each quantization.

No pretrained LLM can be downloaded, so this trains one, once (seeded, cached under
``~/.cache/qcompile/bench``): a byte-level BPE tokenizer (``tokenizers``, 4096 tokens) and a
Llama (hidden 256, 4 layers, 4 heads / 2 KV heads, SiLU MLP of 704) on the docstrings of the
installed ``torch`` and ``transformers`` packages — real English prose about code, shipped
with the packages — holding out every tenth docstring. Then every configuration is compiled
for the reference interpreter (the kernels' oracle) with 32 calibration sequences and its
perplexity measured on held-out sequences of 128 tokens:

fp32; W8A8; W4A16 RTN / GPTQ / AWQ; W3 and W2 (GPTQ) with and without mixed precision (HAWQ
over {int2, int4, int8}); W4A4 with no rotation, Hadamard (QuaRot) and ResQ; KV8 and KV4
(per-token K and V). Weight groups of 32 (ResQ's low-precision part of a 256-wide layer is
224 wide).

Writes ``benchmarks/results/llm_quality.json``::

    .venv/bin/python benchmarks/llm_quality.py            # ~10 min the first time, then ~5
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
from _common import ROOT, machine, provenance, table

RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("QCOMPILE_BENCH_CACHE", Path.home() / ".cache" / "qcompile" / "bench"))
SEQ, VOCAB, SEED = 128, 4096, 0
ARCH = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
            tie_word_embeddings=False)

CONFIGS = {
    "fp32": None,
    "W8A8": {"weights": "int8", "group_size": None, "activations": "int8"},
    "W4A16 RTN": {"weights": "int4", "group_size": 32},
    "W4A16 GPTQ": {"weights": "int4", "group_size": 32, "algorithm": "gptq"},
    "W4A16 AWQ": {"weights": "int4", "group_size": 32, "algorithm": "awq"},
    "W3 GPTQ": {"weights": "int3", "group_size": 32, "algorithm": "gptq"},
    "W3 mixed (avg 3 bits)": {"weights": "int4", "group_size": 32, "algorithm": "gptq",
                              "mixed_precision": {"avg_bits": 3.0, "candidates": ["int2", "int4", "int8"]}},
    "W2 GPTQ": {"weights": "int2", "group_size": 32, "algorithm": "gptq"},
    "W2 mixed (avg 2.5 bits)": {"weights": "int2", "group_size": 32, "algorithm": "gptq",
                                "mixed_precision": {"avg_bits": 2.5, "candidates": ["int2", "int4", "int8"]}},
    "W4A4 no rotation": {"weights": "int4", "group_size": 32, "activations": "int4"},
    "W4A4 Hadamard": {"weights": "int4", "group_size": 32, "activations": "int4", "rotation": "hadamard"},
    "W4A4 ResQ": {"weights": "int4", "group_size": 32, "activations": "int4", "rotation": "pca"},
    "KV8": {"weights": None, "kv_cache": "int8"},
    "KV4": {"weights": None, "kv_cache": "int4"},
}


# -- the text and the model ------------------------------------------------------------------
#: packages whose docstrings make the corpus (transformers' ~400 model folders are left out:
#: slow to import, and their docstrings repeat one template)
PACKAGES = ("torch", "torch.nn", "torch.optim", "torch.utils.data", "torch.distributions",
            "torch.autograd", "torch.fx", "torch.export", "torch.linalg", "torch.fft",
            "torch.special", "torch.sparse", "transformers")


def docstrings() -> list[str]:
    """The docstrings (over 200 characters) of the modules, classes, functions and builtins
    of :data:`PACKAGES` and their submodules that import cleanly, in a fixed order, once each."""
    import importlib
    import pkgutil
    seen, out = set(), []
    names = []
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        names.append(pkg_name)
        if pkg_name != "torch":  # torch itself: its own namespace only
            names += sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, pkg_name + ".")
                            if "._" not in m.name and ".testing" not in m.name
                            and not m.name.startswith("transformers.models."))
    for name in dict.fromkeys(names):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - optional dependencies missing: skip the module
            continue
        objs = [mod] + [v for k, v in sorted(vars(mod).items()) if not k.startswith("_")
                        and (inspect.isclass(v) or inspect.isfunction(v) or inspect.isbuiltin(v))
                        and getattr(v, "__module__", None) in (name, "torch._C._VariableFunctions", None)]
        for o in objs:
            doc = inspect.getdoc(o)
            if doc and len(doc) > 200 and doc not in seen:
                seen.add(doc)
                out.append(doc)
    return out


def corpus() -> tuple[list[str], list[str]]:
    """(training docstrings, held-out docstrings: every tenth), cached as JSON."""
    path = CACHE / "llm_quality_corpus.json"
    if not path.is_file():
        docs = docstrings()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(docs))
    docs = json.loads(path.read_text())
    return [d for i, d in enumerate(docs) if i % 10], [d for i, d in enumerate(docs) if i % 10 == 0]


def tokenizer(train: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    path = CACHE / "llm_quality_tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train, trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(path))
    return tok


def sequences(tok, docs: list[str]) -> torch.Tensor:
    """The documents' tokens, concatenated (each doc ended by token 0) and cut into rows of SEQ."""
    ids = []
    for d in docs:
        ids += tok.encode(d).ids + [0]
    n = len(ids) // SEQ
    return torch.tensor(ids[:n * SEQ]).reshape(n, SEQ)


def trained_model(train_ids: torch.Tensor, steps: int):
    """The Llama trained on ``train_ids`` (AdamW, cosine schedule, batch 16), cached."""
    import hashlib

    from transformers import LlamaConfig, LlamaForCausalLM
    key = hashlib.sha256(json.dumps(ARCH, sort_keys=True).encode()).hexdigest()[:8]
    d = CACHE / f"llm_quality_model_{key}_{steps}"
    if (d / "config.json").is_file():
        return LlamaForCausalLM.from_pretrained(d).eval()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**ARCH))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(SEED)
    from tqdm.auto import tqdm
    model.train()
    bar = tqdm(range(steps), desc="training the quality model", unit="step")
    for _ in bar:
        batch = train_ids[torch.randint(0, len(train_ids), (16,), generator=g)]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.save_pretrained(d)
    return model


# -- evaluation ---------------------------------------------------------------------------------
def perplexity(cm, rows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            logits = cm(r[None]).float()
            nll += torch.nn.functional.cross_entropy(logits[0, :-1], r[1:], reduction="sum").item()
            count += SEQ - 1
    return math.exp(nll / count)


def main() -> None:
    import qcompile
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps (cached per value)")
    ap.add_argument("--eval-rows", type=int, default=48, help="held-out sequences of 128 tokens")
    ap.add_argument("--only", help="comma-separated config names")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    train_docs, test_docs = corpus()
    tok = tokenizer(train_docs)
    train_ids, test_ids = sequences(tok, train_docs), sequences(tok, test_docs)
    print(f"corpus: {len(train_docs)} training / {len(test_docs)} held-out docstrings, "
          f"{train_ids.numel()} / {test_ids.numel()} tokens", flush=True)
    model = trained_model(train_ids, a.steps)
    from qcompile.zoo import _Logits
    wrapped = _Logits(model).eval()
    cal = [(train_ids[i][None],) for i in range(0, 32 * 7, 7)]
    rows = test_ids[:a.eval_rows]
    example = (rows[:1],)
    names = a.only.split(",") if a.only else list(CONFIGS)
    out = []
    for name in names:
        t1 = time.perf_counter()
        cfg = CONFIGS[name]
        try:
            cm = qcompile.compile(wrapped, "reference", example_inputs=example, config=cfg,
                                  calibration=cal if cfg is not None else None, progress=False)
            ppl = perplexity(cm, rows)
            out.append({"config": name, "settings": cfg, "perplexity": ppl,
                        "seconds": time.perf_counter() - t1})
        except qcompile.QCompileError as e:
            out.append({"config": name, "settings": cfg, "error": str(e).splitlines()[0]})
        r = out[-1]
        print(f"  {name}: " + (f"ppl {r['perplexity']:.3f}" if "perplexity" in r else r["error"]),
              flush=True)
    base = next((r["perplexity"] for r in out if r["config"] == "fp32" and "perplexity" in r), None)
    table(["config", "perplexity", "vs fp32"],
          [[r["config"], f"{r['perplexity']:.3f}" if "perplexity" in r else "failed",
            f"{r['perplexity'] / base:.3f}x" if base and "perplexity" in r else "-"] for r in out])
    res = {"machine": machine(), **provenance(), "arch": ARCH, "seq": SEQ, "steps": a.steps,
           "train_tokens": int(train_ids.numel()), "eval_tokens": int(rows.numel()),
           "results": out, "seconds": time.perf_counter() - t0}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llm_quality.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {RESULTS / 'llm_quality.json'}")


if __name__ == "__main__":
    main()
