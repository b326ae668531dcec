"""Neural-network ops kept whole so that passes can match them: linear, matmul, conv,
norms, pooling, embedding, attention, rotary embedding, softmax and reductions."""
from __future__ import annotations

import sympy
import torch
import torch.nn.functional as F

from qcompile.ir.ops._infer import broadcast_shapes, norm_axis, reduce_shape, same
from qcompile.ir.registry import Attr, op
from qcompile.ir.types import TensorType, dim_expr, dims_equal, is_float, make_dim

__all__ = ["kv_row_bytes", "kv_quantize_rows", "kv_dequantize_rows"]


def _check_dim(a, b, what):
    if not dims_equal(a, b):
        raise ValueError(f"{what}: {a} != {b}")


def _linear_infer(t, a):
    x, w = t[0], t[1]
    if w.rank != 2:
        raise ValueError(f"linear weight must be 2-D [out, in], got {w}")
    _check_dim(x.shape[-1], w.shape[1], "linear input features vs weight in-features")
    if t[2] is not None:
        _check_dim(t[2].shape[-1], w.shape[0], "linear bias vs out-features")
    return TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)


@op("linear", inputs=("x", "weight", "bias?"), infer=_linear_infer)
def linear(x, weight, bias):
    """y = x Wᵀ + b, weight laid out [out_features, in_features] as in torch."""
    return F.linear(x, weight, bias)


def _matmul_infer(t, a):
    x, y = t
    if x.rank == 0 or y.rank == 0:
        raise ValueError("matmul needs operands of rank >= 1")
    xs = x.shape if x.rank > 1 else (1,) + x.shape
    ys = y.shape if y.rank > 1 else y.shape + (1,)
    _check_dim(xs[-1], ys[-2], "matmul contraction")
    batch = broadcast_shapes(xs[:-2], ys[:-2])
    out = batch + (xs[-2] if x.rank > 1 else None, ys[-1] if y.rank > 1 else None)
    return TensorType(tuple(d for d in out if d is not None), x.dtype)


@op("matmul", inputs=("a", "b"), infer=_matmul_infer)
def matmul(a, b):
    """Batched matrix product with numpy broadcasting rules."""
    return torch.matmul(a, b)


def _conv_out(n, k, s, p, d):
    e = sympy.floor((dim_expr(n) + 2 * p - d * (k - 1) - 1) / s) + 1
    return make_dim(e)


_CONV_ATTRS = {"stride": Attr("ints"), "padding": Attr("ints"), "dilation": Attr("ints"),
               "groups": Attr("int", 1)}


def _conv_infer(t, a):
    x, w = t[0], t[1]
    nd = w.rank - 2
    if x.rank != nd + 2:
        raise ValueError(f"conv{nd}d expects a rank-{nd + 2} input, got {x}")
    _check_dim(x.shape[1], w.shape[1] * a["groups"], "conv input channels vs weight")
    spatial = tuple(_conv_out(x.shape[2 + i], w.shape[2 + i], a["stride"][i], a["padding"][i],
                              a["dilation"][i]) for i in range(nd))
    return TensorType((x.shape[0], w.shape[0]) + spatial, x.dtype)


@op("conv", inputs=("x", "weight", "bias?"), attrs=_CONV_ATTRS, infer=_conv_infer)
def conv(x, weight, bias, stride, padding, dilation, groups):
    """N-d convolution (1-d/2-d/3-d by the weight's rank), NC(D)HW layout, cross-correlation."""
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    return fn(x, weight, bias, stride, padding, dilation, groups)


@op("batch_norm", inputs=("x", "weight?", "bias?", "mean", "var"), attrs={"eps": Attr("float", 1e-5)},
    infer=same)
def batch_norm(x, weight, bias, mean, var, eps):
    """Inference batch norm (Ioffe & Szegedy 2015, Alg. 1 with running statistics)."""
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


@op("layer_norm", inputs=("x", "weight?", "bias?"),
    attrs={"normalized_ndim": Attr("int", 1), "eps": Attr("float", 1e-5)}, infer=same)
def layer_norm(x, weight, bias, normalized_ndim, eps):
    """LayerNorm over the last ``normalized_ndim`` axes (Ba et al. 2016, eq. 4)."""
    return F.layer_norm(x, x.shape[x.dim() - normalized_ndim:], weight, bias, eps)


