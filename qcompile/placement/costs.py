"""The cost graph of a model on a set of devices: fused groups, their cost on each device,
the memory they hold and the bytes their edges move (DiviML's inputs, arXiv 2308.00127;
``shared/reference/peers.md`` §A.2-A.3: "fuse first: costs must describe the kernels the
backends will actually run").

:func:`fused_groups` cuts the graph into the groups the backends emit as one kernel;
:func:`build_problem` gives each group a cost per device and returns a :class:`CostModel`
whose ``problem`` is the :class:`~qcompile.placement.costgraph.Problem` the solvers take:

* **capability**: a group costs ``inf`` on a device whose backend does not support one of
  its nodes (``Backend.supports``), or — for ``npu`` targets — that the QNN HTP refuses
  (``NpuBackend.capability`` on the graph specialised to the sample's shapes);
* **measured** (``DeviceConfig.measure``): the group is extracted as a standalone graph
  (:func:`~qcompile.placement.subgraph.extract`, on the graph specialised to the sample's
  shapes), lowered by the device's backend, and timed here (``latency.time_call``) or on the
  remote (an executable's ``time_remote``); the time of an empty call on the same device is
  subtracted. A group timed alone keeps its weights in the last-level cache, which a run of
  a model with more weights does not (six 4 MB linears, each timed alone, summed to 0.6-0.8
  of the model's time on a 32 MiB L3), so the timed graph holds :func:`copies` independent
  copies of the group, each with its own cloned constants (:func:`replicate`, as
  ``latency.copies`` does for one layer) — about as many bytes of weights as the model holds,
  or past :data:`COPY_BYTES` — and the time of the call, less the empty call and what handing
  back each further output costs (a placed run hands back only a segment's outputs), is
  divided by their number. Results
  are cached per machine in the latency cache under the group's canonical :func:`signature`
  (ops, attributes, shapes, dtypes, quantization — not names) and the number of copies, so
  the six identical layers of MiniLM are measured once, and a rebuild measures nothing.
  Groups with no heavy op and at most ``TRIVIAL_BYTES`` of traffic (masks, reshapes) are not
  compiled one by one: they are modelled from the device's roofline (its spec, or this
  host's :func:`~qcompile.placement.devices.host_spec`), calibrated against the groups
  measured on it;
* **modelled**: the roofline of Williams, Waterman & Patterson (CACM 52(4), 2009),
  ``t = max(flops / peak, bytes / bandwidth) / efficiency + launch``, with flops and bytes of
  the group from the IR (:func:`work_of`).

The empty-call time of a measured device is a per-call cost the groups no longer carry: a
placed run pays it once per segment, i.e. each time execution enters the device from another
one, so it is added to the latency of every link into that device.

The caller's tensors live in host memory. Where a device is not (a remote, a GPU, an NPU
with its own link), the graph's inputs and outputs are **terminal** nodes of the cost graph
(``CostModel.terminals``): an input's node costs, on each device, what it takes to bring the
tensor there from the caller (nothing in host memory; the device's link to the host, its
call overhead and the bytes over the link elsewhere), an output's what it takes to hand it
back; their edges carry the tensor's bytes. A plan that keeps a remote busy from the first
group on pays for the upload, as a placed run does (a 32 KB input and the call cost a
loopback TVM RPC server 1.5 ms, against 7 ms of convolutions).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field, replace

import networkx as nx
import torch

from qcompile.errors import ConfigError, QCompileError
from qcompile.ir.graph import Graph, Node, Value
from qcompile.ir.types import DTYPES, TensorType, is_float
from qcompile.placement.costgraph import INF, Device, Link, Problem
from qcompile.placement.devices import (
    HOST_TARGETS,
    DeviceConfig,
    DeviceSpec,
    default_link,
    host_spec,
    is_rpc,
    link_to_host,
)

__all__ = ["LIGHT_OPS", "HEAVY_OPS", "TRIVIAL_BYTES", "COPY_BYTES", "MAX_COPIES", "MAX_COPY_NODES",
           "MAX_COPY_TENSOR_BYTES", "fused_groups", "Work", "work_of", "storage_bytes", "roofline",
           "calibrate", "signature", "weight_bytes", "copies", "replicate", "CostModel", "build_problem"]

#: ops that start a group whatever feeds them (their kernels are the groups' anchors)
HEAVY_OPS = frozenset({"linear", "conv", "matmul", "attention", "layer_norm", "rms_norm",
                       "embedding", "softmax", "batch_norm"})

#: ops a backend fuses into the kernel of their producer: elementwise arithmetic and
#: activations, data movement/views, quantize/dequantize; every other op starts a group
LIGHT_OPS = frozenset({
    "abs", "add", "sub", "mul", "div", "pow", "neg", "exp", "log", "sqrt", "rsqrt", "reciprocal",
    "sin", "cos", "tanh", "sigmoid", "relu", "gelu", "silu", "leaky_relu", "erf", "clamp",
    "floor", "ceil", "round", "sign", "maximum", "minimum", "remainder", "cast", "where",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_xor", "logical_not",
    "bitwise_and", "bitwise_or", "bitwise_xor", "identity",
    "reshape", "permute", "expand", "slice", "select", "rotary",
    "quantize", "dequantize"})

#: a group without a heavy op moving at most this many bytes is modelled, not compiled
TRIVIAL_BYTES = 1 << 20

#: a measured group of a model whose weights (at their stored width) pass this many bytes is
#: timed as enough copies that theirs pass it too, so they stream from memory as in a run of
#: the model instead of staying in the last-level cache (32 MiB on the hosts measured;
#: ``latency.copies`` uses the same bound); a smaller model's groups get copies of about the
#: model's bytes (:func:`copies`)
COPY_BYTES = 32 << 20

#: at most this many copies of a group in one timed graph (``latency.copies``' cap) ...
MAX_COPIES = 64
#: ... nor more nodes than this in all: the copies are lowered as one graph, and a TVM build
#: grows with its nodes (a lone group of more nodes is timed once, as it is)
MAX_COPY_NODES = 256
#: ... nor more bytes of constant tensors than this in all (a quantized group's tensors may be
#: wider than its stored format: int4 codes held as float32 are 8x; the backend copies them
#: again while lowering); a group whose weights alone pass COPY_BYTES gets one copy anyway
MAX_COPY_TENSOR_BYTES = 256 << 20

_VIEWS = frozenset({"reshape", "identity", "expand", "permute", "slice", "select", "shape_of",
                    "concat", "pad", "tile", "take", "gather", "index", "tril", "triu"})
_NORMS = frozenset({"layer_norm", "rms_norm", "batch_norm", "softmax", "log_softmax"})
_INT_FMT = re.compile(r"^u?int(\d+)$")


# -- fused groups ------------------------------------------------------------------------------
def fused_groups(graph: Graph) -> list[list[Node]]:
    """The nodes of ``graph`` in the groups the backends emit as one kernel, in a
    topological order of the groups (each group in graph order, its first node the head).

    A node of :data:`LIGHT_OPS` joins the group of the producer of its first non-constant
    input that (a) some node produces, (b) has this node as its only reader and is not a graph
    output, and (c) keeps the group graph acyclic: no other input of the node comes from a
    group that depends on the target group (the check of ``subgraph.partition``). Any other
    node starts a group. So a linear takes its bias add, activation and the reshape/permute
    after it; attention takes the head merge; a residual add joins the linear before it."""
    producer: dict[int, Node] = {id(o): n for n in graph.nodes for o in n.outputs}
    readers: dict[int, set[int]] = {}
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None:
                readers.setdefault(id(v), set()).add(id(n))
    outputs = {id(v) for v in graph.outputs}
    group_of: dict[int, int] = {}
    groups: list[list[Node]] = []
    anc: list[set[int]] = []          # groups each group depends on, transitively
    for n in graph.nodes:
        deps = {group_of[id(producer[id(v)])] for v in n.inputs
                if v is not None and id(v) in producer}
        target = None
        if n.op in LIGHT_OPS:
            for v in n.inputs:
                if v is None or id(v) not in producer or graph.is_constant(v):
                    continue
                if readers[id(v)] != {id(n)} or id(v) in outputs:
                    continue
                g = group_of[id(producer[id(v)])]
                if all(h == g or g not in anc[h] for h in deps):
                    target = g
                    break
        if target is None:
            target = len(groups)
            groups.append([])
            anc.append(set())
        groups[target].append(n)
        group_of[id(n)] = target
        for h in deps - {target}:
            anc[target] |= anc[h] | {h}
        for t in range(len(groups)):      # keep every closure exact
            if target in anc[t]:
                anc[t] |= anc[target]
    order = sorted(range(len(groups)), key=lambda t: (len(anc[t]), t))
    done: set[int] = set()
    out: list[list[Node]] = []
    while len(out) < len(groups):
        for t in order:
            if t not in done and anc[t] <= done:
                out.append(groups[t])
                done.add(t)
                break
    return out


# -- work and the roofline ---------------------------------------------------------------------
@dataclass(frozen=True)
class Work:
    """What a group computes: ``flops`` (a multiply-add is 2), ``bytes`` moved to and from
    memory (constants at their stored width, boundary activations at theirs; values inside
    the group stay on chip), ``precision`` (``float``, ``int8`` or ``int16``: integer when the
    weights and activations of its matmul-like ops are integer-quantized) and ``heavy``
    (whether it holds a :data:`HEAVY_OPS` node)."""

    flops: float
    bytes: float
    precision: str = "float"
    heavy: bool = False


def _numel(shape) -> int:
    return int(math.prod(int(d) for d in shape))


def _int_bits(spec) -> int | None:
    m = _INT_FMT.match(spec.format) if spec is not None else None
    return int(m.group(1)) if m else None


def storage_bytes(graph: Graph, v: Value) -> float:
    """Bytes of constant ``v`` as stored: codes at the format's width plus its parameters
    (``QuantizedTensor.nbits``), or the tensor's own size when it is not quantized."""
    t = graph.constants[v.name]
    if v.quant is None:
        return float(t.numel() * t.element_size())
    try:
        fmt = v.quant.fmt
        bits = t.numel() * fmt.bits
        for role in ("scale", "zero_point", "tensor_scale", "meta"):
            pname = getattr(v.quant, role)
            if pname is not None and pname in graph.constants:
                bits += graph.constants[pname].numel() * fmt.param_bits(role)
        return bits / 8
    except (NotImplementedError, QCompileError):  # pragma: no cover - every format has bits
        return float(t.numel() * t.element_size())


