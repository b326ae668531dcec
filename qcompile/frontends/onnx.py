"""Capture an ONNX model (plain, QDQ-quantized or with MatMulNBits) into the qcompile IR."""
from __future__ import annotations

import ast
import operator
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
import sympy
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import CaptureError, QCompileError, UnsupportedOpError, VerificationError
from qcompile.ir.graph import Graph, Provenance, Value
from qcompile.ir.ops._infer import broadcast_shapes
from qcompile.ir.quant import Granularity, QuantSpec
from qcompile.ir.registry import get_schema
from qcompile.ir.types import TensorType, dim_expr, dims_equal, is_float, make_dim, numel, to_torch_dtype

__all__ = ["capture_onnx"]

MIN_OPSET, MAX_OPSET = 13, 21
_FOLD_LIMIT = 1 << 16  # largest tensor the import-time evaluator computes with numpy
_BIG = 2 ** 62  # slice bounds beyond this mean "to the end"

_IR_DTYPE = {
    TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
    TensorProto.INT16: "int16", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8",
    TensorProto.BOOL: "bool",
}
# integer storage dtypes of quantized codes -> qcompile format names
_QFORMAT = {"int8": "int8", "uint8": "uint8", "int4": "int4", "uint4": "uint4",
            "float8_e4m3fn": "fp8_e4m3", "float8_e5m2": "fp8_e5m2"}
_FLOAT_Q = ("fp8_e4m3", "fp8_e5m2")  # float codes: x / s cast with saturation, no zero point
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')
_TORCH_DIR = os.path.dirname(torch.__file__)


def capture_onnx(model, *, dynamic_dims: bool = True) -> Graph:
    """Import ``model`` (an ``onnx.ModelProto``, a path to an ``.onnx`` file, or its bytes).

    Symbolic input dims (``dim_param``) stay symbolic; with ``dynamic_dims=False`` every input
    dim must be static. Shape computations (``Shape -> Gather -> Concat -> Reshape``) are
    evaluated at import time over the IR's symbolic dims.
    """
    proto, where = _load(model)
    return _Importer(proto, where, dynamic_dims).run()


# -- loading ------------------------------------------------------------------------------
def _load(model) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        where, parse = f"<ModelProto {model.graph.name}>", lambda: model
    elif isinstance(model, (bytes, bytearray, memoryview)):
        where, parse = "<bytes>", lambda: onnx.load_model_from_string(bytes(model))
    elif isinstance(model, (str, os.PathLike)):
        where = os.fspath(model)
        if not os.path.isfile(where):
            raise CaptureError(f"ONNX file '{where}' does not exist")
        parse = lambda: onnx.load(where)  # noqa: E731
    else:
        raise CaptureError(f"capture_onnx takes an onnx.ModelProto, a path or bytes, "
                           f"got {type(model).__name__}")
    try:
        proto = parse()
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise CaptureError(f"cannot read ONNX model {where}: {type(e).__name__}: {e}",
                           hint="the file may be truncated or not an ONNX model; re-export it") from e
    _check_complete(proto, where)
    return proto, where


def _check_complete(proto: onnx.ModelProto, where: str) -> None:
    """A file cut at a field boundary parses without error; its outputs then lack producers."""
    g = proto.graph
    defined = {v.name for v in g.input} | {t.name for t in g.initializer}
    defined |= {o for n in g.node for o in n.output}
    missing = [o.name for o in g.output if o.name not in defined]
    if not g.output or missing:
        raise CaptureError(f"ONNX model {where} is incomplete: graph outputs {missing or '(none)'} "
                           "are produced by no node", hint="the file may be truncated; re-export it")


def _default_opset(proto: onnx.ModelProto, where: str) -> int:
    versions = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    v = versions.get("ai.onnx")
    if v is None or not MIN_OPSET <= v <= MAX_OPSET:
        raise CaptureError(f"ONNX model {where} uses default-domain opset {v}; the ONNX frontend "
                           f"supports opsets {MIN_OPSET}-{MAX_OPSET}",
                           hint=f"re-export with opset_version in {MIN_OPSET}..{MAX_OPSET} or "
                           "convert it with onnx.version_converter.convert_version")
    return v


# -- numpy helpers for known values -------------------------------------------------------
class _NoFold(Exception):
    """The import-time evaluator declines a node; it becomes IR nodes instead."""


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    name = arr.dtype.name
    if name in ("int4", "uint4"):  # ml_dtypes storage types: widen to a torch byte type
        arr = arr.astype(np.int8 if name == "int4" else np.uint8)
    elif name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16).copy(order="C")).view(torch.bfloat16)
    elif arr.dtype == object:
        raise CaptureError("internal: a symbolic shape value cannot be a constant")
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = arr.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    return torch.from_numpy(arr)


def _is_symbolic(arr: np.ndarray) -> bool:
    return arr.dtype == object


def _elem(e):
    """Normalise one element of a symbolic array: ints stay ints, exprs become sympy."""
    if isinstance(e, (bool, np.bool_)):
        raise _NoFold()
    if isinstance(e, (int, np.integer)):
        return int(e)
    if isinstance(e, sympy.Basic):
        if e.is_Integer:
            return int(e)
        if isinstance(e, sympy.Expr):
            return e
    raise _NoFold()


def _normalize(arr) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != object:
        return arr
    flat = [_elem(e) for e in arr.reshape(-1)]
    if all(isinstance(e, int) for e in flat):
        return np.array(flat, dtype=np.int64).reshape(arr.shape)
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(arr.shape)


def _dims_array(dims) -> np.ndarray:
    return _normalize(np.array([d if isinstance(d, int) else dim_expr(d) for d in dims] or [],
                               dtype=object))


def _as_dim(e):
    if isinstance(e, (int, np.integer)):
        return int(e)
    return make_dim(e)


def _sym_div(a, b):
    """Integer division of dims; exact quotients stay exact so that shapes still match."""
    if isinstance(a, int) and isinstance(b, int):
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    e = sympy.cancel(sympy.sympify(a) / sympy.sympify(b))
    return e if sympy.fraction(e)[1] == 1 else sympy.floor(e)


def _objwise(fn, *arrs):
    return np.frompyfunc(fn, len(arrs), 1)(*arrs)


def _cmp(fn):
    def run(a, b):
        r = fn(a, b)
        if isinstance(r, (bool, np.bool_)) or r in (sympy.true, sympy.false):
            return bool(r)
        raise _NoFold()  # a relation over symbols has no known truth value
    return run


def _binary_np(np_fn, obj_fn, boolean: bool = False):
    def fold(a, b):
        if _is_symbolic(a) or _is_symbolic(b):
            out = _objwise(obj_fn, a, b)
            return out.astype(bool) if boolean else out
        return np_fn(a, b)
    return fold


def _np_div(a, b):
    if _is_symbolic(a) or _is_symbolic(b):
        return _objwise(_sym_div, a, b)
    if np.issubdtype(a.dtype, np.integer):
        q = np.abs(a) // np.abs(b)
        return np.where((a >= 0) == (b >= 0), q, -q).astype(a.dtype)
    return (a / b).astype(a.dtype)


_NP_BINARY = {
    "Add": _binary_np(np.add, operator.add), "Sub": _binary_np(np.subtract, operator.sub),
    "Mul": _binary_np(np.multiply, operator.mul), "Div": _np_div,
    "Equal": _binary_np(np.equal, _cmp(operator.eq), True),
    "Less": _binary_np(np.less, _cmp(operator.lt), True),
    "LessOrEqual": _binary_np(np.less_equal, _cmp(operator.le), True),
    "Greater": _binary_np(np.greater, _cmp(operator.gt), True),
    "GreaterOrEqual": _binary_np(np.greater_equal, _cmp(operator.ge), True),
    "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor,
}


def _guard(n: Any) -> None:
    if not isinstance(n, (int, np.integer)) or n > _FOLD_LIMIT:
        raise _NoFold()


def _static(arr: np.ndarray, what: str, n: "_Node") -> list[int]:
    """Plain ints from a known array; symbolic entries are refused with a clear message."""
    vals = [_elem(e) if _is_symbolic(arr) else e for e in arr.reshape(-1).tolist()]
    if not all(isinstance(v, (int, float)) for v in vals):
        raise UnsupportedOpError(f"the {what} of {n.describe()} depends on symbolic sizes "
                                 f"{[str(v) for v in vals]}; qcompile needs it static",
                                 hint="export with static shapes for that part of the model")
    return [int(v) for v in vals]


