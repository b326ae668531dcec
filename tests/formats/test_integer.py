"""Integer formats: grids, rounding, saturation, symmetric/asymmetric, granularities, scale
dtypes, clipping, the 1-bit binary format, padding, NaN policy, STE; the 16-bit formats (ranges,
code dtypes, round trip, calibrated uint16 zero point, packing, a serialized graph)."""
from __future__ import annotations

import pytest
import torch

from qcompile import formats as F
from qcompile.errors import ConfigError, QuantizationError


def _rel(fmt, x, axis=-1):
    y = fmt.dequantize(fmt.quantize(x, axis))
    return float((y - x).norm() / x.norm())


@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_signed_grid(bits):
    x = torch.randn(8, 64)
    fmt = F.get(f"int{bits}", granularity="per_channel")
    qt = fmt.quantize(x)
    qmax = 2 ** (bits - 1) - 1
    s = qt.params["scale"]
    assert s.shape == (8, 1) and torch.equal(s, x.abs().amax(-1, keepdim=True) / qmax)
    assert qt.codes.dtype == torch.int8
    assert qt.codes.abs().amax(-1).eq(qmax).all()  # each row's max lands on +-qmax
    assert torch.equal(qt.codes, torch.round(x / s).to(torch.int8))
    y = fmt.dequantize(qt)
    assert ((y - x).abs() <= s / 2 * (1 + 1e-6)).all()


def test_round_half_to_even_and_saturation():
    fmt = F.get("int4")
    params = {"scale": torch.tensor(0.5)}
    x = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, 100.0, -100.0])
    assert fmt.quantize(x, params=params).codes.tolist() == [0, 2, 2, 0, -2, 7, -8]


def test_unsigned_symmetric_is_the_signed_grid_offset():
    x = torch.randn(4, 32)
    s = F.get("int4", group_size=16)
    u = F.get("uint4", group_size=16, symmetric=True)
    qs, qu = s.quantize(x), u.quantize(x)
    assert qu.codes.dtype == torch.uint8 and "zero_point" not in qu.params
    assert torch.equal(qu.codes.to(torch.int16) - 8, qs.codes.to(torch.int16))
    assert torch.equal(u.dequantize(qu), s.dequantize(qs))


@pytest.mark.parametrize("name", ["uint4", "uint8", "int4"])
def test_asymmetric(name):
    fmt = F.get(name, granularity="per_channel", symmetric=False)
    x = torch.rand(6, 50) * 3 + 0.5  # all positive: zero must still be exact
    x[0] = -x[0]  # all negative row
    qt = fmt.quantize(x)
    qmin, qmax = fmt.qrange
    z, s = qt.params["zero_point"], qt.params["scale"]
    assert z.dtype == qt.codes.dtype and z.shape == (6, 1)
    zero = fmt.dequantize(qt.__class__(fmt, z.expand(6, 50).contiguous(), qt.params, qt.shape,
                                       qt.axis))
    assert zero.eq(0).all()  # the zero point decodes to exactly 0
    y = fmt.dequantize(qt)
    assert ((y - x).abs() <= s / 2 * (1 + 1e-5)).all()
    assert torch.equal(qt.codes.amax(-1)[1:], torch.full((5,), qmax, dtype=qt.codes.dtype))
    assert int(qt.codes[0].amin()) == qmin  # the most negative value maps to qmin


def test_binary_one_bit():
    x = torch.randn(3, 64)
    fmt = F.get("int1", group_size=32)
    qt = fmt.quantize(x)
    assert set(qt.codes.unique().tolist()) <= {0, 1}
    s = x.abs().reshape(3, 2, 32).mean(-1)  # XNOR-Net: the L2-optimal binary scale
    torch.testing.assert_close(qt.params["scale"], s)
    y = fmt.dequantize(qt)
    torch.testing.assert_close(y, torch.sign(x) * s.repeat_interleave(32, 1))
    assert fmt.bits_per_element == 1 + 32 / 32


