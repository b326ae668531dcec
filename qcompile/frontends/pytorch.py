"""Capture a ``torch.nn.Module`` into the qcompile IR.

``torch.export.export`` traces the model; ``run_decompositions`` lowers it to core ATen
except for the high-level ops the passes match on (linear, layer_norm, attention, ...),
which stay whole. When export fails, ``torch.fx.symbolic_trace`` + ``make_fx`` is the
fallback, and the reason export failed is reported. Each ATen op maps to IR ops through the
``_ATEN`` table; anything else raises ``UnsupportedOpError`` with the user's source line.
"""
from __future__ import annotations

import operator
import os
import re
import warnings
from typing import Any, Callable

import sympy
import torch
import torch.fx

from qcompile.errors import CaptureError, UnsupportedOpError
from qcompile.ir.graph import Graph, Provenance, Value
from qcompile.ir.types import TensorType, from_torch_dtype, is_float, make_dim, to_torch_dtype

__all__ = ["capture_torch", "decomposition_table", "KEPT_OPS"]

aten = torch.ops.aten

#: ATen ops that the decomposition leaves whole because passes match on them.
KEPT_OPS = [
    aten.linear.default, aten.layer_norm.default, aten.rms_norm.default,
    aten.scaled_dot_product_attention.default, aten.gelu.default, aten.silu.default,
    aten.conv1d.default, aten.conv2d.default, aten.embedding.default, aten.batch_norm.default,
    aten.softmax.int, aten.log_softmax.int, aten.matmul.default, aten.hardtanh.default,
    aten.adaptive_avg_pool2d.default, aten.max_pool2d.default, aten.avg_pool2d.default,
    aten.flatten.using_ints,
]

_TORCH_DIR = os.path.dirname(torch.__file__)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def decomposition_table() -> dict:
    table = torch.export.default_decompositions()
    for k in KEPT_OPS:
        table.pop(k, None)
    return table


def _provenance(node: torch.fx.Node) -> Provenance:
    module = None
    stack = node.meta.get("nn_module_stack")
    if stack:
        module = list(stack.values())[-1][0] or None
    source = code = None
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    user = [f for f in frames if not f[0].startswith(_TORCH_DIR)]
    if user:
        path, line, _fn, text = user[-1]
        source, code = f"{path}:{line}", text.strip()
    return Provenance(module=module, source=source, code=code, origin=node.name)