def _act_bytes(v: Value) -> float:
    """Bytes of activation ``v`` in device memory: at its static integer format if it has one."""
    n = _numel(v.shape)
    bits = _int_bits(v.quant) if (v.quant is not None and not v.quant.dynamic) else None
    return n * (bits / 8 if bits else DTYPES[v.dtype].itemsize)


def _node_flops(n: Node) -> float:
    out = _numel(n.outputs[0].shape)
    if n.op == "linear":
        return 2.0 * out * int(n.inputs[1].shape[1])
    if n.op == "matmul":
        return 2.0 * out * int(n.inputs[0].shape[-1])
    if n.op == "conv":
        return 2.0 * out * _numel(n.inputs[1].shape[1:])
    if n.op == "attention":
        q = n.inputs[0].shape
        s = int(n.inputs[1].shape[-2])
        rows = _numel(q[:-1])
        return 2.0 * _numel(q) * s + 2.0 * out * s + 5.0 * rows * s  # QK^T, PV, softmax
    if n.op in _NORMS:
        return 5.0 * out
    if n.op in _VIEWS or n.op == "embedding":
        return 0.0
    return float(out)


def _precision(graph: Graph, nodes: list[Node]) -> str:
    """``int8``/``int16`` when every matmul-like node reads integer-quantized activations (at
    most 8 / 16 bits) and integer weights of at most 8 bits; otherwise ``float``."""
    mm = [n for n in nodes if n.op in ("linear", "conv", "matmul", "attention")]
    if not mm:
        return "float"
    act_bits = 0
    for n in mm:
        ins = [v for v in n.inputs if v is not None]
        acts = [v for v in ins if not graph.is_constant(v) and is_float(v.dtype)]
        weights = [v for v in ins[1:2] if graph.is_constant(v)] if n.op in ("linear", "conv") else []
        for v in acts:
            b = _int_bits(v.quant)
            if b is None:
                return "float"
            act_bits = max(act_bits, b)
        for w in weights:
            b = _int_bits(w.quant)
            if b is None or b > 8:
                return "float"
    return "int8" if act_bits <= 8 else "int16"


