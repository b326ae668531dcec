"""Quantized ``linear`` lowerings, chosen from the weight's and the input's annotations:

- **W8A8**: an ``int8 per_token`` activation copy (symmetric, fp32 scale, no clipping) feeding
  an ``int8`` per-channel weight → ``int8_matmul``: the kernel quantizes the float rows itself
  (the same arithmetic as the interpreter's fake quantization) and accumulates exactly in
  int32 (VNNI ``vpdpbusd`` where the CPU has it);
- **weight-only integer** (``intN`` symmetric, ``uintN`` with zero points; 2/3/4/8 bits; per
  group or per channel) → ``dequant_matmul`` (GEMV for few rows, GEMM from 16 rows on);
- **MXFP4 / MXINT8** weights → ``mx_dequant_matmul``.

On CUDA (no CPU kernels) an integer weight becomes packed words and scales decoded inside one
TE matmul, ``y[m, n] = Σ_k x[m, k]·(code(n, k) − z)·s``, which dlight's GPU GEMV / matmul rules
schedule — weight traffic stays at the code width (the MLC-LLM "decode-GEMV" pattern).

The codes come from the weight's ``QuantSpec`` applied to its stored (dequantized) value,
which reproduces them exactly. Anything else returns None (the float kernel takes it).
A lowering's ``linear_hook`` (target ``lut``) is asked first.
"""
from __future__ import annotations

from qcompile.ir.quant import Granularity

__all__ = ["lower_quantized_linear", "lower_gpu_dequant_linear", "pack_words"]


def _codes(L, wv):
    """The weight's ``QuantizedTensor`` (codes and parameters) from its annotation."""
    return wv.quant.quantize(L.graph.constants[wv.name].float(), L.graph.constants)


def _int_weight(fmt) -> bool:
    from qcompile.formats.integer import IntFormat
    return (isinstance(fmt, IntFormat) and fmt.bits in (2, 3, 4, 8) and not fmt.binary
            and not fmt.full_range and fmt.signed == fmt.symmetric and not fmt.pad
            and fmt.granularity in (Granularity.PER_GROUP, Granularity.PER_CHANNEL))


def _w8a8(wfmt, xspec) -> bool:
    from qcompile.formats.integer import IntFormat
    if xspec is None or not xspec.dynamic:
        return False
    xf = xspec.fmt
    return (isinstance(wfmt, IntFormat) and wfmt.bits == 8 and wfmt.symmetric and wfmt.signed
            and wfmt.granularity == Granularity.PER_CHANNEL and not wfmt.full_range
            and isinstance(xf, IntFormat) and xf.bits == 8 and xf.symmetric and xf.signed
            and xf.granularity == Granularity.PER_TOKEN and float(xf.clip_ratio) == 1.0
            and xf.scale_dtype == "fp32" and not xf.full_range)


def lower_quantized_linear(L, n, x, b, k: int, nout: int):
    """The quantized kernel's result for linear ``n`` (a Relax expression), or None."""
    from tvm import relax

    from qcompile.backends.tvm.kernels import quant as K
    from qcompile.backends.tvm.linear import _count, _flat_type, _rows, kernel_rows
    wv, xv = n.inputs[1], n.inputs[0]
    if wv.quant is None:
        return None
    if L.linear_hook is not None:  # another backend's kernels first (target lut)
        y = L.linear_hook(L, n, x, b, k, nout)
        if y is not None:
            return y
    fmt = wv.quant.fmt
    raw = xv.producer.inputs[0] if xv.producer is not None and xv.producer.op == "identity" \
        else None
    if _w8a8(fmt, xv.quant) and raw is not None and raw.dtype == "float32":
        qt = _codes(L, wv)
        packed = K.pack_int8_weight(qt.codes, qt.params["scale"])
        x = L.get(raw)  # the kernel quantizes the float rows itself
        kind = "w8a8"
        build = lambda m: L.kernel(K.int8_matmul, m, nout, k, bias=b is not None,  # noqa: E731
                                   info=L.info)
        order = K.W8A8_ARGS
        src = raw
    elif _int_weight(fmt):
        qt = _codes(L, wv)
        asym = not fmt.symmetric
        packed = K.pack_int_weight(qt.codes, qt.params["scale"], qt.params.get("zero_point"),
                                   fmt.bits, group=fmt.group_size)
        group = fmt.group_size if fmt.granularity == Granularity.PER_GROUP else None
        kind = f"w{fmt.bits}" + ("-asym" if asym else "")
        build = lambda m: L.kernel(K.dequant_matmul, m, nout, k, bits=fmt.bits,  # noqa: E731
                                   group=group, asym=asym, bias=b is not None, info=L.info)
        order = [r for r in K.INT_ARGS if r in packed]
        src = xv
    elif fmt.name in K.MX_FORMATS and fmt.group_size == 32:
        qt = _codes(L, wv)
        packed = K.pack_mx_weight(qt.codes, qt.params["scale"], fmt.name)
        kind = fmt.name
        build = lambda m: L.kernel(K.mx_dequant_matmul, m, nout, k, fmt=fmt.name,  # noqa: E731
                                   bias=b is not None, info=L.info)
        order = K.MX_ARGS
        src = xv
    else:
        return None
    x2, rows = _rows(L, x, src)
    args = [x2] + [L.add_param(f"{wv.name}.{r}", packed[r]) for r in order]
    if b is not None:
        args.append(b)
    L.consumed.add(wv.name)
    out = n.outputs[0]
    y = L.call_kernel(build(kernel_rows(rows)), args, _flat_value(out, _flat_type), kind)
    _count(L, f"linear.{kind}")
    return L.emit(relax.op.reshape(y, L.shape(out))) if out.type.rank != 2 else y