# -- one ONNX node, as the handlers see it -----------------------------------------------
@dataclass
class _Node:
    proto: onnx.NodeProto
    index: int
    op: str
    domain: str
    name: str
    inputs: list
    outputs: list
    attrs: dict
    prov: Provenance

    def describe(self) -> str:
        dom = f"{self.domain}::" if self.domain else ""
        return f"ONNX node '{self.name}' ({dom}{self.op})"

    def input(self, i: int) -> str:
        return self.inputs[i] if i < len(self.inputs) else ""


def _attr_value(a: onnx.AttributeProto):
    v = helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [x.decode() for x in v]
    return v


def _provenance(node: onnx.NodeProto, index: int) -> Provenance:
    origin = node.name or f"{node.op_type}#{index}"
    meta = {p.key: p.value for p in node.metadata_props}
    module = origin
    try:  # torch.onnx records the module path of every node: prefer it
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        if len(scopes) >= 2 and scopes[-2]:
            module = scopes[-2]
    except (ValueError, SyntaxError):
        pass
    source = code = None
    frames = [f for f in _FRAME.findall(meta.get("pkg.torch.onnx.stack_trace", ""))
              if not f[0].startswith(_TORCH_DIR)]
    if frames:
        source, code = f"{frames[-1][0]}:{frames[-1][1]}", frames[-1][3].strip()
    return Provenance(module=module, source=source, code=code, origin=origin)


@dataclass
class _QWeight:
    """How a constant came out of a DequantizeLinear: enough to build its QuantSpec."""

    format: str
    granularity: Granularity
    axis: int | None
    block_size: int
    scale: str
    zero_point: str | None


