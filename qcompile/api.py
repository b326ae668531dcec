"""The Python entry points: ``capture`` and ``compile``."""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from qcompile.errors import CaptureError, ConfigError
from qcompile.ir.graph import Graph
from qcompile.runtime import CompiledModel

__all__ = ["capture", "compile"]


def _split_inputs(example_inputs) -> tuple[tuple, dict]:
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _is_onnx(model) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return True
    try:
        import onnx
        return isinstance(model, onnx.ModelProto)
    except ImportError:
        return False


def capture(model, example_inputs=None, *, dynamic_shapes=None, method: str = "auto") -> Graph:
    """Capture an ``nn.Module`` (on its example inputs: a tensor, a tuple, or a dict of
    keyword inputs) or an ONNX model (``ModelProto`` or path) into a verified IR graph."""
    from qcompile.ir.verify import verify
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise ConfigError("capturing a torch model needs example_inputs",
                              hint="pass example_inputs=(tensor, ...) or a dict of named inputs")
        from qcompile.frontends.pytorch import capture_torch
        args, kwargs = _split_inputs(example_inputs)
        graph = capture_torch(model, args, example_kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                              method=method)
    elif _is_onnx(model):
        try:
            from qcompile.frontends.onnx import capture_onnx
        except ImportError as e:
            raise ConfigError(f"the ONNX frontend needs the 'onnx' extra ({e})",
                              hint="pip install 'qcompile[onnx]'") from e
        graph = capture_onnx(model)
    else:
        raise CaptureError(f"cannot capture a {type(model).__name__}",
                           hint="pass a torch.nn.Module, an onnx.ModelProto or a path to .onnx")
    verify(graph)
    return graph


def _check_tune_trials(tune_trials, target: str, backend) -> None:
    if isinstance(tune_trials, bool) or not isinstance(tune_trials, int) or tune_trials < 0:
        raise ConfigError(f"tune_trials must be a non-negative integer, got {tune_trials!r}",
                          hint="0 (the default) builds without tuning")
    if tune_trials and target not in backend.tunable:
        from qcompile.backends import all_targets, get_backend
        tunable = [t for t in all_targets() if t in get_backend(t).tunable]
        raise ConfigError(f"target {target!r} cannot be tuned",
                          hint=f"tunable targets: {', '.join(tunable) or 'none'}; or pass "
                               "tune_trials=0")


def _check_data_needs_config(calibration, labels, config) -> None:
    if (calibration is not None or labels is not None) and config is None:
        raise ConfigError("calibration data or labels were given without a quantization config",
                          hint="pass config=QuantConfig(...) or drop calibration= / labels=")


def _capture_timed(model, example_inputs, dynamic_shapes, timings: dict) -> Graph:
    """``model`` as a graph (captured unless it is one), the time taken in ``timings``."""
    t0 = time.perf_counter()
    graph = model if isinstance(model, Graph) else capture(model, example_inputs,
                                                            dynamic_shapes=dynamic_shapes)
    timings["capture_s"] = time.perf_counter() - t0
    return graph


def _is_multi(target) -> bool:
    """Whether ``target`` names several devices: a list/tuple of more than one, a mapping, a
    comma-separated string (``"npu,cpu"``) or a TOML device file."""
    if isinstance(target, dict):
        return True
    if isinstance(target, (list, tuple)):
        return len(target) != 1
    if isinstance(target, (str, os.PathLike)):
        t = os.fspath(target)
        return "," in t or t.endswith(".toml")
    return False