def _flat_value(out, flat_type):
    from qcompile.ir.graph import Value
    return Value(out.name, flat_type(out))


def pack_words(values, bits: int):
    """Unsigned codes ``[N, K]`` packed along K: ``32/bits`` per uint32 word (2, 4, 8 bits), code
    ``i`` of a word at bits ``bits·i``; 3-bit codes stay one per uint8."""
    import numpy as np
    v = np.asarray(values, dtype=np.uint32)
    if bits == 3:
        return v.astype(np.uint8)
    per = 32 // bits
    n, k = v.shape
    pad = -k % per
    v = np.pad(v, ((0, 0), (0, pad)))
    words = np.zeros((n, v.shape[1] // per), np.uint32)
    for i in range(per):
        words |= v[:, i::per] << np.uint32(bits * i)
    return words


def lower_gpu_dequant_linear(L, n, x, b, k: int, nout: int):
    """An integer-weight linear for a GPU target: packed codes decoded in the matmul."""
    import numpy as np
    from tvm import te, tirx
    wv = n.inputs[1]
    if wv.quant is None or not _int_weight(wv.quant.fmt):
        return None
    fmt = wv.quant.fmt
    qt = _codes(L, wv)
    off = 1 << (fmt.bits - 1)
    codes = qt.codes.numpy().astype(np.int64) + (off if fmt.symmetric else 0)
    g = fmt.group_size if fmt.granularity == Granularity.PER_GROUP else k
    scale = qt.params["scale"].float().numpy().reshape(nout, -1)
    zero = (qt.params["zero_point"].float().numpy().reshape(nout, -1) if not fmt.symmetric
            else np.full_like(scale, float(off)))
    args = [x, L.add_param(f"{wv.name}.qweight", pack_words(codes, fmt.bits)),
            L.add_param(f"{wv.name}.scales", scale.astype(np.float32)),
            L.add_param(f"{wv.name}.zeros", zero.astype(np.float32))]
    if b is not None:
        args.append(b)
    L.consumed.add(wv.name)
    bits, per = fmt.bits, (1 if fmt.bits == 3 else 32 // fmt.bits)
    mask = (1 << bits) - 1

    def f(xt, qw, s, z, *bias):
        r = te.reduce_axis((0, k), "k")

        def code(j, kk):
            if bits == 3:
                return qw[j, kk].astype("float32")
            word = qw[j, tirx.floordiv(kk, per)]
            sh = (tirx.floormod(kk, per) * bits).astype("uint32")
            return tirx.bitwise_and(tirx.shift_right(word, sh), tirx.const(mask, "uint32")
                                    ).astype("float32")

        def w(j, kk):
            grp = tirx.floordiv(kk, g)
            return (code(j, kk) - z[j, grp]) * s[j, grp]
        lead = list(xt.shape[:-1])
        y = te.compute(lead + [nout], lambda *i: te.sum(xt[(*i[:-1], r)] * w(i[-1], r), axis=r),
                       name="dequant_matmul")
        if bias:
            y = te.compute(lead + [nout], lambda *i: y[i] + bias[0][i[-1]], name="bias_add")
        return y
    L.report["linear.gpu_dequant"] = L.report.get("linear.gpu_dequant", 0) + 1
    return L.emit_te(f, *args, name=f"dequant_w{bits}_matmul")
