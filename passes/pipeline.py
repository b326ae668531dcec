"""The quantization pipeline a ``QuantConfig`` asks for, as a pass list:

    fold_norms → calibrate → smoothquant → calibrate → quantize_weights → quantize_activations

(steps a config does not need are left out). ``compile()`` runs it between capture and
lowering; each pass is timed, verified (under tests or ``QCOMPILE_VERIFY=1``) and dumped
(``QCOMPILE_DUMP``) by the ``PassManager``.
"""
from __future__ import annotations

import itertools

from qcompile.config import QuantConfig
from qcompile.errors import ConfigError
from qcompile.ir.graph import Graph
from qcompile.passes.manager import PassManager, PassRecord

__all__ = ["quantization_pipeline", "quantize_graph"]


def quantization_pipeline(cfg: QuantConfig, data, *, progress: bool = True):
    """(pass names, per-pass options) for ``cfg`` with calibration samples ``data``."""
    if cfg.rotation is not None:
        raise ConfigError(f"rotation={cfg.rotation!r} is not available in this version yet",
                          hint="compile with rotation=None")
    algos = {cfg.algorithm} | {ov.get("algorithm") for ov in cfg.overrides.values()
                               if isinstance(ov, dict) and ov.get("algorithm")}
    static_acts = cfg.activations is not None and cfg.activation_granularity == "per_tensor"
    stats = bool(algos & {"gptq", "awq"}) or static_acts
    names, opts = [], {}
    cal = {"data": data, "max_samples": cfg.calibration_size, "seed": cfg.seed,
           "progress": progress}
    if cfg.smoothquant is not None:
        names += ["calibrate", "smoothquant"]
        opts["smoothquant"] = {"alpha": float(cfg.smoothquant),
                               "overrides": dict(cfg.smoothquant_alpha_overrides)}
    if stats:
        names.append("calibrate")
    if (cfg.smoothquant is not None or stats) and data is None:
        raise ConfigError("this QuantConfig needs calibration data (smoothquant, gptq, awq or "
                          "static activations)", hint="pass calibration=[inputs, ...] to compile()")
    opts["calibrate"] = dict(cal, hessian="gptq" in algos, reservoir=512 if "awq" in algos else 0)
    names += ["quantize_weights", "quantize_activations"]
    opts["quantize_weights"] = {"config": cfg, "progress": progress}
    opts["quantize_activations"] = {"config": cfg}
    return names, opts


def quantize_graph(graph: Graph, config, calibration=None, *,
                   progress: bool = True) -> tuple[Graph, list[PassRecord]]:
    cfg = QuantConfig.coerce(config)
    data = None
    if calibration is not None:
        data = list(itertools.islice(iter(calibration), cfg.calibration_size))
        if not data:
            raise ConfigError("the calibration set is empty",
                              hint="pass at least one sample (64-128 are typical)")
    names, opts = quantization_pipeline(cfg, data, progress=progress)
    # two calibrate steps (before and after smoothing) share options: run them separately
    records: list[PassRecord] = []
    for name in names:
        pm = PassManager([name], options={name: opts.get(name, {})})
        graph = pm.run(graph)
        records += pm.records
    graph.meta.pop("calibration", None)
    return graph, records