def work_of(graph: Graph, nodes: list[Node]) -> Work:
    """The :class:`Work` of ``nodes`` (one group of a graph with static shapes)."""
    from qcompile.placement.subgraph import boundary
    flops = sum(_node_flops(n) for n in nodes)
    moved = 0.0
    seen: set[int] = set()
    for n in nodes:
        for i, v in enumerate(n.inputs):
            if v is None or id(v) in seen or not graph.is_constant(v):
                continue
            seen.add(id(v))
            if n.op == "embedding" and i == 0:   # only the gathered rows are read
                moved += _numel(n.outputs[0].shape) * storage_bytes(graph, v) / max(_numel(v.shape), 1)
            else:
                moved += storage_bytes(graph, v)
    ins, outs = boundary(graph, nodes)
    moved += sum(_act_bytes(v) for v in ins) + sum(_act_bytes(v) for v in outs)
    return Work(flops, moved, _precision(graph, nodes), any(n.op in HEAVY_OPS for n in nodes))


def roofline(spec: DeviceSpec, work: Work, efficiency: float | None = None) -> float:
    """Seconds for ``work`` on ``spec``: ``max(flops / peak, bytes / bandwidth) / efficiency
    + launch`` (Williams, Waterman & Patterson 2009: attainable throughput is
    ``min(peak, intensity x bandwidth)``), at the peak of the work's precision."""
    eff = spec.efficiency if efficiency is None else efficiency
    body = max(work.flops / spec.peak(work.precision), work.bytes / spec.bandwidth)
    return body / eff + spec.launch


def calibrate(spec: DeviceSpec, measured) -> float:
    """The efficiency that fits ``roofline(spec, work, eff)`` to measured ``(work, seconds)``
    pairs: the geometric mean of ideal / (measured - launch), which minimises the squared
    log error of the fit; clamped to [1e-3, 10]. ``spec.efficiency`` without usable pairs."""
    logs = []
    for work, seconds in measured:
        ideal = max(work.flops / spec.peak(work.precision), work.bytes / spec.bandwidth)
        body = seconds - spec.launch
        if ideal > 0 and body > 0:
            logs.append(math.log(ideal / body))
    if not logs:
        return spec.efficiency
    return min(10.0, max(1e-3, math.exp(sum(logs) / len(logs))))


# -- signatures ----------------------------------------------------------------------------------
def _quant_sig(spec):
    if spec is None:
        return None
    d = spec.to_json()
    for role in ("scale", "zero_point", "tensor_scale", "meta"):
        if role in d:
            d[role] = True  # the parameters' names and values do not change the kernel
    return d


def signature(graph: Graph) -> str:
    """A hash of what a kernel's speed depends on: ops, attributes, wiring, shapes, dtypes,
    quantization formats and sparsity — not value or node names, nor constant values."""
    ids: dict[int, int] = {}

    def ref(v):
        return None if v is None else ids.setdefault(id(v), len(ids))

    rec: dict = {"in": [], "const": [], "nodes": []}
    for v in graph.inputs:
        ref(v)
        rec["in"].append([str(v.type), _quant_sig(v.quant)])
    for name in graph.constants:
        v = graph.constant_value(name)
        ref(v)
        rec["const"].append([str(v.type), _quant_sig(v.quant), str(v.sparsity) if v.sparsity else None])
    for n in graph.nodes:
        ins = [ref(v) for v in n.inputs]
        outs = []
        for o in n.outputs:
            ref(o)
            outs.append([str(o.type), _quant_sig(o.quant)])
        rec["nodes"].append([n.op, {k: repr(a) for k, a in sorted(n.attrs.items())}, ins, outs])
    rec["out"] = [ref(v) for v in graph.outputs]
    return hashlib.sha256(json.dumps(rec, sort_keys=True, default=repr).encode()).hexdigest()[:24]


# -- copies of a group ---------------------------------------------------------------------------
def _param_names(graph: Graph) -> set[str]:
    """Names of the constants that hold quantization parameters of some value."""
    return {c for v in graph.values() if v.quant is not None for c in v.quant.constants()}


def weight_bytes(graph: Graph) -> float:
    """Stored bytes (:func:`storage_bytes`) of ``graph``'s weights: its constants other than
    quantization parameters (which :func:`storage_bytes` counts with the values they scale)."""
    params = _param_names(graph)
    return sum(storage_bytes(graph, graph.constant_value(c)) for c in graph.constants
               if c not in params)


