"""Relax lowerings of the IR op set, each matching the interpreter's torch kernel
(``qcompile/ir/ops``): dtypes follow the node's inferred output type (torch promotion), and
where a Relax op's semantics differ (negative indices, integer division, advanced indexing,
shapes) the op is written in TE instead."""
from __future__ import annotations

import math

from qcompile.backends.tvm.lower import register_lowering
from qcompile.errors import BackendError
from qcompile.ir.types import is_float

__all__: list[str] = []


def _R():
    from tvm import relax
    return relax


def _out(n):
    return n.outputs[0]


def _axis(ax: int, rank: int) -> int:
    return ax % rank if rank else 0


# -- elementwise -------------------------------------------------------------------------------
_UNARY = {"neg": "negative", "abs": "abs", "exp": "exp", "log": "log", "sqrt": "sqrt",
          "rsqrt": "rsqrt", "tanh": "tanh", "sigmoid": "sigmoid", "erf": "erf", "sin": "sin",
          "cos": "cos", "floor": "floor", "ceil": "ceil", "round": "round", "sign": "sign"}


@register_lowering(*_UNARY)
def _unary(L, n, a):
    R = _R()
    x = L.cast(a[0], _out(n).dtype)
    if n.op in ("floor", "ceil", "round", "sign", "abs", "neg") and not is_float(_out(n).dtype):
        if n.op in ("floor", "ceil", "round"):
            return x
    return getattr(R.op, _UNARY[n.op])(x)


@register_lowering("identity")
def _identity(L, n, a):
    return a[0]


@register_lowering("reciprocal")
def _reciprocal(L, n, a):
    R = _R()
    return R.op.divide(L.const(1, _out(n).dtype), L.cast(a[0], _out(n).dtype))


def _act_kernel(L, n, a, kind: str):
    """The vectorised activation kernel over ``[rows, last]``, or None."""
    v = n.inputs[0]
    if not (L.kernels and L.info is not None and v.dtype == "float32" and v.type.rank >= 1
            and isinstance(v.type.shape[-1], int)):
        return None
    from qcompile.backends.tvm.kernels.elementwise import activation
    from qcompile.backends.tvm.linear import _flat_type, _rows, kernel_rows
    from qcompile.ir.graph import Value
    x2, rows = _rows(L, a[0], v) if v.type.rank >= 2 else (a[0], None)
    if rows is None:
        return None
    out = n.outputs[0]
    func = L.kernel(activation, kernel_rows(rows), v.type.shape[-1], kind=kind, info=L.info)
    y = L.call_kernel(func, [x2], Value(out.name, _flat_type(out)), f"act_{kind}")
    return _R().op.reshape(y, L.shape(out)) if out.type.rank != 2 else y


@register_lowering("relu", "silu")
def _act(L, n, a):
    R = _R()
    if n.op == "silu":
        k = _act_kernel(L, n, a, "silu")
        if k is not None:
            return k
    return getattr(R.op.nn, n.op)(a[0])


@register_lowering("gelu")
def _gelu(L, n, a):
    R = _R()
    k = _act_kernel(L, n, a, "gelu_tanh" if n.attrs["approximate"] == "tanh" else "gelu")
    if k is not None:
        return k
    return R.op.nn.gelu_tanh(a[0]) if n.attrs["approximate"] == "tanh" else R.op.nn.gelu(a[0])


@register_lowering("leaky_relu")
def _leaky(L, n, a):
    return _R().op.nn.leakyrelu(a[0], float(n.attrs["negative_slope"]))


@register_lowering("clamp")
def _clamp(L, n, a):
    R = _R()
    x, dt = a[0], _out(n).dtype
    if n.attrs["min"] is not None:
        x = L.emit(R.op.maximum(x, L.const(n.attrs["min"], dt)))
    if n.attrs["max"] is not None:
        x = R.op.minimum(x, L.const(n.attrs["max"], dt))
    return x


_BINARY = {"add": "add", "sub": "subtract", "mul": "multiply", "pow": "power",
           "maximum": "maximum", "minimum": "minimum", "remainder": "floor_mod",
           "bitwise_and": "bitwise_and", "bitwise_or": "bitwise_or", "bitwise_xor": "bitwise_xor"}


