"""quantize_weights: quantize every linear's constant weight ``[out, in]`` along its input axis
into the layer's format, with the layer's algorithm:

- ``rtn``: round to nearest (the format's own rounding), optionally with a search of the
  clipping ratio that minimises ``‖W − Q(W)‖²`` (``rtn_clip_search``; the grid of AWQ's
  ``auto_clip``, Lin et al. 2024, §3.3);
- ``gptq``: Frantar et al., "GPTQ", ICLR 2023, Algorithm 1, on the calibrated Hessian
  ``H = 2XᵀX/N`` of the layer input (``qcompile.passes.gptq``);
- ``awq``: Lin et al., "AWQ", MLSys 2024, eq. 4–5: a per-input-channel scale searched on
  calibration activations and folded into the producer of the input (``qcompile.passes.awq``);
  layers whose input has no foldable producer get RTN.

Convolutions' constant weights ``[out, in/groups, *kernel]`` are quantized per output channel
(one scale over ``in/groups × kernel``, the convention of ONNX Runtime's and TensorRT's
quantizers) with RTN; block formats, which need a single axis, leave them in float (on record).

Where the mixed-precision pass ran (``graph.meta["mixed_precision"]``, a ``PrecisionPlan``),
each layer it decided takes the plan's weight format in place of the config's.

The weight constant becomes its dequantized value, annotated with a ``QuantSpec`` whose scale
(zero point, tensor scale, metadata) constants hold the format's parameters, so the
interpreter's fake quantization reproduces it exactly and backends can read the codes.
"""
from __future__ import annotations

import dataclasses

import torch

from qcompile.config import QuantConfig
from qcompile.errors import ConfigError
from qcompile.formats import QuantizedTensor
from qcompile.ir.graph import Graph, Node
from qcompile.ir.quant import QuantSpec
from qcompile.passes._scaling import fold_input_scale, linear_consumers
from qcompile.passes.awq import CLIP_GRID, awq_quantize, awq_search
from qcompile.passes.gptq import gptq
from qcompile.passes.manager import register_pass

__all__ = ["quantize_weights", "annotate_weight", "rtn", "weight_layers", "conv_format",
           "layer_plan"]

def rtn(w: torch.Tensor, fmt, *, clip_search: bool = False) -> QuantizedTensor:
    """Round to nearest; with ``clip_search``, the clip ratio (int formats) of least MSE."""
    best = fmt.quantize(w, -1)
    if not clip_search or not hasattr(fmt, "clip_ratio"):
        return best
    err = float((fmt.dequantize(best) - w).pow(2).sum())
    for r in CLIP_GRID[1:]:
        f = dataclasses.replace(fmt, clip_ratio=r)
        qt = f.quantize(w, -1)
        e = float((f.dequantize(qt) - w).pow(2).sum())
        if e < err:
            best, err = qt, e
    return best


def annotate_weight(graph: Graph, lin: Node, qt: QuantizedTensor) -> None:
    """Replace ``lin``'s weight by ``qt`` dequantized, annotated with ``qt``'s format and
    parameters (stored as constants named after the weight)."""
    old = lin.inputs[1]
    dtype = graph.constants[old.name].dtype
    fmt = qt.format
    params = {role: graph.add_constant(f"{old.name}.{role}", t).name for role, t in qt.params.items()}
    opts = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fmt.options().items()
            if k not in ("granularity", "group_size")}
    rank = len(qt.shape)
    axis = None if qt.axis is None else 1 if rank == 2 else tuple(range(1, rank))
    spec = QuantSpec(fmt.name, fmt.granularity, axis=axis,
                     group_size=fmt.group_size, options=tuple(sorted(opts.items())), **params)
    lin.inputs[1] = graph.add_constant(old.name, qt.dequantize(dtype), quant=spec)
    lin.inputs[1].sparsity = old.sparsity


def _layer_names(lin: Node) -> tuple[str, str]:
    return (lin.provenance.module or lin.name, lin.inputs[1].name)


def weight_layers(graph: Graph) -> list[Node]:
    """The linears and convolutions with a constant, not yet quantized, float weight."""
    return [n for n in graph.nodes if n.op in ("linear", "conv") and graph.is_constant(n.inputs[1])
            and n.inputs[1].quant is None and n.inputs[1].dtype in ("float32", "float16",
                                                                     "bfloat16")
            and (n.op == "linear" or n.inputs[1].type.rank >= 3)]


def conv_format(fmt):
    """A convolution weight's format: ``fmt`` per output channel; None for block formats."""
    from qcompile.formats import get
    if fmt.block_only:
        return None
    if fmt.granularity.value in ("none", "per_tensor"):
        return fmt
    opts = {k: v for k, v in fmt.options().items() if k not in ("granularity", "group_size")}
    return get(fmt.name, **opts, granularity="per_channel")


def layer_plan(graph: Graph, config: QuantConfig, layers: list[Node]) -> dict:
    """Each layer's resolved ``LayerConfig`` (None: skipped), with the mixed-precision plan's
    weight format where it decided the layer."""
    mp = graph.meta.get("mixed_precision")
    chosen = mp.formats if mp is not None else {}
    out = {}
    for n in layers:
        lc = config.layer(*_layer_names(n))
        if lc is not None and n.name in chosen:
            lc = lc.with_weights(chosen[n.name])
        out[id(n)] = lc
    return out