def compile(model, target: Any = "reference", *, example_inputs=None, config=None,
            calibration=None, labels=None, dynamic_shapes=None,
            tune_trials: int = 0, placement=None, progress: bool = True) -> CompiledModel:
    """Capture ``model``, run the pipeline for ``config`` and lower it for ``target``.
    ``labels`` (one per calibration sample) give mixed precision a task loss.
    ``tune_trials`` > 0 tunes the build with that many measured trials per workload, for
    targets that support it (``cpu``: MetaSchedule; records are cached per shape, so a
    rebuild with the same shapes does not search again).

    ``target`` may name several devices — ``["npu", "cpu"]``, ``"npu,cpu"``, a mapping
    ``{"npu": {"spec": "hexagon-v73"}, "cpu": {}}`` or a TOML device file
    (:func:`qcompile.placement.devices.parse_devices`): then every node is placed by
    ``passes/place.py`` on the device that minimises the predicted latency and the result is
    a :class:`qcompile.placed.PlacedModel`. ``placement`` is a plan dict or the path of a
    ``plan.json`` a previous build wrote, with pins edited (``{"pins": {"encoder.*": "cpu"}}``),
    or solver options (``{"solver": "milp", "time_limit": 30}``, ``{"objective":
    "throughput"}``, ``{"verify": False}``). ``progress`` shows progress bars (quantization,
    placement costs, lowering)."""
    from qcompile.backends import get_backend
    if _is_multi(target):
        return _compile_placed(model, target, example_inputs=example_inputs, config=config,
                               calibration=calibration, labels=labels,
                               dynamic_shapes=dynamic_shapes, placement=placement,
                               progress=progress)
    if placement is not None:
        raise ConfigError("placement= applies to multi-device targets only",
                          hint="pass a list of targets, e.g. ['npu', 'cpu'], or drop placement=")
    if isinstance(target, (list, tuple)):
        target = target[0]
    backend = get_backend(target)  # an unknown target fails before any work
    from qcompile.config import QuantConfig
    config = QuantConfig.coerce(config)  # a bad config fails before any work too
    if config is None and calibration is not None and hasattr(backend, "default_config"):
        config = backend.default_config()  # npu: the HTP's recipe (uint16 activations, int8 weights)
    _check_tune_trials(tune_trials, target, backend)
    _check_data_needs_config(calibration, labels, config)
    timings = {}
    graph = _capture_timed(model, example_inputs, dynamic_shapes, timings)
    if config is not None:
        from qcompile.passes.pipeline import quantize_graph
        t0 = time.perf_counter()
        graph = graph.clone() if graph is model else graph
        graph, records = quantize_graph(graph, config, calibration, labels=labels,
                                        target=target, progress=progress)
        timings["quantize_s"] = time.perf_counter() - t0
        timings["passes"] = [[r.name, round(r.seconds, 4)] for r in records]
    t0 = time.perf_counter()
    executable = (backend.lower(graph, target, tune_trials=tune_trials) if tune_trials
                  else backend.lower(graph, target))
    timings["lower_s"] = time.perf_counter() - t0
    return CompiledModel(graph, target, executable, config=config, timings=timings)


def _sample(example_inputs, calibration, graph: Graph) -> tuple:
    """The example inputs that fix the shapes the placement costs are measured at."""
    if example_inputs is not None:
        args, kwargs = _split_inputs(example_inputs)
        if kwargs:
            names = [v.name for v in graph.inputs]
            return tuple(kwargs[n] for n in names if n in kwargs)
        return tuple(args)
    if calibration is not None:
        from qcompile.passes.calibrate import as_positional
        first = calibration[0] if isinstance(calibration, (list, tuple)) else next(iter(calibration))
        return tuple(as_positional(graph, first, 0))
    raise ConfigError("placing a model across devices needs example inputs to measure costs at",
                      hint="pass example_inputs=... (or calibration data)")


def _compile_placed(model, target, *, example_inputs, config, calibration, labels,
                    dynamic_shapes, placement, progress) -> CompiledModel:
    """Capture, quantize once for the most demanding device, place, lower each segment."""
    from qcompile.backends import get_backend
    from qcompile.config import QuantConfig
    from qcompile.passes.place import place, read_plan_file
    from qcompile.placed import PlacedExecutable, PlacedModel, lower_segments
    from qcompile.placement.devices import parse_devices
    devices, links = parse_devices(target)       # unknown devices fail before any work
    backends = {d.name: get_backend(d.target) for d in devices}
    if placement is not None:
        read_plan_file(placement)                # a bad plan file fails before any work too
    config = QuantConfig.coerce(config)
    # the pipeline follows the strictest device: one that runs every op on integers (npu)
    # needs every activation quantized, and the other devices run that same graph
    strict = next((d for d in devices if backends[d.name].full_qdq), None)
    if config is None and calibration is not None:
        config = next((b.default_config() for b in backends.values()
                       if b.default_config() is not None), None)
    _check_data_needs_config(calibration, labels, config)
    timings = {}
    graph = _capture_timed(model, example_inputs, dynamic_shapes, timings)
    sample = _sample(example_inputs, calibration, graph)
    if config is not None:
        from qcompile.passes.pipeline import quantize_graph
        t0 = time.perf_counter()
        graph = graph.clone() if graph is model else graph
        graph, records = quantize_graph(graph, config, calibration, labels=labels,
                                        target=strict.target if strict is not None else None,
                                        progress=progress)
        timings["quantize_s"] = time.perf_counter() - t0
        timings["passes"] = [[r.name, round(r.seconds, 4)] for r in records]
    elif graph is model:
        graph = graph.clone()
    t0 = time.perf_counter()
    pl = place(graph, devices, links, sample, plan=placement, progress=progress)
    timings["place_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    by_name = {d.name: d for d in devices}
    lowered = lower_segments(graph, pl.segments, by_name, progress=progress)
    timings["lower_s"] = time.perf_counter() - t0
    ex = PlacedExecutable(graph, pl.segments, [e for _, e in lowered], by_name)
    if read_plan_file(placement).get("verify", True) if placement is not None else True:
        from qcompile.placed import verify_plan
        t0 = time.perf_counter()
        ex, pl, _ = verify_plan(graph, pl, ex, sample, by_name)
        timings["verify_s"] = time.perf_counter() - t0
    return PlacedModel(graph, ex, placement=pl, config=config, timings=timings)