class _Importer:
    """Walks an ATen-level fx graph and builds the IR graph."""

    def __init__(self, gm: torch.fx.GraphModule, graph: Graph, rename: dict):
        self.gm = gm
        self.g = graph
        self.rename = rename
        self.env: dict[torch.fx.Node, Any] = {}
        self.node: torch.fx.Node | None = None

    # -- conversion helpers ---------------------------------------------------------
    def dim(self, s) -> Any:
        if isinstance(s, int):
            return s
        e = sympy.sympify(str(s))
        if self.rename:
            e = e.subs({sympy.Symbol(k): sympy.Symbol(v) for k, v in self.rename.items()})
        return make_dim(e)

    def meta_type(self, n: torch.fx.Node) -> TensorType:
        val = n.meta["val"]
        return TensorType(tuple(self.dim(s) for s in val.shape), from_torch_dtype(val.dtype))

    def arg(self, a):
        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        if isinstance(a, torch.SymInt):
            return self.dim(a)
        return a

    def prov(self) -> Provenance:
        return _provenance(self.node)

    def emit(self, op: str, *inputs, **attrs) -> Value:
        return self.g.add(op, *inputs, provenance=self.prov(), name=self.node.name, **attrs)

    def tensor(self, x, like: Value | None = None) -> Value:
        """A Value for x; python scalars become 0-d constants typed to match ``like``."""
        if isinstance(x, Value):
            return x
        if isinstance(x, bool):
            dtype = torch.bool
        elif isinstance(x, int):
            dtype = _tdt(like.dtype) if like is not None and like.dtype != "bool" else torch.int64
        elif isinstance(x, float):
            dtype = _tdt(like.dtype) if like is not None and is_float(like.dtype) else torch.float32
        else:
            raise UnsupportedOpError(
                f"{type(x).__name__} {x!r} is used as a tensor operand of {self.node.target}",
                hint=f"at {self.prov()}; symbolic sizes cannot be used as tensor values yet: "
                "make that size static or compute it from tensors")
        return self.g.add_constant("scalar", torch.tensor(x, dtype=dtype))

    # -- main loop ------------------------------------------------------------------
    def run(self, placeholders: dict[str, Value]) -> list:
        outputs = []
        for n in self.gm.graph.nodes:
            self.node = n
            if n.op == "placeholder":
                self.env[n] = placeholders[n.name]
            elif n.op == "get_attr":
                t = _get_attr(self.gm, n.target)
                self.env[n] = self.g.add_constant(n.target.replace(".", "_"), t) \
                    if isinstance(t, torch.Tensor) else t
            elif n.op == "call_function":
                self.env[n] = self.call(n)
            elif n.op == "output":
                outputs = list(n.args[0]) if isinstance(n.args[0], (list, tuple)) else [n.args[0]]
            else:
                raise UnsupportedOpError(f"fx node kind '{n.op}' ({n.target}) is not supported",
                                         hint=str(_provenance(n)))
        return outputs

    def call(self, n: torch.fx.Node):
        val = n.meta.get("val")
        if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool) and \
                n.target is not operator.getitem:
            return self.dim(val)  # size arithmetic: known symbolically from the trace
        target = n.target
        if target is operator.getitem:
            return self.arg(n.args[0])[n.args[1]]
        handler = _ATEN.get(target) or _ATEN.get(getattr(target, "overloadpacket", None))
        if handler is None:
            if target in _SKIP or getattr(target, "overloadpacket", None) in _SKIP:
                return None
            name = getattr(target, "__name__", str(target))
            p = _provenance(n)
            where = p.source + (f": {p.code}" if p.code else "") if p.source else str(p)
            raise UnsupportedOpError(
                f"operator '{target}' (node '{n.name}') is not in qcompile's op set; "
                f"used at {where}", hint=f"rewrite the model without {name}, or add a mapping "
                f"for it in qcompile/frontends/pytorch.py")
        args = [self.arg(a) for a in n.args]
        kwargs = {k: self.arg(v) for k, v in n.kwargs.items()}
        return handler(self, *args, **kwargs)


def _tdt(name: str) -> torch.dtype:
    return to_torch_dtype(name)


def _get_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_SKIP = {aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
         aten._assert_async, aten.sym_constrain_range, aten._functional_assert_async}

_Handler = Callable[..., Any]
_ATEN: dict[Any, _Handler] = {}


def _reg(*targets):
    def deco(fn):
        for t in targets:
            _ATEN[t] = fn
        return fn
    return deco


# -- handlers: one small function per family of ATen ops --------------------------------
def _unary(op):
    return lambda im, x, *a, **k: im.emit(op, x)


for _t, _op in {
    aten.relu: "relu", aten.silu: "silu", aten.tanh: "tanh", aten.sigmoid: "sigmoid",
    aten.exp: "exp", aten.log: "log", aten.sqrt: "sqrt", aten.rsqrt: "rsqrt", aten.neg: "neg",
    aten.abs: "abs", aten.erf: "erf", aten.sin: "sin", aten.cos: "cos",
    aten.reciprocal: "reciprocal", aten.floor: "floor", aten.ceil: "ceil", aten.round: "round",
    aten.sign: "sign", aten.logical_not: "logical_not",
}.items():
    _reg(_t)(_unary(_op))


@_reg(aten.bitwise_not)
def _bitwise_not(im, x):
    if x.dtype != "bool":
        raise UnsupportedOpError("bitwise_not on integers is not supported", hint=str(im.prov()))
    return im.emit("logical_not", x)


@_reg(aten.gelu)
def _gelu(im, x, approximate="none"):
    return im.emit("gelu", x, approximate=approximate)


@_reg(aten.hardtanh, aten.clamp)
def _clamp(im, x, min=None, max=None):
    return im.emit("clamp", x, min=min, max=max)


@_reg(aten.leaky_relu)
def _leaky(im, x, negative_slope=0.01):
    return im.emit("leaky_relu", x, negative_slope=negative_slope)