@register_lowering(*_BINARY)
def _binary(L, n, a):
    R = _R()
    dt = _out(n).dtype
    x, y = L.cast(a[0], dt), L.cast(a[1], dt)
    if dt == "bool" and n.op in ("add", "mul", "maximum", "minimum", "bitwise_and", "bitwise_or",
                                 "bitwise_xor"):
        op = {"add": "logical_or", "maximum": "logical_or", "bitwise_or": "logical_or",
              "mul": "logical_and", "minimum": "logical_and", "bitwise_and": "logical_and",
              "bitwise_xor": "logical_xor"}[n.op]
        return getattr(R.op, op)(x, y)
    return getattr(R.op, _BINARY[n.op])(x, y)


@register_lowering("div")
def _div(L, n, a):
    R = _R()
    dt, mode = _out(n).dtype, n.attrs["rounding_mode"]
    x, y = L.cast(a[0], dt), L.cast(a[1], dt)
    if mode is None or (mode == "trunc" and is_float(dt)):
        q = R.op.divide(x, y)
        return q if mode is None else R.op.trunc(L.emit(q))
    if mode == "floor":
        return R.op.floor_divide(x, y)
    from tvm import te, tirx
    return L.emit_te(lambda u, v: te.compute(
        [_bcast(u.shape, v.shape, i) for i in range(max(len(u.shape), len(v.shape)))],
        lambda *i: tirx.truncdiv(u[_bi(u, i)], v[_bi(v, i)])), x, y, name="truncdiv")


def _bcast(s1, s2, i):
    r = max(len(s1), len(s2))
    a = s1[i - (r - len(s1))] if i >= r - len(s1) else 1
    b = s2[i - (r - len(s2))] if i >= r - len(s2) else 1
    from tvm import tirx
    if isinstance(a, tirx.IntImm) and a.value == 1:
        return b
    return a


def _bi(t, idx):
    """Broadcast index of ``t`` inside an output index ``idx``."""
    from tvm import tirx
    off = len(idx) - len(t.shape)
    return tuple(0 if isinstance(d, tirx.IntImm) and d.value == 1 else idx[off + j]
                 for j, d in enumerate(t.shape))


_COMPARE = {"eq": "equal", "ne": "not_equal", "lt": "less", "le": "less_equal", "gt": "greater",
            "ge": "greater_equal"}


@register_lowering(*_COMPARE)
def _compare(L, n, a):
    R = _R()
    from qcompile.ir.ops._infer import promote
    dt = promote(n.inputs[0].type, n.inputs[1].type)
    return getattr(R.op, _COMPARE[n.op])(L.cast(a[0], dt), L.cast(a[1], dt))


@register_lowering("logical_and", "logical_or", "logical_xor")
def _logical(L, n, a):
    return getattr(_R().op, n.op)(L.cast(a[0], "bool"), L.cast(a[1], "bool"))


@register_lowering("logical_not")
def _not(L, n, a):
    return _R().op.logical_not(L.cast(a[0], "bool"))


@register_lowering("where")
def _where(L, n, a):
    dt = _out(n).dtype
    return _R().op.where(L.cast(a[0], "bool"), L.cast(a[1], dt), L.cast(a[2], dt))


@register_lowering("cast")
def _cast(L, n, a):
    return L.cast(a[0], n.attrs["dtype"])


# -- linear algebra ---------------------------------------------------------------------------
@register_lowering("linear")
def _linear(L, n, a):
    from qcompile.backends.tvm.linear import lower_linear
    return lower_linear(L, n, a)


@register_lowering("matmul")
def _matmul(L, n, a):
    dt = _out(n).dtype
    return _R().op.matmul(L.cast(a[0], dt), L.cast(a[1], dt))