@op("rms_norm", inputs=("x", "weight?"),
    attrs={"normalized_ndim": Attr("int", 1), "eps": Attr("float", 1e-6)}, infer=same)
def rms_norm(x, weight, normalized_ndim, eps):
    """RMSNorm (Zhang & Sennrich 2019, eq. 4): x / sqrt(mean(x²) + eps) · g, computed in fp32."""
    dims = tuple(range(x.dim() - normalized_ndim, x.dim()))
    xf = x.to(torch.float32)
    y = (xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)).to(x.dtype)
    return y * weight if weight is not None else y


_POOL_ATTRS = {"kernel": Attr("ints"), "stride": Attr("ints"), "padding": Attr("ints"),
               "dilation": Attr("ints", [1, 1]), "ceil_mode": Attr("bool", False)}


def _pool_out(n, k, s, p, d, ceil):
    e = (dim_expr(n) + 2 * p - d * (k - 1) - 1) / s
    e = (sympy.ceiling(e) if ceil else sympy.floor(e)) + 1
    if ceil and s > d * (k - 1) + 1 - p:
        # torch drops a last window that would start inside the right padding (only possible
        # when the stride exceeds the window's reach past the padding)
        e = sympy.Piecewise((e - 1, (e - 1) * s >= dim_expr(n) + p), (e, True))
    return make_dim(e)


def _pool_infer(t, a):
    x = t[0]
    sp = tuple(_pool_out(x.shape[-2 + i], a["kernel"][i], a["stride"][i], a["padding"][i],
                         a["dilation"][i], a["ceil_mode"]) for i in range(2))
    return TensorType(x.shape[:-2] + sp, x.dtype)


@op("max_pool2d", inputs=("x",), attrs=_POOL_ATTRS, infer=_pool_infer)
def max_pool2d(x, kernel, stride, padding, dilation, ceil_mode):
    return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)


def _avg_pool_infer(t, a):
    if list(a["dilation"]) != [1, 1]:
        raise ValueError(f"avg_pool2d has no dilation (torch's kernel ignores it), got {a['dilation']}")
    return _pool_infer(t, a)


@op("avg_pool2d", inputs=("x",),
    attrs={**_POOL_ATTRS, "count_include_pad": Attr("bool", True),
           "divisor_override": Attr("int", None, True)}, infer=_avg_pool_infer)
def avg_pool2d(x, kernel, stride, padding, dilation, ceil_mode, count_include_pad, divisor_override):
    return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)


@op("adaptive_avg_pool2d", inputs=("x",), attrs={"output_size": Attr("ints")},
    infer=lambda t, a: TensorType(t[0].shape[:-2] + tuple(a["output_size"]), t[0].dtype))
def adaptive_avg_pool2d(x, output_size):
    return F.adaptive_avg_pool2d(x, output_size)


@op("embedding", inputs=("weight", "indices"),
    infer=lambda t, a: TensorType(t[1].shape + t[0].shape[1:], t[0].dtype))
def embedding(weight, indices):
    """Row lookup: out[..., :] = weight[indices[...], :]."""
    return F.embedding(indices, weight)


def _attention_infer(t, a):
    q, k, v = t[0], t[1], t[2]
    if q.rank < 3 or k.rank != q.rank or v.rank != q.rank:
        raise ValueError("attention expects q, k, v of equal rank >= 3 ([..., heads, seq, dim])")
    _check_dim(q.shape[-1], k.shape[-1], "attention q/k head dim")
    _check_dim(k.shape[-2], v.shape[-2], "attention k/v sequence length")
    if q.rank >= 4 and not a["gqa"]:
        _check_dim(q.shape[-3], k.shape[-3], "attention heads (set gqa for grouped KV heads)")
    return TensorType(q.shape[:-1] + (v.shape[-1],), q.dtype)


@op("attention", inputs=("q", "k", "v", "mask?"),
    attrs={"scale": Attr("float", None, True), "causal": Attr("bool", False),
           "gqa": Attr("bool", False)}, infer=_attention_infer)