def copies(sub: Graph, model_bytes: float | None = None) -> int:
    """How many copies of group graph ``sub`` one timed call runs, so that their weights are
    as cold as in a run of the whole model (of ``model_bytes`` of weights, :func:`weight_bytes`;
    None: a model past :data:`COPY_BYTES`):

    * 1 when ``sub`` holds no weights (nothing for the cache to keep hot, e.g. attention);
    * when the model's weights pass :data:`COPY_BYTES`, enough copies that theirs pass it too
      (``latency.copies``' rule): a real run streams every weight from memory;
    * otherwise as many copies as hold about the model's bytes: a real run cycles through that
      working set, which a cache of about its size partly keeps (six 4 MB linears on a 32 MiB
      L3 run faster than eight); a model that fits the cache gets few copies, or one.

    Capped at :data:`MAX_COPIES`, at :data:`MAX_COPY_NODES` nodes and at
    :data:`MAX_COPY_TENSOR_BYTES` of cloned tensors, so that building and lowering the copies
    stays fast and small."""
    weights = weight_bytes(sub)
    if weights <= 0:
        return 1
    if model_bytes is None or model_bytes > COPY_BYTES:
        k = -(-COPY_BYTES // int(max(weights, 1)))
    else:
        k = round(model_bytes / weights)
    held = sum(t.numel() * t.element_size() for t in sub.constants.values())
    k = min(k, MAX_COPIES, MAX_COPY_NODES // max(len(sub.nodes), 1), MAX_COPY_TENSOR_BYTES // max(held, 1))
    return max(1, int(k))


def replicate(sub: Graph, k: int) -> Graph:
    """``k`` independent copies of group graph ``sub`` (an :func:`~qcompile.placement.
    subgraph.extract`) in one graph, as in a model where each layer has its own weights: all
    copies read ``sub``'s inputs, every copy's outputs are outputs (copy by copy, so nothing
    is dead). Copy 0 is ``sub``'s nodes on its own constants; each further copy gets clones of
    every constant it reads — weights and the scales and zero points their quantization specs
    name, and those of its activations' specs (renamed, the specs pointing at the clones);
    the inputs' own specs keep ``sub``'s parameters. ``sub`` itself when ``k`` is 1."""
    from qcompile.ir.verify import verify
    if k <= 1:
        return sub
    g = Graph(sub.name)
    shared: dict[str, Value] = {}          # constants the inputs' specs name: one for all copies

    def add_const(cname: str, new_name: str, tensor, spec) -> Value:
        v = sub.constant_value(cname)
        nv = g.add_constant(new_name, tensor, quant=spec)
        nv.sparsity = v.sparsity
        return nv

    ins = []
    for v in sub.inputs:
        nv = g.add_input(v.name, v.type)
        nv.quant = v.quant
        for c in (v.quant.constants() if v.quant is not None else ()):
            if c not in shared:
                shared[c] = add_const(c, c, sub.constants[c], sub.constant_value(c).quant)
        ins.append(nv)
    outs: list[Value] = []
    for r in range(k):
        vmap: dict[int, Value] = {id(v): nv for v, nv in zip(sub.inputs, ins)}
        cmap: dict[str, Value] = {}

        def const(cname: str) -> Value:
            if cname not in cmap:
                v = sub.constant_value(cname)
                if r == 0 and cname in shared:
                    cmap[cname] = shared[cname]
                    return cmap[cname]
                t = sub.constants[cname]
                cmap[cname] = add_const(cname, cname if r == 0 else f"{cname}.{r}",
                                        t if r == 0 else t.clone(), spec(v.quant))
            return cmap[cname]

        def spec(q):
            if q is None or not q.constants():
                return q
            return replace(q, **{role: const(getattr(q, role)).name
                                 for role in ("scale", "zero_point", "tensor_scale", "meta")
                                 if getattr(q, role) is not None})

        for n in sub.nodes:
            new_ins = [None if v is None else vmap[id(v)] if id(v) in vmap else const(v.name)
                       for v in n.inputs]
            nn_ = Node(n.op, new_ins, [], dict(n.attrs),
                       g.fresh_name(n.name if r == 0 else f"{n.name}.{r}"), n.provenance)
            nn_.outputs = [Value(nn_.name if o.name == n.name else
                                 g.fresh_name(o.name if r == 0 else f"{o.name}.{r}"),
                                 o.type, nn_, spec(o.quant)) for o in n.outputs]
            for o, no in zip(n.outputs, nn_.outputs):
                vmap[id(o)] = no
            g.nodes.append(nn_)
        outs += [vmap[id(v)] for v in sub.outputs]
    g.outputs = outs
    g.meta = dict(sub.meta)
    verify(g)
    return g


# -- the cost model -----------------------------------------------------------------------------
@dataclass
class CostModel:
    """The cost graph and how it was made: ``problem`` (nodes are group names: ``cost``
    {device: seconds}, ``mem`` bytes of constants, ``op`` of the head; edges: ``bytes``),
    ``groups`` {group: IR node names}, ``source`` {(group, device): "measured" | "cached" |
    "modelled"}, ``refused`` {(group, device): reasons}, ``efficiency`` {device: the fraction
    of its roofline its modelled costs assume (fitted where it was also measured)},
    ``overhead`` {measured device: seconds of an empty call, added to links into it},
    ``work`` {group: :class:`Work`}, ``seconds`` to build, ``terminals`` {cost-graph node
    standing for a graph input or output: the group it feeds or is produced by} (nodes of
    ``problem`` that are not groups; empty when every device computes in host memory)."""

    problem: Problem
    groups: dict[str, list[str]]
    source: dict[tuple[str, str], str]
    refused: dict[tuple[str, str], list[str]]
    efficiency: dict[str, float] = field(default_factory=dict)
    overhead: dict[str, float] = field(default_factory=dict)
    work: dict[str, Work] = field(default_factory=dict)
    seconds: float = 0.0
    terminals: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """How many (group, device) costs came from each source."""
        out: dict[str, int] = {}
        for s in self.source.values():
            out[s] = out.get(s, 0) + 1
        return out

    def table(self) -> str:
        """Costs in microseconds, one row per group (``-`` where refused)."""
        p = self.problem
        lines = ["group".ljust(28) + "".join(d.rjust(12) for d in p.names)]
        for g in p.order:
            cells = [("-" if p.cost(g, d) == INF else f"{1e6 * p.cost(g, d):.1f}").rjust(12)
                     for d in p.names]
            lines.append(str(g)[:27].ljust(28) + "".join(cells))
        return "\n".join(lines)


def _backend(target: str):
    from qcompile.backends import get_backend
    return get_backend(target)


def _record(graph: Graph, sample) -> tuple[dict, dict, dict]:
    """Run the reference interpreter on ``sample``: every value's shape, the non-float
    tensors (indices, masks: timing inputs must hold valid ones), the bound symbols."""
    from qcompile.interpreter import Interpreter, bind_inputs
    if isinstance(sample, torch.Tensor):
        sample = (sample,)
    elif isinstance(sample, dict):
        sample = tuple(sample[v.name] for v in graph.inputs)
    sample = tuple(sample)
    _, env = bind_inputs(graph, sample)
    shapes: dict[str, tuple] = {}
    kept: dict[str, torch.Tensor] = {}

    inputs = {id(v) for v in graph.inputs}

    def hook(v, t):
        shapes[v.name] = tuple(int(d) for d in t.shape)
        if not t.is_floating_point() and (v.producer is not None or id(v) in inputs):
            kept[v.name] = t.detach()

    it = Interpreter(graph, fake_quant=False)
    it.add_hook(hook)
    with torch.no_grad():
        it.run(*sample)
    return shapes, kept, env


def _static_copy(graph: Graph, shapes: dict, env: dict) -> Graph:
    """A copy of ``graph`` whose every type has the recorded concrete shape and whose
    symbolic dimension attributes are evaluated (NPU export and the signatures need it)."""
    from qcompile.ir.registry import get_schema
    from qcompile.ir.types import eval_dim
    g = graph.clone()
    for v in g.values():
        if v.name in shapes:
            v.type = TensorType(shapes[v.name], v.type.dtype)
    for n in g.nodes:
        for k in get_schema(n.op).dim_attrs:
            a = n.attrs.get(k)
            try:
                if isinstance(a, list):
                    n.attrs[k] = [eval_dim(d, env) for d in a]
                elif a is not None:
                    n.attrs[k] = eval_dim(a, env)
            except (KeyError, TypeError, ValueError):
                pass
    return g


def _example(v: Value, kept: dict) -> torch.Tensor:
    from qcompile.ir.types import to_torch_dtype
    if v.name in kept:
        return kept[v.name]
    shape = tuple(int(d) for d in v.shape)
    dt = to_torch_dtype(v.dtype)
    if not dt.is_floating_point:
        return torch.zeros(shape, dtype=dt)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dt)


def _empty_graph(outputs: int = 1) -> Graph:
    """A one-element ``neg`` per output, all of one input: an empty call (handing back
    ``outputs`` tensors)."""
    g = Graph("empty")
    x = g.add_input("x", TensorType((1,), "float32"))
    g.outputs = [g.add("neg", x) for _ in range(outputs)]
    return g


#: outputs of the call that times what each output past the first costs
_OUTPUTS = 9


def _cached(d: DeviceConfig, key: str, measure) -> tuple[float, bool]:
    """The per-machine latency cache, except for remote devices: an ``rpc://host:port`` names
    a server, not a board (a loopback port is reused by the next server started), and a
    remote's load changes between builds, so remote groups are measured at every build."""
    from qcompile.backends import latency
    if is_rpc(d.target):
        return float(measure()), False
    return latency.cached(key, measure)


def _timed(ex, args, *, wall: bool = False) -> float:
    """Seconds per call of executable ``ex``: on the remote when it times itself there,
    unless ``wall`` (then the host's wall clock, RPC round trips included)."""
    from qcompile.backends import latency
    remote = getattr(ex, "time_remote", None)
    if callable(remote) and not wall:  # seconds per run, one sample per repeat
        samples = remote(args, number=10, repeat=5)
        return float(statistics.median(samples if isinstance(samples, (list, tuple)) else [samples]))
    return latency.time_call(ex, args, min_time=0.05, rounds=5) / 1e3


def _key(d: DeviceConfig, what: dict) -> str:
    return json.dumps({"placement": 1, "target": d.target,
                       "options": json.dumps(d.options, sort_keys=True, default=repr), **what},
                      sort_keys=True)


def _empty_overhead(d: DeviceConfig) -> tuple[float, str]:
    """Seconds of an empty call on ``d`` (a one-element ``neg``), cached; 0 if it cannot run.
    A remote's is timed from the host, wall clock: what a placed run pays to enter a
    segment there is the RPC round trips (inputs up, the call, outputs down), which the
    remote's own timer does not see."""
    wall = is_rpc(d.target)

    def measure():
        ex = _backend(d.target).lower(_empty_graph(), d.target, **d.options)
        return 1e3 * _timed(ex, (torch.zeros(1),), wall=wall)
    try:
        ms, hit = _cached(d, _key(d, {"empty": True, **({"wall": True} if wall else {})}), measure)
    except Exception as e:  # e.g. the npu refuses float graphs: no per-call figure
        warnings.warn(f"device {d.name!r}: could not time an empty call ({e}); assuming 0")
        return 0.0, "modelled"
    return ms / 1e3, "cached" if hit else "measured"


def _output_overhead(d: DeviceConfig, empty: float) -> float:
    """Seconds each output past the first adds to a call on ``d`` (``empty``: an empty call's
    seconds), cached; 0 if it cannot be timed. The executable hands each output back (the TVM
    ones copy it into a torch tensor: ~8 us each on the hosts measured), which a placed run
    does only where a segment ends; the copies of a group hand back k times its outputs.
    Devices here only: a remote's groups are timed on the remote, outputs staying there."""

    def measure():
        ex = _backend(d.target).lower(_empty_graph(_OUTPUTS), d.target, **d.options)
        return 1e3 * _timed(ex, (torch.zeros(1),))
    try:
        ms, _ = _cached(d, _key(d, {"empty": True, "outputs": _OUTPUTS, "wall": False}), measure)
    except Exception:  # the empty call itself failed, or no figure: nothing to take off
        return 0.0
    return max(ms / 1e3 - empty, 0.0) / (_OUTPUTS - 1)


#: parameters of the call that times what each parameter handle costs a remote call
_PARAMS = 16


def _param_graph(params: int) -> Graph:
    """A chain of ``params`` 64-element adds, each of its own constant (big enough that the
    TVM backends pass it as a parameter rather than embed it), on a 64-element input: a call
    that passes ``params`` parameter handles and does next to no work."""
    g = Graph("params")
    y = g.add("neg", g.add_input("x", TensorType((64,), "float32")))
    for i in range(params):
        c = g.add_constant(f"c{i}", torch.full((64,), float(i + 1)))
        y = g.add("add", y, c)
    g.outputs = [y]
    return g


def _param_overhead(d: DeviceConfig) -> float:
    """Seconds each parameter handle adds to a call on remote ``d``, wall clock from here:
    the Relax VM's ``main`` takes the resident parameters as arguments, and each one crosses
    the RPC link as a handle (measured on loopback: 50-80 us each, against ~0.3 ms for the
    rest of an empty call). A call of :data:`_PARAMS` parameters against an empty call, both
    doing next to nothing on the remote; 0 if it cannot be timed."""
    try:
        ex0 = _backend(d.target).lower(_param_graph(0), d.target, **d.options)
        ex1 = _backend(d.target).lower(_param_graph(_PARAMS), d.target, **d.options)
        n = len(getattr(ex1, "params", ())) - len(getattr(ex0, "params", ()))
        if n <= 0:
            return 0.0
        x = (torch.zeros(64),)
        t0, t1 = _timed(ex0, x, wall=True), _timed(ex1, x, wall=True)
    except Exception:  # noqa: BLE001 - no figure: nothing to add
        return 0.0
    return max(t1 - t0, 0.0) / n


def _npu_refusals(static: Graph, target: str) -> dict[str, list[str]]:
    """{IR node or "": reasons} the HTP refuses in ``static`` ("": not attributable, so
    nothing can be trusted to run there). A probe opens a QNN session (seconds), so answers
    are cached on disk (``<cache>/npu_capability.json``) by graph hash, target, qcompile and
    QNN versions; failures are not cached."""
    from qcompile.backends.onnx.npu import check_graph
    try:
        check_graph(static, target)
    except Exception as e:
        return {"": [f"{type(e).__name__}: {str(e).splitlines()[0]}"]}
    path, key = _capability_cache(static, target)
    try:
        hit = json.loads(path.read_text()).get(key)
    except (OSError, ValueError):
        hit = None
    if isinstance(hit, dict):
        return hit
    try:
        out = {str(k): list(v) for k, v in _backend(target).capability(static, target).items()}
    except Exception as e:
        return {"": [f"{type(e).__name__}: {str(e).splitlines()[0]}"]}
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        data = {}
    data[key] = out
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # pragma: no cover - an unwritable cache only costs a probe next time
        pass
    return out


def _capability_cache(static: Graph, target: str):
    from qcompile import __version__
    from qcompile.backends.lut.build import cache_dir
    from qcompile.backends.onnx import qnn
    from qcompile.runtime import graph_hash
    key = hashlib.sha256(json.dumps([graph_hash(static), target, __version__, qnn.versions()],
                                    sort_keys=True).encode()).hexdigest()
    return cache_dir() / "npu_capability.json", key


def _refusals(static: Graph, groups: dict[str, list[Node]], d: DeviceConfig, npu_cache: dict):
    """{group: [reason]} for the groups ``d`` cannot run."""
    out: dict[str, list[str]] = {}
    try:
        backend = _backend(d.target)
    except Exception as e:
        why = f"no backend for {d.target!r}: {e}"
        return {g: [why] for g in groups}
    for g, nodes in groups.items():
        for n in nodes:
            try:
                ok = backend.supports(n)
            except Exception as e:   # a backend that cannot even say
                ok, why = False, f"{type(e).__name__}: {e}"
            else:
                why = f"op {n.op} has no lowering for target {d.target!r}"
            if not ok:
                out.setdefault(g, []).append(f"{n.name}: {why}")
    if d.target.startswith("npu"):
        if d.target not in npu_cache:
            npu_cache[d.target] = _npu_refusals(static, d.target)
        refused = npu_cache[d.target]
        group_of = {n.name: g for g, nodes in groups.items() for n in nodes}
        unattributed = [f"{k or 'the session'}: {'; '.join(r)}" for k, r in refused.items()
                        if k not in group_of]
        for k, reasons in refused.items():
            if k in group_of:
                out.setdefault(group_of[k], []).append(f"{k}: {'; '.join(reasons)}")
        if unattributed:
            for g in groups:
                out.setdefault(g, []).extend(unattributed)
    return out


def _calib_spec(d: DeviceConfig) -> DeviceSpec | None:
    if d.spec is not None:
        return d.spec_obj
    return host_spec() if d.target in HOST_TARGETS else None


def _measure_cached(d: DeviceConfig, sub: Graph, kept: dict, key: str, overhead: float,
                    k: int = 1, per_output: float = 0.0, per_param: float | None = None):
    """(seconds of one copy, "measured" | "cached") for group graph ``sub`` on ``d``: a call
    of ``k`` copies of it (:func:`replicate`), less the empty-call ``overhead`` and
    ``per_output`` seconds for each output it hands back past the first, divided by ``k``; or
    why it could not be lowered or run there. The cache holds the time of the whole call
    (under ``key``, which names ``k``).

    On a remote (``per_param`` given) the copies are timed by the remote's own timer, which
    sees the kernels alone, and each parameter handle the call passes adds ``per_param``
    seconds (:func:`_param_overhead`). A wall-clock time from here would also count the
    copies' inputs and ``k`` times their outputs crossing the link (at TVM RPC's ~50 MB/s,
    3.6 ms for one 48x32x32 feature map against 1.2 ms for the conv that made it), which a
    placed run pays only where a segment ends, as a link cost."""

    def measure() -> float:
        ex = _backend(d.target).lower(replicate(sub, k), d.target, **d.options)
        args = tuple(_example(v, kept) for v in sub.inputs)
        if per_param is None:
            return 1e3 * _timed(ex, args)
        return 1e3 * (_timed(ex, args) + per_param * len(getattr(ex, "params", ())))
    try:
        ms, hit = _cached(d, key, measure)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        return f"lowering or timing the group failed: {type(e).__name__}: {first}"
    extra = (k * len(sub.outputs) - 1) * per_output
    return max(ms / 1e3 - overhead - extra, 0.0) / k, "cached" if hit else "measured"


@dataclass
class _Build:
    """What the steps of :func:`build_problem` share."""

    static: Graph
    groups: dict[str, list[Node]]
    work: dict[str, Work]
    kept: dict
    cost: dict = field(default_factory=dict)          # group -> {device: seconds}
    source: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)
    runnable: dict = field(default_factory=dict)      # device -> groups it may run
    model_bytes: float | None = None                  # weight_bytes of the whole graph
    efficiency: dict = field(default_factory=dict)
    overhead: dict = field(default_factory=dict)
    per_output: dict = field(default_factory=dict)    # device -> seconds per further output
    per_param: dict = field(default_factory=dict)     # remote device -> seconds per parameter


