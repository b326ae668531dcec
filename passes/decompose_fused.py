"""decompose_fused: ``rms_norm``, ``rotary`` and ``silu`` → the primitive ops they stand for,
so that a full-QDQ target (``npu``) gives each intermediate tensor a calibrated scale of its
own. An ONNX file at opset 21 has no RMSNorm, rotary or SiLU op, so the export writes these
as several nodes; without their intermediates in the IR, those nodes would be float tensors
between Q/DQ pairs, which an integer NPU cannot run.

- RMSNorm (Zhang & Sennrich 2019, eq. 4): ``x / √(mean(x²) + ε) · g`` as mul, mean, add,
  sqrt, div, mul (a div, not reciprocal and mul: the QNN HTP's 16-bit Reciprocal was
  measured wrong, 0.98 relative to the CPU EP on the same file);
- rotary embedding, half-split form (Su et al. 2021, eq. 34, as GPT-NeoX/Llama):
  ``x·cos + [−x₂, x₁]·sin`` as two slices, neg, concat, two muls and an add;
- SiLU (Elfwing et al. 2018, eq. 1): ``x · σ(x)`` as sigmoid and mul.

Requires: float32 graphs (the fused ops' reference kernels compute RMSNorm in fp32).
Guarantees: outputs equal up to float rounding order.
"""
from __future__ import annotations

import torch

from qcompile.ir.graph import Graph, Node
from qcompile.passes.manager import register_pass

__all__ = ["decompose_fused", "OPS"]

OPS = ("rms_norm", "rotary", "silu")


def _adder(g: Graph, n: Node):
    def add(op, *ins, **attrs):
        return g.add_node(op, list(ins), attrs, name=f"{n.name}.{op}", provenance=n.provenance,
                          before=n).outputs[0]
    return add


def _rms_norm(g: Graph, n: Node):
    add = _adder(g, n)
    x = n.inputs[0]
    w = n.inputs[1] if len(n.inputs) > 1 else None
    nd = int(n.attrs["normalized_ndim"])
    axes = list(range(len(x.shape) - nd, len(x.shape)))
    ms = add("mean", add("mul", x, x), axes=axes, keepdim=True)
    eps = g.add_constant(f"{n.name}.eps", torch.tensor(float(n.attrs["eps"])))
    # x / √(·) as one div: the QNN HTP's 16-bit Reciprocal came out wrong (0.98 relative)
    y = add("div", x, add("sqrt", add("add", ms, eps)))
    return add("mul", y, w) if w is not None else y


def _rotary(g: Graph, n: Node):
    add = _adder(g, n)
    x, cos, sin = n.inputs
    h = int(x.shape[-1]) // 2
    x1 = add("slice", x, axis=-1, start=0, end=h)
    x2 = add("slice", x, axis=-1, start=h, end=2 * h)
    rot = add("concat", add("neg", x2), x1, axis=-1)
    return add("add", add("mul", x, cos), add("mul", rot, sin))


def _silu(g: Graph, n: Node):
    add = _adder(g, n)
    x = n.inputs[0]
    return add("mul", x, add("sigmoid", x))


_RULES = {"rms_norm": _rms_norm, "rotary": _rotary, "silu": _silu}


@register_pass("decompose_fused")
def decompose_fused(graph: Graph, *, ops=OPS) -> Graph:
    for n in [n for n in graph.nodes if n.op in ops and n.op in _RULES]:
        if n.op == "rms_norm" and n.inputs[0].dtype != "float32":
            continue  # the fused kernel upcasts; keep it where the graph is not fp32
        out = _RULES[n.op](graph, n)
        graph.replace_uses(n.outputs[0], out)
        graph.nodes.remove(n)
    return graph