def attention(q, k, v, mask, scale, causal, gqa):
    """softmax(q kᵀ · scale + mask) v (Vaswani et al. 2017, eq. 1); a bool mask keeps True
    positions; ``causal`` masks the future; ``gqa`` shares each KV head among q-head groups
    (Ainslie et al. 2023)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=gqa)


def kv_row_bytes(dim: int, bits: int) -> int:
    """Bytes of one quantized cache row: ``dim`` codes of ``bits`` and its fp32 scale."""
    return dim * bits // 8 + 4


def kv_quantize_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Rows ``x`` [..., dim] as stored in a quantized KV cache (uint8 [..., kv_row_bytes]):
    symmetric per-token codes (KIVI's value scheme, Liu et al. 2024 §3; the per-token key
    variant of KVQuant, Hooper et al. 2024) ``q = clamp(round(x / s), -m, m)`` with
    ``s = max|x| / m`` and ``m = 2**(bits-1) - 1``, round half to even; int8 codes one per
    byte, int4 codes two per byte (low nibble first); the fp32 scale in the last 4 bytes."""
    m = (1 << (bits - 1)) - 1
    x = x.float()
    s = x.abs().amax(-1, keepdim=True) / m
    q = torch.where(s > 0, torch.round(x / torch.where(s > 0, s, 1.0)), 0.0).clamp(-m, m)
    q = q.to(torch.int8)
    if bits == 4:
        q = (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)
    codes = q.view(torch.uint8)
    return torch.cat([codes, s.contiguous().view(torch.uint8)], -1)