def _mask(b: _Build, devices: list[DeviceConfig]) -> None:
    """inf (with reasons) where a device's backend or the HTP refuses a node of the group."""
    npu_cache: dict = {}
    for d in devices:
        r = _refusals(b.static, b.groups, d, npu_cache)
        for g, reasons in r.items():
            b.refused[(g, d.name)] = reasons
            b.cost[g][d.name] = INF
        b.runnable[d.name] = [g for g in b.groups if g not in r]


def _measure(b: _Build, devices: list[DeviceConfig], progress: bool) -> None:
    """Time each distinct group on each measured device, as :func:`copies` copies of it in
    one call (trivial groups are left to the calibrated roofline where the device has one);
    failures keep the group off the device."""
    from qcompile.placement.subgraph import extract
    todo = []
    for d in devices:
        if not d.measure:
            continue
        b.overhead[d.name], how = _empty_overhead(d)
        # what a group's own timing includes of the call: the wall-clock overhead here;
        # nothing there (the remote's timer sees the kernels; handles are added per parameter)
        if is_rpc(d.target):
            b.per_param[d.name] = _param_overhead(d)
        else:
            b.per_output[d.name] = 0.0 if how == "modelled" else _output_overhead(d, b.overhead[d.name])
        spec = _calib_spec(d)
        todo += [(d, g) for g in b.runnable[d.name]
                 if spec is None or b.work[g].heavy or b.work[g].bytes > TRIVIAL_BYTES]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc="placement costs", unit="group", leave=False)
    memo: dict[str, tuple[float, str] | str] = {}   # key -> (seconds, source) or the failure
    failed: dict[str, int] = {}
    for d, g in todo:
        if bar is not None:
            bar.set_postfix_str(f"{d.name}: {g}"[:40])
        try:
            sub = extract(b.static, b.groups[g], g)
            k = copies(sub, b.model_bytes)
            key = _key(d, {"group": signature(sub), "copies": k})
        except QCompileError as e:  # pragma: no cover - extracting from a verified graph
            sub, k, key = None, 1, f"extract:{g}"
            memo[key] = f"extracting the group failed: {e}"
        if key not in memo:
            if d.name in b.per_param:  # the remote's timer: no call overhead to take off
                memo[key] = _measure_cached(d, sub, b.kept, key, 0.0, k,
                                            per_param=b.per_param[d.name])
            else:
                memo[key] = _measure_cached(d, sub, b.kept, key, b.overhead[d.name], k,
                                            b.per_output[d.name])
        if isinstance(memo[key], str):
            failed[d.name] = failed.get(d.name, 0) + 1
            b.refused[(g, d.name)] = [f"{g}: {memo[key]}"]
            b.cost[g][d.name] = INF
        else:
            b.cost[g][d.name], b.source[(g, d.name)] = memo[key]
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    for name, k in failed.items():
        warnings.warn(f"device {name!r}: {k} group(s) failed to lower or run and are kept off it "
                      "(CostModel.refused says why)")