def _conv_im2col(L, n, a):
    """A 2-D convolution (groups = 1, constant weight) as im2col + the packed dense kernel:
    ``cols[(n, oh, ow), (c, kh, kw)]`` gathered with zero padding, ``y = cols·Wᵀ + b``, then
    back to NCHW. None when it does not apply."""
    from tvm import te, tirx

    from qcompile.backends.tvm.kernels import dense as K
    from qcompile.backends.tvm.linear import _const_np, kernel_rows
    from qcompile.ir.graph import Value
    from qcompile.ir.types import TensorType, dim_mul
    xv, wv = n.inputs[0], n.inputs[1]
    out = _out(n)
    if not (L.kernels and L.info is not None and wv.type.rank == 4 and n.attrs["groups"] == 1
            and L.graph.is_constant(wv) and xv.dtype == "float32" and wv.dtype == "float32"
            and all(isinstance(d, int) for d in xv.type.shape[1:] + out.type.shape[1:])):
        return None
    o, c, kh, kw = wv.type.shape
    _, _, h, wd = xv.type.shape
    oh, ow = out.type.shape[2], out.type.shape[3]
    (s0, s1), (p0, p1), (d0, d1) = n.attrs["stride"], n.attrs["padding"], n.attrs["dilation"]
    kdim = c * kh * kw

    def im2col(x):
        def body(r, q):
            bi, pix = tirx.floordiv(r, oh * ow), tirx.floormod(r, oh * ow)
            y0, x0 = tirx.floordiv(pix, ow), tirx.floormod(pix, ow)
            ci, kk = tirx.floordiv(q, kh * kw), tirx.floormod(q, kh * kw)
            iy = y0 * s0 - p0 + tirx.floordiv(kk, kw) * d0
            ix = x0 * s1 - p1 + tirx.floormod(kk, kw) * d1
            inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < wd)
            return tirx.if_then_else(inside, x[bi, ci, tirx.max(tirx.min(iy, h - 1), 0),
                                                tirx.max(tirx.min(ix, wd - 1), 0)],
                                     tirx.const(0.0, "float32"))
        return te.compute((x.shape[0] * (oh * ow), kdim), body, name="im2col")
    cols = L.emit_te(im2col, a[0], name="im2col")
    rows = L.prim(xv.type.shape[0]) * (oh * ow)
    packed = L.add_param(f"{wv.name}.packed",
                         K.pack_dense_weight(_const_np(L, wv).reshape(o, kdim), L.info))
    L.consumed.add(wv.name)
    args = [cols, packed] + ([a[2]] if a[2] is not None else [])
    func = L.kernel(K.dense, kernel_rows(rows), o, kdim, bias=a[2] is not None, epilogue=None,
                    residual=False, info=L.info)
    flat = Value(out.name, TensorType((dim_mul(xv.type.shape[0], oh * ow), o), "float32"))
    y = L.call_kernel(func, args, flat, "conv_dense")
    y = L.emit(_R().op.reshape(y, [L.prim(xv.type.shape[0]), oh, ow, o]))
    L.report["conv.im2col_dense"] = L.report.get("conv.im2col_dense", 0) + 1
    return _R().op.permute_dims(y, [0, 3, 1, 2])


@register_lowering("conv")
def _conv(L, n, a):
    R = _R()
    fused = _conv_im2col(L, n, a)
    if fused is not None:
        return fused
    x, w, b = a
    w = w if w is not None else L.get(n.inputs[1])
    nd = len(n.inputs[1].type.shape) - 2
    fn = {1: R.op.nn.conv1d, 2: R.op.nn.conv2d, 3: R.op.nn.conv3d}.get(nd)
    if fn is None:
        raise BackendError(f"conv with a rank-{nd + 2} weight has no TVM lowering", node=n)
    pads = list(n.attrs["padding"]) * 2  # torch pads symmetrically: (begin..., end...)
    y = L.emit(fn(x, w, strides=n.attrs["stride"], padding=pads, dilation=n.attrs["dilation"],
                  groups=n.attrs["groups"]))
    if b is not None:
        y = R.op.add(y, R.op.reshape(b, [1, -1] + [1] * nd))
    return y


