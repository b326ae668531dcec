"""Export a (quantized) IR graph as ONNX: float ops as standard ONNX ops, quantization as
``QuantizeLinear``/``DequantizeLinear`` (QDQ), weight-only int4 as ``MatMulNBits``.

The file is what ONNX Runtime's quantizer would write for the same choices, but with the
scales qcompile computed (calibration, SmoothQuant, GPTQ, AWQ, rotations):

- a statically quantized activation (``QuantSpec`` with a scale constant) becomes a pair
  ``Q(x, s, z) → DQ`` on the value: ``q = saturate(round(x / s) + z)``, ``x̂ = (q − z)·s``,
  the affine map of Jacob et al. 2018 (eq. 1), which the ONNX operator spec defines with the
  same round-half-to-even, so each activation equals the interpreter's fake quantization
  up to the floating-point error of what produced it;
- a quantized weight becomes an integer initializer and a ``DequantizeLinear`` carrying its
  scales and zero points: per tensor, per channel (``axis``) or in blocks (``block_size``,
  opset 21);
- a dynamic per-token activation (no scale constant) is written as the arithmetic it stands
  for, ``s = max|x|/qmax`` per row then ``clip(round(x/s))·s`` (LLM.int8(), Dettmers et al.
  2022, §3.1), since QDQ cannot carry a run-time scale per row;
- a quantized linear whose input has a static scale ``s_x`` and whose weight has scales
  ``s_w`` gets its bias as int32 at ``s_x·s_w`` inside ``Gemm`` (the integer-arithmetic bias
  of Jacob et al. 2018, §2.4), which is what NPU runtimes fuse into a fully connected op;
- fused ops opset 21 lacks (attention, RMSNorm, rotary, SiLU) are written as the primitives
  they stand for by the passes ``decompose_attention`` and ``decompose_fused`` on a copy;
- formats ONNX cannot carry (MX, NVFP4, codebooks, minifloats, int1–3 and int5–7) are refused,
  naming the layer and the nearest format that exports.

Every node is named ``<IR node>/<op>[_k]``; ``Exported.origin`` maps each ONNX node to the IR
node it came from, so runtime reports (QNN's refused nodes) point at the user's model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from qcompile.errors import BackendError, ConfigError
from qcompile.ir.graph import Graph, Node, Value
from qcompile.ir.quant import Granularity, QuantSpec
from qcompile.ir.types import dim_expr, to_torch_dtype

__all__ = ["export", "Exported", "OPSET", "exportable_format", "check_exportable"]

OPSET = 21
MS_DOMAIN = "com.microsoft"
_I64_MAX = 2 ** 63 - 1

#: integer formats QuantizeLinear/DequantizeLinear carry at opset 21, by (bits, signed)
_QDQ_TYPES = {(4, True): "INT4", (4, False): "UINT4", (8, True): "INT8", (8, False): "UINT8",
              (16, True): "INT16", (16, False): "UINT16"}


def _tp():
    import onnx
    return onnx.TensorProto


def _elem(dtype: str) -> int:
    tp = _tp()
    return {"float32": tp.FLOAT, "float16": tp.FLOAT16, "bfloat16": tp.BFLOAT16,
            "float64": tp.DOUBLE, "int64": tp.INT64, "int32": tp.INT32, "int16": tp.INT16,
            "int8": tp.INT8, "uint8": tp.UINT8, "bool": tp.BOOL, "uint16": tp.UINT16}[dtype]


def exportable_format(spec: QuantSpec) -> tuple[bool, str]:
    """(whether ``spec`` exports as QDQ, the nearest format that does when it does not)."""
    from qcompile.formats.integer import IntFormat
    fmt = spec.fmt
    if isinstance(fmt, IntFormat) and not fmt.binary and (fmt.bits, fmt.signed) in _QDQ_TYPES:
        return True, spec.format
    if isinstance(fmt, IntFormat):
        nearest = ("int4" if fmt.bits <= 4 else "int8") if fmt.signed else \
            ("uint4" if fmt.bits <= 4 else "uint8")
        return False, nearest
    if "4" in spec.format:  # mxfp4, nvfp4, nf4, sf4, fp4_e2m1
        return False, "int4 with group_size=32"
    return False, "int8"


def _where(node: Node | None, v: Value) -> str:
    if node is None:
        return f"constant %{v.name}"
    return f"%{v.name} of node {node.name} ({node.op}, {node.provenance})"


def check_exportable(graph: Graph, target: str = "onnx") -> None:
    """Refuse, before any file is written, a graph holding a quantization ONNX cannot carry."""
    readers: dict[int, Node] = {}
    for n in graph.nodes:
        for v in n.inputs:
            if v is not None:
                readers.setdefault(id(v), n)
    values = [graph.constant_value(c) for c in graph.constants] + list(graph.inputs) + \
        [o for n in graph.nodes for o in n.outputs]
    for v in values:
        if v.quant is None or not v.type.dtype.startswith(("float", "bfloat")):
            continue
        spec = v.quant
        if spec.granularity == Granularity.NONE:
            if spec.format in ("fp16", "bf16", "float16", "bfloat16"):
                continue
        ok, nearest = exportable_format(spec) if spec.granularity != Granularity.NONE \
            else (False, "int8")
        node = v.producer or readers.get(id(v))
        if not ok:
            raise ConfigError(f"target '{target}' cannot carry {spec} at {_where(node, v)}: ONNX "
                              f"QuantizeLinear/DequantizeLinear hold int4/uint4, int8/uint8 and "
                              f"int16/uint16 codes only", node=node,
                              hint=f"quantize this layer to {nearest} (e.g. an override "
                                   f"{{'{(node.provenance.module if node else None) or v.name}': "
                                   f"{{'weights': '{nearest.split()[0]}'}}}}), or use target "
                                   "'cpu'")
        if spec.dynamic and spec.granularity == Granularity.PER_TOKEN:
            from qcompile.formats.integer import IntFormat
            f = spec.fmt
            if not (isinstance(f, IntFormat) and f.symmetric and f.signed and not f.full_range
                    and f.scale_dtype == "fp32"):
                raise ConfigError(f"target '{target}' writes per-token activations as "
                                  f"arithmetic for signed symmetric fp32-scaled integers only; "
                                  f"{spec} at {_where(node, v)} is not", node=node,
                                  hint="use activations='int8' (per_token), or per_tensor "
                                       "with calibration")
        if spec.dynamic and spec.granularity not in (Granularity.PER_TOKEN,):
            raise ConfigError(f"target '{target}' cannot carry the dynamic {spec} at "
                              f"{_where(node, v)}", node=node,
                              hint="use activation_granularity='per_tensor' with calibration, or "
                                   "'per_token'")


@dataclass
class Exported:
    """An exported model and where each of its nodes came from."""

    model: object  # onnx.ModelProto
    #: ONNX node name -> IR node name ("" for graph-level nodes such as input QDQ)
    origin: dict[str, str] = field(default_factory=dict)
    #: IR value name -> the ONNX tensor holding its (quantized) codes, for probes
    codes: dict[str, str] = field(default_factory=dict)


class _Exporter:
    def __init__(self, graph: Graph, *, static: bool, weight_only_int4: str, bias_int32: bool,
                 target: str):
        import onnx
        from onnx import helper
        self.onnx, self.h = onnx, helper
        self.g = graph
        self.static = static
        self.nbits = weight_only_int4
        self.bias_int32 = bias_int32
        self.target = target
        self.nodes: list = []
        self.inits: dict[str, object] = {}
        self.names: dict[int, str] = {}
        self.origin: dict[str, str] = {}
        self.codes: dict[str, str] = {}
        self.used_names: set[str] = set()
        self._const_cache: dict[tuple, str] = {}
        self._sym: dict[str, str] = {}
        self.ms = False
        self.cur: Node | None = None

    # -- naming and emission --------------------------------------------------------
    def fresh(self, base: str) -> str:
        base = base.replace(" ", "_")
        name, k = base, 1
        while name in self.used_names:
            name = f"{base}_{k}"
            k += 1
        self.used_names.add(name)
        return name

    def emit(self, op_type: str, inputs, n_out: int = 1, *, out=None, domain: str = "",
             **attrs) -> list[str] | str:
        owner = self.cur.name if self.cur is not None else "graph"
        name = self.fresh(f"{owner}/{op_type}")
        outs = out if out is not None else [self.fresh(f"{name}:{i}") for i in range(n_out)]
        if isinstance(outs, str):
            outs = [outs]
        for o in outs:
            self.used_names.add(o)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(self.h.make_node(op_type, list(inputs), outs, name=name, domain=domain,
                                           **attrs))
        self.origin[name] = self.cur.name if self.cur is not None else ""
        if domain == MS_DOMAIN:
            self.ms = True
        return outs[0] if len(outs) == 1 else outs

    def const(self, arr, hint: str = "c", *, elem: int | None = None) -> str:
        """An initializer holding ``arr`` (numpy), shared between equal small constants."""
        arr = np.asarray(arr)
        key = None
        if arr.size <= 16 and elem is None:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._const_cache:
                return self._const_cache[key]
        name = self.fresh(hint)
        if elem is not None:  # 4-bit and 16-bit codes: numpy holds them widened
            t = self.h.make_tensor(name, elem, list(arr.shape), arr.reshape(-1).tolist())
        else:
            t = self.onnx.numpy_helper.from_array(arr, name)
        self.inits[name] = t
        if key is not None:
            self._const_cache[key] = name
        return name

    def i64(self, values, hint="shape") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def f32(self, value, hint="c") -> str:
        return self.const(np.asarray(value, dtype=np.float32), hint)

    # -- symbolic sizes ----------------------------------------------------------------
    def _symbol(self, s: str) -> str:
        if s in self._sym:
            return self._sym[s]
        for v in self.g.inputs:
            for k, d in enumerate(v.shape):
                if isinstance(d, str) and str(dim_expr(d)) == s:
                    prev, self.cur = self.cur, None
                    out = self.emit("Shape", [v.name], start=k, end=k + 1)
                    self.cur = prev
                    self._sym[s] = out
                    return out
        raise BackendError(f"the size '{s}' is bound by no graph input", node=self.cur,
                           hint="export with static shapes")

    def _expr(self, e) -> str:
        """A 1-element int64 tensor computing the sympy expression ``e``."""
        import sympy
        if e.is_Integer:
            return self.i64([int(e)])
        if e.is_Symbol:
            return self._symbol(str(e))
        if isinstance(e, sympy.Add):
            acc = self._expr(e.args[0])
            for a in e.args[1:]:
                acc = self.emit("Add", [acc, self._expr(a)])
            return acc
        if isinstance(e, sympy.Mul):
            acc = self._expr(e.args[0])
            for a in e.args[1:]:
                acc = self.emit("Mul", [acc, self._expr(a)])
            return acc
        if isinstance(e, sympy.floor) and isinstance(e.args[0], sympy.Mul):
            num, den = e.args[0].as_numer_denom()
            return self.emit("Div", [self._expr(num), self._expr(den)])
        raise BackendError(f"cannot export the symbolic size {e}", node=self.cur,
                           hint="export with static shapes")

    def dims(self, dims) -> str:
        """A 1-D int64 tensor of ``dims`` (ints or symbolic sizes)."""
        if all(isinstance(d, int) for d in dims):
            return self.i64(list(dims))
        parts = [self.i64([d]) if isinstance(d, int) else self._expr(dim_expr(d)) for d in dims]
        return self.emit("Concat", parts, axis=0)

    def scalar_dim(self, d) -> str:
        return self.i64([d]) if isinstance(d, int) else self._expr(dim_expr(d))

    # -- values -------------------------------------------------------------------------
    def value(self, v: Value | None) -> str:
        if v is None:
            return ""
        if id(v) not in self.names:
            if v.name in self.g.constants:
                self.names[id(v)] = self._constant(v)
            else:
                raise BackendError(f"value %{v.name} is used before it is defined", node=self.cur)
        return self.names[id(v)]

    def _constant(self, v: Value) -> str:
        t = self.g.constants[v.name].detach().cpu()
        spec = v.quant
        if spec is None or not t.is_floating_point():
            if t.dtype == torch.bfloat16:
                raw = self.const(t.float().numpy(), v.name)
                return self.emit("Cast", [raw], to=_elem("bfloat16"))
            return self.const(t.numpy(), v.name)
        if spec.granularity == Granularity.NONE:  # fp16 / bf16 storage
            if spec.format in ("fp16", "float16"):
                raw = self.const(t.to(torch.float16).numpy(), v.name)
            else:
                raw = self.const(t.to(torch.bfloat16).float().numpy(), v.name)
                raw = self.emit("Cast", [raw], to=_elem("bfloat16"))
            return self.emit("Cast", [raw], to=_elem(v.dtype))
        return self.dequantized(v, t, spec)

    def dequantized(self, v: Value, t: torch.Tensor, spec: QuantSpec, *, transpose=False) -> str:
        """Integer initializer + DequantizeLinear for a quantized constant (``transpose``:
        of its transpose, for MatMul's [in, out] weight)."""
        qt = spec.quantize(t.float(), self.g.constants)
        fmt = spec.fmt
        codes = qt.codes
        lay = fmt.layout(qt.shape, qt.axis)
        if tuple(codes.shape) != tuple(qt.shape):
            raise BackendError(f"{v.name}: padded blocks ({list(codes.shape)} codes for shape "
                               f"{list(qt.shape)}) do not export", node=self.cur,
                               hint="choose a group size that divides the reduction axis")
        scale = qt.params["scale"].float()
        zp = qt.params.get("zero_point")
        if fmt.symmetric and not fmt.signed:
            zp = torch.full_like(scale, 1 << (fmt.bits - 1), dtype=torch.int32)
        axes = list(lay.axes)
        gran = spec.granularity
        rank = len(qt.shape)
        attrs = {}
        if gran == Granularity.PER_TENSOR:
            scale, zp = scale.reshape(()), (zp.reshape(()) if zp is not None else None)
        elif gran == Granularity.PER_CHANNEL:
            ch = self.channel_axis(v, axes, rank)
            scale = scale.reshape(-1)
            zp = zp.reshape(-1) if zp is not None else None
            attrs["axis"] = ch
        elif gran == Granularity.PER_GROUP:
            (ax,) = axes
            attrs["axis"] = ax
            attrs["block_size"] = int(spec.group_size)
            shp = list(qt.shape)
            shp[ax] = shp[ax] // int(spec.group_size)
            scale = scale.reshape(shp)
            zp = zp.reshape(shp) if zp is not None else None
        else:
            raise BackendError(f"{v.name}: {spec} does not export as a weight", node=self.cur)
        if transpose:
            codes = codes.transpose(0, 1)
            if gran != Granularity.PER_TENSOR:
                attrs["axis"] = 1 - attrs["axis"]
                if scale.dim() == 2:
                    scale = scale.transpose(0, 1)
                    zp = zp.transpose(0, 1) if zp is not None else None
        elem = getattr(_tp(), _QDQ_TYPES[(fmt.bits, fmt.signed)])
        np_codes = codes.contiguous().to(torch.int32).numpy()
        wide = fmt.bits in (4, 16)
        cname = self.const(np_codes if wide else np_codes.astype(np.int8 if fmt.signed else np.uint8),
                           f"{v.name}.codes", elem=elem if wide else None)
        sname = self.const(scale.contiguous().numpy().astype(np.float32), f"{v.name}.scale")
        ins = [cname, sname]
        if zp is not None:
            znp = zp.contiguous().to(torch.int32).numpy()
            ins.append(self.const(znp if wide else znp.astype(np.int8 if fmt.signed else np.uint8),
                                  f"{v.name}.zero_point", elem=elem if wide else None))
        self.codes[v.name] = cname
        return self.emit("DequantizeLinear", ins, **attrs)

    def channel_axis(self, v: Value, shared: list[int], rank: int) -> int:
        """The ONNX ``axis`` of a per-channel spec: the one axis that does *not* share a scale
        (qcompile's ``axis`` names the reduction axes, which share one)."""
        keep = [a for a in range(rank) if a not in [x % rank for x in shared]]
        if len(keep) != 1:
            raise BackendError(f"%{v.name}: per-channel scales kept along axes {keep} do not "
                               "export (ONNX quantizes along one axis)", node=self.cur)
        return keep[0]

    def qdq(self, x: str, v: Value) -> str:
        """Q → DQ (static spec) or the per-token arithmetic (dynamic spec) on tensor ``x``."""
        spec = v.quant
        fmt = spec.fmt
        if spec.dynamic:
            qmin, qmax = fmt.qrange
            if not fmt.symmetric:
                raise BackendError(f"%{v.name}: dynamic asymmetric {spec} does not export",
                                   node=self.cur, hint="use a symmetric per-token format")
            axis = -1 if spec.axis is None else spec.axis
            m = self.emit("ReduceMax", [self.emit("Abs", [x]), self.i64([axis])], keepdims=1)
            if float(fmt.clip_ratio) != 1.0:
                m = self.emit("Mul", [m, self.f32(float(fmt.clip_ratio))])
            s = self.emit("Div", [m, self.f32(float((1 << (fmt.bits - 1)) - 1))])
            ok = self.emit("Greater", [s, self.f32(0.0)])  # safe_div: a zero scale divides by 1
            sd = self.emit("Where", [ok, s, self.f32(1.0)])
            q = self.emit("Clip", [self.emit("Round", [self.emit("Div", [x, sd])]),
                                   self.f32(float(qmin)), self.f32(float(qmax))])
            return self.emit("Mul", [q, s])
        consts = self.g.constants
        scale = consts[spec.scale].float().reshape(-1).numpy()
        gran = spec.granularity
        attrs = {}
        if gran == Granularity.PER_TENSOR:
            scale = scale.reshape(())
        elif gran == Granularity.PER_CHANNEL:
            shared = [-1] if spec.axis is None else \
                ([spec.axis] if isinstance(spec.axis, int) else list(spec.axis))
            attrs["axis"] = self.channel_axis(v, shared, len(v.shape))
        else:
            raise BackendError(f"%{v.name}: activation quantization {spec} does not export",
                               node=self.cur, hint="use per_tensor activations")
        elem = getattr(_tp(), _QDQ_TYPES[(fmt.bits, fmt.signed)])
        if spec.zero_point is not None:
            zp = consts[spec.zero_point].to(torch.int32).reshape(scale.shape).numpy()
        else:
            zp = np.full(scale.shape, 0 if fmt.signed else 1 << (fmt.bits - 1), dtype=np.int32)
        wide = fmt.bits in (4, 16)
        zname = self.const(zp if wide else zp.astype(np.int8 if fmt.signed else np.uint8),
                           f"{v.name}.zero_point", elem=elem if wide else None)
        sname = self.const(scale.astype(np.float32), f"{v.name}.scale")
        q = self.emit("QuantizeLinear", [x, sname, zname], **attrs)
        self.codes.setdefault(v.name, q)
        return self.emit("DequantizeLinear", [q, sname, zname], **attrs)

    def requant_like(self, x: str, v: Value) -> str:
        """Q/DQ on the output of a data-movement op (Reshape, Transpose) that reads a value
        quantized by ``v``'s static per-tensor spec: the same grid, so exact; it keeps every
        node inside a QDQ unit for NPU runtimes."""
        if v is None or v.quant is None or v.quant.dynamic or \
                v.quant.granularity != Granularity.PER_TENSOR:
            return x
        return self.qdq(x, v)

    def bind(self, v: Value, x: str) -> None:
        if v.quant is not None and v.type.dtype.startswith(("float", "bfloat")):
            x = self.qdq(x, v)
        self.names[id(v)] = x

    # -- the graph ----------------------------------------------------------------------
    def run(self):
        h = self.h
        ins = []
        self.used_names.update(v.name for v in self.g.inputs)
        for v in self.g.inputs:
            shape = [d if isinstance(d, int) else str(d) for d in v.shape]
            if self.static and any(isinstance(d, str) for d in shape):
                raise ConfigError(f"target '{self.target}' needs static shapes; input %{v.name} "
                                  f"has shape {shape}",
                                  hint="compile with example inputs of the deployed shape and no "
                                       "dynamic_shapes")
            if v.dtype == "bfloat16":
                raise ConfigError(f"input %{v.name} is bfloat16, which ONNX Runtime's Python "
                                  "API cannot feed", hint="capture the model with float32 inputs")
            ins.append(h.make_tensor_value_info(v.name, _elem(v.dtype), shape))
            self.used_names.add(v.name)
            self.names[id(v)] = v.name
            if v.quant is not None:
                self.names[id(v)] = self.qdq(v.name, v)
        for node in self.g.nodes:
            self.cur = node
            fn = _OPS.get(node.op)
            if fn is None:
                raise BackendError(f"op '{node.op}' has no ONNX export", node=node,
                                   hint="place this node on target 'cpu'")
            outs = fn(self, node, [None if (node.op, i) in _LAZY else self.value(v)
                                   for i, v in enumerate(node.inputs)])
            outs = outs if isinstance(outs, list) else [outs]
            for v, x in zip(node.outputs, outs):
                self.bind(v, x)
        self.cur = None
        outputs = []
        for i, v in enumerate(self.g.outputs):
            name = self.value(v)
            oname = v.name if v.name not in self.used_names or name == v.name else \
                self.fresh(f"output_{i}")
            if name in (x.name for x in ins) or name in self.inits or name != oname:
                self.emit("Identity", [name], out=[oname])
            shape = [d if isinstance(d, int) else str(d) for d in v.shape]
            outputs.append(h.make_tensor_value_info(oname, _elem(v.dtype), shape))
        graph = h.make_graph(self.nodes, self.g.name or "qcompile", ins, outputs,
                             initializer=list(self.inits.values()))
        opsets = [h.make_opsetid("", OPSET)]
        if self.ms:
            opsets.append(h.make_opsetid(MS_DOMAIN, 1))
        model = h.make_model(graph, opset_imports=opsets, producer_name="qcompile",
                             ir_version=10)
        return model


# -- op emitters -----------------------------------------------------------------------------
_OPS = {}
#: (op, input index) an emitter materialises itself (a weight it may write in another form)
_LAZY = {("linear", 1)}


def _reg(*names):
    def deco(fn):
        for n in names:
            _OPS[n] = fn
        return fn
    return deco


def _opt(ins, i: int) -> str | None:
    """Optional input ``i`` (a node may list fewer inputs than its schema)."""
    return ins[i] if i < len(ins) and ins[i] else None


def _cast_to(e: _Exporter, x: str, v: Value, dtype: str) -> str:
    return x if v.dtype == dtype else e.emit("Cast", [x], to=_elem(dtype))


_BIN = {"add": "Add", "sub": "Sub", "mul": "Mul", "pow": "Pow", "maximum": "Max",
        "minimum": "Min", "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater",
        "ge": "GreaterOrEqual", "logical_and": "And", "logical_or": "Or", "logical_xor": "Xor"}
_BITWISE = {"bitwise_and": ("BitwiseAnd", "And"), "bitwise_or": ("BitwiseOr", "Or"),
            "bitwise_xor": ("BitwiseXor", "Xor")}


@_reg(*_BIN, *_BITWISE, "ne", "div", "remainder")
def _binary(e: _Exporter, n: Node, ins):
    a, b = n.inputs
    if n.op in ("eq", "ne", "lt", "le", "gt", "ge"):
        from qcompile.ir.ops._infer import promote
        from qcompile.ir.types import TensorType
        common = promote(TensorType(a.shape, a.dtype), TensorType(b.shape, b.dtype))
    elif n.op.startswith("logical_"):
        common = "bool"
    else:
        common = n.outputs[0].dtype
    x, y = _cast_to(e, ins[0], a, common), _cast_to(e, ins[1], b, common)
    if n.op in _BIN:
        return e.emit(_BIN[n.op], [x, y])
    if n.op in _BITWISE:
        return e.emit(_BITWISE[n.op][1 if common == "bool" else 0], [x, y])
    if n.op == "ne":
        return e.emit("Not", [e.emit("Equal", [x, y])])
    if n.op == "remainder":
        if common.startswith(("float", "bfloat")):  # python's sign rule: x − floor(x/y)·y
            return e.emit("Sub", [x, e.emit("Mul", [e.emit("Floor", [e.emit("Div", [x, y])]), y])])
        return e.emit("Mod", [x, y], fmod=0)
    mode = n.attrs.get("rounding_mode")
    if mode is None:
        return e.emit("Div", [x, y])
    is_f = common.startswith(("float", "bfloat"))
    if mode == "trunc" and not is_f:
        return e.emit("Div", [x, y])
    xf = x if is_f else e.emit("Cast", [x], to=_elem("float64"))
    yf = y if is_f else e.emit("Cast", [y], to=_elem("float64"))
    r = e.emit("Floor" if mode == "floor" else "Sign", [e.emit("Div", [xf, yf])]) \
        if mode == "floor" else None
    if r is None:  # trunc of floats: sign(q)·floor(|q|)
        q = e.emit("Div", [xf, yf])
        r = e.emit("Mul", [e.emit("Sign", [q]), e.emit("Floor", [e.emit("Abs", [q])])])
    return r if is_f else e.emit("Cast", [r], to=_elem(common))


_UN = {"neg": "Neg", "abs": "Abs", "exp": "Exp", "log": "Log", "sqrt": "Sqrt",
       "reciprocal": "Reciprocal", "tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu",
       "erf": "Erf", "sin": "Sin", "cos": "Cos", "floor": "Floor", "ceil": "Ceil",
       "round": "Round", "sign": "Sign", "identity": "Identity", "logical_not": "Not"}


@_reg(*_UN, "rsqrt", "silu")
def _unary(e, n, ins):
    if n.op == "rsqrt":
        return e.emit("Reciprocal", [e.emit("Sqrt", ins)])
    if n.op == "silu":
        return e.emit("Mul", [ins[0], e.emit("Sigmoid", ins)])
    if n.op == "logical_not" and n.inputs[0].dtype != "bool":
        return e.emit("Not", [e.emit("Cast", ins, to=_elem("bool"))])
    return e.emit(_UN[n.op], ins)


@_reg("gelu")
def _gelu(e, n, ins):
    return e.emit("Gelu", ins, approximate=n.attrs.get("approximate", "none"))


@_reg("leaky_relu")
def _leaky(e, n, ins):
    return e.emit("LeakyRelu", ins, alpha=float(n.attrs["negative_slope"]))


@_reg("clamp")
def _clamp(e, n, ins):
    lo, hi = n.attrs.get("min"), n.attrs.get("max")
    dt = n.outputs[0].dtype
    npdt = torch.empty((), dtype=to_torch_dtype(dt)).numpy().dtype
    args = [ins[0], e.const(np.asarray(lo, npdt), "min") if lo is not None else "",
            e.const(np.asarray(hi, npdt), "max") if hi is not None else ""]
    while args[-1] == "":
        args.pop()
    return e.emit("Clip", args)


@_reg("where")
def _where_op(e, n, ins):
    c, a, b = n.inputs
    dt = n.outputs[0].dtype
    cond = ins[0] if c.dtype == "bool" else e.emit("Cast", [ins[0]], to=_elem("bool"))
    return e.emit("Where", [cond, _cast_to(e, ins[1], a, dt), _cast_to(e, ins[2], b, dt)])


@_reg("cast")
def _cast(e, n, ins):
    return e.emit("Cast", ins, to=_elem(n.attrs["dtype"]))


@_reg("linear")
def _linear(e: _Exporter, n: Node, ins):
    x, w, b = (list(n.inputs) + [None])[:3]  # the bias is optional
    k = w.shape[1]
    const_w = w.name in e.g.constants and w.producer is None
    spec = w.quant if const_w else None
    if spec is not None and e.nbits == "matmulnbits" and _nbits_ok(spec, x):
        return _matmulnbits(e, n, ins)
    rank = len(x.shape)
    if spec is not None and spec.granularity == Granularity.PER_GROUP:
        # blocks along K: MatMul with the [K, N] weight (the QNN HTP takes block-quantized
        # weights in MatMul, not in Gemm); a bias is its own Add (quantize_all_activations
        # splits it off for the NPU, so the sum gets a calibrated scale)
        wt = e.dequantized(w, e.g.constants[w.name], spec, transpose=True)
        y = e.emit("MatMul", [ins[0], wt])
        return e.emit("Add", [y, ins[2]]) if b is not None else y
    ins = [ins[0], e.value(w)] + list(ins[2:])
    bias = ins[2] if b is not None else ""
    if b is not None and e.bias_int32 and spec is not None and x.quant is not None \
            and not x.quant.dynamic and x.quant.granularity == Granularity.PER_TENSOR \
            and spec.granularity in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL) \
            and b.name in e.g.constants and b.quant is None:
        bias = _int32_bias(e, n, x, w, b)
    if rank == 2:
        return e.emit("Gemm", [ins[0], ins[1]] + ([bias] if bias else []), transB=1)
    # [..., K] -> [M, K] -> Gemm -> [..., N]: the fully connected form NPU runtimes fuse
    flat = e.emit("Reshape", [ins[0], e.i64([-1, k])])
    flat = e.requant_like(flat, x)
    y = e.emit("Gemm", [flat, ins[1]] + ([bias] if bias else []), transB=1)
    out = n.outputs[0]
    if out.quant is not None:
        y = e.qdq(y, out)
    return e.emit("Reshape", [y, e.dims(list(out.shape))])