def _model(b: _Build, devices: list[DeviceConfig]) -> None:
    """Roofline costs for every group a device may run that has no measured cost, at the
    spec's efficiency, or at the one fitted to the device's measured groups."""
    for d in devices:
        spec = _calib_spec(d)
        if spec is None:
            continue
        pairs = [(b.work[g], b.cost[g][d.name]) for g in b.runnable[d.name]
                 if (g, d.name) in b.source and b.cost[g][d.name] < INF]
        b.efficiency[d.name] = calibrate(spec, pairs) if d.measure else spec.efficiency
        for g in b.runnable[d.name]:
            if d.name not in b.cost[g]:
                b.cost[g][d.name] = roofline(spec, b.work[g], b.efficiency[d.name])
                b.source[(g, d.name)] = "modelled"


def _cost_graph(b: _Build) -> nx.DiGraph:
    """Group nodes (``cost``, ``mem``: stored bytes of their constants, ``op``) and edges
    (``bytes`` of the tensors one group hands another, at their dtype: executables exchange
    torch tensors)."""
    from qcompile.placement.subgraph import boundary
    dg = nx.DiGraph()
    for g, nodes in b.groups.items():
        consts = {id(v): v for n in nodes for v in n.inputs if b.static.is_constant(v)}
        mem = sum(storage_bytes(b.static, v) for v in consts.values())
        dg.add_node(g, cost=b.cost[g], mem=float(mem), op=nodes[0].op)
    group_of = {n.name: g for g, nodes in b.groups.items() for n in nodes}
    for g, nodes in b.groups.items():
        for v in boundary(b.static, nodes)[0]:
            if v.producer is None:
                continue  # a graph input
            src = group_of[v.producer.name]
            nbytes = float(_numel(v.shape) * DTYPES[v.dtype].itemsize)
            if dg.has_edge(src, g):
                dg.edges[src, g]["bytes"] += nbytes
            else:
                dg.add_edge(src, g, bytes=nbytes)
    return dg


