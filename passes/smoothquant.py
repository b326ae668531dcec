"""smoothquant: migrate activation outliers into the weights.

Xiao et al., "SmoothQuant", ICML 2023, eq. 4: per input channel j of the linears reading X,
``s_j = max|X_j|^α / max|W_j|^(1−α)`` (the weight maximum over every linear sharing X, §4;
clamped at ≥ 1e-5), then ``X' = X diag(s)⁻¹`` is folded into X's producer (a norm's γ and β,
or a preceding linear's rows) and ``W' = W diag(s)`` (eq. 3). Float outputs are unchanged; at
α = 0.5, ``max|X'_j| = max|W'_j|``. Needs ``calibrate`` (per-channel abs-max) first; a linear
whose input has no foldable producer is left alone and reported in ``graph.meta``.
"""
from __future__ import annotations

import fnmatch

import torch

from qcompile.errors import ConfigError
from qcompile.ir.graph import Graph
from qcompile.passes._scaling import fold_input_scale, linear_consumers
from qcompile.passes.calibrate import linear_inputs
from qcompile.passes.manager import register_pass

__all__ = ["smoothquant", "smooth_scales"]


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)`` over the weights sharing the input (float64)."""
    w_max = torch.stack([w.abs().amax(0).double() for w in weights]).amax(0)
    a = act_absmax.double().clamp_min(1e-5)
    s = a.pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


@register_pass("smoothquant")
def smoothquant(graph: Graph, *, alpha: float = 0.5, overrides: dict | None = None) -> Graph:
    if not 0 <= alpha <= 1:
        raise ConfigError(f"smoothquant α must be in [0, 1], got {alpha}")
    cal = graph.meta.get("calibration")
    if cal is None:
        raise ConfigError("smoothquant needs activation statistics",
                          hint="run the calibrate pass first (compile() does with calibration=)")
    done, skipped = [], []
    for x in linear_inputs(graph):
        linears = linear_consumers(graph, x)
        if linears is None or x.name not in cal:
            skipped.append(x.name)
            continue
        a = alpha
        for pat, val in (overrides or {}).items():
            if any(fnmatch.fnmatchcase(n.provenance.module or n.name, pat) for n in linears):
                a = float(val)
        s = smooth_scales(cal[x.name].absmax, [graph.constants[n.inputs[1].name] for n in linears], a)
        (done if fold_input_scale(graph, x, linears, s) else skipped).append(x.name)
    graph.meta["smoothquant"] = {"smoothed": done, "skipped": skipped}
    graph.meta.pop("calibration")  # the statistics describe the unsmoothed activations
    graph.remove_dead()
    return graph