def _int32_bias(e: _Exporter, n: Node, x: Value, w: Value, b: Value) -> str:
    """The bias as int32 codes at scale s_x·s_w (Jacob et al. 2018, §2.4, eq. 10 with the
    bias's zero point 0): the integer form NPU fully-connected ops add to the int32 sum."""
    sx = float(e.g.constants[x.quant.scale].float().reshape(()))
    qt = w.quant.quantize(e.g.constants[w.name].float(), e.g.constants)
    sw = qt.params["scale"].float().reshape(-1)
    s = (sx * sw).to(torch.float32)
    if s.numel() == 1:
        s = s.expand(w.shape[0]).contiguous()
    bias = e.g.constants[b.name].float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(bias / safe).clamp(-2 ** 31, 2 ** 31 - 1).to(torch.int32)
    e.codes[b.name] = cn = e.const(q.numpy(), f"{b.name}.codes")
    sn = e.const(s.numpy(), f"{b.name}.scale")
    return e.emit("DequantizeLinear", [cn, sn], axis=0)


def _nbits_ok(spec: QuantSpec, x: Value) -> bool:
    from qcompile.formats.integer import IntFormat
    fmt = spec.fmt
    g = spec.group_size
    return (isinstance(fmt, IntFormat) and fmt.bits == 4 and x.quant is None
            and spec.granularity == Granularity.PER_GROUP and g is not None and g >= 16
            and g & (g - 1) == 0)


