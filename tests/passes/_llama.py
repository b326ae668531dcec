"""Helpers shared by the quantization-pass tests (not fixtures)."""
from __future__ import annotations

import torch


def llama_errors(graph, algos, seed, **cfg):
    """Relative output error of ``graph`` (the tiny Llama) quantized with each algorithm,
    calibrated on 8 random batches and tested on another; returns (errors, graphs)."""
    from qcompile.config import QuantConfig
    from qcompile.interpreter import Interpreter
    from qcompile.passes.pipeline import quantize_graph
    gen = torch.Generator().manual_seed(seed)
    cal = [(torch.randint(0, 1000, (2, 12), generator=gen),) for _ in range(8)]
    test = torch.randint(0, 1000, (2, 12), generator=gen)
    ref = Interpreter(graph).run(test)[0]
    errs, graphs = {}, {}
    for algo in algos:
        g, _ = quantize_graph(graph.clone(), QuantConfig(algorithm=algo, **cfg), cal, progress=False)
        errs[algo] = float((Interpreter(g).run(test)[0] - ref).norm() / ref.norm())
        graphs[algo] = g
    return errs, graphs
