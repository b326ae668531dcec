"""Decoder LLMs end to end: capture a Hugging Face causal LM of the Llama family as one step
graph with its KV cache as state, quantize it with the usual passes, lower it, and generate.

``compile_llm(model, target)`` returns a :class:`~qcompile.llm.runtime.CompiledLLM`."""
from __future__ import annotations

import time

import torch

from qcompile.llm.runtime import CompiledLLM, sample_next
from qcompile.llm.spec import SUPPORTED, LlmSpec, read_spec
from qcompile.llm.step import Step

__all__ = ["compile_llm", "capture_llm", "lower_step", "CompiledLLM", "LlmSpec", "sample_next", "SUPPORTED"]


def step_inputs(spec: LlmSpec, ids: torch.Tensor) -> tuple:
    """Inputs of one prefill step of ``ids`` [n, T] (no padding) on fresh caches: for
    capture and calibration."""
    n, t = ids.shape
    s = spec.max_seq_len
    slots = torch.arange(s)
    mask = (slots[None, :] <= torch.arange(t)[:, None]).expand(n, 1, t, s).clone()
    caches = [torch.zeros(n, spec.kv_heads, s, spec.head_dim) for _ in range(2 * spec.layers)]
    return (ids.to(torch.int64), torch.arange(t).expand(n, t).clone(), mask,
            torch.zeros(1, dtype=torch.int64), *caches)


def capture_llm(model: torch.nn.Module, *, max_seq_len: int = 256, max_batch: int = 1):
    """(the step graph, its :class:`LlmSpec`): ``model``'s step (:mod:`qcompile.llm.step`)
    captured with a symbolic batch and token count."""
    from qcompile.api import capture
    from qcompile.llm.check import check_step_graph
    spec = read_spec(model, max_seq_len=max_seq_len, max_batch=max_batch)
    step = Step(model, spec).eval()
    example = step_inputs(spec, torch.zeros(min(2, max_batch), min(4, max_seq_len - 1),
                                            dtype=torch.int64))
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch > 1 else None
    tokens = torch.export.Dim("tokens", min=1, max=max_seq_len - 1)
    bdim = {0: batch} if batch is not None else {}
    # the caches are forward's *caches: one tuple in the structure export compares
    dyn = ({**bdim, 1: tokens}, {**bdim, 1: tokens}, {**bdim, 2: tokens}, None,
           tuple(dict(bdim) or None for _ in range(2 * spec.layers)))
    if batch is None:
        example = (example[0][:1], example[1][:1], example[2][:1], example[3],
                   *[c[:1] for c in example[4:]])
    graph = capture(step, example, dynamic_shapes=dyn)
    graph.name = f"{spec.model_type}_step"
    check_step_graph(graph, spec)
    return graph, spec


def compile_llm(model: torch.nn.Module, target: str = "reference", *, config=None,
                calibration=None, max_seq_len: int = 256, max_batch: int = 1,
                progress: bool = True) -> CompiledLLM:
    """Compile a Hugging Face causal LM of the Llama family (``SUPPORTED``) for ``target``.

    ``config`` (a ``QuantConfig``, a dict or a TOML path) quantizes it as ``compile`` does,
    calibrated on ``calibration`` (a list of prompts: token-id tensors [1, T] or lists).
    ``max_seq_len`` (prompt plus generated tokens) and ``max_batch`` size the KV cache."""
    from qcompile.api import _check_data_needs_config
    from qcompile.backends import get_backend
    from qcompile.config import QuantConfig
    backend = get_backend(target)
    config = QuantConfig.coerce(config)
    _check_data_needs_config(calibration, None, config)
    timings = {}
    t0 = time.perf_counter()
    graph, spec = capture_llm(model, max_seq_len=max_seq_len, max_batch=max_batch)
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
                       timings=timings)


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