@register_pass("quantize_weights")
def quantize_weights(graph: Graph, *, config: QuantConfig, progress: bool = True) -> Graph:
    config = QuantConfig.coerce(config)
    cal = graph.meta.get("calibration")
    layers = weight_layers(graph)
    plan = layer_plan(graph, config, layers)
    linears = [n for n in layers if n.op == "linear"]
    needs = {lc.algorithm for n in linears if (lc := plan[id(n)]) is not None
             and lc.weights is not None}
    if needs & {"gptq", "awq"} and cal is None:
        raise ConfigError(f"{'/'.join(sorted(needs & {'gptq', 'awq'}))} needs calibration "
                          "statistics", hint="pass calibration=[inputs, ...] to compile()")
    for lin in linears:  # every format must fit before anything changes (convs always fit)
        lc = plan[id(lin)]
        if lc is not None and lc.weights is not None:
            _check_fits(graph, lin, lc.weight_format())
    # AWQ first: search and fold every scale, so a producer linear absorbs the scales of the
    # layers it feeds before it is quantized itself (Lin et al. 2024, reference order)
    awq_inputs = _awq_fold(graph, linears, plan, config, cal) if "awq" in needs else {}
    report = {}
    it = layers
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(layers, desc="quantize weights", leave=False, unit="layer")
    for lin in it:
        lc = plan[id(lin)]
        if lc is None or lc.weights is None:
            report[lin.name] = "float"
            continue
        fmt = lc.weight_format()
        w = graph.constants[lin.inputs[1].name].float()
        algo = lc.algorithm
        if lin.op == "conv":
            cf = conv_format(fmt)
            if cf is None:
                report[lin.name] = f"float (conv: block format {fmt} needs a single axis)"
                continue
            qt = cf.quantize(w, tuple(range(1, w.dim())))
            annotate_weight(graph, lin, qt)
            report[lin.name] = f"rtn {cf}"
            continue
        if algo == "awq" and id(lin) in awq_inputs:
            clip = config.awq.get("clip", True) and not feeds_attention_scores(graph, lin)
            qt = awq_quantize(w, awq_inputs[id(lin)], fmt, clip=clip)
        elif algo == "gptq":
            opts = {"block_size": 128, "damp": 0.01, "act_order": False, "static_groups": True,
                    **config.gptq}
            qt = gptq(w, cal[lin.inputs[0].name].hessian(), fmt, **opts).qt
        else:
            algo = "rtn"  # also AWQ layers whose input has no foldable producer
            qt = rtn(w, fmt, clip_search=config.rtn_clip_search)
        if lin.inputs[1].sparsity is not None:
            qt = _keep_zeros(qt, w == 0)
        annotate_weight(graph, lin, qt)
        report[lin.name] = f"{algo} {fmt}"
    graph.meta["quantize_weights"] = report
    graph.remove_dead()
    return graph


def _keep_zeros(qt: QuantizedTensor, zero: torch.Tensor) -> QuantizedTensor:
    """``qt`` with the pruned weights (``zero``) re-encoded as exact zeros under the same
    parameters: GPTQ's and AWQ's updates move them, the sparse kernels need them zero."""
    w = qt.dequantize(torch.float32)
    if not bool((w[zero] != 0).any()):
        return qt
    return qt.format.quantize(torch.where(zero, torch.zeros(()), w), -1, params=qt.params)


def _check_fits(graph: Graph, lin: Node, fmt) -> None:
    w = graph.constants[lin.inputs[1].name]
    try:
        fmt.layout(w.shape, -1)
    except ConfigError as e:
        raise ConfigError(f"cannot quantize the weight of {lin.describe()} "
                          f"({list(w.shape)}) as {fmt}: {e}", node=lin,
                          hint="override this layer's format or group size, or skip it "
                               "(QuantConfig(overrides={pattern: 'skip'}))") from None


def _awq_fold(graph: Graph, linears: list[Node], plan, config: QuantConfig, cal) -> dict:
    """Search AWQ's scale for each group of AWQ linears sharing an input (same format), fold
    it, and return each folded linear's calibration rows in its new (scaled) input space."""
    out: dict[int, torch.Tensor] = {}
    opts = {k: v for k, v in config.awq.items() if k == "grid"}
    for lin in linears:
        lc = plan[id(lin)]
        if id(lin) in out or lc is None or lc.weights is None or lc.algorithm != "awq":
            continue
        x = lin.inputs[0]
        group = linear_consumers(graph, x)
        if group is None or x.name not in cal or cal[x.name].sample is None:
            continue
        fmt = lc.weight_format()
        if any(plan.get(id(n)) is None or plan[id(n)].algorithm != "awq"
               or plan[id(n)].weight_format() != fmt for n in group):
            continue  # one scale serves every reader: they must agree
        st = cal[x.name]
        ws = [graph.constants[n.inputs[1].name].float() for n in group]
        res = awq_search(ws, st.absmean.float(), st.sample, fmt, **opts)
        if fold_input_scale(graph, x, group, res.scales):
            rows = st.sample / res.scales.float()
            out.update({id(n): rows for n in group})
    return out


_PASS_THROUGH = ("reshape", "permute", "rotary", "expand", "identity", "hadamard", "cast")


def feeds_attention_scores(graph: Graph, lin: Node) -> bool:
    """Whether ``lin``'s output reaches an attention's q or k (through shape ops and rotary)."""
    users = graph.users()
    todo, seen = [lin.outputs[0]], set()
    while todo:
        v = todo.pop()
        for n in users.get(v, []):
            if n.op == "attention" and (n.inputs[0] is v or n.inputs[1] is v):
                return True
            if n.op in _PASS_THROUGH and n.inputs[0] is v and id(n) not in seen:
                seen.add(id(n))
                todo.append(n.outputs[0])
    return False