def _binary(op, swap=False):
    def h(im, a, b, alpha=1, **kw):
        like = a if isinstance(a, Value) else b
        a, b = im.tensor(a, like), im.tensor(b, like)
        if alpha != 1:
            b = im.emit("mul", b, im.tensor(alpha, b))
        return im.emit(op, b, a) if swap else im.emit(op, a, b)
    return h


for _t, _op in {
    aten.add: "add", aten.sub: "sub", aten.mul: "mul", aten.maximum: "maximum",
    aten.minimum: "minimum", aten.remainder: "remainder", aten.eq: "eq", aten.ne: "ne",
    aten.lt: "lt", aten.le: "le", aten.gt: "gt", aten.ge: "ge", aten.logical_and: "logical_and",
    aten.logical_or: "logical_or", aten.logical_xor: "logical_xor",
    aten.bitwise_and: "bitwise_and", aten.bitwise_or: "bitwise_or",
    aten.bitwise_xor: "bitwise_xor", aten.pow: "pow",
}.items():
    _reg(_t)(_binary(_op))
_reg(aten.rsub)(_binary("sub", swap=True))
_reg(aten.__and__)(_binary("bitwise_and"))
_reg(aten.__or__)(_binary("bitwise_or"))


@_reg(aten.div)
def _div(im, a, b, rounding_mode=None):
    like = a if isinstance(a, Value) else b
    return im.emit("div", im.tensor(a, like), im.tensor(b, like), rounding_mode=rounding_mode)


@_reg(aten.where)
def _where(im, c, a, b):
    like = a if isinstance(a, Value) else b
    return im.emit("where", c, im.tensor(a, like), im.tensor(b, like))


@_reg(aten.masked_fill)
def _masked_fill(im, x, mask, value):
    return im.emit("where", mask, im.tensor(value, x), x)


@_reg(aten._to_copy, aten.to)
def _to(im, x, *args, dtype=None, **kw):
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
    if dtype is None or from_torch_dtype(dtype) == x.dtype:
        return x
    return im.emit("cast", x, dtype=from_torch_dtype(dtype))


@_reg(aten.clone, aten.alias, aten.detach, aten.contiguous, aten.lift_fresh_copy,
      aten.dropout, aten.feature_dropout)
def _identity(im, x, *a, **k):
    return x


@_reg(aten.linear)
def _linear(im, x, w, b=None):
    return im.emit("linear", x, w, b)


@_reg(aten.matmul, aten.mm, aten.bmm)
def _matmul(im, a, b):
    return im.emit("matmul", a, b)


@_reg(aten.addmm)
def _addmm(im, bias, a, b, beta=1, alpha=1):
    y = im.emit("matmul", a, b)
    if alpha != 1:
        y = im.emit("mul", y, im.tensor(alpha, y))
    if beta != 1:
        bias = im.emit("mul", bias, im.tensor(beta, bias))
    return im.emit("add", y, bias)