@register_lowering("batch_norm")
def _batch_norm(L, n, a):
    R = _R()
    x, w, b, mean, var = a
    rank = n.inputs[0].type.rank
    shape = [1, -1] + [1] * (rank - 2)
    r = lambda t: L.emit(R.op.reshape(t, shape))  # noqa: E731
    inv = L.emit(R.op.rsqrt(R.op.add(var, L.const(n.attrs["eps"], "float32"))))
    y = L.emit(R.op.multiply(R.op.subtract(x, r(mean)), r(inv)))
    if w is not None:
        y = L.emit(R.op.multiply(y, r(w)))
    return R.op.add(y, r(b)) if b is not None else y


def _norm_axes(n):
    rank = n.inputs[0].type.rank
    return list(range(rank - n.attrs["normalized_ndim"], rank))


@register_lowering("layer_norm")
def _layer_norm(L, n, a):
    from qcompile.backends.tvm.norms import lower_layer_norm
    return lower_layer_norm(L, n, a, _norm_axes(n))


@register_lowering("rms_norm")
def _rms_norm(L, n, a):
    from qcompile.backends.tvm.norms import lower_rms_norm
    return lower_rms_norm(L, n, a, _norm_axes(n))


def _pool_pads(n):
    p = list(n.attrs["padding"])
    return p + p


@register_lowering("max_pool2d")
def _max_pool(L, n, a):
    return _R().op.nn.max_pool2d(a[0], n.attrs["kernel"], n.attrs["stride"], _pool_pads(n),
                                 n.attrs["dilation"], ceil_mode=n.attrs["ceil_mode"])


@register_lowering("avg_pool2d")
def _avg_pool(L, n, a):
    R = _R()
    y = R.op.nn.avg_pool2d(a[0], n.attrs["kernel"], n.attrs["stride"], _pool_pads(n),
                           ceil_mode=n.attrs["ceil_mode"],
                           count_include_pad=n.attrs["count_include_pad"] or
                           n.attrs["divisor_override"] is not None)
    d = n.attrs["divisor_override"]
    if d is not None:  # a sum over the window (pads count as zeros) divided by d
        k = n.attrs["kernel"][0] * n.attrs["kernel"][1]
        y = R.op.multiply(L.emit(y), L.const(k / d, _out(n).dtype))
    return y


@register_lowering("adaptive_avg_pool2d")
def _adaptive(L, n, a):
    return _R().op.nn.adaptive_avg_pool2d(a[0], n.attrs["output_size"])


@register_lowering("embedding")
def _embedding(L, n, a):
    return _take_rows(L, n.inputs[0], a[0], a[1], n.inputs[1].type.rank, 0, _out(n))


def _take_rows(L, v, x, idx, irank: int, ax: int, out):
    """``x`` gathered along ``ax`` by an index tensor (negative indices wrap)."""
    from tvm import te, tirx

    def f(t, ix):
        size = t.shape[ax]

        def body(*i):
            j = ix[tuple(i[ax:ax + irank])].astype("int64")
            j = tirx.Select(j < 0, j + size, j)
            return t[tuple(i[:ax]) + (j,) + tuple(i[ax + irank:])]
        return te.compute(L.shape(out), body, name="take")
    return L.emit_te(f, x, idx, name="take")


@register_lowering("attention")
def _attention(L, n, a):
    from qcompile.backends.tvm.attention import lower_attention
    return lower_attention(L, n, a)


