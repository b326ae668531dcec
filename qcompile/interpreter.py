"""The reference interpreter: runs a Graph node by node with each op's torch kernel.

It is the oracle every backend is diffed against. Quantization-annotated values are
fake-quantized when produced (with a straight-through gradient), hooks see every value as
it is produced (calibration uses them), and parameters may be overridden by tensors that
require grad, so the whole run is differentiable (Hessian traces use autograd through it).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from qcompile.errors import InputError
from qcompile.ir.graph import Graph, Value
from qcompile.ir.registry import get_schema
from qcompile.ir.types import dim_expr, eval_dim, to_torch_dtype

__all__ = ["Interpreter", "run_graph", "bind_inputs"]

Hook = Callable[[Value, torch.Tensor], None]


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return torch.from_numpy(np.asarray(x))
    raise InputError(f"input '{name}' must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def bind_inputs(graph: Graph, inputs: Sequence) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Check run-time inputs against the graph's input types and bind the symbolic sizes."""
    if len(inputs) != len(graph.inputs):
        names = ", ".join(v.name for v in graph.inputs)
        raise InputError(f"expected {len(graph.inputs)} inputs ({names}), got {len(inputs)}")
    env: dict[str, int] = {}
    tensors = []
    for v, x in zip(graph.inputs, inputs):
        t = _as_tensor(x, v.name)
        want = to_torch_dtype(v.dtype)
        if t.dtype != want:
            if t.dtype.is_floating_point == want.is_floating_point or (
                    not t.dtype.is_floating_point and not want.is_floating_point):
                t = t.to(want)
            else:
                raise InputError(f"input '{v.name}' has dtype {t.dtype}, expected {v.dtype}")
        if t.dim() != len(v.shape):
            raise InputError(f"input '{v.name}' has shape {list(t.shape)}, expected "
                             f"{_shape(v.shape)} (rank {t.dim()} instead of {len(v.shape)})")
        for d, n in zip(v.shape, t.shape):
            if isinstance(d, str) and dim_expr(d).is_Symbol:
                if env.setdefault(d, int(n)) != int(n):
                    raise InputError(f"input '{v.name}' has shape {list(t.shape)}, expected "
                                     f"{_shape(v.shape)}: '{d}' is already bound to {env[d]}")
        tensors.append(t)
    for v, t in zip(graph.inputs, tensors):
        for d, n in zip(v.shape, t.shape):
            try:
                expected = eval_dim(d, env)
            except (KeyError, TypeError):
                expected = int(n)
            if expected != int(n):
                raise InputError(f"input '{v.name}' has shape {list(t.shape)}, expected "
                                 f"{_shape(v.shape)}" + (f" with {env}" if env else ""))
    return tensors, env


class Interpreter:
    """Run a graph with torch. ``hooks`` get ``(value, tensor)`` for every produced value."""

    def __init__(self, graph: Graph, *, fake_quant: bool = True):
        self.graph = graph
        self.fake_quant = fake_quant
        self.hooks: list[Hook] = []
        self._schemas = [get_schema(n.op) for n in graph.nodes]

    def add_hook(self, hook: Hook) -> Callable[[], None]:
        self.hooks.append(hook)
        return lambda: self.hooks.remove(hook)

    def _produce(self, v: Value, t: torch.Tensor, consts) -> torch.Tensor:
        if self.fake_quant and v.quant is not None and t.is_floating_point():
            t = v.quant.fake_quant(t, consts)
        for h in self.hooks:
            h(v, t)
        return t

    def run(self, *inputs, params: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Run on inputs (torch or numpy); ``params`` overrides constants by name."""
        g = self.graph
        tensors, env = bind_inputs(g, inputs)
        consts = dict(g.constants)
        if params:
            unknown = set(params) - set(consts)
            if unknown:
                raise InputError(f"params override unknown constants {sorted(unknown)}")
            consts.update(params)
        vals: dict[int, torch.Tensor] = {}
        for v, t in zip(g.inputs, tensors):
            vals[id(v)] = self._produce(v, t, consts)
        for name, t in consts.items():
            v = g.constant_value(name)
            vals[id(v)] = self._produce(v, t, consts) if (v.quant is not None or self.hooks) else t
        for node, schema in zip(g.nodes, self._schemas):
            args = [None if v is None else vals[id(v)] for v in node.inputs]
            outs = schema.run(args, node.attrs, env)
            for v, t in zip(node.outputs, outs):
                vals[id(v)] = self._produce(v, t, consts)
        return [vals[id(v)] for v in g.outputs]

    __call__ = run


def run_graph(graph: Graph, *inputs, **kw) -> list[torch.Tensor]:
    return Interpreter(graph).run(*inputs, **kw)
