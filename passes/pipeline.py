"""The quantization pipeline a ``QuantConfig`` asks for, as a pass list:

    [fold_norms → (calibrate) → rotate] → [calibrate → smoothquant] → calibrate
        → [sparsify] → [mixed_precision] → quantize_weights → quantize_activations

(steps a config does not need are left out). For a target whose backend runs every op on
integers (``Backend.full_qdq``: ``npu``) the graph is first canonicalised and its fused ops
decomposed (``canonicalize_npu → decompose_attention → decompose_fused``), and
``quantize_all_activations`` replaces ``quantize_activations``. ``compile()`` runs it between capture and
lowering; each pass is timed, verified (under tests or ``QCOMPILE_VERIFY=1``) and dumped
(``QCOMPILE_DUMP``) by the ``PassManager``.
"""
from __future__ import annotations

import dataclasses
import itertools

from qcompile.config import QuantConfig
from qcompile.errors import ConfigError
from qcompile.ir.graph import Graph
from qcompile.passes.manager import PassManager, PassRecord
from qcompile.passes.rotate import HIGH_SUFFIX

__all__ = ["quantization_pipeline", "quantize_graph"]


def quantization_pipeline(cfg: QuantConfig, data, *, progress: bool = True, labels=None,
                          target: str | None = None):
    """(pass names, per-pass options) for ``cfg`` with calibration samples ``data`` (and, for
    mixed precision's task loss, their ``labels``; its latency budget measures on ``target``)."""
    algos = {cfg.algorithm} | {ov.get("algorithm") for ov in cfg.overrides.values()
                               if isinstance(ov, dict) and ov.get("algorithm")}
    full = _full_qdq(target)  # every activation is calibrated by quantize_all_activations
    static_acts = cfg.activations is not None and cfg.activation_granularity == "per_tensor"
    sparse = cfg.sparsity or any(isinstance(ov, dict) and ov.get("sparsity")
                                 for ov in cfg.overrides.values())
    methods = {cfg.sparsity_method} | {ov.get("sparsity_method") for ov in cfg.overrides.values()
                                       if isinstance(ov, dict) and ov.get("sparsity_method")}
    wanda = bool(sparse) and "wanda" in methods
    other_stats = bool(algos & {"gptq", "awq"}) or (bool(sparse) and data is not None
                                                    and bool(methods & {"wanda", "2:4"}))
    stats = other_stats or static_acts
    pca = cfg.rotation == "pca"
    mixed = cfg.mixed_precision is not None
    if labels is not None and not mixed:
        raise ConfigError("labels were given, but only mixed precision's sensitivity uses them",
                          hint="set QuantConfig(mixed_precision=qcompile.Budget(...)), or drop "
                               "labels=")
    if (cfg.smoothquant is not None or stats or pca or wanda or mixed) and data is None:
        raise ConfigError("this QuantConfig needs calibration data (smoothquant, gptq, awq, "
                          "static activations, rotation='pca', sparsity_method='wanda' or "
                          "mixed_precision)",
                          hint="pass calibration=[inputs, ...] to compile()")
    names, opts = [], {}
    opts["calibrate"] = {"data": data, "max_samples": cfg.calibration_size, "seed": cfg.seed,
                         "progress": progress, "hessian": "gptq" in algos or pca,
                         "reservoir": 512 if "awq" in algos else 0}
    if cfg.rotation is not None:
        names += ["fold_norms"] + (["calibrate"] if pca else []) + ["rotate"]
        opts["rotate"] = {"kind": cfg.rotation, "seed": cfg.seed,
                          "fraction": float(cfg.resq_options()["fraction"])}
    if cfg.smoothquant is not None:
        names += ["calibrate", "smoothquant"]
        opts["smoothquant"] = {"alpha": float(cfg.smoothquant),
                               "overrides": dict(cfg.smoothquant_alpha_overrides)}
    if other_stats or (static_acts and not full):
        names.append("calibrate")
    if pca:  # the high-variance subspace's linears (``…resq_high``) get their own formats
        high = cfg.resq_options()
        ov = {"weights": high["weights"], "group_size": None, "activations": high["activations"]}
        cfg = dataclasses.replace(cfg, overrides={**cfg.overrides, f"*.{HIGH_SUFFIX}": ov})
    if sparse:
        names.append("sparsify")
        opts["sparsify"] = {"config": cfg}
    if mixed:
        names.append("mixed_precision")
        opts["mixed_precision"] = {"config": cfg, "data": data, "labels": labels,
                                   "target": target, "progress": progress}
    names += ["quantize_weights", "quantize_activations"]
    opts["quantize_weights"] = {"config": cfg, "progress": progress}
    opts["quantize_activations"] = {"config": cfg}
    if full:  # NPU runtimes: integer node units everywhere, masks as arithmetic
        names = ["canonicalize_npu", "decompose_attention", "decompose_fused"] + names[:-1] + \
            ["quantize_all_activations"]
        opts["quantize_all_activations"] = {"config": cfg, "data": data, "progress": progress,
                                            "max_samples": cfg.calibration_size}
    return names, opts


def _full_qdq(target) -> bool:
    """Whether ``target``'s backend runs every op on integers (``Backend.full_qdq``)."""
    if not isinstance(target, str):
        return False
    from qcompile.backends import get_backend
    from qcompile.errors import ConfigError as _Unknown
    try:
        return bool(getattr(get_backend(target), "full_qdq", False))  # plugins may predate it
    except _Unknown:  # an unknown target is reported by compile()
        return False


def quantize_graph(graph: Graph, config, calibration=None, *, progress: bool = True,
                   labels=None, target: str | None = None) -> tuple[Graph, list[PassRecord]]:
    cfg = QuantConfig.coerce(config)
    data = None
    if calibration is not None:
        data = list(itertools.islice(iter(calibration), cfg.calibration_size))
        if not data:
            raise ConfigError("the calibration set is empty",
                              hint="pass at least one sample (64-128 are typical)")
    if labels is not None:
        labels = list(labels)
    names, opts = quantization_pipeline(cfg, data, progress=progress, labels=labels,
                                        target=target)
    # two calibrate steps (before and after smoothing) share options: run them separately
    records: list[PassRecord] = []
    for name in names:
        pm = PassManager([name], options={name: opts.get(name, {})})
        graph = pm.run(graph)
        records += pm.records
    graph.meta.pop("calibration", None)
    return graph, records