# -- the importer -------------------------------------------------------------------------
class _Importer:
    def __init__(self, proto: onnx.ModelProto, where: str, dynamic_dims: bool):
        self.proto = proto
        self.where = where
        self.dynamic = dynamic_dims
        self.opset = _default_opset(proto, where)
        self.graph = Graph(proto.graph.name or "main")
        self.values: dict[str, Value] = {}  # ONNX name -> IR value
        self.known: dict[str, np.ndarray] = {}  # ONNX name -> value known at import time
        self.qweights: dict[str, _QWeight] = {}  # known float weights that were dequantized
        self.names_of: dict[int, int] = {}  # IR value id -> how many ONNX names it carries
        self.sym_src: dict[str, tuple[Value, int]] = {}  # symbol -> (graph input, axis)
        self.skip: set[int] = set()  # indices of nodes imported as part of a fused pattern
        self.display: dict[str, str] = {}  # synthetic known value -> its IR name
        self.transposes: dict[str, str] = {}  # known weight -> its transposed synthetic value
        self.nodes = list(proto.graph.node)
        self.consumers: dict[str, list[int]] = {}  # ONNX name -> indices of reading nodes
        for index, node in enumerate(self.nodes):
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(index)
        self.graph_outputs = {o.name for o in proto.graph.output}
        self.cur: _Node | None = None

    def run(self) -> Graph:
        g = self.proto.graph
        if g.sparse_initializer:
            raise UnsupportedOpError(f"ONNX model {self.where} has sparse initializers",
                                     hint="densify them before import")
        for t in g.initializer:
            try:
                self.known[t.name] = numpy_helper.to_array(t)
            except Exception as e:  # external data that was not loaded, a bad raw buffer
                raise CaptureError(f"initializer '{t.name}' of {self.where} cannot be read: {e}",
                                   hint="load the model from its path so that external data "
                                   "files are found next to it") from e
        self._inputs(g)
        for index, node in enumerate(self.nodes):
            if index not in self.skip:
                self._import(index, node)
        self.graph.outputs = [self._output(o.name) for o in g.output]
        self.graph.remove_dead()  # shape computations that folded away leave dead nodes
        return self.graph

    def _output(self, name: str) -> Value:
        """Graph outputs keep their ONNX names, also where an op was a no-op alias."""
        v = self.value(name)
        if v.name == name:
            return v
        return self.graph.add_node("identity", [v], name=name,
                                   provenance=Provenance(module=name, origin="graph output")).output

    # -- inputs -----------------------------------------------------------------------
    def _inputs(self, g: onnx.GraphProto) -> None:
        for vi in g.input:
            if vi.name in self.known:
                continue  # an initializer listed as an input (IR < 4): a constant
            if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
                raise CaptureError(f"graph input '{vi.name}' of {self.where} is not a tensor of "
                                   "known rank", hint="give the input a shape when exporting")
            tt = vi.type.tensor_type
            dtype = self._ir_dtype(tt.elem_type, f"graph input '{vi.name}'")
            dims = [self._input_dim(vi.name, k, d) for k, d in enumerate(tt.shape.dim)]
            v = self.graph.add_input(vi.name, TensorType(tuple(dims), dtype))
            self._bind_value(vi.name, v)
            for k, d in enumerate(dims):
                if isinstance(d, str):
                    self.sym_src.setdefault(d, (v, k))

    def _input_dim(self, name: str, k: int, d) -> Any:
        if d.HasField("dim_value") and d.dim_value >= 0:
            return int(d.dim_value)
        if not self.dynamic:
            raise CaptureError(f"dim {k} of graph input '{name}' is not static "
                               f"({d.dim_param or 'unknown'}) and dynamic_dims=False",
                               hint="pass dynamic_dims=True, or fix the input shapes of the model")
        return _symbol(d.dim_param or f"{name}_dim{k}")

    def _ir_dtype(self, elem_type: int, what: str) -> str:
        if elem_type not in _IR_DTYPE:
            raise UnsupportedOpError(f"{what} has ONNX type {TensorProto.DataType.Name(elem_type)}, "
                                     f"which the IR does not support",
                                     hint=f"supported: {', '.join(sorted(set(_IR_DTYPE.values())))}")
        return _IR_DTYPE[elem_type]

    # -- nodes ------------------------------------------------------------------------
    def _import(self, index: int, proto: onnx.NodeProto) -> None:
        domain = "" if proto.domain in ("", "ai.onnx") else proto.domain
        n = _Node(proto, index, proto.op_type, domain, proto.name or f"{proto.op_type}#{index}",
                  list(proto.input), list(proto.output),
                  {a.name: _attr_value(a) for a in proto.attribute}, _provenance(proto, index))
        self.cur = n
        try:
            if not domain and self._fold(n):
                return
            handler = _HANDLERS.get((domain, n.op))
            if handler is None:
                raise UnsupportedOpError(
                    f"ONNX op '{n.op}' (domain '{domain or 'ai.onnx'}') of node '{n.name}' is not "
                    "supported by the qcompile ONNX frontend",
                    hint="decompose it into standard ONNX ops before import")
            self._bind(n, handler(self, n))
        except VerificationError as e:
            raise CaptureError(f"importing {n.describe()} failed: {e}") from e
        except QCompileError:
            raise
        except Exception as e:  # a bug or an unforeseen model: name the node, keep the cause
            raise CaptureError(f"importing {n.describe()} failed: {type(e).__name__}: {e}") from e

    def _fold(self, n: _Node) -> bool:
        """Evaluate shape computations and small constant expressions with numpy."""
        fn = _FOLD.get(n.op)
        if fn is None:
            return False
        present = [i for i in n.inputs if i]
        if n.op not in ("Shape", "Size"):
            if any(i not in self.known or i in self.qweights for i in present):
                return False
            if any(self.known[i].size > _FOLD_LIMIT for i in present):
                return False
        ins = [self.known.get(i) if i else None for i in n.inputs]
        try:
            outs = [_normalize(o) for o in fn(self, n, ins)]
        except _NoFold:
            return False
        except Exception:  # numpy refused (bad indices, symbolic compare): import as IR
            return False
        if any(o.size > _FOLD_LIMIT for o in outs):
            return False
        for name, arr in zip(n.outputs, outs):
            if name:
                self.known[name] = arr
        return True

    def _bind(self, n: _Node, result) -> None:
        outs = result if isinstance(result, (list, tuple)) else [result]
        for i, name in enumerate(n.outputs):
            if not name:
                continue
            if i < len(outs) and outs[i] is not None:
                if isinstance(outs[i], np.ndarray):
                    self.known[name] = outs[i]
                else:
                    self._bind_value(name, outs[i])
            elif name not in self.values and self._used(name):
                raise UnsupportedOpError(f"output {i} ('{name}') of {n.describe()} is used, but "
                                         "the ONNX frontend imports only the op's main outputs")

    def _bind_value(self, name: str, v: Value) -> None:
        self.values[name] = v
        self.names_of[id(v)] = self.names_of.get(id(v), 0) + 1

    def _used(self, name: str) -> bool:
        return name in self.graph_outputs or any(
            c not in self.skip for c in self.consumers.get(name, []))

    # -- values -----------------------------------------------------------------------
    def value(self, name: str) -> Value:
        v = self.values.get(name)
        if v is None:
            if name not in self.known:
                raise CaptureError(f"value '{name}' is used before it is defined",
                                   hint="the model's nodes are not in topological order, or "
                                   "the file is incomplete")
            v = self._materialize(name)
            self._bind_value(name, v)
        return v

    def v(self, n: _Node, i: int) -> Value | None:
        """IR value of input i (``None`` when the optional input is absent)."""
        name = n.input(i)
        return self.value(name) if name else None

    def k(self, n: _Node, i: int, what: str, optional: bool = False) -> np.ndarray | None:
        """The import-time value of input i, which must be known (a constant or a shape)."""
        name = n.input(i)
        if not name:
            if optional:
                return None
            raise CaptureError(f"{n.describe()} lacks its {what} (input {i})")
        if name not in self.known:
            raise UnsupportedOpError(
                f"input {i} ('{name}', the {what}) of {n.describe()} is computed at run time; "
                "qcompile needs it at import time", hint="it must be a constant, or computed "
                "from tensor shapes (Shape, Gather, Concat, ...), so that shapes stay static or "
                "symbolic")
        return self.known[name]

    def shape(self, name: str) -> tuple:
        if name in self.values:
            return self.values[name].shape
        if name in self.known:
            return tuple(self.known[name].shape)
        return self.value(name).shape

    def dtype(self, name: str) -> str:
        if name in self.values:
            return self.values[name].dtype
        return _np_ir_dtype(self.known[name])

    def constant(self, name: str, arr, quant: QuantSpec | None = None) -> Value:
        t = arr if isinstance(arr, torch.Tensor) else _to_torch(np.asarray(arr))
        return self.graph.add_constant(name, t, quant=quant)

    def _materialize(self, name: str) -> Value:
        arr = self.known[name]
        display = self.display.get(name, name)
        if name in self.qweights:
            return self.constant(display, arr, self._spec(self.qweights[name], np.ndim(arr)))
        if _is_symbolic(arr):
            return self._materialize_dims(name, arr)
        return self.constant(display, arr)

    def _materialize_dims(self, name: str, arr: np.ndarray) -> Value:
        """A shape vector with symbolic entries: computed from the inputs' run-time shapes."""
        n = self.cur
        parts = [self._dim_scalar(n, e) for e in arr.reshape(-1)]
        if arr.ndim == 0:
            return parts[0]
        parts = [self.tmp(n, "reshape", p, shape=[1]) for p in parts]
        v = self.tmp(n, "concat", *parts, axis=0) if len(parts) > 1 else parts[0]
        return self.tmp(n, "reshape", v, shape=list(arr.shape)) if arr.ndim != 1 else v

    def _dim_scalar(self, n: _Node, e) -> Value:
        if isinstance(e, int):
            return self.constant("dim", torch.tensor(e, dtype=torch.int64))
        if e.is_Symbol and e.name in self.sym_src:
            src, axis = self.sym_src[e.name]
            return self.tmp(n, "shape_of", src, axis=axis)
        # any other size expression: the IR evaluates dims of `full`, then we read it back
        ones = self.tmp(n, "full", shape=[make_dim(e)], value=False, dtype="bool")
        return self.tmp(n, "shape_of", ones, axis=0)

    # -- emitting IR nodes -------------------------------------------------------------
    def _emit(self, n: _Node, op: str, ins, attrs: dict, name: str) -> Value:
        return self.graph.add_node(op, list(ins), attrs, name=name, provenance=n.prov).output

    def out(self, n: _Node, op: str, *ins, **attrs) -> Value:
        """The node producing the ONNX node's (first) output, named after it."""
        return self._emit(n, op, ins, attrs, n.outputs[0])

    def tmp(self, n: _Node, op: str, *ins, **attrs) -> Value:
        """A helper node inside the mapping of one ONNX node."""
        return self._emit(n, op, ins, attrs, f"{n.outputs[0]}_{op}")

    def exclusive(self, name: str, consumer: int) -> bool:
        """Is ``name`` an IR node output read only by ``consumer`` (so it may be annotated)?"""
        v = self.values.get(name)
        return (v is not None and v.producer is not None and v.quant is None
                and name not in self.graph_outputs and self.names_of.get(id(v)) == 1
                and self.consumers.get(name, []) == [consumer])

    # -- quantized weights -------------------------------------------------------------
    def _spec(self, q: _QWeight, rank: int) -> QuantSpec:
        zp = self.value(q.zero_point).name if q.zero_point and q.format not in _FLOAT_Q else None
        axis = q.axis
        if q.granularity == Granularity.PER_CHANNEL:  # ONNX names the channel axis; the spec
            rest = tuple(i for i in range(rank) if i != q.axis)  # names the axes sharing a scale
            axis = rest[0] if len(rest) == 1 else rest
        return QuantSpec(format=q.format, granularity=q.granularity, axis=axis,
                         group_size=q.block_size or None, scale=self.value(q.scale).name,
                         zero_point=zp)

    def synthetic(self, display: str, arr: np.ndarray) -> str:
        """A known value the importer made up; ``display`` names its IR constant."""
        key = f"\0{len(self.display)}:{display}"  # cannot clash with an ONNX name
        self.known[key] = arr
        self.display[key] = display
        return key

    def transposed(self, name: str) -> str:
        """Known 2-D ``name`` transposed, its quantization moved to the transposed axes."""
        if name not in self.transposes:
            key = self.synthetic(name, self.known[name].T)
            q = self.qweights.get(name)
            if q is not None and q.granularity == Granularity.PER_GROUP:  # scales follow
                zp = self.synthetic(f"{name}_zero_point", self.known[q.zero_point].T) \
                    if q.zero_point else None
                scale = self.synthetic(f"{name}_scale", self.known[q.scale].T)
                self.qweights[key] = _QWeight(q.format, q.granularity, 1 - q.axis,
                                              q.block_size, scale, zp)
            elif q is not None:
                axis = None if q.axis is None else 1 - q.axis
                self.qweights[key] = _QWeight(q.format, q.granularity, axis, 0, q.scale,
                                              q.zero_point)
            self.transposes[name] = key
        return self.transposes[name]

    def weight_t(self, name: str) -> Value:
        """Constant ``name`` ([in, out] as MatMul reads it) as linear's [out, in] weight."""
        return self.value(self.transposed(name))


def _np_ir_dtype(arr: np.ndarray) -> str:
    if arr.dtype == object:
        return "int64"
    name = arr.dtype.name
    return {"int4": "int8", "uint4": "uint8", "bool": "bool"}.get(name, name)


def _symbol(name: str) -> str:
    """A dim_param as a sympy-safe symbol name ('N' or 'beta' would parse as functions)."""
    s = re.sub(r"\W", "_", name)
    if not s or s[0].isdigit():
        s = "d_" + s
    try:
        ok = sympy.sympify(s) == sympy.Symbol(s)
    except (sympy.SympifyError, TypeError, ValueError):
        ok = False
    return s if ok else s + "_"


# -- import-time evaluation ("known" values) ------------------------------------------------
_FOLD: dict[str, Callable] = {}


def _folds(*ops):
    def deco(fn):
        for o in ops:
            _FOLD[o] = fn
        return fn
    return deco


@_folds("Constant")
def _f_constant(imp, n, ins):
    a = n.attrs
    for key, conv in (("value", lambda v: v), ("value_float", lambda v: np.float32(v)),
                      ("value_floats", lambda v: np.array(v, np.float32)),
                      ("value_int", lambda v: np.int64(v)),
                      ("value_ints", lambda v: np.array(v, np.int64))):
        if key in a:
            return [np.asarray(conv(a[key]))]
    raise UnsupportedOpError(f"{n.describe()} holds a {sorted(a)} constant; only tensor, "
                             "float(s) and int(s) constants are supported")


@_folds("Shape")
def _f_shape(imp, n, ins):
    dims = list(imp.shape(n.inputs[0]))
    return [_dims_array(dims[n.attrs.get("start", 0):n.attrs.get("end", None)])]


