"""Integer formats: grids, rounding, saturation, symmetric/asymmetric, granularities, scale
dtypes, clipping, the 1-bit binary format, padding, NaN policy, STE."""
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


@pytest.mark.parametrize("bad", [dict(bits=9), dict(bits=0), dict(granularity="none"),
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
