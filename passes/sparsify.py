"""sparsify: prune every linear's constant weight ``[out, in]`` to its layer's sparsity, before
quantization, and record the result on the weight (:class:`~qcompile.ir.SparsitySpec`).

- ``magnitude``: the ``s·numel`` weights of least ``|W_ij|`` over the whole layer (Han et al.,
  "Learning both Weights and Connections for Efficient Neural Networks", NeurIPS 2015, §3);
- ``wanda``: per output row, the ``s·in`` weights of least ``S_ij = |W_ij|·‖X_j‖₂``, with
  ``‖X_j‖₂`` the L2 norm of input channel ``j`` over all calibration tokens (Sun et al., "A
  Simple and Effective Pruning Approach for Large Language Models", ICLR 2024, eq. 1 and the
  per-output comparison group of §3);
- ``2:4``: in each row, two of every four consecutive weights (NVIDIA's 2:4 pattern; Mishra et
  al., "Accelerating Sparse Deep Neural Networks", 2021), ranked by Wanda's score when
  calibration statistics exist (Wanda §3 "N:M structured sparsity"), by ``|W|`` otherwise.

Ties are broken by position (a stable sort), so the result is deterministic. Weight
quantization afterwards keeps the zeros: symmetric and asymmetric integer grids both hold
zero exactly, and ``quantize_weights`` re-imposes the mask after GPTQ/AWQ, whose updates would
otherwise fill it in.
"""
from __future__ import annotations

import torch

from qcompile.config import QuantConfig
from qcompile.errors import ConfigError, PassError
from qcompile.ir.graph import Graph, Node
from qcompile.ir.sparsity import SparsitySpec
from qcompile.passes.manager import register_pass

__all__ = ["sparsify", "prune_mask", "wanda_scores"]


def wanda_scores(w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij|·‖X_j‖₂`` (Wanda eq. 1), float64."""
    return w.double().abs() * norm.double()[None, :]


def prune_mask(scores: torch.Tensor, sparsity: float, *, per_row: bool,
               pattern: str = "unstructured") -> torch.Tensor:
    """A bool mask of the weights to keep: the lowest-scoring ``round(sparsity·count)`` of each
    comparison group (the whole matrix, each row, or each group of four for ``2:4``) are
    dropped; ties go to the earlier position."""
    out, k = scores.shape
    if pattern == "2:4":
        g = scores.reshape(out, k // 4, 4)
        order = torch.argsort(g, dim=-1, stable=True)
        keep = torch.ones_like(g, dtype=torch.bool)
        keep.scatter_(-1, order[..., :2], False)
        return keep.reshape(out, k)
    if per_row:
        n = int(round(sparsity * k))
        order = torch.argsort(scores, dim=1, stable=True)[:, :n]
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep.scatter_(1, order, False)
        return keep
    n = int(round(sparsity * scores.numel()))
    order = torch.argsort(scores.reshape(-1), stable=True)[:n]
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[order] = False
    return keep.reshape(out, k)


def _names(lin: Node) -> tuple[str, str]:
    return (lin.provenance.module or lin.name, lin.inputs[1].name)


@register_pass("sparsify")
def sparsify(graph: Graph, *, config: QuantConfig) -> Graph:
    config = QuantConfig.coerce(config)
    cal = graph.meta.get("calibration")
    linears = [n for n in graph.nodes if n.op == "linear" and graph.is_constant(n.inputs[1])
               and n.inputs[1].quant is None and n.inputs[1].sparsity is None]
    plan = {}
    for lin in linears:  # check every layer before any weight changes
        lc = config.layer(*_names(lin))
        if lc is None or not lc.sparsity:
            continue
        w = graph.constants[lin.inputs[1].name]
        method = lc.sparsity_method
        if w.dim() != 2:
            raise PassError(f"sparsify: the weight is {w.dim()}-D; it prunes [out, in] matrices",
                            node=lin)
        if method == "2:4" and w.shape[1] % 4:
            raise ConfigError(f"sparsify: 2:4 needs the input width to be a multiple of 4, this "
                              f"linear has {w.shape[1]}", node=lin,
                              hint="skip this layer with an override, or use 'wanda'")
        if method == "wanda" and (cal is None or lin.inputs[0].name not in cal):
            raise ConfigError("sparsify: 'wanda' needs calibration statistics of this linear's "
                              "input", node=lin, hint="pass calibration=[inputs, ...] to "
                              "compile(), or use sparsity_method='magnitude'")
        plan[id(lin)] = lc
    report = {}
    for lin in linears:
        lc = plan.get(id(lin))
        if lc is None:
            continue
        wv = lin.inputs[1]
        w = graph.constants[wv.name]
        method = lc.sparsity_method
        have_x = cal is not None and lin.inputs[0].name in cal
        if method == "wanda" or (method == "2:4" and have_x):
            scores, score = wanda_scores(w, cal[lin.inputs[0].name].norm), "wanda"
        else:
            scores, score = w.double().abs(), "magnitude"
        pattern = "2:4" if method == "2:4" else "unstructured"
        keep = prune_mask(scores, float(lc.sparsity), per_row=method != "magnitude",
                          pattern=pattern)
        pruned = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
        graph.constants[wv.name] = pruned
        zeros = int((pruned == 0).sum())
        wv.sparsity = SparsitySpec(zeros, pruned.numel(), score, pattern)
        report[lin.name] = f"{score} {pattern} {wv.sparsity.ratio:.3f}"
    graph.meta["sparsify"] = report
    return graph
