"""Shared graph surgery for the passes that rescale a linear's input channels (SmoothQuant,
AWQ) or fold norm affines: find the linears reading a value, the op producing it, and fold a
per-channel scale ``s`` so that ``X' = X / s`` and ``W' = W · diag(s)``, outputs unchanged
(Xiao et al., "SmoothQuant", ICML 2023, eq. 3: ``Y = (X diag(s)⁻¹)(diag(s) W)``)."""
from __future__ import annotations

import torch

from qcompile.ir.graph import Graph, Node, Value

__all__ = ["linear_consumers", "norm_of", "fold_input_scale", "split_norm_affine", "has_affine",
           "set_constant", "NORMS"]

NORMS = ("layer_norm", "rms_norm")


def linear_consumers(graph: Graph, v: Value, users=None) -> list[Node] | None:
    """The linears (constant weight) reading ``v`` as their input, when a channel scale can be
    folded for them: every reader is such a linear, or ``v`` comes from a norm (whose other
    readers ``split_norm_affine`` serves). None otherwise."""
    readers = (users or graph.users()).get(v, [])
    lin = [n for n in readers if n.op == "linear" and n.inputs[0] is v
           and graph.is_constant(n.inputs[1])]
    if not lin:
        return None
    if norm_of(graph, v) is not None or (len(lin) == len(readers) and v not in graph.outputs):
        return lin
    return None


def norm_of(graph: Graph, v: Value) -> Node | None:
    p = v.producer
    return p if p is not None and p.op in NORMS and p.attrs.get("normalized_ndim", 1) == 1 else None


def has_affine(graph: Graph, norm: Node) -> bool:
    return any(v is not None for v in norm.inputs[1:])


def set_constant(graph: Graph, v: Value, t: torch.Tensor) -> Value:
    """A fresh constant holding ``t`` (constants may be shared, so never written in place)."""
    return graph.add_constant(v.name, t.to(graph.constants[v.name].dtype))


def split_norm_affine(graph: Graph, norm: Node, linears: list[Node]) -> None:
    """Give ``linears`` an affine-free copy of ``norm``'s output: the norm loses γ and β, the
    linears absorb them (``W' = W diag(γ)``, ``b' = b + W β``), and any other reader gets
    ``y₀·γ + β`` back through explicit ``mul``/``add`` nodes. Outputs are unchanged."""
    out = norm.outputs[0]
    others = [n for n in graph.users().get(out, []) if n not in linears]
    gamma = norm.inputs[1] if len(norm.inputs) > 1 else None
    beta = norm.inputs[2] if len(norm.inputs) > 2 else None
    g = graph.constants[gamma.name].to(torch.float64) if gamma is not None else None
    b = graph.constants[beta.name].to(torch.float64) if beta is not None else None
    if g is None and b is None:
        return
    dtype = graph.constants[linears[0].inputs[1].name].dtype
    for lin in linears:
        w_v = lin.inputs[1]
        w = graph.constants[w_v.name].to(torch.float64)
        bias_v = lin.inputs[2] if len(lin.inputs) > 2 else None
        if b is not None:
            bias = w @ b + (graph.constants[bias_v.name].double() if bias_v is not None else 0)
            nb = graph.add_constant(f"{lin.name}.bias", bias.to(dtype))
            lin.inputs = lin.inputs[:2] + [nb]
        if g is not None:
            w = w * g
        lin.inputs[1] = set_constant(graph, w_v, w)
    if others or out in graph.outputs:
        _restore_affine_for(graph, norm, others, gamma, beta)
    norm.inputs = [norm.inputs[0]]


def _restore_affine_for(graph: Graph, norm: Node, readers: list[Node], gamma, beta) -> None:
    out = norm.outputs[0]
    y = out
    new_nodes = []
    if gamma is not None:
        n = _new_node(graph, "mul", [y, gamma], norm)
        new_nodes.append(n)
        y = n.outputs[0]
    if beta is not None:
        n = _new_node(graph, "add", [y, beta], norm)
        new_nodes.append(n)
        y = n.outputs[0]
    graph.replace_uses(out, y, nodes=readers)
    if out in graph.outputs:
        graph.outputs = [y if o is out else o for o in graph.outputs]
    i = graph.nodes.index(norm) + 1
    graph.nodes[i:i] = new_nodes


def _new_node(graph: Graph, op: str, inputs, like: Node) -> Node:
    n = graph.add_node(op, inputs, {}, name=f"{like.name}.{op}", provenance=like.provenance)
    graph.nodes.remove(n)  # the caller places it
    return n


def fold_input_scale(graph: Graph, x: Value, linears: list[Node], s: torch.Tensor) -> bool:
    """Divide ``x``'s channels by ``s`` at its producer and multiply the linears' weight columns
    by ``s``. The producer may be a norm (its γ and β are divided; other readers, such as a
    post-LN residual, get the original values back through a ``mul`` by ``s``) or a linear
    read only by ``linears`` (its weight rows and bias are divided). Returns False, changing
    nothing, when ``x`` has no foldable producer."""
    s = s.to(torch.float64)
    p = x.producer
    users = graph.users().get(x, [])
    if p is not None and norm_of(graph, x) is not None:
        others = [n for n in users if n not in linears]
        # divide γ and β (SmoothQuant's fold, §4); other readers (a post-LN residual) get the
        # original values back through a ``mul`` by s
        if others or x in graph.outputs:
            _restore_affine_for(graph, p, others,
                                graph.add_constant(f"{p.name}.unsmooth", s.float()), None)
        gamma = p.inputs[1] if len(p.inputs) > 1 else None
        beta = p.inputs[2] if len(p.inputs) > 2 else None
        g = graph.constants[gamma.name].double() if gamma is not None else torch.ones_like(s)
        ins = [p.inputs[0], graph.add_constant(f"{p.name}.weight", (g / s).float())]
        if beta is not None:
            ins.append(set_constant(graph, beta, graph.constants[beta.name].double() / s))
        p.inputs = ins
    elif p is not None and p.op == "linear" and graph.is_constant(p.inputs[1]) \
            and all(n in linears for n in users) and x not in graph.outputs:
        w = graph.constants[p.inputs[1].name].to(torch.float64)
        p.inputs[1] = set_constant(graph, p.inputs[1], w / s[:, None])
        if len(p.inputs) > 2 and p.inputs[2] is not None:
            p.inputs[2] = set_constant(graph, p.inputs[2], graph.constants[p.inputs[2].name].double() / s)
    else:
        return False
    for lin in linears:
        _scale_columns(graph, lin, s)
    return True


def _scale_columns(graph: Graph, lin: Node, s: torch.Tensor) -> None:
    w = graph.constants[lin.inputs[1].name].to(torch.float64)
    lin.inputs[1] = set_constant(graph, lin.inputs[1], w * s)