def build_problem(graph: Graph, devices, links, sample, *, progress: bool = True) -> CostModel:
    """The :class:`CostModel` of ``graph`` on ``devices`` (``DeviceConfig`` s) joined by
    ``links`` ({(a, b): Link}; missing pairs get ``devices.default_link``), at the shapes of
    ``sample`` (example inputs, positional). See the module docstring for how each cost is
    found. Raises ``ConfigError`` naming a node no device can run, with each device's reason."""
    t_start = time.perf_counter()
    devices = list(devices)
    shapes, kept, env = _record(graph, sample)
    static = _static_copy(graph, shapes, env)
    groups = {nodes[0].name: nodes for nodes in fused_groups(static)}
    b = _Build(static, groups, {g: work_of(static, ns) for g, ns in groups.items()}, kept,
               cost={g: {} for g in groups}, model_bytes=weight_bytes(static))
    _mask(b, devices)
    _measure(b, devices, progress)
    _model(b, devices)
    _check_runnable(graph, groups, devices, b.cost, b.refused)
    full = {}
    for a in devices:
        for d in devices:
            if a.name != d.name:
                link = links.get((a.name, d.name)) or default_link(a, d)
                full[(a.name, d.name)] = Link(link.latency + b.overhead.get(d.name, 0.0),
                                              link.bandwidth)
    dg = _cost_graph(b)
    terminals = _add_terminals(dg, b, devices, links)
    problem = Problem(dg, [Device(d.name, d.memory) for d in devices], full)
    return CostModel(problem, {g: [n.name for n in ns] for g, ns in groups.items()}, b.source,
                     b.refused, b.efficiency, b.overhead, b.work, time.perf_counter() - t_start,
                     terminals)


