"""Decoder LLMs end to end: capture a Hugging Face causal LM of the Llama family as one step
graph with its KV cache as state, quantize it with the usual passes, lower it, and generate.

``compile_llm(model, target)`` returns a :class:`~qcompile.llm.runtime.CompiledLLM`."""
from __future__ import annotations

import time

import torch

from qcompile.llm.runtime import CompiledLLM, sample_next
from qcompile.llm.spec import SUPPORTED, LlmSpec, read_spec
from qcompile.llm.step import Step

__all__ = ["compile_llm", "capture_llm", "lower_step", "CompiledLLM", "LlmSpec", "sample_next",
           "SUPPORTED"]


def step_inputs(spec: LlmSpec, ids: torch.Tensor) -> tuple:
    """Inputs of one prefill step of ``ids`` [n, T] (no padding) on fresh caches: for
    capture and calibration."""
    n, t = ids.shape
    s = spec.max_seq_len
    slots = torch.arange(s)
    mask = (slots[None, :] <= torch.arange(t)[:, None]).expand(n, 1, t, s).clone()
    caches = [torch.zeros((n, *spec.cache_shape[1:]), dtype=spec.cache_dtype)
              for _ in range(2 * spec.layers)]
    return (ids.to(torch.int64), torch.arange(t).expand(n, t).clone(), mask,
            torch.zeros(1, dtype=torch.int64), *caches)


#: KV cache formats stored quantized: QuantConfig.kv_cache name -> bits
KV_FORMATS = {"int8": 8, "int4": 4}


def capture_llm(model: torch.nn.Module, *, max_seq_len: int = 256, max_batch: int = 1,
                kv_bits: int = 0):
    """(the step graph, its :class:`LlmSpec`): ``model``'s step (:mod:`qcompile.llm.step`)
    captured with a symbolic batch and token count; ``kv_bits`` 8 or 4 stores the KV cache
    quantized per token."""
    from dataclasses import replace

    from qcompile.api import capture
    from qcompile.llm.check import check_step_graph
    spec = replace(read_spec(model, max_seq_len=max_seq_len, max_batch=max_batch), kv_bits=kv_bits)
    step = Step(model, spec).eval()
    example = step_inputs(spec, torch.zeros(min(2, max_batch), min(4, max_seq_len - 1),
                                            dtype=torch.int64))
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch > 1 else None
    tokens = torch.export.Dim("tokens", min=1, max=max_seq_len - 1)
    bdim = {0: batch} if batch is not None else {}
    # the caches are forward's *caches: one tuple in the structure export compares
    dyn = ({**bdim, 1: tokens}, {**bdim, 1: tokens}, {**bdim, 2: tokens}, None,
           tuple(dict(bdim) or None for _ in range(2 * spec.layers)))
    graph = capture(step, example, dynamic_shapes=dyn)
    graph.name = f"{spec.model_type}_step"
    check_step_graph(graph, spec)
    return graph, spec


def tokenizer_files(model, tokenizer=None) -> dict[str, bytes]:
    """The tokenizer files to keep with a compiled model: those of ``tokenizer`` (a
    directory, or a Hugging Face tokenizer, saved), else those in the model's own directory
    (``model.name_or_path``); empty when there are none."""
    import tempfile
    from pathlib import Path

    from qcompile.llm.runtime import TOKENIZER_FILES

    def read(d) -> dict[str, bytes]:
        d = Path(d)
        return {f: (d / f).read_bytes() for f in TOKENIZER_FILES if (d / f).is_file()}
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            return read(tmp)
    where = tokenizer if tokenizer is not None else getattr(model, "name_or_path", None)
    return read(where) if where and Path(where).is_dir() else {}