def test_error_falls_with_bits_and_granularity():
    torch.manual_seed(1)
    x = torch.randn(64, 512) * torch.logspace(-1, 1, 512)  # channels of very different range
    errs = [_rel(F.get(f"int{b}", group_size=32), x) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    by_gran = [_rel(F.get("int4"), x), _rel(F.get("int4", granularity="per_channel"), x),
               _rel(F.get("int4", group_size=128), x), _rel(F.get("int4", group_size=32), x)]
    assert all(a > b for a, b in zip(by_gran, by_gran[1:])), by_gran


def test_per_token_equals_per_channel_along_the_last_axis():
    x = torch.randn(2, 5, 16)
    a = F.get("int8", granularity="per_token").quantize(x)
    b = F.get("int8", granularity="per_channel").quantize(x)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.params["scale"], b.params["scale"])
    assert a.params["scale"].shape == (2, 5, 1)


def test_group_axis_and_keepdim_params():
    w = torch.randn(6, 64)
    fmt = F.get("int4", group_size=16)
    q0 = fmt.quantize(w.T.contiguous(), axis=0)
    q1 = fmt.quantize(w, axis=1)
    assert q1.params["scale"].shape == (6, 4) and q0.params["scale"].shape == (4, 6)
    assert torch.equal(q0.codes.T, q1.codes) and torch.equal(q0.params["scale"].T,
                                                             q1.params["scale"])
    again = fmt.quantize(w, axis=1, params=q1.params)  # given params reproduce the codes
    assert torch.equal(again.codes, q1.codes)


def test_scale_dtype_and_clip_ratio():
    x = torch.randn(4, 128)
    h = F.get("int4", group_size=64, scale_dtype="fp16").quantize(x)
    assert h.params["scale"].dtype == torch.float16
    assert F.get("int4", group_size=64, scale_dtype="fp16").bits_per_element == 4 + 16 / 64
    clipped = F.get("int4", group_size=64, clip_ratio=0.8).quantize(x)
    full = F.get("int4", group_size=64).quantize(x)
    torch.testing.assert_close(clipped.params["scale"], full.params["scale"] * 0.8)


def test_padding_only_when_asked():
    x = torch.randn(3, 40)
    with pytest.raises(ConfigError, match="does not divide") as e:
        F.get("int4", group_size=32).quantize(x)
    assert "pad=True" in str(e.value)
    fmt = F.get("int4", group_size=32, pad=True)
    qt = fmt.quantize(x)
    assert qt.codes.shape == (3, 64) and qt.codes[:, 40:].eq(0).all()
    y = fmt.dequantize(qt)
    assert y.shape == x.shape
    assert torch.equal(y[:, :32], F.get("int4", group_size=32).fake_quant(x[:, :32]))


@pytest.mark.parametrize("bad", [dict(bits=9), dict(bits=0), dict(bits=32), dict(granularity="none"),
                                 dict(clip_ratio=1.5), dict(scale_dtype="fp64"),
                                 dict(nan_policy="ignore"), dict(granularity="per_group")])
def test_bad_options(bad):
    with pytest.raises(ConfigError):
        F.IntFormat(name="int", **bad)


def test_nan_policy():
    x = torch.randn(2, 32)
    x[1, 5] = float("nan")
    with pytest.raises(QuantizationError, match=r"index \[1, 5\]") as e:
        F.get("int8", group_size=16).quantize(x)
    assert "nan_policy='propagate'" in str(e.value)
    fmt = F.get("int8", group_size=16, nan_policy="propagate")
    y = fmt.dequantize(fmt.quantize(x))
    assert y[1, :16].isnan().all() and not y[1, 16:].isnan().any() and not y[0].isnan().any()


def test_fake_quant_straight_through():
    x = torch.randn(4, 32, requires_grad=True)
    fmt = F.get("int4", group_size=16)
    y = fmt.fake_quant(x)
    assert torch.equal(y.detach(), fmt.dequantize(fmt.quantize(x.detach())))
    g = torch.randn(4, 32)
    (y * g).sum().backward()
    assert torch.equal(x.grad, g)


def test_half_precision_input_keeps_dtype():
    x = torch.randn(4, 32).half()
    fmt = F.get("int8", group_size=32)
    assert fmt.dequantize(fmt.quantize(x)).dtype == torch.float16
    assert fmt.fake_quant(x).dtype == torch.float16
    with pytest.raises(ConfigError, match="floating-point"):
        fmt.quantize(torch.arange(32))


