"""quantize_all_activations: a static per-tensor format on *every* float value — the full
QDQ form that NPU runtimes need (each op an integer "node unit": DQ → op → Q).

``quantize_activations`` quantizes only what a quantized linear reads; an NPU instead runs
every op on integers, so every tensor needs a scale: graph inputs, every float node output,
and the float constants ops read as data (embedding tables, the positional embeddings an
``add`` reads, the attention scale) — as ONNX Runtime's ``quantize_static`` does. Scales and
zero points come from the calibrated min/max of the float model (Jacob et al. 2018, §3: the
asymmetric range with zero exactly representable); constants use their own min/max.

- Data-movement ops (reshape, permute, expand, slice, select, gather, embedding, max-pool …)
  give their output the *same* parameters as their input: the values
  stay on the input's grid, so the fake quantization is the identity there and the NPU
  needs no requantization.
- 16-bit Sigmoid and Tanh outputs get fixed encodings covering their whole range (sigmoid:
  s = 2⁻¹⁶, z = 0; tanh: s = 2⁻¹⁵, z = 2¹⁵ for uint16), the values ONNX Runtime's QNN
  configuration uses, so the HTP's table-driven 16-bit kernels apply.
- LayerNorm γ gets ``norm_weights`` (uint8 asymmetric per tensor: the QNN HTP rejects a
  signed γ, npu.md §2); linear/conv weights are left to ``quantize_weights``; their biases
  and LayerNorm's β stay float in the IR. A linear's bias exports as int32 at ``s_x·s_w``
  (Jacob et al. 2018, §2.4), an error ≤ s_x·s_w/2 the export oracle allows; β and conv
  biases export as float initializers, which the HTP takes.
Requires: ``graph.meta["calibration"]`` holding stats for ``activation_values(graph)``.
"""
from __future__ import annotations

import torch

from qcompile.config import QuantConfig
from qcompile.errors import ConfigError
from qcompile.ir.graph import Graph, Value
from qcompile.ir.quant import Granularity, QuantSpec
from qcompile.ir.types import is_float
from qcompile.passes.manager import register_pass
from qcompile.passes.quantize_activations import static_spec

__all__ = ["quantize_all_activations", "activation_values", "SAME_GRID"]

#: ops whose float output holds only values of their (first) float input: same parameters
SAME_GRID = frozenset({"reshape", "permute", "expand", "slice", "select", "take", "gather",
                       "index", "tile", "identity", "max_pool2d", "embedding", "relu"})
#: (op, input index) pairs whose constant is a weight or bias quantized elsewhere
_WEIGHT_SLOTS = {("linear", 1), ("linear", 2), ("conv", 1), ("conv", 2), ("layer_norm", 2),
                 ("batch_norm", 1), ("batch_norm", 2), ("batch_norm", 3), ("batch_norm", 4)}


def _is_float(v: Value | None) -> bool:
    return v is not None and is_float(v.dtype)


def _grid_source(n) -> Value | None:
    if n.op == "embedding":
        return n.inputs[0]
    if n.op == "relu":
        return None  # relu clips at 0: its own (calibrated, min 0) range is the finer grid
    return next((v for v in n.inputs if _is_float(v)), None)


def activation_values(graph: Graph) -> list[Value]:
    """The float values that get their own calibrated scale: graph inputs and the outputs of
    ops that compute (not those of data-movement ops), not yet quantized."""
    out = [v for v in graph.inputs if _is_float(v) and v.quant is None]
    for n in graph.nodes:
        if n.op in SAME_GRID and n.op != "relu":
            continue
        out += [o for o in n.outputs if _is_float(o) and o.quant is None]
    return out


#: fixed 16-bit output encodings (scale, zero point) of functions with a known range, as
#: ONNX Runtime's QNN configuration sets them (``get_qnn_qdq_config``): sigmoid ∈ (0, 1),
#: tanh ∈ (−1, 1) — the whole code range, whatever calibration saw
_FIXED16 = {("sigmoid", "uint16"): (1 / 65536, 0), ("tanh", "uint16"): (1 / 32768, 32768),
            ("sigmoid", "int16"): (1 / 32768, 0), ("tanh", "int16"): (1 / 32768, 0)}


def _fixed_spec(graph: Graph, fmt, name: str, scale: float, zero: int) -> QuantSpec:
    from qcompile.passes.quantize_activations import _options
    opts = _options(fmt)
    params = {"scale": graph.add_constant(f"{name}.act_scale", torch.tensor(scale)).name}
    if "zero_point" in fmt.roles:
        params["zero_point"] = graph.add_constant(
            f"{name}.act_zero_point", torch.tensor(zero, dtype=fmt.code_dtype)).name
    return QuantSpec(fmt.name, Granularity.PER_TENSOR, options=opts, **params)