@_folds("Size")
def _f_size(imp, n, ins):
    return [_dims_array([numel(imp.shape(n.inputs[0]))]).reshape(())]


@_folds("Identity", "Dropout")
def _f_identity(imp, n, ins):
    return [ins[0]]


@_folds(*_NP_BINARY)
def _f_binary(imp, n, ins):
    return [_NP_BINARY[n.op](ins[0], ins[1])]


@_folds("Neg", "Abs")
def _f_unary(imp, n, ins):
    return [np.negative(ins[0]) if n.op == "Neg" else np.abs(ins[0])]


@_folds("Not")
def _f_not(imp, n, ins):
    return [np.logical_not(ins[0])]


@_folds("Max", "Min")
def _f_minmax(imp, n, ins):
    fn = np.maximum if n.op == "Max" else np.minimum
    out = ins[0]
    for x in ins[1:]:
        out = fn(out, x)
    return [out]


@_folds("Mod")
def _f_mod(imp, n, ins):
    return [(np.fmod if n.attrs.get("fmod", 0) else np.mod)(ins[0], ins[1])]


@_folds("Where")
def _f_where(imp, n, ins):
    if _is_symbolic(ins[0]):
        raise _NoFold()
    return [np.where(ins[0], ins[1], ins[2])]


@_folds("Cast", "CastLike")
def _f_cast(imp, n, ins):
    to = helper.tensor_dtype_to_np_dtype(n.attrs["to"]) if n.op == "Cast" else ins[1].dtype
    if _is_symbolic(ins[0]):
        if not np.issubdtype(to, np.integer):
            raise _NoFold()
        return [ins[0]]
    return [ins[0].astype(to)]


@_folds("Gather")
def _f_gather(imp, n, ins):
    return [np.take(ins[0], ins[1].astype(np.int64), axis=n.attrs.get("axis", 0))]


@_folds("GatherElements")
def _f_gather_elements(imp, n, ins):
    idx = ins[1].astype(np.int64)
    axis = n.attrs.get("axis", 0) % ins[0].ndim
    idx = np.where(idx < 0, idx + ins[0].shape[axis], idx)
    return [np.take_along_axis(ins[0], idx, axis=axis)]


@_folds("Concat")
def _f_concat(imp, n, ins):
    return [np.concatenate([x for x in ins if x is not None], axis=n.attrs["axis"])]


@_folds("Slice")
def _f_slice(imp, n, ins):
    starts, ends = ins[1].tolist(), ins[2].tolist()
    axes = ins[3].tolist() if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = ins[4].tolist() if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    key = [slice(None)] * ins[0].ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        if isinstance(s, sympy.Basic) or isinstance(e, sympy.Basic):
            raise _NoFold()
        key[a] = slice(s, e, st)
    return [ins[0][tuple(key)]]


def _unsqueeze_shape(shape, axes) -> list:
    rank = len(shape) + len(axes)
    axes = sorted(a % rank for a in axes)
    out, it = [], iter(shape)
    for i in range(rank):
        out.append(1 if i in axes else next(it))
    return out


def _squeeze_shape(shape, axes) -> list:
    if axes is None:
        return [d for d in shape if d != 1]
    axes = {a % len(shape) for a in axes}
    return [d for i, d in enumerate(shape) if i not in axes]


def _axes(imp, n, ins, attr_before: int) -> list[int] | None:
    """Axes as an attribute (opset < attr_before) or as the optional second input."""
    if imp.opset < attr_before:
        return n.attrs.get("axes")
    if len(n.inputs) > 1 and n.inputs[1]:
        arr = ins[1] if ins is not None else imp.k(n, 1, "axes")
        return _static(arr, "axes", n)
    return None


@_folds("Unsqueeze")
def _f_unsqueeze(imp, n, ins):
    return [ins[0].reshape(_unsqueeze_shape(ins[0].shape, _axes(imp, n, ins, 13)))]


@_folds("Squeeze")
def _f_squeeze(imp, n, ins):
    return [ins[0].reshape(_squeeze_shape(ins[0].shape, _axes(imp, n, ins, 13)))]