def test_full_range_matches_onnxruntime_matmulnbits():
    """full_range=True: the signed abs-max maps onto -8, as ONNX Runtime's symmetric 4-bit
    quantizer (and llama.cpp's Q4_0) do; scales and codes equal ORT's bit for bit."""
    import numpy as np
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k, g = 48, 256, 32
    x = torch.randn(n, k) * torch.logspace(-2, 1, n)[:, None]
    packed = np.zeros((n, k // g, g // 2), np.uint8)
    scale = np.zeros((n, k // g), np.float32)
    zp = np.zeros((n, (k // g + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(x.numpy().T), scale, zp, g, n, k, True)
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, k)
    qt = F.get("uint4", group_size=g, symmetric=True, full_range=True).quantize(x)
    assert np.array_equal(qt.params["scale"].numpy(), scale)
    assert np.array_equal(qt.codes.numpy(), codes)
    signed = F.get("int4", group_size=g, full_range=True)
    qs = signed.quantize(x)
    assert qs.codes.min() == -8 and torch.equal(qs.codes.to(torch.int16) + 8, qt.codes.to(torch.int16))
    full_err = _rel(signed, x)
    assert full_err < _rel(F.get("int4", group_size=g), x)  # 16 levels beat 15
    with pytest.raises(ConfigError, match="full_range"):
        F.get("uint4", full_range=True)  # asymmetric


# -- 16-bit integers -------------------------------------------------------------------------
def test_sixteen_bit_ranges_and_code_dtypes():
    from qcompile.ir.quant import int_code_dtype, int_range
    i16, u16 = F.get("int16"), F.get("uint16")
    assert (i16.bits, i16.signed, i16.symmetric) == (16, True, True)
    assert (u16.bits, u16.signed, u16.symmetric) == (16, False, False)  # asymmetric by default
    assert i16.qrange == int_range("int16") == (-32768, 32767)
    assert u16.qrange == int_range("uint16") == (0, 65535)
    # uint16 codes do not fit int16, and torch.uint16 lacks most ops: int32
    assert i16.code_dtype == torch.int16 and u16.code_dtype == torch.int32
    assert (int_code_dtype("int16"), int_code_dtype("uint16")) == ("int16", "int32")
    assert (int_code_dtype("int8"), int_code_dtype("uint4")) == ("int8", "uint8")
    assert u16.roles == ("scale", "zero_point") and u16.param_bits("zero_point") == 16
    for bad in ("int9", "uint12", "int32", "int0"):
        with pytest.raises(ConfigError, match="int16"):
            int_range(bad)
        with pytest.raises(ConfigError, match="unknown numeric format"):
            F.get(bad)
    with pytest.raises(ConfigError, match="1 to 8 or 16 bits"):
        F.IntFormat(name="int", bits=12)


@pytest.mark.parametrize("name", ["int16", "uint16"])
def test_sixteen_bit_round_trip(name):
    """Each row's extreme lands on the end of the grid, codes are round(x/s) + z, and the error
    is at most half a step and fp32 rounding (Jacob et al. 2018, eq. 1)."""
    x = torch.randn(8, 300) * torch.logspace(-2, 2, 8)[:, None]
    fmt = F.get(name, granularity="per_channel")
    qt = fmt.quantize(x)
    s = qt.params["scale"]
    assert qt.codes.dtype == fmt.code_dtype and s.shape == (8, 1)
    z = qt.params["zero_point"].float() if name == "uint16" else 0.0
    assert torch.equal(qt.codes, (torch.round(x / s) + z).clamp(*fmt.qrange).to(fmt.code_dtype))
    if name == "int16":
        assert torch.equal(s, x.abs().amax(-1, keepdim=True) / 32767)
        assert qt.codes.abs().amax(-1).eq(32767).all()
    else:
        assert int(qt.codes.min()) == 0 and int(qt.codes.max()) == 65535  # past int16
    y = fmt.dequantize(qt)
    # half a step, plus fp32 rounding of x/s and of (q − z)·s: u·|x| each (u = 2^-24), which at
    # 2^15..2^16 steps per range is no longer negligible against s/2
    assert ((y - x).abs() <= s / 2 * (1 + 1e-6) + 2 ** -23 * x.abs()).all()
    assert torch.equal(fmt.quantize(x, params=qt.params).codes, qt.codes)
    # 16 bits are ~256x finer than 8: the error falls accordingly
    e8 = _rel(F.get(name[:-2] + "8", granularity="per_channel"), x)
    assert _rel(fmt, x) < e8 / 100


def test_uint16_per_tensor_calibrated_zero_point():
    """Per tensor from a calibrated [min, max] (as quantize_activations does): ``s = (max −
    min) / 65535``, ``z = −round(min / s)`` stored in int32; zero is exact, min and max land on
    0 and 65535, values beyond saturate."""
    lo, hi = torch.tensor(-0.75), torch.tensor(3.5)
    fmt = F.get("uint16")
    params = fmt.quantize(torch.stack([lo, hi])).params
    s, z = params["scale"], params["zero_point"]
    assert s.shape == () and z.shape == () and z.dtype == torch.int32
    assert torch.equal(s, (hi - lo) / 65535)
    assert int(z) == -int(torch.round(lo / s)) == 11565
    x = torch.tensor([0.0, -0.75, 3.5, -5.0, 9.0, 1.0])
    qt = fmt.quantize(x, params=params)
    assert qt.codes.tolist()[:5] == [int(z), 0, 65535, 0, 65535]
    y = fmt.dequantize(qt)
    assert y[0] == 0 and abs(float(y[1]) + 0.75) <= float(s) / 2 and abs(float(y[2]) - 3.5) <= \
        float(s) / 2
    assert abs(float(y[5]) - 1.0) <= float(s) / 2
    # an all-positive range still includes zero (z = 0)
    pos = fmt.quantize(torch.tensor([0.5, 2.0])).params
    assert int(pos["zero_point"]) == 0 and torch.equal(pos["scale"], torch.tensor(2.0) / 65535)


def test_int16_per_token_dynamic():
    x = torch.randn(2, 3, 50)
    fmt = F.get("int16", granularity="per_token")
    qt = fmt.quantize(x)
    assert qt.params["scale"].shape == (2, 3, 1) and "zero_point" not in qt.params
    assert torch.equal(fmt.fake_quant(x), fmt.dequantize(qt))


def test_sixteen_bit_pack_is_two_bytes_a_code():
    x = torch.randn(4, 64) * 3
    for name in ("int16", "uint16"):
        fmt = F.get(name, granularity="per_channel")
        qt = fmt.quantize(x)
        back = F.QuantizedTensor.unpack(qt.pack())
        assert back.codes.dtype == qt.codes.dtype and torch.equal(back.codes, qt.codes)
        assert all(torch.equal(back.params[k], p) and back.params[k].dtype == p.dtype
                   for k, p in qt.params.items())
        assert qt.bits_per_element == pytest.approx(16 + (32 + (16 if name == "uint16" else 0))
                                                    / 64)
        assert len(qt.pack()) < 4 * 64 * 2 + 1024  # codes at 16 bits, not at int32's 32


def test_graph_with_a_uint16_spec_serializes(tmp_path):
    """QuantSpec JSON and a graph holding a uint16 activation spec (int32 zero point in
    safetensors) round-trip; the reloaded graph computes the same bits."""
    from qcompile.interpreter import Interpreter
    from qcompile.ir import Graph, TensorType
    from qcompile.ir.quant import QuantSpec
    from qcompile.ir.serialize import load_graph, save_graph

    g = Graph("u16")
    x = g.add_input("x", TensorType(("batch", 8), "float32"))
    qt = F.get("uint16").quantize(torch.tensor([-1.0, 2.0]))
    ps = {r: g.add_constant(f"x.act_{r}", t).name for r, t in qt.params.items()}
    spec = QuantSpec("uint16", "per_tensor", **ps)
    assert ("symmetric", False) in spec.options and spec.fmt.code_dtype == torch.int32
    assert QuantSpec.from_json(spec.to_json()) == spec
    y = g.add("identity", x, name="q")
    y.quant = spec
    w = g.add_constant("w", torch.randn(4, 8))
    g.outputs = [g.add("linear", y, w, None, name="fc")]
    save_graph(g, tmp_path)
    back = load_graph(tmp_path)
    assert back.value("q").quant == spec
    assert back.constants[spec.zero_point].dtype == torch.int32
    assert torch.equal(back.constants[spec.zero_point], g.constants[spec.zero_point])
    xs = torch.randn(5, 8) * 2
    assert torch.equal(Interpreter(back).run(xs)[0], Interpreter(g).run(xs)[0])
