"""quantize_activations: annotate the inputs of quantized linears, and attention's K and V,
with activation formats.

- dynamic per token (``activation_granularity="per_token"``): scales from each token's
  abs-max at run time (LLM.int8(), Dettmers et al. 2022, §3.1 "vector-wise quantization";
  ZeroQuant, Yao et al. 2022, §4.1 "token-wise");
- static per tensor (``"per_tensor"``): one scale (and zero point, for asymmetric formats)
  from the calibrated min/max (Jacob et al. 2018, §3);
- block formats (MX, NVFP4) are always dynamic, with their own block scales;
- KV cache (``kv_cache``): K and V of every ``attention`` dynamically per token (KIVI, Liu et
  al. 2024, quantizes K per channel; per token is the simpler common choice here).

Annotations go on an ``identity`` copy read only by the quantized consumers, so other readers
(a residual connection) still see the float value, as a real kernel's input quantizer would.
"""
from __future__ import annotations

import torch

from qcompile.config import QuantConfig
from qcompile.errors import ConfigError
from qcompile.ir.graph import Graph, Node, Value
from qcompile.ir.quant import Granularity, QuantSpec
from qcompile.passes.manager import register_pass

__all__ = ["quantize_activations", "static_spec"]


def _options(fmt) -> tuple:
    return tuple(sorted((k, v) for k, v in fmt.options().items()
                        if k not in ("granularity", "group_size")))


def static_spec(graph: Graph, fmt, name: str, lo: float, hi: float) -> QuantSpec:
    """A static per-tensor spec of ``fmt`` covering [lo, hi] (Jacob et al. 2018, §3), its
    parameters stored as graph constants ``<name>.act_scale`` / ``.act_zero_point``. The range
    always holds 0 (the format widens it so); an all-zero tensor gets [0, 1], so the scale is
    never 0."""
    if lo == hi == 0.0:  # an all-zero tensor: any positive scale, zero stays exact
        hi = 1.0
    qt = fmt.quantize(torch.tensor([lo, hi], dtype=torch.float32))
    params = {r: graph.add_constant(f"{name}.act_{r}", t).name for r, t in qt.params.items()}
    return QuantSpec(fmt.name, Granularity.PER_TENSOR, options=_options(fmt), **params)


def _spec(graph: Graph, fmt, x: Value, cal) -> QuantSpec:
    if fmt.granularity != Granularity.PER_TENSOR:
        return QuantSpec(fmt.name, fmt.granularity, axis=-1, group_size=fmt.group_size,
                         options=_options(fmt))
    if cal is None or x.name not in cal:
        raise ConfigError(f"static per-tensor quantization of %{x.name} needs calibration "
                          "statistics", hint="pass calibration= or use per_token activations")
    st = cal[x.name]
    return static_spec(graph, fmt, x.name, st.min, st.max)


def _copy(graph: Graph, x: Value, readers: list[Node], spec: QuantSpec, tag: str) -> None:
    first = graph.nodes[min(graph.nodes.index(n) for n in readers)]
    node = graph.add_node("identity", [x], {}, name=f"{x.name}.{tag}",
                          provenance=readers[0].provenance, before=first)
    node.outputs[0].quant = spec
    graph.replace_uses(x, node.outputs[0], nodes=readers)


@register_pass("quantize_activations")
def quantize_activations(graph: Graph, *, config: QuantConfig) -> Graph:
    config = QuantConfig.coerce(config)
    cal = graph.meta.get("calibration")
    groups: dict[tuple[int, str], tuple[Value, object, list[Node]]] = {}
    for n in graph.nodes:
        if n.op != "linear" or n.inputs[1].quant is None:
            continue
        lc = config.layer(n.provenance.module or n.name, n.inputs[1].name)
        fmt = lc.activation_format() if lc is not None else None
        if fmt is None or n.inputs[0].quant is not None:
            continue
        key = (id(n.inputs[0]), str(fmt))
        groups.setdefault(key, (n.inputs[0], fmt, []))[2].append(n)
    for x, fmt, readers in groups.values():
        _copy(graph, x, readers, _spec(graph, fmt, x, cal), "act_q")
    if config.kv_cache is not None:
        from qcompile.formats import get
        kv = get(config.kv_cache)
        if not kv.block_only and kv.granularity.value != "none":
            kv = get(config.kv_cache, granularity="per_token")
        for n in [n for n in graph.nodes if n.op == "attention"]:
            for i, tag in ((1, "k_q"), (2, "v_q")):
                _copy(graph, n.inputs[i], [n], _spec(graph, kv, n.inputs[i], None), tag)
    return graph