@_folds("Reshape")
def _f_reshape(imp, n, ins):
    shape = _static(ins[1], "shape", n)
    if not n.attrs.get("allowzero", 0):
        shape = [ins[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [ins[0].reshape(shape)]


@_folds("Flatten")
def _f_flatten(imp, n, ins):
    axis = n.attrs.get("axis", 1)
    axis = axis + ins[0].ndim if axis < 0 else axis
    return [ins[0].reshape(int(np.prod(ins[0].shape[:axis])), -1)]


@_folds("Transpose")
def _f_transpose(imp, n, ins):
    return [np.transpose(ins[0], n.attrs.get("perm"))]


@_folds("Expand")
def _f_expand(imp, n, ins):
    shape = np.broadcast_shapes(ins[0].shape, tuple(_static(ins[1], "shape", n)))
    _guard(int(np.prod(shape)))
    return [np.broadcast_to(ins[0], shape).copy()]


@_folds("Tile")
def _f_tile(imp, n, ins):
    reps = _static(ins[1], "repeats", n)
    _guard(ins[0].size * int(np.prod(reps)))
    return [np.tile(ins[0], reps)]


@_folds("Range")
def _f_range(imp, n, ins):
    if any(_is_symbolic(x) for x in ins):
        raise _NoFold()
    start, limit, delta = (x.item() for x in ins)
    _guard(max(0, int(np.ceil((limit - start) / delta))))
    return [np.arange(start, limit, delta, dtype=ins[0].dtype)]


@_folds("ConstantOfShape")
def _f_constant_of_shape(imp, n, ins):
    if _is_symbolic(ins[0]):
        raise _NoFold()
    shape = [int(d) for d in ins[0].reshape(-1)]
    _guard(int(np.prod(shape)))
    value = n.attrs.get("value", np.zeros(1, np.float32))
    return [np.full(shape, value.reshape(-1)[0], dtype=value.dtype)]


@_folds("Trilu")
def _f_trilu(imp, n, ins):
    k = int(ins[1]) if len(ins) > 1 and ins[1] is not None else 0
    return [(np.triu if n.attrs.get("upper", 1) else np.tril)(ins[0], k)]


@_folds("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin")
def _f_reduce(imp, n, ins):
    axes = _axes(imp, n, ins, 13 if n.op == "ReduceSum" else 18)
    keep = bool(n.attrs.get("keepdims", 1))
    if not axes and n.attrs.get("noop_with_empty_axes", 0):
        return [ins[0]]
    axes = tuple(axes) if axes else None
    fn = {"ReduceProd": np.prod, "ReduceSum": np.sum, "ReduceMax": np.max, "ReduceMin": np.min}
    return [np.asarray(fn[n.op](ins[0], axis=axes, keepdims=keep))]


# -- handlers: ONNX op -> IR ------------------------------------------------------------------
_HANDLERS: dict[tuple[str, str], Callable] = {}


def _handles(*ops, domain: str = ""):
    def deco(fn):
        for o in ops:
            _HANDLERS[(domain, o)] = fn
        return fn
    return deco


_UNARY = {
    "Sqrt": "sqrt", "Reciprocal": "reciprocal", "Exp": "exp", "Log": "log", "Tanh": "tanh",
    "Sigmoid": "sigmoid", "Relu": "relu", "Erf": "erf", "Neg": "neg", "Abs": "abs", "Sin": "sin",
    "Cos": "cos", "Floor": "floor", "Ceil": "ceil", "Round": "round", "Sign": "sign",
    "Not": "logical_not",
}
_BINARY = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Pow": "pow", "Equal": "eq", "Less": "lt",
    "LessOrEqual": "le", "Greater": "gt", "GreaterOrEqual": "ge", "And": "logical_and",
    "Or": "logical_or", "Xor": "logical_xor", "BitwiseAnd": "bitwise_and",
    "BitwiseOr": "bitwise_or", "BitwiseXor": "bitwise_xor",
}
_VARIADIC = {"Max": "maximum", "Min": "minimum", "Sum": "add"}

for _onnx, _ir in _UNARY.items():
    _handles(_onnx)(lambda imp, n, _ir=_ir: imp.out(n, _ir, imp.v(n, 0)))
for _onnx, _ir in _BINARY.items():
    _handles(_onnx)(lambda imp, n, _ir=_ir: imp.out(n, _ir, imp.v(n, 0), imp.v(n, 1)))


@_handles(*_VARIADIC)
def _variadic(imp, n):
    vals = [imp.v(n, i) for i in range(len(n.inputs))]
    acc = vals[0]
    for i, x in enumerate(vals[1:], 2):
        acc = (imp.out if i == len(vals) else imp.tmp)(n, _VARIADIC[n.op], acc, x)
    return acc


@_handles("Div")
def _div(imp, n):
    a, b = imp.v(n, 0), imp.v(n, 1)
    return imp.out(n, "div", a, b, rounding_mode=None if is_float(a.dtype) else "trunc")


@_handles("Mod")
def _mod(imp, n):
    a, b = imp.v(n, 0), imp.v(n, 1)
    if not n.attrs.get("fmod", 0):
        return imp.out(n, "remainder", a, b)
    q = imp.tmp(n, "div", a, b, rounding_mode="trunc")  # C fmod: a - trunc(a / b) * b
    return imp.out(n, "sub", a, imp.tmp(n, "mul", q, b))


@_handles("IsNaN")
def _isnan(imp, n):
    x = imp.v(n, 0)
    return imp.out(n, "ne", x, x)


@_handles("Where")
def _where(imp, n):
    return imp.out(n, "where", imp.v(n, 0), imp.v(n, 1), imp.v(n, 2))


@_handles("Identity", "Dropout")
def _identity(imp, n):
    return imp.v(n, 0)


@_handles("Cast", "CastLike")
def _cast(imp, n):
    x = imp.v(n, 0)
    if n.op == "Cast":
        dtype = imp._ir_dtype(n.attrs["to"], f"the target of {n.describe()}")
    else:
        dtype = imp.dtype(n.inputs[1])
    return x if x.dtype == dtype else imp.out(n, "cast", x, dtype=dtype)


@_handles("LeakyRelu")
def _leaky_relu(imp, n):
    return imp.out(n, "leaky_relu", imp.v(n, 0), negative_slope=n.attrs.get("alpha", 0.01))


@_handles("Gelu")
def _gelu(imp, n):
    return imp.out(n, "gelu", imp.v(n, 0), approximate=n.attrs.get("approximate", "none"))


@_handles("Clip")
def _clip(imp, n):
    x = imp.v(n, 0)
    lo, hi = (n.input(i) for i in (1, 2))
    if is_float(x.dtype) and all(not b or (b in imp.known and imp.known[b].size == 1)
                                 for b in (lo, hi)):
        val = lambda b: float(imp.known[b].reshape(-1)[0]) if b else None  # noqa: E731
        return imp.out(n, "clamp", x, min=val(lo), max=val(hi))
    if lo:
        x = (imp.tmp if hi else imp.out)(n, "maximum", x, imp.value(lo))
    if hi:
        x = imp.out(n, "minimum", x, imp.value(hi))
    return x


@_handles("Softmax", "LogSoftmax")
def _softmax(imp, n):
    op = "softmax" if n.op == "Softmax" else "log_softmax"
    return imp.out(n, op, imp.v(n, 0), axis=n.attrs.get("axis", -1))


# -- linear algebra -----------------------------------------------------------------------------
def _is_weight(imp, name: str) -> bool:
    arr = imp.known.get(name)
    return arr is not None and arr.ndim == 2 and arr.dtype != object and \
        np.issubdtype(arr.dtype, np.floating)


def _bias_add(imp, n: _Node, out_features: int):
    """The Add reading a MatMul's only output with a 1-D constant bias, to fold into linear."""
    out = n.outputs[0]
    users = imp.consumers.get(out, [])
    if out in imp.graph_outputs or len(users) != 1:
        return None, None
    add = imp.nodes[users[0]]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None, None
    other = add.input[1] if add.input[0] == out else add.input[0]
    arr = imp.known.get(other)
    if other == out or arr is None or arr.shape != (out_features,) or other in imp.qweights:
        return None, None
    return users[0], other


@_handles("MatMul")
def _matmul(imp, n):
    a, b = n.inputs
    if not _is_weight(imp, b):
        return imp.out(n, "matmul", imp.v(n, 0), imp.v(n, 1))
    x, w = imp.v(n, 0), imp.weight_t(b)  # y = x @ B = linear(x, Bᵀ)
    add, bias = _bias_add(imp, n, w.shape[0])
    if add is None:
        return imp.out(n, "linear", x, w, None)
    imp.skip.add(add)
    out = imp.nodes[add].output[0]
    imp._bind_value(out, imp._emit(n, "linear", [x, w, imp.value(bias)], {}, out))
    return []


@_handles("Gemm")
def _gemm(imp, n):
    at = n.attrs
    alpha, beta = at.get("alpha", 1.0), at.get("beta", 1.0)
    trans_a, trans_b = at.get("transA", 0), at.get("transB", 0)
    b, c = n.inputs[1], n.input(2)
    if not trans_a and _is_weight(imp, b) and (alpha == 1.0 or b not in imp.qweights):
        out_f = imp.known[b].shape[0 if trans_b else 1]
        if not c or (c in imp.known and imp.known[c].size in (1, out_f)):
            return _gemm_linear(imp, n, out_f)
    x, w = imp.v(n, 0), imp.v(n, 1)
    if trans_a:
        x = imp.tmp(n, "permute", x, perm=[1, 0])
    if trans_b:
        w = imp.tmp(n, "permute", w, perm=[1, 0])
    y = imp.tmp(n, "matmul", x, w) if (c or alpha != 1.0) else imp.out(n, "matmul", x, w)
    if alpha != 1.0:
        s = imp.constant("alpha", torch.tensor(alpha, dtype=to_torch_dtype(y.dtype)))
        y = (imp.tmp if c else imp.out)(n, "mul", y, s)
    if c:
        cv = imp.v(n, 2)
        if beta != 1.0:
            cv = imp.tmp(n, "mul", cv, imp.constant("beta", torch.tensor(
                beta, dtype=to_torch_dtype(cv.dtype))))
        y = imp.out(n, "add", y, cv)
    return y


def _gemm_linear(imp, n, out_f: int) -> Value:
    at = n.attrs
    alpha, beta = at.get("alpha", 1.0), at.get("beta", 1.0)
    b, c = n.inputs[1], n.input(2)
    if alpha != 1.0:
        arr = imp.known[b] * np.float32(alpha)
        w = imp.constant(b, arr if at.get("transB", 0) else np.ascontiguousarray(arr.T))
    else:
        w = imp.v(n, 1) if at.get("transB", 0) else imp.weight_t(b)
    bias = None
    if c:
        arr = imp.known[c]
        if arr.shape == (out_f,) and beta == 1.0:
            bias = imp.value(c)
        else:
            bias = imp.constant(f"{c}_bias", np.broadcast_to(
                (arr * np.asarray(beta, arr.dtype)).reshape(-1), (out_f,)).copy())
    return imp.out(n, "linear", imp.v(n, 0), w, bias)


# -- convolution, normalization, pooling ----------------------------------------------------------
def _pads(n: _Node, nd: int) -> tuple[list[int], list[int]]:
    auto = n.attrs.get("auto_pad", "NOTSET")
    if auto not in ("NOTSET", "VALID"):
        raise UnsupportedOpError(f"auto_pad={auto} of {n.describe()} is not supported",
                                 hint="export with explicit pads (auto_pad=NOTSET)")
    pads = n.attrs.get("pads", [0] * (2 * nd)) if auto == "NOTSET" else [0] * (2 * nd)
    return list(pads[:nd]), list(pads[nd:])


@_handles("Conv")
def _conv(imp, n):
    x, w = imp.v(n, 0), imp.v(n, 1)
    nd = w.type.rank - 2
    if nd not in (1, 2, 3):
        raise UnsupportedOpError(f"{n.describe()} is a {nd}-d convolution; 1-3 d are supported")
    begin, end = _pads(n, nd)
    if begin != end:  # asymmetric: pad explicitly (torch order: last axis first)
        pads = [p for i in reversed(range(nd)) for p in (begin[i], end[i])]
        x = imp.tmp(n, "pad", x, pads=pads)
        begin = [0] * nd
    return imp.out(n, "conv", x, w, imp.v(n, 2), stride=n.attrs.get("strides", [1] * nd),
                   padding=begin, dilation=n.attrs.get("dilations", [1] * nd),
                   groups=n.attrs.get("group", 1))


@_handles("BatchNormalization")
def _batch_norm(imp, n):
    if n.attrs.get("training_mode", 0):
        raise UnsupportedOpError(f"{n.describe()} runs in training mode",
                                 hint="export the model in eval mode")
    x, scale, bias, mean, var = (imp.v(n, i) for i in range(5))
    return imp.out(n, "batch_norm", x, scale, bias, mean, var, eps=n.attrs.get("epsilon", 1e-5))


def _norm_ndim(imp, n, x: Value) -> int:
    return x.type.rank - n.attrs.get("axis", -1) % x.type.rank


@_handles("LayerNormalization")
def _layer_norm(imp, n):
    x, scale, bias = imp.v(n, 0), imp.v(n, 1), imp.v(n, 2)
    k = _norm_ndim(imp, n, x)
    eps = n.attrs.get("epsilon", 1e-5)
    norm = x.shape[x.type.rank - k:]
    fits = lambda v: v is None or (v.type.rank == k and all(  # noqa: E731
        dims_equal(a, b) for a, b in zip(v.shape, norm)))
    if fits(scale) and fits(bias):
        return imp.out(n, "layer_norm", x, scale, bias, normalized_ndim=k, eps=eps)
    y = imp.tmp(n, "layer_norm", x, None, None, normalized_ndim=k, eps=eps)  # broadcast affine
    y = imp.tmp(n, "mul", y, scale) if bias is not None else imp.out(n, "mul", y, scale)
    return imp.out(n, "add", y, bias) if bias is not None else y


@_handles("SimplifiedLayerNormalization", "RMSNormalization")
def _rms_norm(imp, n):
    x = imp.v(n, 0)
    return imp.out(n, "rms_norm", x, imp.v(n, 1), normalized_ndim=_norm_ndim(imp, n, x),
                   eps=n.attrs.get("epsilon", 1e-5))


def _pool_attrs(n: _Node, x: Value) -> dict:
    if x.type.rank != 4:
        raise UnsupportedOpError(f"{n.describe()} pools a rank-{x.type.rank} tensor; only 2-d "
                                 "pooling (NCHW) is supported")
    begin, end = _pads(n, 2)
    if begin != end:
        raise UnsupportedOpError(f"{n.describe()} has asymmetric pads {begin + end}")
    if n.attrs.get("storage_order", 0):
        raise UnsupportedOpError(f"{n.describe()} uses storage_order=1")
    return {"kernel": list(n.attrs["kernel_shape"]), "stride": n.attrs.get("strides", [1, 1]),
            "padding": begin, "dilation": n.attrs.get("dilations", [1, 1]),
            "ceil_mode": bool(n.attrs.get("ceil_mode", 0))}


@_handles("MaxPool")
def _max_pool(imp, n):
    x = imp.v(n, 0)
    return imp.out(n, "max_pool2d", x, **_pool_attrs(n, x))


@_handles("AveragePool")
def _avg_pool(imp, n):
    x = imp.v(n, 0)
    attrs = _pool_attrs(n, x)
    if attrs.pop("dilation") != [1, 1]:
        raise UnsupportedOpError(f"{n.describe()} is a dilated average pool")
    return imp.out(n, "avg_pool2d", x, **attrs,
                   count_include_pad=bool(n.attrs.get("count_include_pad", 0)))


@_handles("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(imp, n):
    x = imp.v(n, 0)
    if n.op == "GlobalAveragePool" and x.type.rank == 4:
        return imp.out(n, "adaptive_avg_pool2d", x, output_size=[1, 1])
    op = "mean" if n.op == "GlobalAveragePool" else "amax"
    return imp.out(n, op, x, axes=list(range(2, x.type.rank)), keepdim=True)


_REDUCE = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "amax", "ReduceMin": "amin",
           "ReduceProd": "prod", "ReduceSumSquare": "sum", "ReduceL1": "sum", "ReduceL2": "sum"}


@_handles(*_REDUCE)
def _reduce(imp, n):
    x = imp.v(n, 0)
    axes = _axes(imp, n, None, 13 if n.op == "ReduceSum" else 18)
    if not axes and n.attrs.get("noop_with_empty_axes", 0):
        return x
    keep = bool(n.attrs.get("keepdims", 1))
    if n.op in ("ReduceSumSquare", "ReduceL2"):
        x = imp.tmp(n, "mul", x, x)
    elif n.op == "ReduceL1":
        x = imp.tmp(n, "abs", x)
    if n.op == "ReduceL2":
        return imp.out(n, "sqrt", imp.tmp(n, "sum", x, axes=axes or None, keepdim=keep))
    return imp.out(n, _REDUCE[n.op], x, axes=axes or None, keepdim=keep)


@_handles("ArgMax", "ArgMin")
def _argmax(imp, n):
    if n.attrs.get("select_last_index", 0):
        raise UnsupportedOpError(f"{n.describe()} uses select_last_index=1")
    x = imp.v(n, 0)
    if n.op == "ArgMin":
        x = imp.tmp(n, "neg", x)
    return imp.out(n, "argmax", x, axis=n.attrs.get("axis", 0),
                   keepdim=bool(n.attrs.get("keepdims", 1)))


@_handles("CumSum")
def _cumsum(imp, n):
    if n.attrs.get("exclusive", 0) or n.attrs.get("reverse", 0):
        raise UnsupportedOpError(f"{n.describe()} is an exclusive or reverse cumsum")
    axis = _static(imp.k(n, 1, "axis"), "axis", n)[0]
    return imp.out(n, "cumsum", imp.v(n, 0), axis=axis)


# -- shape and data movement ----------------------------------------------------------------------
def _reshape(imp, n, x: Value, dims: list) -> Value:
    dims = [_as_dim(d) for d in dims]
    if -1 not in dims and len(dims) == x.type.rank and all(
            dims_equal(a, b) for a, b in zip(dims, x.shape)):
        return x  # a no-op reshape: keep the graph small
    return imp.out(n, "reshape", x, shape=dims)


@_handles("Reshape")
def _reshape_op(imp, n):
    x, shape = imp.v(n, 0), imp.k(n, 1, "target shape")
    dims = list(shape.reshape(-1))
    if not n.attrs.get("allowzero", 0):  # 0 copies the input's dim
        dims = [x.shape[i] if isinstance(d, (int, np.integer)) and d == 0 else d
                for i, d in enumerate(dims)]
    return _reshape(imp, n, x, dims)


@_handles("Flatten")
def _flatten(imp, n):
    x = imp.v(n, 0)
    axis = n.attrs.get("axis", 1)
    axis = axis + x.type.rank if axis < 0 else axis
    return _reshape(imp, n, x, [numel(x.shape[:axis]), numel(x.shape[axis:])])


@_handles("Unsqueeze", "Squeeze")
def _unsqueeze(imp, n):
    x = imp.v(n, 0)
    axes = _axes(imp, n, None, 13)
    if n.op == "Unsqueeze":
        return _reshape(imp, n, x, _unsqueeze_shape(x.shape, axes))
    return _reshape(imp, n, x, _squeeze_shape(x.shape, axes))


@_handles("Transpose")
def _transpose(imp, n):
    src = n.inputs[0]
    if _is_weight(imp, src) and n.attrs.get("perm", [1, 0]) == [1, 0]:
        key = imp.transposed(src)  # a weight laid out for MatMul: it stays a known constant
        if key in imp.qweights:
            imp.qweights[n.outputs[0]] = imp.qweights[key]
        return imp.known[key]
    x = imp.v(n, 0)
    perm = n.attrs.get("perm", list(reversed(range(x.type.rank))))
    return x if list(perm) == list(range(x.type.rank)) else imp.out(n, "permute", x, perm=perm)


@_handles("Expand")
def _expand(imp, n):
    x = imp.v(n, 0)
    target = [_as_dim(d) for d in imp.k(n, 1, "target shape").reshape(-1)]
    shape = list(broadcast_shapes(tuple(x.shape), tuple(target)))
    if len(shape) == x.type.rank and all(dims_equal(a, b) for a, b in zip(shape, x.shape)):
        return x
    return imp.out(n, "expand", x, shape=shape)


@_handles("Concat")
def _concat(imp, n):
    vals = [imp.value(i) for i in n.inputs if i]
    return vals[0] if len(vals) == 1 else imp.out(n, "concat", *vals, axis=n.attrs["axis"])


@_handles("Tile")
def _tile(imp, n):
    return imp.out(n, "tile", imp.v(n, 0), repeats=_static(imp.k(n, 1, "repeats"), "repeats", n))


def _slice_bound(e, big: int):
    if isinstance(e, (int, np.integer)):
        e = int(e)
        return max(min(e, big), -big)
    return make_dim(e)


@_handles("Slice")
def _slice(imp, n):
    x = imp.v(n, 0)
    starts = list(imp.k(n, 1, "starts").reshape(-1))
    ends = list(imp.k(n, 2, "ends").reshape(-1))
    axes = imp.k(n, 3, "axes", optional=True)
    axes = _static(axes, "axes", n) if axes is not None else list(range(len(starts)))
    steps = imp.k(n, 4, "steps", optional=True)
    steps = _static(steps, "steps", n) if steps is not None else [1] * len(starts)
    todo = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st < 1:
            raise UnsupportedOpError(f"{n.describe()} slices with step {st}; only positive "
                                     "steps are supported")
        s, e = _slice_bound(s, _BIG), _slice_bound(e, _BIG + 1)
        if isinstance(s, int) and s <= -_BIG:
            s = 0
        a %= x.type.rank
        if s == 0 and st == 1 and ((isinstance(e, int) and e >= _BIG) or dims_equal(e, x.shape[a])):
            continue  # the whole axis
        todo.append((a, s, e, st))
    for i, (a, s, e, st) in enumerate(todo):
        emit = imp.out if i == len(todo) - 1 else imp.tmp
        x = emit(n, "slice", x, axis=a, start=s, end=e, step=st)
    return x


@_handles("Split")
def _split(imp, n):
    x = imp.v(n, 0)
    axis = n.attrs.get("axis", 0) % x.type.rank
    count = len(n.outputs)
    sizes = imp.k(n, 1, "split sizes", optional=True)
    if sizes is not None:
        sizes = [_as_dim(s) for s in sizes.reshape(-1)]
    else:
        dim = x.shape[axis]
        count = n.attrs.get("num_outputs", count)
        if isinstance(dim, int):  # opset 18: the last chunk may be smaller
            chunk = -(-dim // count)
            sizes = [min(chunk, dim - i * chunk) for i in range(count)]
        else:
            sizes = [make_dim(dim_expr(dim) / count)] * count
    outs, start = [], 0
    for name, size in zip(n.outputs, sizes):
        end = make_dim(dim_expr(start) + dim_expr(size))
        outs.append(imp._emit(n, "slice", [x], {"axis": axis, "start": start, "end": end},
                              name or f"{n.outputs[0]}_split"))
        start = end
    return outs


@_handles("Gather")
def _gather(imp, n):
    axis = n.attrs.get("axis", 0)
    data, idx = n.inputs
    lookup = idx not in imp.known or (not _is_symbolic(imp.known[idx])
                                      and imp.known[idx].ndim > 0 and (imp.known[idx] >= 0).all())
    if axis == 0 and _is_weight(imp, data) and lookup:
        return imp.out(n, "embedding", imp.v(n, 0), imp.v(n, 1))  # a table lookup
    x = imp.v(n, 0)
    if idx in imp.known and imp.known[idx].ndim == 0 and not _is_symbolic(imp.known[idx]):
        return imp.out(n, "select", x, axis=axis % x.type.rank, index=int(imp.known[idx]))
    return imp.out(n, "take", x, imp.v(n, 1), axis=axis % x.type.rank)


@_handles("GatherElements")
def _gather_elements(imp, n):
    x = imp.v(n, 0)
    return imp.out(n, "gather", x, imp.v(n, 1), axis=n.attrs.get("axis", 0) % x.type.rank)


@_handles("GatherND")
def _gather_nd(imp, n):
    if n.attrs.get("batch_dims", 0):
        raise UnsupportedOpError(f"{n.describe()} uses batch_dims != 0")
    x, idx = imp.v(n, 0), imp.v(n, 1)
    k = idx.shape[-1]
    if not isinstance(k, int):
        raise UnsupportedOpError(f"the index depth of {n.describe()} is symbolic ({k})")
    parts = [imp.tmp(n, "select", idx, axis=idx.type.rank - 1, index=j) for j in range(k)]
    return imp.out(n, "index", x, *parts, axes=list(range(k)))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@_handles("Pad")
def _pad(imp, n):
    x = imp.v(n, 0)
    pads = _static(imp.k(n, 1, "pads"), "pads", n)
    value = imp.k(n, 2, "constant value", optional=True)
    axes = imp.k(n, 3, "axes", optional=True)
    axes = [a % x.type.rank for a in _static(axes, "axes", n)] if axes is not None \
        else list(range(x.type.rank))
    half = len(axes)
    per_axis = {a: (pads[i], pads[i + half]) for i, a in enumerate(axes)}
    padded = [a for a, p in per_axis.items() if p != (0, 0)]
    lowest = min(padded) if padded else x.type.rank  # torch pads the trailing axes only
    torch_pads = [p for a in reversed(range(lowest, x.type.rank))
                  for p in per_axis.get(a, (0, 0))]
    mode = n.attrs.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise UnsupportedOpError(f"{n.describe()} pads in mode '{mode}'")
    fill = float(value.reshape(-1)[0]) if value is not None and value.size else 0.0
    return imp.out(n, "pad", x, pads=torch_pads, mode=_PAD_MODES[mode], value=fill)


@_handles("Trilu")
def _trilu(imp, n):
    k = imp.k(n, 1, "diagonal", optional=True)
    k = _static(k, "diagonal", n)[0] if k is not None else 0
    return imp.out(n, "triu" if n.attrs.get("upper", 1) else "tril", imp.v(n, 0), diagonal=k)


@_handles("Range")
def _range(imp, n):
    start, limit, delta = (imp.k(n, i, w) for i, w in enumerate(("start", "limit", "delta")))
    dtype = _np_ir_dtype(start)
    if not is_float(dtype) and not _is_symbolic(delta):
        return imp.out(n, "arange", start=_as_dim(start.reshape(())[()]),
                       end=_as_dim(limit.reshape(())[()]), step=int(delta), dtype=dtype)
    if any(_is_symbolic(a) for a in (start, limit, delta)):
        raise UnsupportedOpError(f"{n.describe()} is a float or symbolic-step range over "
                                 "symbolic sizes")
    return np.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


@_handles("ConstantOfShape")
def _constant_of_shape(imp, n):
    shape = [_as_dim(d) for d in imp.k(n, 0, "shape").reshape(-1)]
    value = n.attrs.get("value", np.zeros(1, np.float32))
    fill = value.reshape(-1)[0].item()
    return imp.out(n, "full", shape=shape, value=fill, dtype=_np_ir_dtype(value))


@_handles("Shape", "Size", "Constant")
def _known_only(imp, n):
    """Always known at import time; here only when folding declined (a large constant, or
    an error worth reporting as it is)."""
    return _FOLD[n.op](imp, n, [])[0]


# -- quantization ---------------------------------------------------------------------------------
def _qformat(n: _Node, dtype_name: str) -> str:
    if dtype_name not in _QFORMAT:
        raise UnsupportedOpError(f"{n.describe()} quantizes to {dtype_name}; supported formats "
                                 f"are {', '.join(_QFORMAT)}")
    return _QFORMAT[dtype_name]


def _q_granularity(imp, n: _Node, scale: str, rank: int) -> tuple[Granularity, int | None, int]:
    block = n.attrs.get("block_size", 0)
    axis = n.attrs.get("axis", 1) % max(rank, 1)
    if block:
        return Granularity.PER_GROUP, axis, block
    if imp.known[scale].size == 1 and imp.known[scale].ndim <= 1:
        return Granularity.PER_TENSOR, None, 0
    return Granularity.PER_CHANNEL, axis, 0


def _same_param(imp, a: str, b: str) -> bool:
    if a == b:
        return True
    if not a or not b or a not in imp.known or b not in imp.known:
        return False
    x, y = imp.known[a], imp.known[b]
    return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


@_handles("QuantizeLinear")
def _quantize(imp, n):
    zp = n.input(2)
    if zp:
        fmt_dtype = imp.known[zp].dtype.name if zp in imp.known else imp.dtype(zp)
    else:
        to = n.attrs.get("output_dtype", 0) or TensorProto.UINT8
        fmt_dtype = helper.tensor_dtype_to_np_dtype(to).name
    fmt = _qformat(n, fmt_dtype)
    users = imp.consumers.get(n.outputs[0], [])
    if len(users) == 1 and n.outputs[0] not in imp.graph_outputs and _fake_quant_pair(
            imp, n, users[0], fmt):
        return []
    if fmt in _FLOAT_Q:
        raise UnsupportedOpError(f"{n.describe()} quantizes to {fmt} outside a Q -> DQ pair; "
                                 "FP8 is imported as an annotation (Q -> DQ pairs, DQ of "
                                 "constants), not as standalone codes")
    xv = imp.v(n, 0)
    return imp.out(n, "quantize", xv, imp.v(n, 1), imp.v(n, 2),
                   axis=n.attrs.get("axis", 1) % max(xv.type.rank, 1),
                   block_size=n.attrs.get("block_size", 0), format=fmt)


def _fake_quant_pair(imp, n: _Node, dq_index: int, fmt: str) -> bool:
    """Q -> DQ with the same parameters: annotate the activation instead (or, for a float
    constant, round it now into an annotated constant)."""
    dq = imp.nodes[dq_index]
    if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
        return False
    dq_attrs = {a.name: _attr_value(a) for a in dq.attribute}
    x, scale, zp = n.input(0), n.input(1), n.input(2)
    dq_in = list(dq.input) + [""] * (3 - len(dq.input))
    if scale not in imp.known or (zp and zp not in imp.known):
        return False
    if not _same_param(imp, scale, dq_in[1]) or not _same_param(imp, zp, dq_in[2]):
        return False
    rank = len(imp.shape(x))
    gran, axis, block = _q_granularity(imp, n, scale, rank)
    if gran != Granularity.PER_TENSOR and (
            dq_attrs.get("axis", 1) % max(rank, 1) != axis or dq_attrs.get("block_size", 0) != block):
        return False
    if block and not _blocks_fit(imp.shape(x)[axis], block):
        return False
    qw = _QWeight(fmt, gran, axis, block, scale, zp or None)
    imp.skip.add(dq_index)
    if _is_float_constant(imp, x):  # a float weight with Q/DQ: round it now, keep it constant
        imp.known[dq.output[0]] = _fake_quant_constant(imp, n, fmt)
        imp.qweights[dq.output[0]] = qw
        return True
    spec = imp._spec(qw, rank)
    v = imp.value(x)
    if not imp.exclusive(x, n.index):  # shared, an input or a constant: annotate a copy
        v = imp._emit(n, "identity", [v], {}, dq.output[0])
    v.quant = spec
    imp._bind_value(dq.output[0], v)
    return True


def _is_float_constant(imp, name: str) -> bool:
    arr = imp.known.get(name)
    return arr is not None and arr.dtype != object and np.issubdtype(arr.dtype, np.floating) \
        and name not in imp.qweights


def _fake_quant_constant(imp, n: _Node, fmt: str) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(w)) of a constant, with the IR's own kernels."""
    w, scale, zp = (imp.known[i] if i else None for i in (n.input(0), n.input(1), n.input(2)))
    attrs = {"axis": n.attrs.get("axis", 1) % max(w.ndim, 1),
             "block_size": n.attrs.get("block_size", 0), "format": fmt}
    s = _to_torch(scale)
    if fmt in _FLOAT_Q:  # saturating RNE cast of x / s (QuantizeLinear's saturate=1)
        from qcompile.formats import element
        from qcompile.formats.floats import decode_elements, encode_elements
        from qcompile.ir.ops.quant import _expand
        wt = _to_torch(w).float()
        se = _expand(s.float(), wt, attrs["axis"], attrs["block_size"])
        e = element(fmt)
        return (decode_elements(encode_elements(wt / se, e), e) * se).numpy()
    z = _to_torch(zp) if zp is not None else None
    q = get_schema("quantize").kernel(_to_torch(w), s, z, **attrs)
    return get_schema("dequantize").kernel(q, s, z, **attrs).numpy()


def _blocks_fit(dim, block: int) -> bool:
    return isinstance(dim, int) and dim % block == 0


@_handles("DequantizeLinear")
def _dequantize(imp, n):
    x, scale, zp = n.input(0), n.input(1), n.input(2)
    if x in imp.known and scale in imp.known and (not zp or zp in imp.known):
        return _dequantize_weight(imp, n)
    xv = imp.v(n, 0)
    fmt = _qformat(n, _qdtype(imp, x))
    if fmt in _FLOAT_Q:
        raise UnsupportedOpError(f"{n.describe()} dequantizes {fmt} codes computed at run time; "
                                 "FP8 is imported as an annotation (Q -> DQ pairs, DQ of "
                                 "constants), not as standalone codes")
    return imp.out(n, "dequantize", xv, imp.v(n, 1), imp.v(n, 2),
                   axis=n.attrs.get("axis", 1) % max(xv.type.rank, 1),
                   block_size=n.attrs.get("block_size", 0), format=fmt)


def _qdtype(imp, name: str) -> str:
    return imp.known[name].dtype.name if name in imp.known else imp.dtype(name)


def _dequantize_weight(imp, n: _Node):
    """DQ of a constant: a float constant annotated with how it was quantized."""
    x, scale, zp = n.input(0), n.input(1), n.input(2)
    q = imp.known[x]
    block = n.attrs.get("block_size", 0)
    axis = n.attrs.get("axis", 1) % max(q.ndim, 1)
    kernel = get_schema("dequantize").kernel
    fmt = _QFORMAT.get(q.dtype.name)
    if fmt in _FLOAT_Q:  # float codes: y = x * s, the zero point is 0 by definition
        zt, codes = None, torch.from_numpy(q.astype(np.float32))
    else:
        zt = _to_torch(imp.known[zp]) if zp else None
        codes = _to_torch(q)
    w = kernel(codes, _to_torch(imp.known[scale]), zt, axis=axis, block_size=block,
               format="int8")
    out = w.numpy()
    if fmt is not None and (not block or _blocks_fit(q.shape[axis], block)):
        gran, axis, block = _q_granularity(imp, n, scale, q.ndim)
        imp.qweights[n.outputs[0]] = _QWeight(fmt, gran, axis, block, scale, zp or None)
    return out  # int16/int32 codes (biases) have no QuantSpec format: plain float constants


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unpack little-endian bit fields along the last axis (element 0 in the low bits)."""
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    vals = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * per)


@_handles("MatMulNBits", domain="com.microsoft")
def _matmul_nbits(imp, n):
    at = n.attrs
    k_in, n_out, bits, block = at["K"], at["N"], at.get("bits", 4), at["block_size"]
    if bits not in (2, 4, 8) or k_in % block:
        raise UnsupportedOpError(f"{n.describe()} has bits={bits}, K={k_in}, block_size={block}; "
                                 "supported: bits 2/4/8 with K a multiple of block_size")
    n_blocks = k_in // block
    b_name = n.inputs[1]
    codes = _unpack(imp.k(n, 1, "packed weight").reshape(n_out, -1), bits)[:, :k_in]
    scales = imp.k(n, 2, "scales").reshape(n_out, n_blocks)
    zp = imp.k(n, 3, "zero points", optional=True)
    if zp is None:
        zp = np.full((n_out, n_blocks), 1 << (bits - 1), np.uint8)
    elif zp.dtype == np.uint8:
        zp = _unpack(zp.reshape(n_out, -1), bits)[:, :n_blocks]
    else:
        zp = zp.reshape(n_out, n_blocks)
    g_idx = imp.k(n, 4, "g_idx", optional=True)
    if g_idx is not None and not np.array_equal(g_idx.reshape(-1), np.arange(k_in) // block):
        raise UnsupportedOpError(f"{n.describe()} reorders channels with g_idx (act-order)")
    z = zp.astype(np.float32).repeat(block, axis=1)
    w = ((codes.astype(np.float32) - z) * scales.astype(np.float32).repeat(block, axis=1))
    w = w.astype(scales.dtype)
    spec = None
    if zp.dtype == np.uint8 or np.array_equal(zp, np.round(zp)):  # integer codes: annotate
        s = imp.constant(f"{b_name}_scale", np.ascontiguousarray(scales)).name
        zc = imp.constant(f"{b_name}_zero_point", zp.astype(np.uint8)).name
        spec = QuantSpec(format=f"uint{bits}", granularity=Granularity.PER_GROUP, axis=1,
                         group_size=block, scale=s, zero_point=zc)
    weight = imp.constant(b_name, w, spec)
    return imp.out(n, "linear", imp.v(n, 0), weight, imp.v(n, 5))