def _matmulnbits(e: _Exporter, n: Node, ins):
    """com.microsoft.MatMulNBits (ONNX Runtime's 4-bit weight GEMM): B as uint8
    [N, K/bs, bs/2] with two 4-bit codes per byte, low nibble first; the default zero point
    8 reproduces signed symmetric int4 exactly, ``(u − 8)·s = q·s``."""
    x, w, b = (list(n.inputs) + [None])[:3]  # the bias is optional
    spec = w.quant
    fmt = spec.fmt
    t = e.g.constants[w.name].float()
    qt = spec.quantize(t, e.g.constants)
    nout, k = t.shape
    bs = int(spec.group_size)
    if k % bs:
        raise BackendError(f"{w.name}: K={k} is not a multiple of the group {bs}", node=n)
    codes = qt.codes.to(torch.int32)
    if fmt.symmetric:  # signed codes + 8, or offset-binary codes already: zero point 8
        u = codes + 8 if fmt.signed else codes
        zp = None
    else:
        u = codes
        zp = qt.params["zero_point"].to(torch.int32).reshape(nout, k // bs)
    u = u.reshape(nout, k // bs, bs).numpy().astype(np.uint8)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    scale = qt.params["scale"].float().reshape(-1).numpy().astype(np.float32)
    ins2 = [ins[0], e.const(packed, f"{w.name}.nbits"), e.const(scale, f"{w.name}.scale")]
    if zp is not None:
        nb = k // bs
        zz = zp.numpy().astype(np.uint8)
        if nb % 2:
            zz = np.concatenate([zz, np.zeros((nout, 1), np.uint8)], axis=1)
        ins2.append(e.const((zz[:, 0::2] | (zz[:, 1::2] << 4)).reshape(-1), f"{w.name}.zp"))
    else:
        ins2.append("")
    if b is not None:
        ins2 += ["", ins[2]]  # g_idx (absent), bias
    while ins2[-1] == "":
        ins2.pop()
    e.codes[w.name] = ins2[1]
    return e.emit("MatMulNBits", ins2, domain=MS_DOMAIN, K=k, N=nout, bits=4, block_size=bs)


@_reg("matmul")
def _matmul(e, n, ins):
    return e.emit("MatMul", ins)


@_reg("conv")
def _conv(e, n, ins):
    x, w, b = (list(n.inputs) + [None])[:3]  # the bias is optional
    pads = list(n.attrs["padding"])
    return e.emit("Conv", [ins[0], ins[1]] + ([ins[2]] if b is not None else []),
                  strides=list(n.attrs["stride"]), pads=pads + pads,
                  dilations=list(n.attrs["dilation"]), group=int(n.attrs.get("groups", 1)),
                  kernel_shape=list(w.shape[2:]))


@_reg("batch_norm")
def _bn(e, n, ins):
    x, wv, bv, mean, var = n.inputs
    c = x.shape[1]
    w = _opt(ins, 1) or e.f32(np.ones(c, np.float32), "bn_scale")
    b = _opt(ins, 2) or e.f32(np.zeros(c, np.float32), "bn_bias")
    return e.emit("BatchNormalization", [ins[0], w, b, ins[3], ins[4]],
                  epsilon=float(n.attrs["eps"]))


@_reg("layer_norm")
def _ln(e, n, ins):
    x = n.inputs[0]
    nd = int(n.attrs["normalized_ndim"])
    shape = [int(d) for d in x.shape[len(x.shape) - nd:]]
    w = _opt(ins, 1) or e.f32(np.ones(shape, np.float32), "ln_scale")
    args = [ins[0], w] + ([ins[2]] if _opt(ins, 2) else [])
    return e.emit("LayerNormalization", args, axis=-nd, epsilon=float(n.attrs["eps"]))


@_reg("rms_norm")
def _rms(e, n, ins):
    """RMSNorm (Zhang & Sennrich 2019, eq. 4) in opset-21 ops: x·1/√(mean(x²)+ε)·g."""
    x = n.inputs[0]
    nd = int(n.attrs["normalized_ndim"])
    axes = list(range(len(x.shape) - nd, len(x.shape)))
    xf = _cast_to(e, ins[0], x, "float32")
    ms = e.emit("ReduceMean", [e.emit("Mul", [xf, xf]), e.i64(axes)], keepdims=1)
    r = e.emit("Reciprocal", [e.emit("Sqrt", [e.emit("Add", [ms, e.f32(float(n.attrs["eps"]))])])])
    y = e.emit("Mul", [xf, r])
    if x.dtype != "float32":
        y = e.emit("Cast", [y], to=_elem(x.dtype))
    return e.emit("Mul", [y, ins[1]]) if _opt(ins, 1) else y


def _pool_attrs(n):
    p = list(n.attrs["padding"])
    return dict(kernel_shape=list(n.attrs["kernel"]), strides=list(n.attrs["stride"] or
                                                                 n.attrs["kernel"]),
                pads=p + p, ceil_mode=int(bool(n.attrs.get("ceil_mode"))))


@_reg("max_pool2d")
def _maxpool(e, n, ins):
    return e.emit("MaxPool", ins, dilations=list(n.attrs.get("dilation") or [1, 1]),
                  **_pool_attrs(n))


@_reg("avg_pool2d")
def _avgpool(e, n, ins):
    k = list(n.attrs["kernel"])
    d = n.attrs.get("divisor_override")
    if d is not None and d != k[0] * k[1]:
        raise BackendError("avg_pool2d's divisor_override has no ONNX form", node=n,
                           hint="place this node on target 'cpu'")
    return e.emit("AveragePool", ins, count_include_pad=int(bool(n.attrs["count_include_pad"])),
                  **_pool_attrs(n))


@_reg("adaptive_avg_pool2d")
def _adaptive(e, n, ins):
    x = n.inputs[0]
    out = list(n.attrs["output_size"])
    if out == [1, 1]:
        return e.emit("GlobalAveragePool", ins)
    h, w = x.shape[-2:]
    if not all(isinstance(s, int) for s in (h, w)) or h % out[0] or w % out[1]:
        raise BackendError(f"adaptive_avg_pool2d to {out} from {[h, w]} has no ONNX form",
                           node=n, hint="place this node on target 'cpu'")
    k = [h // out[0], w // out[1]]
    return e.emit("AveragePool", ins, kernel_shape=k, strides=k)


@_reg("embedding")
def _embedding(e, n, ins):
    return e.emit("Gather", [ins[0], _idx(e, n.inputs[1], ins[1])], axis=0)


def _idx(e, v: Value, x: str) -> str:
    return x if v.dtype in ("int64", "int32") else e.emit("Cast", [x], to=_elem("int64"))


@_reg("take")
def _take(e, n, ins):
    return e.emit("Gather", [ins[0], _idx(e, n.inputs[1], ins[1])], axis=int(n.attrs["axis"]))


@_reg("gather")
def _gather(e, n, ins):
    return e.emit("GatherElements", [ins[0], _idx(e, n.inputs[1], ins[1])],
                  axis=int(n.attrs["axis"]))


@_reg("index")
def _index(e, n, ins):
    x = n.inputs[0]
    axes = [a % len(x.shape) for a in n.attrs["axes"]]
    idx = n.inputs[1:]
    if len(axes) == 1 and idx[0].dtype != "bool":
        return e.emit("Gather", [ins[0], _idx(e, idx[0], ins[1])], axis=axes[0])
    if len(axes) == 1 and idx[0].dtype == "bool" and len(idx[0].shape) == 1:
        nz = e.emit("Squeeze", [e.emit("NonZero", [ins[1]]), e.i64([0])])
        return e.emit("Gather", [ins[0], nz], axis=axes[0])
    if any(i.dtype == "bool" for i in idx):
        raise BackendError("boolean indexing over several axes has no ONNX export", node=n,
                           hint="place this node on target 'cpu'")
    # numpy advanced indexing as one Gather: the indexed axes moved to the front and flattened
    # into one, the index tensors broadcast to B and combined into the flat index
    # Σ i_k·stride_k (folded when they are constants, as masks' are); the result is B + the
    # other axes, with B moved after the leading axes when the indexed axes were consecutive.
    # (Gather, not GatherND: the QNN HTP refuses GatherND.)
    rank = len(x.shape)
    others = [a for a in range(rank) if a not in axes]
    sizes = [x.shape[a] for a in axes]
    xt = ins[0] if axes + others == list(range(rank)) else \
        e.emit("Transpose", [ins[0]], perm=axes + others)
    xt = e.emit("Reshape", [xt, e.dims([-1] + [x.shape[a] for a in others])])
    from qcompile.ir.ops._infer import broadcast_shapes
    from qcompile.ir.types import dim_mul
    b = list(broadcast_shapes(*[i.shape for i in idx]))
    strides = [dim_mul(1, *sizes[k + 1:]) for k in range(len(sizes))]
    static = all(isinstance(d, int) for d in sizes + strides + b)
    if static and all(v.name in e.g.constants for v in idx):
        flat = np.zeros(b, np.int64)
        for v, size, st in zip(idx, sizes, strides):
            i = e.g.constants[v.name].to(torch.int64).numpy()
            flat = flat + np.where(i < 0, i + size, i) * st
        fi = e.const(flat, f"{n.name}.flat_index")
    else:
        fi = None
        for v, t, size, st in zip(idx, ins[1:], sizes, strides):
            i = _idx(e, v, t)
            if not (v.name in e.g.constants and (e.g.constants[v.name] >= 0).all()):
                i = e.emit("Where", [e.emit("Less", [i, e.i64(0)]),
                                     e.emit("Add", [i, e.scalar_dim(size)]), i])
            term = i if st == 1 else e.emit("Mul", [i, e.scalar_dim(st)])
            fi = term if fi is None else e.emit("Add", [fi, term])
        fi = e.emit("Expand", [fi, e.dims(b)])
    y = e.emit("Gather", [xt, fi], axis=0)
    first = axes[0]
    if axes == list(range(first, first + len(axes))) and first > 0:
        nb = len(b)
        lead = list(range(nb, nb + first))
        y = e.emit("Transpose", [y], perm=lead + list(range(nb)) +
                   list(range(nb + first, nb + len(others))))
    return y


@_reg("softmax", "log_softmax")
def _softmax(e, n, ins):
    return e.emit("Softmax" if n.op == "softmax" else "LogSoftmax", ins,
                  axis=int(n.attrs["axis"]))


@_reg("cumsum")
def _cumsum(e, n, ins):
    return e.emit("CumSum", [ins[0], e.i64(int(n.attrs["axis"]))])


_RED = {"sum": "ReduceSum", "mean": "ReduceMean", "amax": "ReduceMax", "amin": "ReduceMin",
        "prod": "ReduceProd"}


def _axes_of(n):
    ax = n.attrs.get("axes")
    return list(range(len(n.inputs[0].shape))) if ax is None else list(ax)


@_reg(*_RED)
def _reduce(e, n, ins):
    return e.emit(_RED[n.op], [ins[0], e.i64(_axes_of(n))], keepdims=int(bool(n.attrs["keepdim"])))


@_reg("var")
def _var(e, n, ins):
    x = n.inputs[0]
    axes = _axes_of(n)
    cnt = 1
    for a in axes:
        cnt *= int(x.shape[a])
    m = e.emit("ReduceMean", [ins[0], e.i64(axes)], keepdims=1)
    d = e.emit("Sub", [ins[0], m])
    s = e.emit("ReduceSum", [e.emit("Mul", [d, d]), e.i64(axes)],
               keepdims=int(bool(n.attrs["keepdim"])))
    return e.emit("Div", [s, e.f32(max(cnt - float(n.attrs["correction"]), 0.0))])


@_reg("argmax")
def _argmax(e, n, ins):
    return e.emit("ArgMax", ins, axis=int(n.attrs["axis"]), keepdims=int(bool(n.attrs["keepdim"])))


@_reg("reshape")
def _reshape(e, n, ins):
    y = e.emit("Reshape", [ins[0], e.dims(list(n.outputs[0].shape))])
    return e.requant_like(y, n.inputs[0]) if n.outputs[0].quant is None else y


@_reg("permute")
def _permute(e, n, ins):
    y = e.emit("Transpose", ins, perm=[p % len(n.inputs[0].shape) for p in n.attrs["perm"]])
    return e.requant_like(y, n.inputs[0]) if n.outputs[0].quant is None else y


@_reg("expand")
def _expand(e, n, ins):
    shape = [1 if d == -1 else d for d in n.attrs["shape"]]
    y = e.emit("Expand", [ins[0], e.dims(shape)])
    return e.requant_like(y, n.inputs[0]) if n.outputs[0].quant is None else y


@_reg("slice")
def _slice(e, n, ins):
    a = n.attrs
    end = a["end"]
    end = _I64_MAX if isinstance(end, int) and end >= 2 ** 62 else end
    return e.emit("Slice", [ins[0], e.scalar_dim(a["start"]), e.scalar_dim(end),
                            e.i64([int(a["axis"])]), e.i64([int(a["step"])])])


@_reg("select")
def _select(e, n, ins):
    idx = n.attrs["index"]
    i = e.const(np.asarray(idx, np.int64), "index") if isinstance(idx, int) else \
        e.emit("Squeeze", [e.scalar_dim(idx), e.i64([0])])
    return e.emit("Gather", [ins[0], i], axis=int(n.attrs["axis"]))


@_reg("concat")
def _concat(e, n, ins):
    dt = n.outputs[0].dtype
    return e.emit("Concat", [_cast_to(e, x, v, dt) for x, v in zip(ins, n.inputs)],
                  axis=int(n.attrs["axis"]))


@_reg("tile")
def _tile(e, n, ins):
    reps = list(n.attrs["repeats"])
    rank = len(n.inputs[0].shape)
    x = ins[0]
    if len(reps) > rank:
        x = e.emit("Reshape", [x, e.dims([1] * (len(reps) - rank) + list(n.inputs[0].shape))])
    reps = [1] * (rank - len(reps)) + reps
    return e.emit("Tile", [x, e.i64(reps)])


@_reg("tril", "triu")
def _trilu(e, n, ins):
    return e.emit("Trilu", [ins[0], e.i64(int(n.attrs["diagonal"]))], upper=int(n.op == "triu"))


@_reg("pad")
def _pad(e, n, ins):
    pads = list(n.attrs["pads"])
    rank = len(n.inputs[0].shape)
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pads) // 2):
        begin[rank - 1 - i], end[rank - 1 - i] = pads[2 * i], pads[2 * i + 1]
    mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge",
            "circular": "wrap"}[n.attrs["mode"]]
    args = [ins[0], e.i64(begin + end)]
    if mode == "constant":
        dt = torch.empty((), dtype=to_torch_dtype(n.inputs[0].dtype)).numpy().dtype
        args.append(e.const(np.asarray(n.attrs["value"], dt), "pad_value"))
    return e.emit("Pad", args, mode=mode)


@_reg("arange")
def _arange(e, n, ins):
    a = n.attrs
    dt = a["dtype"]
    if dt.startswith("float"):
        st = e.emit("Cast", [e.emit("Squeeze", [e.scalar_dim(a["start"])])], to=_elem(dt))
        en = e.emit("Cast", [e.emit("Squeeze", [e.scalar_dim(a["end"])])], to=_elem(dt))
        sp = e.const(np.asarray(a["step"], np.float32 if dt == "float32" else np.float64))
        return e.emit("Range", [st, en, sp])
    st = e.emit("Squeeze", [e.scalar_dim(a["start"])])
    en = e.emit("Squeeze", [e.scalar_dim(a["end"])])
    r = e.emit("Range", [st, en, e.const(np.asarray(a["step"], np.int64))])
    return r if dt == "int64" else e.emit("Cast", [r], to=_elem(dt))


@_reg("full")
def _full(e, n, ins):
    a = n.attrs
    t = torch.full((1,), a["value"], dtype=to_torch_dtype(a["dtype"]))
    if a["dtype"] == "bfloat16":
        return e.emit("Cast", [e.emit("ConstantOfShape", [e.dims(list(a["shape"]))],
                                      value=e.onnx.numpy_helper.from_array(t.float().numpy()))],
                      to=_elem("bfloat16"))
    return e.emit("ConstantOfShape", [e.dims(list(a["shape"]))],
                  value=e.onnx.numpy_helper.from_array(t.numpy()))


@_reg("shape_of")
def _shape_of(e, n, ins):
    ax = n.attrs.get("axis")
    if ax is None:
        return e.emit("Shape", ins)
    ax %= len(n.inputs[0].shape)
    return e.emit("Squeeze", [e.emit("Shape", ins, start=ax, end=ax + 1), e.i64([0])])


@_reg("hadamard")
def _hadamard(e, n, ins):
    """x·(I ⊗ H) along the last axis (QuaRot's online rotation) as a constant MatMul on
    chunks of ``size``: reshape [..., d/size, size] · H (or Hᵀ) → [..., d]."""
    from qcompile.hadamard import hadamard_matrix
    x = n.inputs[0]
    size = int(n.attrs["size"])
    H = hadamard_matrix(size, torch.float64)
    if n.attrs.get("transpose"):
        H = H.T
    Hc = e.const(H.to(torch.float32).contiguous().numpy(), f"hadamard{size}")
    d = x.shape[-1]
    if d == size:
        return e.emit("MatMul", [ins[0], Hc])
    lead = list(x.shape[:-1])
    y = e.emit("Reshape", [ins[0], e.dims(lead + [int(d) // size, size])])
    y = e.emit("MatMul", [y, Hc])
    return e.emit("Reshape", [y, e.dims(list(x.shape))])


#: the additive value a boolean attention mask becomes where it is False when the export
#: decomposes attention itself (``onnx``): finite (no -inf for QDQ calibration, no Where for
#: NPUs), and exp(−1e4) underflows to 0 in fp32. (``npu`` decomposes before calibration, with
#: ``decompose_attention``'s −50, which keeps a 16-bit grid on the scores.)
MASK_FILL = -1.0e4
#: fused IR ops the export writes as the primitives they stand for (no opset-21 op for them)
_DECOMPOSED = ("attention", "rms_norm", "rotary", "silu")


def _decomposed(graph: Graph) -> Graph:
    """``graph``, or a copy with attention (``decompose_attention``), RMSNorm, rotary and SiLU
    (``decompose_fused``) written as primitive ops: one lowering of each, shared with the
    ``npu`` pipeline. Node names and provenance carry over (``<node>.<op>``)."""
    if not any(n.op in _DECOMPOSED for n in graph.nodes):
        return graph
    from qcompile.passes.decompose_attention import decompose_attention
    from qcompile.passes.decompose_fused import decompose_fused
    g = graph.clone()
    decompose_attention(g, mask_value=MASK_FILL)
    return decompose_fused(g)


def _qdq_elem(n: Node) -> tuple[int, int]:
    """(ONNX element type, bits) of an explicit quantize/dequantize node's ``format``."""
    from qcompile.ir.quant import int_range
    lo, hi = int_range(n.attrs["format"])
    bits, signed = (hi - lo + 1).bit_length() - 1, lo < 0
    if (bits, signed) not in _QDQ_TYPES:
        raise BackendError(f"{n.attrs['format']} codes have no ONNX QuantizeLinear type",
                           node=n, hint="use int4/uint4, int8/uint8 or int16/uint16")
    return getattr(_tp(), _QDQ_TYPES[(bits, signed)]), bits


def _block(n: Node) -> dict:
    return {"block_size": int(n.attrs["block_size"])} if n.attrs["block_size"] else {}


@_reg("quantize")
def _quantize(e, n, ins):
    elem, bits = _qdq_elem(n)
    q = e.emit("QuantizeLinear", [x for x in ins if x], axis=int(n.attrs["axis"]),
               output_dtype=elem, **_block(n))
    # the IR holds codes as int8/uint8, int16, or int32 for uint16 (int_code_dtype)
    return e.emit("Cast", [q], to=_elem(n.outputs[0].dtype)) if bits == 16 and \
        n.outputs[0].dtype == "int32" else q


@_reg("dequantize")
def _dequantize(e, n, ins):
    elem, bits = _qdq_elem(n)
    codes = ins[0]
    if n.inputs[0].dtype == "int32":  # uint16 codes held in int32
        codes = e.emit("Cast", [codes], to=elem)
    zp = [x for x in ins[2:] if x]
    if zp and n.inputs[2].dtype == "int32":
        zp = [e.emit("Cast", zp, to=elem)]
    return e.emit("DequantizeLinear", [codes, ins[1]] + zp, axis=int(n.attrs["axis"]),
                  **_block(n))


def export(graph: Graph, *, target: str = "onnx", static: bool = False,
           weight_only_int4: str = "matmulnbits", bias_int32: bool = True,
           check: bool = True) -> Exported:
    """``graph`` as an ONNX model (opset 21). ``static``: refuse symbolic input sizes (NPU
    runtimes need static shapes); ``weight_only_int4``: ``"matmulnbits"`` writes int4
    weight-only linears as ``com.microsoft.MatMulNBits``, ``"qdq"`` as an int4
    DequantizeLinear feeding Gemm; ``bias_int32``: biases of linears with static input and
    weight scales as int32 at ``s_x·s_w``. The model passes ``onnx.checker``."""
    try:
        import onnx
    except ImportError as e:
        raise ConfigError(f"exporting ONNX needs the 'onnx' package ({e})",
                          hint="pip install 'qcompile[onnx]'") from None
    if weight_only_int4 not in ("matmulnbits", "qdq"):
        raise ConfigError(f"weight_only_int4 must be 'matmulnbits' or 'qdq', got "
                          f"{weight_only_int4!r}")
    check_exportable(graph, target)
    graph = _decomposed(graph)
    ex = _Exporter(graph, static=static, weight_only_int4=weight_only_int4,
                   bias_int32=bias_int32, target=target)
    model = ex.run()
    if check:
        try:
            onnx.checker.check_model(model, full_check=not ex._sym)
        except onnx.checker.ValidationError as err:
            raise BackendError(f"the exported ONNX model does not pass onnx.checker: {err}",
                               hint="please report this with the model") from None
    return Exported(model, ex.origin, ex.codes)