def _split_block_biases(graph: Graph) -> int:
    """linear(x, W, b) with block-quantized W → add(linear(x, W), b): NPU runtimes take block
    weights in MatMul, which has no bias, so the sum before the bias is a tensor of its own
    and needs its own calibrated scale. An all-zero bias is dropped (npu.md §1: the HTP
    miscompiles Add(x, 0))."""
    split = 0
    users = graph.users()
    for n in list(graph.nodes):
        if n.op != "linear" or len(n.inputs) < 3 or n.inputs[2] is None or \
                n.inputs[1].quant is None or \
                n.inputs[1].quant.granularity != Granularity.PER_GROUP:
            continue
        b = n.inputs[2]
        n.inputs = [n.inputs[0], n.inputs[1], None]
        split += 1
        if graph.is_constant(b) and not graph.constants[b.name].any():
            continue
        out = n.outputs[0]
        i = graph.nodes.index(n)
        nxt = graph.nodes[i + 1] if i + 1 < len(graph.nodes) else None
        add = graph.add_node("add", [out, b], {}, name=f"{n.name}.bias",
                             provenance=n.provenance, before=nxt)
        graph.replace_uses(out, add.outputs[0], nodes=users.get(out, []))
    return split


@register_pass("quantize_all_activations")
def quantize_all_activations(graph: Graph, *, config: QuantConfig, data=None,
                             norm_weights: str = "uint8", max_samples: int | None = None,
                             progress: bool = True) -> Graph:
    """With ``data``, calibrates every float value first (min/max of the float model);
    otherwise reads ``graph.meta["calibration"]``."""
    config = QuantConfig.coerce(config)
    if config.activations is None or config.activation_granularity != "per_tensor":
        raise ConfigError("quantizing every activation needs static per-tensor activations",
                          hint="set activations='uint16' (or 'uint8') and "
                               "activation_granularity='per_tensor'")
    from qcompile.formats import get
    fmt = get(config.activations, granularity="per_tensor")
    if _split_block_biases(graph) and data is None:
        raise ConfigError("splitting block-quantized linears' biases changes what the stored "
                          "calibration statistics describe",
                          hint="pass data= so the pass calibrates the split graph itself")
    if data is not None:
        from qcompile.passes.calibrate import collect_statistics
        names = [v.name for v in graph.inputs if _is_float(v)] + \
            [o.name for n in graph.nodes for o in n.outputs if _is_float(o)]
        graph.meta["calibration"] = collect_statistics(graph, data, values=names,
                                                       max_samples=max_samples,
                                                       progress=progress)
    cal = graph.meta.get("calibration")
    for v in activation_values(graph):
        fixed = _FIXED16.get((v.producer.op, fmt.name)) if v.producer is not None else None
        if fixed is not None:
            v.quant = _fixed_spec(graph, fmt, v.name, *fixed)
            continue
        if cal is None or v.name not in cal:
            raise ConfigError(f"static quantization of %{v.name} needs calibration statistics",
                              hint="pass calibration= to compile()")
        st = cal[v.name]
        v.quant = static_spec(graph, fmt, v.name, st.min, st.max)
    nfmt = get(norm_weights, granularity="per_tensor")
    for n in graph.nodes:
        for i, v in enumerate(n.inputs):
            if not (_is_float(v) and graph.is_constant(v)) or v.quant is not None:
                continue
            if (n.op, i) in _WEIGHT_SLOTS:
                continue
            t = graph.constants[v.name].float()
            lo, hi = (float(t.min()), float(t.max())) if t.numel() else (0.0, 0.0)
            f = nfmt if (n.op, i) in (("layer_norm", 1), ("rms_norm", 1)) else fmt
            v.quant = static_spec(graph, f, v.name, lo, hi)
        if n.op in SAME_GRID:
            src = _grid_source(n)
            for o in n.outputs:
                if _is_float(o) and o.quant is None:
                    if src is not None and src.quant is not None and not src.quant.dynamic \
                            and src.quant.granularity == Granularity.PER_TENSOR:
                        o.quant = src.quant
                    elif cal is not None and o.name in cal:
                        st = cal[o.name]
                        o.quant = static_spec(graph, fmt, o.name, st.min, st.max)
    return graph