@register_lowering("kv_write")
def _kv_write(L, n, a):
    """In place: the result aliases the cache (``call_tir_inplace``); the executable passes
    the caller's cache tensor itself (see ``TVMExecutable``)."""
    from tvm import relax

    from qcompile.backends.tvm.kernels.cache import kv_write, kv_write_quant
    from qcompile.backends.tvm.lower import _with_root_block
    from qcompile.errors import BackendError
    ct, nt = n.inputs[0].type, n.inputs[1].type
    bits = n.attrs["bits"]
    if ct.rank != 4 or n.attrs["axis"] not in (2, -2) or not all(
            isinstance(d, int) for d in (ct.shape[1], ct.shape[2], ct.shape[3])):
        raise BackendError(f"kv_write on {ct} along axis {n.attrs['axis']}: the TVM backend "
                           "writes caches [batch, heads, seq, dim] with static heads, seq and dim",
                           hint="capture with qcompile.llm, which lays the cache out that way")
    batch = ct.shape[0] if isinstance(ct.shape[0], int) else None
    tokens = nt.shape[2] if isinstance(nt.shape[2], int) else None
    if bits:
        func = L.kernel(kv_write_quant, batch, ct.shape[1], ct.shape[2], tokens, nt.shape[3], bits)
    else:
        func = L.kernel(kv_write, batch, ct.shape[1], ct.shape[2], tokens, ct.shape[3], ct.dtype)
    func = _with_root_block(func).with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True)
    gv = L.bb.add_func(func.without_attr("global_symbol"), "kv_write")
    slot = L.cast(a[2], "int64")
    return relax.op.call_tir_inplace(gv, [a[0], a[1], slot], [0],
                                     relax.TensorType(L.shape(_out(n)), ct.dtype))


@register_lowering("kv_read")
def _kv_read(L, n, a):
    from qcompile.backends.tvm.kernels.cache import kv_read_rows
    return L.emit_te(lambda c: kv_read_rows(c, n.attrs["bits"], n.attrs["dim"]), a[0],
                     name="kv_read")


@register_lowering("rotary")
def _rotary(L, n, a):
    R = _R()
    x, cos, sin = a
    d = n.inputs[0].type.shape[-1]
    h = d // 2
    ax = n.inputs[0].type.rank - 1
    lo = L.emit(R.op.strided_slice(x, [ax], [0], [h]))
    hi = L.emit(R.op.strided_slice(x, [ax], [h], [d]))
    rot = L.emit(R.op.concat([L.emit(R.op.negative(hi)), lo], axis=ax))
    dt = _out(n).dtype
    return R.op.add(R.op.multiply(x, L.cast(cos, dt)), R.op.multiply(rot, L.cast(sin, dt)))


@register_lowering("softmax", "log_softmax")
def _softmax(L, n, a):
    from qcompile.backends.tvm.norms import lower_softmax
    return lower_softmax(L, n, a)


@register_lowering("hadamard")
def _hadamard(L, n, a):
    from qcompile.backends.tvm.rotation import lower_hadamard
    return lower_hadamard(L, n, a)


# -- reductions ---------------------------------------------------------------------------------
def _red_axes(n):
    rank = n.inputs[0].type.rank
    axes = n.attrs.get("axes")
    return [x % rank for x in axes] if axes else list(range(rank))


@register_lowering("sum", "mean", "amax", "amin", "prod")
def _reduce(L, n, a):
    R = _R()
    fn = {"sum": "sum", "mean": "mean", "amax": "max", "amin": "min", "prod": "prod"}[n.op]
    x = L.cast(a[0], _out(n).dtype) if n.op in ("sum", "prod") else a[0]
    if n.inputs[0].type.rank == 0:
        return x
    return getattr(R.op, fn)(x, axis=_red_axes(n), keepdims=n.attrs["keepdim"])


@register_lowering("var")
def _var(L, n, a):
    R = _R()
    axes = _red_axes(n)
    x = a[0]
    m = L.emit(R.op.mean(x, axis=axes, keepdims=True))
    sq = L.emit(R.op.square(R.op.subtract(x, m)))
    s = L.emit(R.op.sum(sq, axis=axes, keepdims=n.attrs["keepdim"]))
    sizes = [n.inputs[0].type.shape[i] for i in axes]
    if not all(isinstance(d, int) for d in sizes):
        raise BackendError("var over a symbolic axis has no TVM lowering", node=n)
    count = math.prod(sizes) - n.attrs["correction"]
    return R.op.divide(s, L.const(count, _out(n).dtype))


@register_lowering("argmax")
def _argmax(L, n, a):
    return _R().op.argmax(a[0], axis=n.attrs["axis"], keepdims=n.attrs["keepdim"])


@register_lowering("cumsum")
def _cumsum(L, n, a):
    dt = _out(n).dtype
    return _R().op.cumsum(L.cast(a[0], dt), axis=n.attrs["axis"], dtype=dt)


