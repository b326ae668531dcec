"""Fake quantization of annotated activations in TIR, with the interpreter's arithmetic to the
bit (``qcompile.formats.integer``: ``s = clip·max|x| / qmax``, ``q = clamp(round_half_even(x/s)
+ z)``, ``x' = (q − z)·s``; a zero scale divides by one), and plain fp16/bf16 storage as a
cast round trip. Other activation formats (MX, FP8, codebooks) have no TVM lowering yet and are
refused with the value named."""
from __future__ import annotations

from qcompile.errors import BackendError
from qcompile.ir.graph import Value
from qcompile.ir.quant import Granularity

__all__ = ["fake_quant", "int_params"]


def int_params(fmt) -> tuple[int, int, int]:
    """(qmin, qmax, implied zero offset) of an integer format."""
    qmin, qmax = fmt.qrange
    return qmin, qmax, fmt._offset()


def _scale_round(s, fmt):
    """The scale as the format stores it (fp16/bf16 scales round), back in fp32."""
    if fmt.scale_dtype == "fp32":
        return s
    return s.astype({"fp16": "float16", "bf16": "bfloat16"}[fmt.scale_dtype]).astype("float32")


def _dynamic_rows(x, fmt):
    """Per-row (last axis) dynamic integer fake quantization of a TE tensor."""
    from tvm import te, tirx
    qmin, qmax, off = int_params(fmt)
    clip = tirx.const(float(fmt.clip_ratio), "float32")
    lead, n = list(x.shape[:-1]), x.shape[-1]
    k = te.reduce_axis((0, n), "k")
    f32 = lambda e: e.astype("float32") if e.dtype != "float32" else e  # noqa: E731
    one, zero = tirx.const(1.0, "float32"), tirx.const(0.0, "float32")
    if fmt.symmetric:
        amax = te.compute(lead, lambda *i: te.max(tirx.abs(f32(x[(*i, k)])), axis=k), name="amax")
        s = te.compute(lead, lambda *i: _scale_round(amax[i] * clip / tirx.const(
            float((1 << (fmt.bits - 1)) - 1), "float32"), fmt), name="scale")
        z = None
    else:
        k2 = te.reduce_axis((0, n), "k2")
        hi = te.compute(lead, lambda *i: te.max(f32(x[(*i, k)]), axis=k), name="hi")
        lo = te.compute(lead, lambda *i: te.min(f32(x[(*i, k2)]), axis=k2), name="lo")
        s = te.compute(lead, lambda *i: _scale_round(
            (tirx.max(hi[i], zero) * clip - tirx.min(lo[i], zero) * clip)
            / tirx.const(float(qmax - qmin), "float32"), fmt), name="scale")

        def zp(*i):
            sd = tirx.Select(s[i] != zero, s[i], one)
            zz = tirx.const(float(qmin), "float32") - tirx.nearbyint(tirx.min(lo[i], zero) * clip / sd)
            return tirx.max(tirx.min(zz, tirx.const(float(qmax), "float32")),
                            tirx.const(float(qmin), "float32"))
        z = te.compute(lead, zp, name="zero")

    def fq(*i):
        r = i[:-1]
        sd = tirx.Select(s[r] != zero, s[r], one)
        zz = z[r] if z is not None else tirx.const(float(off), "float32")
        q = tirx.nearbyint(f32(x[i]) / sd) + zz
        q = tirx.max(tirx.min(q, tirx.const(float(qmax), "float32")), tirx.const(float(qmin), "float32"))
        return ((q - zz) * s[r]).astype(x.dtype)
    return te.compute(x.shape, fq, name="fake_quant")


def _static(x, s, z, fmt):
    """Per-tensor static integer fake quantization with stored scale (and zero point)."""
    from tvm import te, tirx
    qmin, qmax, off = int_params(fmt)
    one, zero = tirx.const(1.0, "float32"), tirx.const(0.0, "float32")

    def fq(*i):
        sv = s[()].astype("float32")
        sd = tirx.Select(sv != zero, sv, one)
        zz = z[()].astype("float32") if z is not None else tirx.const(float(off), "float32")
        q = tirx.nearbyint(x[i].astype("float32") / sd) + zz
        q = tirx.max(tirx.min(q, tirx.const(float(qmax), "float32")), tirx.const(float(qmin), "float32"))
        return ((q - zz) * sv).astype(x.dtype)
    return te.compute(x.shape, fq, name="fake_quant")


def fake_quant(L, v: Value, x):
    """Emit the fake quantization of value ``v`` (Relax expression ``x``)."""
    from tvm import relax

    from qcompile.formats.floats import FloatStorage
    from qcompile.formats.integer import IntFormat
    spec = v.quant
    if L.graph.is_constant(v):
        return x  # stored dequantized: its fake quantization is the identity
    fmt = spec.fmt
    if isinstance(fmt, FloatStorage):
        dt = {"fp16": "float16", "bf16": "bfloat16"}.get(fmt.dtype, fmt.dtype)
        return relax.op.astype(L.emit(relax.op.astype(x, dt)), v.dtype)
    ok_axis = spec.axis in (None, -1, v.type.rank - 1)
    if isinstance(fmt, IntFormat) and not fmt.binary and not fmt.full_range:
        if spec.dynamic and fmt.granularity == Granularity.PER_TOKEN and ok_axis:
            return L.emit_te(lambda t: _dynamic_rows(t, fmt), x, name="fake_quant_token")
        if not spec.dynamic and fmt.granularity == Granularity.PER_TENSOR:
            s = L.constant(L.graph.constant_value(spec.scale))
            z = L.constant(L.graph.constant_value(spec.zero_point)) if spec.zero_point else None
            args = [x, s] + ([z] if z is not None else [])
            return L.emit_te(lambda t, a, *b: _static(t, a, b[0] if b else None, fmt), *args,
                             name="fake_quant_tensor")
    producer = v.producer.describe() if v.producer is not None else f"input %{v.name}"
    raise BackendError(f"the TVM backend cannot fake-quantize %{v.name} as {spec}",
                             node=v.producer, hint=f"value produced by {producer}; use integer "
                             "per-token or per-tensor activations, or target 'reference'")
