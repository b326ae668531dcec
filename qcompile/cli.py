"""The ``qcompile`` command: ``inspect``, ``build``, ``run`` and ``bench``."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]


def _load_model(spec: str):
    """``path.onnx`` or ``package.module:factory`` (factory returns a model, or
    ``(model, example_inputs[, dynamic_shapes])``)."""
    from qcompile.errors import ConfigError
    if spec.endswith(".onnx") or os.path.isfile(spec):
        return spec, None, None
    if ":" not in spec:
        raise ConfigError(f"cannot find model {spec!r}",
                          hint="give an .onnx path or package.module:factory")
    mod_name, fn_name = spec.split(":", 1)
    sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import {spec}: {e}") from e
    out = fn()
    if isinstance(out, tuple):
        return (tuple(out) + (None, None))[:3]
    return out, None, None


def _capture(spec: str):
    import qcompile
    model, inputs, dyn = _load_model(spec)
    return qcompile.capture(model, inputs, dynamic_shapes=dyn)


def cmd_inspect(a) -> int:
    g = _capture(a.model)
    if a.ir:
        print(g)
        return 0
    params = sum(t.numel() for t in g.constants.values())
    print(f"graph {g.name}: {len(g.nodes)} nodes, {len(g.constants)} constants "
          f"({params:,} parameters)")
    for v in g.inputs:
        print(f"  input  %{v.name}: {v.type}")
    for v in g.outputs:
        print(f"  output %{v.name}: {v.type}")
    print("ops:")
    for op, n in g.op_histogram().items():
        print(f"  {op:<20} {n:>5}")
    return 0


def _read_array_file(path: str, what: str, hint: str):
    from qcompile.errors import ConfigError
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {what} file {path}: {e}", hint=hint) from None


def _calibration(path: str | None, names: list[str] | None):
    """Samples from an ``.npz`` whose arrays (one per model input, by name or in order) carry
    the samples along their first axis."""
    if path is None:
        return None
    from qcompile.errors import ConfigError
    z = _read_array_file(path, "calibration",
                         "give an .npz with one array per model input, samples first")
    keys = list(z.files)
    counts = {k: z[k].shape[0] for k in keys}
    if len(set(counts.values())) != 1:
        raise ConfigError(f"calibration arrays in {path} hold different sample counts {counts}")
    n = next(iter(counts.values()), 0)
    if names and set(names) <= set(keys):
        return [{k: z[k][i] for k in names} for i in range(n)]
    return [tuple(z[k][i] for k in keys) for i in range(n)]


def _labels(path: str | None):
    """Labels from an ``.npy``, one per calibration sample along the first axis."""
    if path is None:
        return None
    return list(_read_array_file(path, "labels",
                                 "give an .npy with one label per calibration sample"))


def cmd_build(a) -> int:
    import qcompile
    model, inputs, dyn = _load_model(a.model)
    t0 = time.perf_counter()
    names = list(inputs) if isinstance(inputs, dict) else None
    cm = qcompile.compile(model, a.target, example_inputs=inputs, dynamic_shapes=dyn,
                          config=a.config, calibration=_calibration(a.calibration, names),
                          labels=_labels(a.labels), tune_trials=a.tune_trials)
    plan = cm.graph.meta.get("mixed_precision")
    if plan is not None:
        print(plan)
    out = cm.save(a.output)
    print(f"built {a.model} for {a.target} in {time.perf_counter() - t0:.2f}s -> {out}")
    return 0


def _inputs(cm, paths):
    from qcompile.errors import InputError
    if len(paths) != len(cm.graph.inputs):
        raise InputError(f"the model takes {len(cm.graph.inputs)} inputs "
                         f"({', '.join(cm.input_names)}); give one --input file.npy for each")
    return [np.load(p, allow_pickle=False) for p in paths]


def cmd_run(a) -> int:
    import qcompile
    cm = qcompile.load(a.artifact)
    outs = cm.run(*_inputs(cm, a.input or []))
    for v, t in zip(cm.graph.outputs, outs):
        arr = t.detach().cpu().numpy()
        print(f"%{v.name}: {arr.dtype}{list(arr.shape)} mean={arr.mean():.6g} "
              f"std={arr.std():.6g}")
    if a.output:
        Path(a.output).mkdir(parents=True, exist_ok=True)
        for i, t in enumerate(outs):
            np.save(Path(a.output) / f"output_{i}.npy", t.detach().cpu().numpy())
    return 0


def cmd_bench(a) -> int:
    import qcompile
    cm = qcompile.load(a.artifact)
    xs = _inputs(cm, a.input or [])
    cm.run(*xs)
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        cm.run(*xs)
        times.append(time.perf_counter() - t0)
    result = {"artifact": str(a.artifact), "target": cm.target, "repeat": a.repeat,
              "median_ms": float(np.median(times) * 1e3), "min_ms": float(np.min(times) * 1e3)}
    print(json.dumps(result, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompile", description="Compile quantized neural networks.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m_help = "an .onnx file, or package.module:factory returning (model, example_inputs[, dynamic_shapes])"
    s = sub.add_parser("inspect", help="capture a model and print its IR summary and op histogram")
    s.add_argument("model", help=m_help)
    s.add_argument("--ir", action="store_true", help="print the whole IR listing")
    s.set_defaults(fn=cmd_inspect)
    s = sub.add_parser("build", help="compile a model ahead of time into an artifact directory")
    s.add_argument("model", help=m_help)
    s.add_argument("--target", default="reference", help="target name (see qcompile.targets())")
    s.add_argument("-o", "--output", required=True, help="artifact directory to write")
    s.add_argument("--config", help="a QuantConfig TOML file (weights, activations, algorithm, ...)")
    s.add_argument("--calibration", help="an .npz of calibration samples: one array per input, "
                                         "samples along the first axis")
    s.add_argument("--labels", help="an .npy of labels, one per calibration sample: mixed "
                                    "precision's sensitivities then use the task loss")
    s.add_argument("--tune-trials", type=int, default=0, metavar="N",
                   help="tune with N measured trials per workload (target cpu: MetaSchedule, "
                        "records cached per shape in ~/.cache/qcompile); 0, the default, "
                        "does not tune")
    s.set_defaults(fn=cmd_build)
    s = sub.add_parser("run", help="run a built artifact on .npy inputs")
    s.add_argument("artifact", help="directory written by `qcompile build`")
    s.add_argument("--input", action="append", help="an input .npy file, once per model input, in order")
    s.add_argument("--output", help="directory to write output_<i>.npy files")
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("bench", help="time a built artifact on .npy inputs")
    s.add_argument("artifact")
    s.add_argument("--input", action="append")
    s.add_argument("--repeat", type=int, default=20)
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    from qcompile.errors import QCompileError
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except QCompileError as e:
        print(f"qcompile: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
