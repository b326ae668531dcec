"""The ``qcompile`` command: ``inspect``, ``build``, ``run``, ``bench``, ``generate`` and
``info``."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
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


def _is_hf_dir(spec: str) -> bool:
    """A Hugging Face model directory (a ``config.json`` beside the weights)."""
    return os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json"))


def _build_llm(a) -> int:
    """``build`` of a Hugging Face causal-LM directory: ``compile_llm``, tokenizer kept."""
    import qcompile
    from qcompile.errors import ConfigError
    if a.plan is not None or "," in a.target or a.tune_trials or a.labels:
        raise ConfigError("an LLM directory builds for one target, without --plan, "
                          "--tune-trials or --labels", hint="drop those options")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ConfigError(f"building an LLM directory needs transformers ({e})",
                          hint="pip install 'qcompile[models]'") from e
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype="float32").eval()
    cal = None
    if a.calibration:
        arr = _read_array_file(a.calibration, "calibration", "an .npy of token ids [samples, length]")
        cal = [row[None] for row in np.asarray(arr)]
    llm = qcompile.compile_llm(model, a.target, config=a.config, calibration=cal,
                               max_seq_len=a.max_seq_len, max_batch=a.max_batch)
    out = llm.save(a.output, overwrite=a.force)
    print(f"built {a.model} ({llm.spec.model_type}, {llm.spec.layers} layers) for {a.target} in "
          f"{time.perf_counter() - t0:.2f}s -> {out}")
    return 0


def cmd_build(a) -> int:
    import qcompile
    from qcompile.runtime import check_destination
    check_destination(a.output, overwrite=a.force)  # refuse before the (slow) compile
    if _is_hf_dir(a.model):
        return _build_llm(a)
    from qcompile.api import _is_multi
    multi = _is_multi(a.target)
    if a.plan is not None and not multi:
        from qcompile.errors import ConfigError
        raise ConfigError("--plan applies to multi-device targets only",
                          hint="pass --target npu,cpu (a comma-separated list or a .toml device file)")
    if multi:
        from qcompile.passes.place import read_plan_file
        from qcompile.placement.devices import parse_devices
        devices, _ = parse_devices(a.target)  # an unknown device fails before the model loads
        if a.plan is not None:
            read_plan_file(a.plan)
        targets = [d.target for d in devices]
    else:
        targets = [a.target]
    model, inputs, dyn = _load_model(a.model)
    from qcompile.backends import get_backend
    if dyn is not None and any(get_backend(t).full_qdq for t in targets):
        print(f"note: target {a.target} compiles for the example inputs' static shapes "
              "(NPU runtimes need static shapes)")
        dyn = None
    t0 = time.perf_counter()
    names = list(inputs) if isinstance(inputs, dict) else None
    kw = {"placement": a.plan} if multi else {"tune_trials": a.tune_trials}
    cm = qcompile.compile(model, a.target, example_inputs=inputs, dynamic_shapes=dyn,
                          config=a.config, calibration=_calibration(a.calibration, names),
                          labels=_labels(a.labels), **kw)
    plan = cm.graph.meta.get("mixed_precision")
    if plan is not None:
        print(plan)
    placement = getattr(cm, "placement", None)
    if placement is not None:
        print(placement.format())
    out = cm.save(a.output, overwrite=a.force)
    if placement is not None:
        print(f"plan: {out / 'plan.json'} (edit its \"pins\" and pass it back with --plan)")
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


def cmd_generate(a) -> int:
    """Generate from a built LLM, printing the text as it comes and tokens/s at the end."""
    import qcompile
    from qcompile.errors import InputError
    llm = qcompile.load(a.artifact)
    if not isinstance(llm, qcompile.CompiledLLM):
        raise InputError(f"{a.artifact} is not a compiled LLM",
                         hint="build one from a Hugging Face model directory (qcompile build "
                              "DIR ...) or with qcompile.compile_llm")
    tok = llm.tokenizer(a.tokenizer)
    ids = tok(a.prompt, return_tensors="pt")["input_ids"]
    made: list[int] = []
    shown = [0]
    print(a.prompt, end="", flush=True)

    def stream(_b: int, t: int) -> None:
        made.append(t)
        text = tok.decode(made, skip_special_tokens=True)
        print(text[shown[0]:], end="", flush=True)
        shown[0] = len(text)
    t0 = time.perf_counter()
    llm.generate(ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                 seed=a.seed, callback=stream)
    secs = time.perf_counter() - t0
    print(f"\n[{len(made)} tokens in {secs:.2f}s: {len(made) / max(secs, 1e-9):.1f} tokens/s, "
          f"prompt {ids.shape[1]} tokens, target {llm.target}]")
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


# -- info ---------------------------------------------------------------------------------
#: (label, LLVM feature name) of the AVX-512 subsets ``info`` reports
_AVX512 = (("F", "avx512f"), ("BW", "avx512bw"), ("DQ", "avx512dq"), ("VL", "avx512vl"),
           ("VNNI", "avx512vnni"), ("BF16", "avx512bf16"), ("VBMI", "avx512vbmi"),
           ("VBMI2", "avx512vbmi2"), ("VPOPCNTDQ", "avx512vpopcntdq"), ("FP16", "avx512fp16"))
_AMX = (("tile", "amx-tile"), ("int8", "amx-int8"), ("bf16", "amx-bf16"))


def _guarded(fn, *args):
    """``fn(*args)``, or ``"unknown (<reason>)"`` when it fails (a missing compiler, a kernel
    library that does not build): ``info`` reports what it can rather than stopping."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - any failure is reported, not raised
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"unknown ({reason})"