# -- shapes -----------------------------------------------------------------------------------
@register_lowering("reshape")
def _reshape(L, n, a):
    return _R().op.reshape(a[0], L.shape(_out(n)))


@register_lowering("permute")
def _permute(L, n, a):
    rank = n.inputs[0].type.rank
    return _R().op.permute_dims(a[0], [p % rank for p in n.attrs["perm"]])


@register_lowering("expand")
def _expand(L, n, a):
    return _R().op.broadcast_to(a[0], L.shape(_out(n)))


@register_lowering("slice")
def _slice(L, n, a):
    from tvm import te
    v = n.inputs[0]
    ax = _axis(n.attrs["axis"], v.type.rank)
    start, size, step = n.attrs["start"], v.type.shape[ax], n.attrs["step"]
    if isinstance(start, int) and isinstance(size, int):
        start = slice(start, None, step).indices(size)[0]

    def f(t):
        # sizes from the tensor itself: emit_te gives each input its own shape variables
        s0 = t.shape[ax] + start if isinstance(start, int) and start < 0 else L.prim(start)
        return te.compute(L.shape(_out(n)), lambda *i: t[
            tuple(s0 + i[k] * step if k == ax else i[k] for k in range(len(i)))], name="slice")
    return L.emit_te(f, a[0], name="slice")


@register_lowering("select")
def _select(L, n, a):
    from tvm import te
    v = n.inputs[0]
    ax = _axis(n.attrs["axis"], v.type.rank)
    idx = n.attrs["index"]

    def f(t):
        i0 = t.shape[ax] + idx if isinstance(idx, int) and idx < 0 else L.prim(idx)
        return te.compute(L.shape(_out(n)), lambda *i: t[tuple(i[:ax]) + (i0,) + tuple(i[ax:])],
                          name="select")
    return L.emit_te(f, a[0], name="select")


@register_lowering("concat")
def _concat(L, n, a):
    dt = _out(n).dtype
    return _R().op.concat([L.cast(x, dt) for x in a], axis=_axis(n.attrs["axis"], _out(n).type.rank))


@register_lowering("take")
def _take(L, n, a):
    v = n.inputs[0]
    return _take_rows(L, v, a[0], a[1], n.inputs[1].type.rank, _axis(n.attrs["axis"], v.type.rank),
                      _out(n))


@register_lowering("gather")
def _gather(L, n, a):
    return _R().op.gather_elements(a[0], L.cast(a[1], "int64"),
                                   axis=_axis(n.attrs["axis"], n.inputs[0].type.rank))


@register_lowering("index")
def _index(L, n, a):
    from tvm import te, tirx
    x = n.inputs[0]
    rank = x.type.rank
    axes = [ax % rank for ax in n.attrs["axes"]]
    if any(v.dtype == "bool" for v in n.inputs[1:]):
        raise BackendError("boolean-mask indexing has a data-dependent shape; no TVM lowering",
                           node=n)
    from qcompile.ir.ops._infer import broadcast_shapes
    b = broadcast_shapes(*[v.type.shape for v in n.inputs[1:]])
    nb = len(b)
    consecutive = axes == list(range(axes[0], axes[0] + len(axes)))
    first = axes[0] if consecutive else 0
    rest = [i for i in range(rank) if i not in axes]
    def f(t, *idx):
        sizes = list(t.shape)

        def body(*o):
            bi = o[first:first + nb]
            src = [None] * rank
            for ax, ix in zip(axes, idx):
                off = nb - len(ix.shape)
                key = tuple(0 if isinstance(d, tirx.IntImm) and d.value == 1 else bi[off + j]
                            for j, d in enumerate(ix.shape))
                j = ix[key].astype("int64")
                src[ax] = tirx.Select(j < 0, j + sizes[ax], j)
            others = list(o[:first]) + list(o[first + nb:])
            for ax, oi in zip(rest, others):
                src[ax] = oi
            return t[tuple(src)]
        return te.compute(L.shape(_out(n)), body, name="index")
    return L.emit_te(f, a[0], *a[1:], name="index")