def kv_dequantize_rows(rows: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The fp32 rows [..., dim] that :func:`kv_quantize_rows` stored."""
    ncode = dim * bits // 8
    s = rows[..., ncode:].contiguous().view(torch.float32)
    c = rows[..., :ncode].contiguous().view(torch.int8)
    if bits == 4:
        lo = (c << 4) >> 4                      # sign-extend each nibble
        hi = c >> 4
        c = torch.stack([lo, hi], -1).flatten(-2)
    return c.float() * s


def _kv_write_infer(t, a):
    cache, new, slot = t
    if cache.rank != new.rank:
        raise ValueError(f"kv_write: cache {cache} and new rows {new} differ in rank")
    axis = norm_axis(a["axis"], cache.rank)
    bits = a["bits"]
    if bits not in (0, 4, 8):
        raise ValueError(f"kv_write: bits must be 0 (float rows), 8 or 4, got {bits}")
    for i, (c, n) in enumerate(zip(cache.shape, new.shape)):
        if i == cache.rank - 1 and bits:
            if not isinstance(n, int) or c != kv_row_bytes(n, bits) or cache.dtype != "uint8":
                raise ValueError(f"kv_write: a {bits}-bit cache holds uint8 rows of "
                                 f"{kv_row_bytes(n, bits) if isinstance(n, int) else '?'} bytes "
                                 f"for rows of {n}; got {cache}")
        elif i != axis:
            _check_dim(c, n, f"kv_write cache vs new rows (axis {i})")
    if axis == cache.rank - 1 and bits:
        raise ValueError("kv_write: a quantized cache is written along a row axis, not the last")
    if slot.dtype not in ("int32", "int64") or slot.rank != 1:
        raise ValueError(f"kv_write: slot must be an int32/int64 tensor of shape [1], got {slot}")
    return cache


@op("kv_write", inputs=("cache", "new", "slot"),
    attrs={"axis": Attr("int", -2), "bits": Attr("int", 0)}, infer=_kv_write_infer)
def kv_write(cache, new, slot, axis, bits):
    """The KV cache as state: ``new``'s rows written into ``cache`` along ``axis`` at
    positions ``slot[0]`` .. ``slot[0] + new.shape[axis] - 1``; the result is ``cache``.
    ``bits`` 8 or 4: the cache stores each row quantized (:func:`kv_quantize_rows`, uint8
    rows of :func:`kv_row_bytes`); 0: as it is.

    The only op that updates an input in place (as llama.cpp's ``ggml_cpy`` into a view of
    its cache, or ORT's GroupQueryAttention with a shared past/present buffer): a decode step
    costs one row per layer, never a copy of the cache. The cache must be a graph input that
    no other node reads (checked by ``qcompile.llm``), so the write is invisible to the rest
    of the graph."""
    start = int(slot.reshape(-1)[0])
    n = new.shape[axis]
    if start < 0 or start + n > cache.shape[axis]:
        raise IndexError(f"kv_write: rows {start}..{start + n - 1} outside a cache of "
                         f"{cache.shape[axis]} positions")
    cache.narrow(axis, start, n).copy_(kv_quantize_rows(new, bits) if bits else new)
    return cache


def _kv_read_infer(t, a):
    c = t[0]
    if c.dtype != "uint8" or c.shape[-1] != kv_row_bytes(a["dim"], a["bits"]):
        raise ValueError(f"kv_read: a {a['bits']}-bit cache of rows of {a['dim']} is uint8 "
                         f"[..., {kv_row_bytes(a['dim'], a['bits'])}]; got {c}")
    return TensorType(c.shape[:-1] + (a["dim"],), "float32")


@op("kv_read", inputs=("cache",), attrs={"bits": Attr("int"), "dim": Attr("int")},
    infer=_kv_read_infer)
def kv_read(cache, bits, dim):
    """A quantized KV cache's rows as fp32 (:func:`kv_dequantize_rows`): what attention reads."""
    return kv_dequantize_rows(cache, bits, dim)


@op("rotary", inputs=("x", "cos", "sin"),
    infer=lambda t, a: TensorType(broadcast_shapes(t[0].shape, t[1].shape), t[0].dtype))
def rotary(x, cos, sin):
    """Rotary position embedding, half-split form (Su et al. 2021, eq. 34 as in GPT-NeoX/Llama):
    x·cos + rotate_half(x)·sin with rotate_half(x) = [-x₂, x₁]."""
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rot * sin


_AXIS = {"axis": Attr("int", -1)}


@op("softmax", inputs=("x",), attrs=_AXIS, infer=same)
def softmax(x, axis):
    return torch.softmax(x, axis)


@op("log_softmax", inputs=("x",), attrs=_AXIS, infer=same)
def log_softmax(x, axis):
    return torch.log_softmax(x, axis)


@op("cumsum", inputs=("x",), attrs={"axis": Attr("int")},
    infer=lambda t, a: TensorType(t[0].shape, "int64" if t[0].dtype in ("bool", "int8", "uint8",
                                                                        "int16", "int32") else t[0].dtype))
def cumsum(x, axis):
    return torch.cumsum(x, axis)


_RED = {"axes": Attr("ints", None, True), "keepdim": Attr("bool", False)}


def _reduce_infer(t, a):
    return TensorType(reduce_shape(t[0].shape, a["axes"], a["keepdim"]), t[0].dtype)


def _sum_infer(t, a):
    """sum and prod accumulate bool and integer inputs in int64, as torch does."""
    out = _reduce_infer(t, a)
    return out if is_float(out.dtype) else TensorType(out.shape, "int64")


def _red(fn):
    def kernel(x, axes, keepdim):
        if not axes:
            axes = list(range(x.dim()))
        return fn(x, axes, keepdim)
    return kernel


op("sum", inputs=("x",), attrs=_RED, infer=_sum_infer)(
    _red(lambda x, d, k: torch.sum(x, d, keepdim=k)))
op("mean", inputs=("x",), attrs=_RED, infer=_reduce_infer)(
    _red(lambda x, d, k: torch.mean(x, d, keepdim=k)))
op("amax", inputs=("x",), attrs=_RED, infer=_reduce_infer)(
    _red(lambda x, d, k: torch.amax(x, d, keepdim=k)))
op("amin", inputs=("x",), attrs=_RED, infer=_reduce_infer)(
    _red(lambda x, d, k: torch.amin(x, d, keepdim=k)))
op("prod", inputs=("x",), attrs=_RED, infer=_sum_infer)(
    _red(lambda x, d, k: _prod(x, d, k)))


def _prod(x, dims, keepdim):
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, d, keepdim=keepdim)
    return x


@op("var", inputs=("x",), attrs={**_RED, "correction": Attr("float", 1.0)}, infer=_reduce_infer)
def var(x, axes, keepdim, correction):
    return torch.var(x, axes if axes else None, correction=correction, keepdim=keepdim)


@op("argmax", inputs=("x",), attrs={"axis": Attr("int"), "keepdim": Attr("bool", False)},
    infer=lambda t, a: TensorType(reduce_shape(t[0].shape, [norm_axis(a["axis"], t[0].rank)],
                                               a["keepdim"]), "int64"))
def argmax(x, axis, keepdim):
    return torch.argmax(x, axis, keepdim=keepdim)