def _add_terminals(dg: nx.DiGraph, b: _Build, devices: list[DeviceConfig], links) -> dict[str, str]:
    """Add to ``dg`` a node per graph input and output (see the module docstring), when some
    device is not in host memory; return {terminal: its group}. A terminal's cost on device
    ``d`` is the link host -> d (input) or d -> host (output): a declared link between ``d``
    and an in-host device in ``links`` if there is one, else ``d``'s own link to the host,
    plus ``d``'s call overhead for an input; 0 on devices in host memory."""
    home = {d.name: _home_link(d, devices, links) for d in devices}
    if all(h is None for h in home.values()):
        return {}
    out: dict[str, str] = {}
    group_of = {n.name: g for g, nodes in b.groups.items() for n in nodes}

    def cost(nbytes: float, into: bool) -> dict[str, float]:
        c = {}
        for d in devices:
            h = home[d.name]
            c[d.name] = 0.0 if h is None else (
                h.latency + nbytes / h.bandwidth + (b.overhead.get(d.name, 0.0) if into else 0.0))
        return c
    for v in b.static.inputs:
        readers = [g for g, nodes in b.groups.items() if any(x is v for n in nodes for x in n.inputs)]
        if not readers:
            continue
        nbytes = float(_numel(v.shape) * DTYPES[v.dtype].itemsize)
        t = f"<input {v.name}>"
        dg.add_node(t, cost=cost(nbytes, True), mem=0.0, op="input")
        for g in readers:
            dg.add_edge(t, g, bytes=nbytes)
        out[t] = readers[0]
    for i, v in enumerate(b.static.outputs):
        if v.producer is None:
            continue  # an input handed straight back
        nbytes = float(_numel(v.shape) * DTYPES[v.dtype].itemsize)
        t = f"<output {i} {v.name}>"
        src = group_of[v.producer.name]
        dg.add_node(t, cost=cost(nbytes, False), mem=0.0, op="output")
        dg.add_edge(src, t, bytes=nbytes)
        out[t] = src
    return out


def _home_link(d: DeviceConfig, devices: list[DeviceConfig], links) -> Link | None:
    """How the caller's host memory reaches ``d`` (None: ``d`` computes in it): the link
    ``links`` gives from a device in host memory, else ``d``'s own (:func:`link_to_host`)."""
    own = link_to_host(d)
    if own is None:
        return None
    for h in devices:
        if h.name != d.name and (h.name, d.name) in links and link_to_host(h) is None:
            return links[(h.name, d.name)]
    return own


def _check_runnable(graph: Graph, groups, devices, cost, refused) -> None:
    """A ``ConfigError`` for the first group no device can run, naming its first refused node
    (with provenance) and every device's reasons."""
    by_name = {n.name: n for n in graph.nodes}
    for g, nodes in groups.items():
        if any(cost[g].get(d.name, 0.0) < INF for d in devices):
            continue
        names = {n.name for n in nodes}
        parts, culprit = [], None
        for d in devices:
            reasons = refused.get((g, d.name), [f"{g}: no cost"])
            whys = []
            for r in reasons:
                who, _, why = r.partition(": ")
                if culprit is None and who in names:
                    culprit = who
                whys.append(why if who in names or who == g else r)
            parts.append(f"{d.name} refused ({'; '.join(dict.fromkeys(whys))})")
        node = by_name.get(culprit or nodes[0].name)
        raise ConfigError(f"node {node.name!r} cannot run on any device: " + ", ".join(parts),
                          node=node, hint="add a device that runs it (e.g. 'cpu'), or change "
                                          "the model so the op goes")