@register_lowering("tril", "triu")
def _tri(L, n, a):
    return getattr(_R().op, n.op)(a[0], n.attrs["diagonal"])


@register_lowering("pad")
def _pad(L, n, a):
    pads = list(n.attrs["pads"])
    rank = n.inputs[0].type.rank
    width = [0] * (2 * rank)
    for i in range(len(pads) // 2):
        ax = rank - 1 - i
        width[2 * ax], width[2 * ax + 1] = pads[2 * i], pads[2 * i + 1]
    mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.get(n.attrs["mode"])
    if mode is None:
        raise BackendError(f"pad mode {n.attrs['mode']!r} has no TVM lowering", node=n)
    return _R().op.nn.pad(a[0], width, mode, float(n.attrs["value"]))


@register_lowering("tile")
def _tile(L, n, a):
    reps = list(n.attrs["repeats"])
    rank = n.inputs[0].type.rank
    x = a[0]
    if len(reps) > rank:
        x = L.emit(_R().op.reshape(x, [1] * (len(reps) - rank) + L.shape(n.inputs[0])))
    return _R().op.tile(x, reps)


@register_lowering("arange")
def _arange(L, n, a):
    from tvm import te
    s = L.prim(n.attrs["start"])
    step = n.attrs["step"]
    dt = _out(n).dtype
    return L.emit_te(lambda: te.compute(L.shape(_out(n)), lambda i: (s + i * step).astype(dt),
                                        name="arange"), name="arange")


@register_lowering("full")
def _full(L, n, a):
    from tvm import te, tirx
    dt = _out(n).dtype
    value = n.attrs["value"]
    c = tirx.const(bool(value) if dt == "bool" else value, dt)
    return L.emit_te(lambda: te.compute(L.shape(_out(n)), lambda *i: c, name="full"), name="full")


@register_lowering("shape_of")
def _shape_of(L, n, a):
    from tvm import te, tirx
    dims = L.shape(n.inputs[0])
    ax = n.attrs["axis"]
    if ax is not None:
        d = dims[ax]
        return L.emit_te(lambda: te.compute((), lambda: d, name="dim"), name="shape_of")

    def body(i):
        out = dims[-1] if dims else tirx.IntImm("int64", 0)
        for k in range(len(dims) - 2, -1, -1):
            out = tirx.Select(i == k, dims[k], out)
        return out
    return L.emit_te(lambda: te.compute((len(dims),), body, name="shape"), name="shape_of")


# -- explicit quantization ops -----------------------------------------------------------------
def _expand_param(p, x_shape, axis, block, rank):
    """The index of a per-axis / per-block parameter for element index ``i``."""
    def at(i):
        if len(p.shape) == 0:
            return p[()]
        j = i[axis] if not block else i[axis] // block
        return p[(j,)] if len(p.shape) == 1 else p[tuple(
            (i[k] if k != axis else j) for k in range(rank))]
    return at


@register_lowering("quantize", "dequantize")
def _qdq(L, n, a):
    from tvm import te, tirx

    from qcompile.ir.quant import int_range
    qmin, qmax = int_range(n.attrs["format"])
    rank = n.inputs[0].type.rank
    axis = n.attrs["axis"] % rank if rank else 0
    block = n.attrs["block_size"]
    dt = _out(n).dtype

    def f(x, s, *z):
        ps = _expand_param(s, x.shape, axis, block, rank)
        pz = _expand_param(z[0], x.shape, axis, block, rank) if z else None

        def body(*i):
            sv = ps(i).astype("float32")
            zv = pz(i).astype("float32") if pz else tirx.const(0.0, "float32")
            if n.op == "quantize":
                q = tirx.nearbyint(x[i].astype("float32") / sv) + zv
                q = tirx.max(tirx.min(q, tirx.const(float(qmax), "float32")),
                             tirx.const(float(qmin), "float32"))
                return q.astype(dt)
            return ((x[i].astype("float32") - zv) * sv).astype(dt)
        return te.compute(x.shape, body, name=n.op)
    args = [a[0], a[1]] + ([a[2]] if a[2] is not None else [])
    return L.emit_te(f, *args, name=n.op)