@_reg(aten.conv1d, aten.conv2d)
def _conv(im, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    nd = w.type.rank - 2
    if isinstance(padding, str):
        raise UnsupportedOpError(f"conv padding='{padding}' is not supported",
                                 hint=f"{im.prov()}: pass explicit integer padding")
    rep = lambda v: list(v) * (nd // len(v)) if isinstance(v, (list, tuple)) else [v] * nd  # noqa: E731
    return im.emit("conv", x, w, b, stride=rep(stride), padding=rep(padding),
                   dilation=rep(dilation), groups=groups)


@_reg(aten.convolution)
def _convolution(im, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if transposed:
        raise UnsupportedOpError("transposed convolution is not in the op set",
                                 hint=str(im.prov()))
    return im.emit("conv", x, w, b, stride=list(stride), padding=list(padding),
                   dilation=list(dilation), groups=groups)


@_reg(aten.batch_norm)
def _batch_norm(im, x, w, b, mean, var, training, momentum, eps, cudnn=False):
    if training:
        raise CaptureError("batch_norm in training mode was captured",
                           hint=f"{im.prov()}: call model.eval() before compiling")
    return im.emit("batch_norm", x, w, b, mean, var, eps=eps)


@_reg(aten._native_batch_norm_legit_no_training)
def _bn_legit(im, x, w, b, mean, var, momentum, eps):
    return (im.emit("batch_norm", x, w, b, mean, var, eps=eps), None, None)


@_reg(aten.layer_norm)
def _layer_norm(im, x, shape, w=None, b=None, eps=1e-5, cudnn=False):
    return im.emit("layer_norm", x, w, b, normalized_ndim=len(shape), eps=eps)


@_reg(aten.rms_norm)
def _rms_norm(im, x, shape, w=None, eps=None):
    if eps is None:
        eps = torch.finfo(_tdt(x.dtype)).eps
    return im.emit("rms_norm", x, w, normalized_ndim=len(shape), eps=eps)


@_reg(aten.scaled_dot_product_attention)
def _sdpa(im, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    return im.emit("attention", q, k, v, attn_mask, scale=scale, causal=is_causal,
                   gqa=enable_gqa)


@torch.library.custom_op("qcompile::kv_write", mutates_args=())
def kv_write(cache: torch.Tensor, new: torch.Tensor, slot: torch.Tensor, axis: int = -2,
             bits: int = 0) -> torch.Tensor:
    """The IR's ``kv_write`` for torch models to call (``qcompile.llm`` does): ``cache`` with
    ``new`` written along ``axis`` from position ``slot[0]`` (quantized rows when ``bits``).
    Functional in eager torch (a copy); captured whole, and run in place by qcompile."""
    from qcompile.ir.ops.nn import kv_quantize_rows
    out = cache.clone()
    out.narrow(axis, int(slot.reshape(-1)[0]), new.shape[axis]).copy_(
        kv_quantize_rows(new, bits) if bits else new)
    return out


@kv_write.register_fake
def _kv_write_fake(cache, new, slot, axis=-2, bits=0):
    return torch.empty_like(cache)


@torch.library.custom_op("qcompile::kv_read", mutates_args=())
def kv_read(cache: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The IR's ``kv_read``: a quantized KV cache's rows as fp32."""
    from qcompile.ir.ops.nn import kv_dequantize_rows
    return kv_dequantize_rows(cache, bits, dim)


@kv_read.register_fake
def _kv_read_fake(cache, bits, dim):
    return cache.new_empty((*cache.shape[:-1], dim), dtype=torch.float32)


@_reg(torch.ops.qcompile.kv_write.default)
def _kv_write(im, cache, new, slot, axis=-2, bits=0):
    return im.emit("kv_write", cache, new, slot, axis=axis, bits=bits)


@_reg(torch.ops.qcompile.kv_read.default)
def _kv_read(im, cache, bits, dim):
    return im.emit("kv_read", cache, bits=bits, dim=dim)


@_reg(aten.embedding)
def _embedding(im, w, idx, *a, **k):
    return im.emit("embedding", w, idx)


@_reg(aten.softmax, aten._softmax)
def _softmax(im, x, dim, *a, **k):
    return im.emit("softmax", x, axis=dim)


@_reg(aten.log_softmax, aten._log_softmax)
def _log_softmax(im, x, dim, *a, **k):
    return im.emit("log_softmax", x, axis=dim)


def _axes(dims):
    if dims is None:
        return None
    return [dims] if isinstance(dims, int) else list(dims)


def _reduction(op):
    def h(im, x, dim=None, keepdim=False, *, dtype=None, **kw):
        y = im.emit(op, x, axes=_axes(dim), keepdim=keepdim)
        return _to(im, y, dtype=dtype)
    return h


for _t, _op in {aten.mean: "mean", aten.sum: "sum", aten.amax: "amax", aten.amin: "amin"}.items():
    _reg(_t)(_reduction(_op))


@_reg(aten.var)
def _var(im, x, dim=None, *, correction=1, keepdim=False):
    return im.emit("var", x, axes=_axes(dim), keepdim=keepdim,
                   correction=1.0 if correction is None else correction)


@_reg(aten.argmax)
def _argmax(im, x, dim=None, keepdim=False):
    if dim is None:
        x, dim = im.emit("reshape", x, shape=[-1]), 0
    return im.emit("argmax", x, axis=dim, keepdim=keepdim)


@_reg(aten.cumsum)
def _cumsum(im, x, dim, dtype=None):
    return _to(im, im.emit("cumsum", x, axis=dim), dtype=dtype)


def _as_out_shape(im, x, *a, **k):
    """Every view-like op is a reshape to the traced output shape."""
    return im.emit("reshape", x, shape=list(im.meta_type(im.node).shape))


for _t in (aten.view, aten._unsafe_view, aten.reshape, aten.unsqueeze, aten.squeeze,
           aten.flatten, aten.unflatten):
    _reg(_t)(_as_out_shape)


@_reg(aten.permute)
def _permute(im, x, dims):
    return im.emit("permute", x, perm=list(dims))


@_reg(aten.transpose)
def _transpose(im, x, a, b):
    perm = list(range(x.type.rank))
    perm[a], perm[b] = perm[b], perm[a]
    return im.emit("permute", x, perm=perm)


@_reg(aten.t, aten.numpy_T)
def _t(im, x):
    return x if x.type.rank < 2 else im.emit("permute", x, perm=[1, 0])


@_reg(aten.expand)
def _expand(im, x, size, *a, **k):
    return im.emit("expand", x, shape=list(im.meta_type(im.node).shape))


@_reg(aten.slice)
def _slice(im, x, dim=0, start=None, end=None, step=1):
    start = 0 if start is None else start
    end = 2 ** 62 if end is None or (isinstance(end, int) and end > 2 ** 62) else end
    if start == 0 and isinstance(end, int) and end >= 2 ** 62 and step == 1:
        return x
    return im.emit("slice", x, axis=dim, start=start, end=end, step=step)


@_reg(aten.select)
def _select(im, x, dim, index):
    return im.emit("select", x, axis=dim, index=index)


@_reg(aten.cat, aten.concat)
def _cat(im, xs, dim=0):
    xs = [x for x in xs if not (x.type.rank == 1 and x.type.shape[0] == 0)]
    return xs[0] if len(xs) == 1 else im.emit("concat", *xs, axis=dim)


@_reg(aten.split_with_sizes, aten.split)
def _split(im, x, sizes, dim=0):
    n = x.shape[dim]
    if isinstance(sizes, int):
        if not isinstance(n, int):
            raise UnsupportedOpError("split of a symbolic dimension", hint=str(im.prov()))
        sizes = [min(sizes, n - i) for i in range(0, n, sizes)]
    outs, start = [], 0
    for s in sizes:
        outs.append(im.emit("slice", x, axis=dim, start=start, end=make_dim(
            sympy.sympify(str(start)) + sympy.sympify(str(s))), step=1))
        start = make_dim(sympy.sympify(str(start)) + sympy.sympify(str(s)))
    return tuple(outs)


@_reg(aten.unbind)
def _unbind(im, x, dim=0):
    return tuple(im.emit("select", x, axis=dim, index=i) for i in range(x.shape[dim]))


@_reg(aten.index)
def _index(im, x, indices):
    axes = [i for i, t in enumerate(indices) if t is not None]
    return im.emit("index", x, *[indices[i] for i in axes], axes=axes)


@_reg(aten.index_select)
def _index_select(im, x, dim, idx):
    return im.emit("take", x, idx, axis=dim)


@_reg(aten.gather)
def _gather(im, x, dim, idx, sparse_grad=False):
    return im.emit("gather", x, idx, axis=dim)


def _dtype_name(dtype, default="float32"):
    return from_torch_dtype(dtype) if dtype is not None else default


@_reg(aten.arange)
def _arange(im, *args, dtype=None, **kw):
    ints = [a for a in args if not isinstance(a, torch.dtype)]
    start, end, step = (0, ints[0], 1) if len(ints) == 1 else \
        (ints[0], ints[1], ints[2] if len(ints) > 2 else 1)
    return im.emit("arange", start=start, end=end, step=step,
                   dtype=_dtype_name(dtype, im.meta_type(im.node).dtype))


def _full_value(im, shape, value, dtype):
    t = im.meta_type(im.node)
    if t.is_static:  # static fills are folded to constants right away
        return im.g.add_constant(im.node.name, torch.full(t.shape, value, dtype=_tdt(t.dtype)))
    return im.emit("full", shape=list(t.shape), value=value, dtype=t.dtype)


@_reg(aten.full)
def _full(im, size, value, *, dtype=None, **kw):
    return _full_value(im, size, value, dtype)


@_reg(aten.zeros, aten.new_zeros, aten.zeros_like)
def _zeros(im, *a, **k):
    return _full_value(im, None, 0, None)


@_reg(aten.ones, aten.new_ones, aten.ones_like)
def _ones(im, *a, **k):
    return _full_value(im, None, 1, None)


@_reg(aten.full_like, aten.new_full)
def _full_like(im, x, *a, **k):
    value = a[-1] if a else k["fill_value"]
    return _full_value(im, None, value, None)


@_reg(aten.scalar_tensor)
def _scalar_tensor(im, value, **k):
    return im.g.add_constant(im.node.name, torch.tensor(value, dtype=_tdt(
        im.meta_type(im.node).dtype)))


@_reg(aten.tril)
def _tril(im, x, diagonal=0):
    return im.emit("tril", x, diagonal=diagonal)


@_reg(aten.triu)
def _triu(im, x, diagonal=0):
    return im.emit("triu", x, diagonal=diagonal)


@_reg(aten.constant_pad_nd)
def _pad(im, x, pad, value=0.0):
    return im.emit("pad", x, pads=list(pad), mode="constant", value=value)


@_reg(aten.repeat)
def _repeat(im, x, repeats):
    return im.emit("tile", x, repeats=list(repeats))


@_reg(aten.max_pool2d)
def _max_pool(im, x, kernel, stride=(), padding=0, dilation=1, ceil_mode=False):
    two = lambda v: list(v) * (2 // len(v)) if isinstance(v, (list, tuple)) and v else [v] * 2  # noqa: E731
    stride = stride if stride else kernel
    return im.emit("max_pool2d", x, kernel=two(kernel), stride=two(stride), padding=two(padding),
                   dilation=two(dilation), ceil_mode=ceil_mode)


@_reg(aten.max_pool2d_with_indices)
def _max_pool_idx(im, *a, **k):
    return (_max_pool(im, *a, **k), None)


@_reg(aten.avg_pool2d)
def _avg_pool(im, x, kernel, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
              divisor_override=None):
    two = lambda v: list(v) * (2 // len(v)) if isinstance(v, (list, tuple)) and v else [v] * 2  # noqa: E731
    stride = stride if stride else kernel
    return im.emit("avg_pool2d", x, kernel=two(kernel), stride=two(stride), padding=two(padding),
                   ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                   divisor_override=divisor_override)


@_reg(aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d)
def _adaptive(im, x, output_size):
    return im.emit("adaptive_avg_pool2d", x, output_size=list(output_size))


# -- entry point ------------------------------------------------------------------------
def _symbol_names(ep_inputs, dynamic_shapes, user_names) -> dict:
    """Map torch's symbols (s0, s45, ...) to the names of the user's ``Dim``s."""
    rename: dict[str, str] = {}
    if dynamic_shapes is None:
        return rename
    specs: list = []
    if isinstance(dynamic_shapes, dict):
        specs = [dynamic_shapes.get(n) for n in user_names]
    elif isinstance(dynamic_shapes, (list, tuple)):
        specs = []
        for sp in dynamic_shapes:  # a tuple of dicts: the specs of a *args or tuple input
            nested = isinstance(sp, (list, tuple)) and any(isinstance(x, dict) for x in sp)
            specs += list(sp) if nested else [sp]
        specs += [None] * (len(user_names) - len(specs))
    for (name, val), spec in zip(ep_inputs, specs):
        if not isinstance(spec, dict) or not hasattr(val, "shape"):
            continue
        for axis, dim in spec.items():
            s = val.shape[axis]
            dim_name = getattr(dim, "__name__", None)
            if isinstance(s, torch.SymInt) and dim_name and str(s) not in rename:
                rename[str(s)] = dim_name
    return rename


def _export(model, args, kwargs, dynamic_shapes):
    ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    return ep.run_decompositions(decomposition_table())


def capture_torch(model: torch.nn.Module, example_inputs=(), *, example_kwargs=None,
                  dynamic_shapes=None, method: str = "auto") -> Graph:
    """Capture ``model`` on its example inputs. ``method``: ``auto`` (export, falling back
    to fx), ``export`` or ``fx``."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if method not in ("auto", "export", "fx"):
        from qcompile.errors import ConfigError
        raise ConfigError(f"unknown capture method {method!r}", hint="use auto, export or fx")
    args = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="torch")
            return _capture(model, args, kwargs, dynamic_shapes, method)
    finally:
        model.train(was_training)


def _capture(model, args, kwargs, dynamic_shapes, method) -> Graph:
    if method in ("auto", "export"):
        try:
            ep = _export(model, args, kwargs, dynamic_shapes)
        except UnsupportedOpError:
            raise
        except Exception as e:  # export failed: say why, then try fx
            if method == "export":
                raise CaptureError(f"torch.export failed: {type(e).__name__}: "
                                   f"{_first_line(e)}") from e
            warnings.warn(f"qcompile: torch.export failed ({type(e).__name__}: "
                          f"{_first_line(e)}); falling back to torch.fx.symbolic_trace",
                          stacklevel=2)
            return _capture_fx(model, args, kwargs, reason=e)
        return _from_exported(ep, model, dynamic_shapes)
    return _capture_fx(model, args, kwargs)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _from_exported(ep, model, dynamic_shapes) -> Graph:
    from torch.export.graph_signature import InputKind
    sig = ep.graph_signature
    g = Graph(type(model).__name__)
    placeholders: dict[str, Value] = {}
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    user = [(s.arg.name, nodes[s.arg.name].meta["val"]) for s in sig.input_specs
            if s.kind == InputKind.USER_INPUT]
    rename = _symbol_names(user, dynamic_shapes, [u[0] for u in user])
    im = _Importer(ep.graph_module, g, rename)
    state = dict(ep.state_dict)
    state.update(ep.constants)
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.USER_INPUT:
            val = nodes[name].meta["val"]
            if not isinstance(val, torch.Tensor):
                raise CaptureError(f"input '{name}' is a {type(val).__name__}; only tensor "
                                   "inputs can be compiled")
            placeholders[name] = g.add_input(name, im.meta_type(nodes[name]))
        else:
            t = state[spec.target]
            placeholders[name] = g.add_constant(spec.target, t.detach())
    outs = im.run(placeholders)
    out_names = set(sig.user_outputs)
    g.outputs = [im.env[o] for o in outs if isinstance(o, torch.fx.Node) and o.name in out_names]
    return _finish(g)


def _capture_fx(model, args, kwargs, reason: Exception | None = None) -> Graph:
    from torch.fx.experimental.proxy_tensor import make_fx
    try:
        traced = torch.fx.symbolic_trace(model)
        flat = list(args) + list(kwargs.values())
        names = [n.name for n in traced.graph.nodes if n.op == "placeholder"][:len(flat)]
        gm = make_fx(lambda *xs: traced(*xs), decomposition_table=decomposition_table(),
                     pre_dispatch=True)(*flat)
    except UnsupportedOpError:
        raise
    except Exception as e:
        why = f"; torch.export failed first with {type(reason).__name__}: {_first_line(reason)}" \
            if reason else ""
        raise CaptureError(f"torch.fx.symbolic_trace could not trace "
                           f"{type(model).__name__}: {_first_line(e)}{why}",
                           hint="remove data-dependent control flow from forward()") from e
    g = Graph(type(model).__name__)
    im = _Importer(gm, g, {})
    placeholders = {}
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n, nm in zip(phs, names):
        placeholders[n.name] = g.add_input(nm, im.meta_type(n))
    outs = im.run(placeholders)
    g.outputs = [im.env[o] for o in outs if isinstance(o, torch.fx.Node)]
    return _finish(g)


def _finish(g: Graph) -> Graph:
    from qcompile.passes import run_passes
    g.outputs = [o for o in g.outputs if isinstance(o, Value)]
    g.remove_dead()
    return run_passes(g, ["fold_constants", "canonicalize"])