def compile_llm(model: torch.nn.Module, target: str = "reference", *, config=None,
                calibration=None, max_seq_len: int = 256, max_batch: int = 1,
                tokenizer=None, progress: bool = True) -> CompiledLLM:
    """Compile a Hugging Face causal LM of the Llama family (``SUPPORTED``) for ``target``.

    ``config`` (a ``QuantConfig``, a dict or a TOML path) quantizes it as ``compile`` does,
    calibrated on ``calibration`` (a list of prompts: token-id tensors [1, T] or lists).
    ``config.kv_cache`` ``"int8"`` or ``"int4"`` stores the KV cache quantized per token
    (``kv_write``'s codes and scale: 3.8x / 7.1x smaller at head_dim 64), the rest of the
    config applies to the weights and activations.
    ``max_seq_len`` (prompt plus generated tokens) and ``max_batch`` size the KV cache.
    ``tokenizer`` (a directory or a Hugging Face tokenizer; default: the model's directory)
    is saved with the model for ``qcompile generate``."""
    from qcompile.api import _check_data_needs_config
    from qcompile.backends import get_backend
    from qcompile.config import QuantConfig
    backend = get_backend(target)
    config = QuantConfig.coerce(config)
    _check_data_needs_config(calibration, None, config)
    kv_bits = 0
    if config is not None and config.kv_cache is not None:
        # the cache is stored in the format, not fake-quantized inside the graph
        from dataclasses import replace

        from qcompile.errors import ConfigError
        if config.kv_cache not in KV_FORMATS:
            raise ConfigError(f"kv_cache {config.kv_cache!r} cannot be stored by compile_llm",
                              hint=f"use one of {sorted(KV_FORMATS)} (per-token codes and scale)")
        kv_bits = KV_FORMATS[config.kv_cache]
        config = replace(config, kv_cache=None)
    timings = {}
    t0 = time.perf_counter()
    graph, spec = capture_llm(model, max_seq_len=max_seq_len, max_batch=max_batch, kv_bits=kv_bits)
    timings["capture_s"] = time.perf_counter() - t0
    if config is not None:
        from qcompile.passes.pipeline import quantize_graph
        samples = None if calibration is None else [
            step_inputs(spec, torch.as_tensor(p, dtype=torch.int64).reshape(1, -1)[:, :max_seq_len - 1])
            for p in calibration]
        t0 = time.perf_counter()
        graph, records = quantize_graph(graph, config, samples, target=target, progress=progress)
        timings["quantize_s"] = time.perf_counter() - t0
        timings["passes"] = [[r.name, round(r.seconds, 4)] for r in records]
    t0 = time.perf_counter()
    executable, decode = lower_step(backend, graph, target)
    timings["lower_s"] = time.perf_counter() - t0
    return CompiledLLM(graph, target, executable, spec, decode=decode, config=config,
                       timings=timings, tokenizer_files=tokenizer_files(model, tokenizer))


def lower_step(backend, graph, target: str, files: dict | None = None):
    """(prefill executable, decode executable or None): ``graph`` lowered as is (symbolic
    token count) and specialised to one token per sequence, the static shapes the decode
    kernels need, on one copy of the parameters. The interpreter (``reference``) runs both
    shapes as they come. ``files``: load both from an artifact's files instead."""
    from qcompile.ir.specialize import specialize
    from qcompile.llm.runtime import DECODE
    if target == "reference":
        return (backend.lower(graph, target) if files is None else backend.load(graph, target, files)), None
    one = specialize(graph, {"tokens": 1})
    if files is None:
        prefill, decode = backend.lower(graph, target), backend.lower(one, target)
    else:
        mine = {k: v for k, v in files.items() if not k.startswith(DECODE)}
        theirs = {k[len(DECODE):]: v for k, v in files.items() if k.startswith(DECODE)}
        if not theirs:
            return backend.load(graph, target, mine), None
        prefill = backend.load(graph, target, mine)
        decode = backend.load(one, target, {**{k: v for k, v in mine.items() if k not in theirs}, **theirs})
    share = getattr(decode, "share_params", None)
    if share is not None:
        share(prefill)
    return prefill, decode