def _caches() -> dict[str, str]:
    """``{"L1d": "48 KiB", "L2": "2 MiB", ...}`` from ``/sys/devices/system/cpu/cpu0/cache``
    (empty where it is absent)."""
    out: dict[str, str] = {}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            lv, kind, size = ((d / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        name = f"L{lv}" + {"Data": "d", "Instruction": "i"}.get(kind, "")
        out[name] = _size(size)
    return out


def _size(text: str) -> str:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    n = int(text[:-1]) * units[text[-1]] if text[-1:] in units and text[:-1].isdigit() else None
    if n is None:
        return text
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _tool_version(*cmd: str) -> str | None:
    """The first line of ``cmd --version``, or None when the tool is not on PATH."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"
    lines = (r.stdout or r.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _targets(tvm_error: str | None, sparse) -> dict[str, str]:
    """Each registered target and whether it runs here (and, if not, why)."""
    import qcompile
    cc = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc") or shutil.which("clang")
    cxx = shutil.which(os.environ.get("CXX") or "c++")
    out = {}
    for t in qcompile.targets():
        if t == "reference":
            status = "runs here (torch)"
        elif tvm_error is not None and (t.startswith(("cpu", "cuda")) or t in ("lut", "amx")):
            status = f"unavailable ({tvm_error})"
        elif t == "cpu":
            status = "runs here"
        elif t.startswith("cpu-"):
            status = "build only (a cross target)"
        elif t.startswith("cuda"):
            import torch
            if not shutil.which("nvcc"):
                status = "unavailable (building needs nvcc)"
            elif not torch.cuda.is_available():
                status = "build only (no CUDA GPU visible to run it)"
            else:
                status = "runs here"
        elif t == "lut":
            status = "runs here" if cc else "unavailable (needs a C compiler)"
        elif t == "amx":
            status = ("unavailable (needs a C++ compiler)" if not cxx else
                      f"runs here (sparse kernels: {sparse})" if sparse and not
                      str(sparse).startswith("unknown") else
                      f"runs here (pruned linears use the dense cpu kernels; sparse kernels: "
                      f"{sparse or 'none on this CPU'})")
        elif t.startswith("onnx"):
            status = "runs here (ONNX Runtime, CPU EP)" if _package_version("onnxruntime") \
                else "unavailable (pip install 'qcompile[onnx]')"
        elif t.startswith("npu"):
            from qcompile.backends.onnx import qnn
            res = _guarded(qnn.available) if _package_version("onnxruntime") else \
                (False, "needs onnxruntime")
            ok, why = res if isinstance(res, tuple) else (False, res)
            status = ("runs here (QNN HTP in its x86 simulator: its times are not NPU latency)"
                      if ok is True else f"unavailable ({why})")
        else:
            status = "registered"
        out[t] = status
    return out


def host_info() -> dict:
    """What ``qcompile info`` reports, as a JSON-able dict."""
    import torch

    import qcompile
    from qcompile import isa
    from qcompile.backends.lut.build import cpu_model
    level = isa.describe()  # first: an invalid QCOMPILE_ISA is a ConfigError, reported cleanly
    have = isa.host_features()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        from qcompile.backends.tvm.target import cpu_target, require_tvm
        tvm = require_tvm()
        tvm_version, tvm_error = tvm.__version__, None
        mcpu = _guarded(lambda: str(cpu_target().attrs["mcpu"]))
    except Exception as e:  # noqa: BLE001 - no TVM: the TVM targets are reported unavailable
        tvm_version, tvm_error, mcpu = None, str(e).splitlines()[0], None

    def amx_os():
        from qcompile.backends.amx.build import amx_available
        return bool(amx_available())

    def sparse_kind():
        from qcompile.backends.amx.build import best_kind
        return best_kind()

    def lut_variants():
        from qcompile.backends.lut.build import host_variants
        return list(host_variants())

    cpuid_amx = all(f in have for _, f in _AMX)
    granted = _guarded(amx_os) if cpuid_amx else False
    sparse = _guarded(sparse_kind)
    return {
        "cpu": {
            "model": cpu_model(), "machine": platform.machine(), "cores": cores,
            "avx2": "avx2" in have, "fma": "fma" in have,
            "avx512": {label: f in have for label, f in _AVX512},
            "amx": {label: f in have for label, f in _AMX},
            "amx_os_grants": granted,
            "cache": _caches(),
        },
        "isa": level,
        "targets": _targets(tvm_error, sparse),
        "kernels": {"tvm_mcpu": mcpu, "lut_variants": _guarded(lut_variants),
                    "sparse": sparse},
        "versions": {"qcompile": qcompile.__version__, "python": platform.python_version(),
                     "torch": torch.__version__, "tvm": tvm_version,
                     "cc": _tool_version(os.environ.get("CC") or "cc"),
                     "c++": _tool_version(os.environ.get("CXX") or "c++"),
                     "onnxruntime": _package_version("onnxruntime")},
    }


def _yes(v) -> str:
    return "yes" if v is True else "no" if v is False else str(v)


def format_info(info: dict) -> str:
    c, lv, k = info["cpu"], info["isa"], info["kernels"]
    lut = k["lut_variants"]
    cap = f"{lv['cap']}" if lv["cap"] else "unset"
    lines = [
        f"cpu          {c['model']} ({c['machine']}, {c['cores']} cores usable)",
        f"avx2 / fma   {_yes(c['avx2'])} / {_yes(c['fma'])}",
        "avx-512      " + " ".join(f"{n}:{_yes(v)}" for n, v in c["avx512"].items()),
        "amx (cpuid)  " + " ".join(f"{n}:{_yes(v)}" for n, v in c["amx"].items())
        + f"   granted by the OS: {_yes(c['amx_os_grants'])}",
        "cache        " + (", ".join(f"{n} {s}" for n, s in c["cache"].items()) or "unknown"),
        f"isa level    {lv['level']} (host {lv['host_level']}, QCOMPILE_ISA {cap})",
        f"features     {' '.join(lv['features']) or 'none beyond x86-64'}",
        "targets",
        *(f"  {t:<12} {s}" for t, s in info["targets"].items()),
        "kernels",
        f"  tvm mcpu   {k['tvm_mcpu'] or 'n/a (no TVM)'}",
        f"  lut        {', '.join(lut) if isinstance(lut, list) else lut}",
        f"  sparse     {k['sparse'] or 'none (pruned linears use the dense cpu kernels)'}",
        "versions",
        *(f"  {n:<12} {v or 'not installed'}" for n, v in info["versions"].items()),
    ]
    return "\n".join(lines)


def cmd_info(a) -> int:
    info = host_info()
    print(json.dumps(info, indent=1) if a.json else format_info(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompile", description="Compile quantized neural networks.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m_help = ("an .onnx file, package.module:factory returning (model, example_inputs[, "
              "dynamic_shapes]), or a Hugging Face causal-LM directory (Llama, Qwen2, Mistral)")
    s = sub.add_parser("inspect", help="capture a model and print its IR summary and op histogram")
    s.add_argument("model", help=m_help)
    s.add_argument("--ir", action="store_true", help="print the whole IR listing")
    s.set_defaults(fn=cmd_inspect)
    s = sub.add_parser("build", help="compile a model ahead of time into an artifact directory")
    s.add_argument("model", help=m_help)
    s.add_argument("--target", default="reference",
                   help="target name (see qcompile.targets()); several devices as a comma-separated "
                        "list (npu,cpu) or a .toml device file place the model across them")
    s.add_argument("--plan", help="a plan.json from an earlier multi-device build, with pins "
                                  "edited ({\"pins\": {\"encoder.*\": \"cpu\"}}), to place with")
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
    s.add_argument("--force", action="store_true",
                   help="replace whatever is at the output path; without it only an existing "
                        "artifact (or an empty directory) is replaced")
    s.add_argument("--max-seq-len", type=int, default=512,
                   help="a Hugging Face LLM directory: prompt plus generated tokens (KV cache size)")
    s.add_argument("--max-batch", type=int, default=1,
                   help="a Hugging Face LLM directory: sequences generated at once")
    s.set_defaults(fn=cmd_build)
    s = sub.add_parser("generate", help="generate text with an LLM built from a Hugging Face "
                                        "model directory")
    s.add_argument("artifact", help="directory written by `qcompile build MODEL_DIR` or "
                                    "CompiledLLM.save")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--tokenizer", help="a tokenizer directory, when the artifact has none")
    s.set_defaults(fn=cmd_generate)
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
    s = sub.add_parser("info", help="print this machine's CPU features, the instruction-set "
                                    "level, the targets and kernels that run here and versions")
    s.add_argument("--json", action="store_true", help="print the same as one JSON object")
    s.set_defaults(fn=cmd_info)
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
