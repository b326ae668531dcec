"""QuantSpec: a typed annotation over ``qcompile.formats``. Fake quantization lies on the grid,
rounds half to even, saturates, and has a straight-through gradient; static parameters come
from graph constants, dynamic ones from the value; specs round-trip through JSON; bad specs
are ConfigErrors."""
from __future__ import annotations

import json

import pytest
import torch

from qcompile.errors import ConfigError
from qcompile.ir import Granularity, QuantSpec
from qcompile.ir.quant import int_range

S = 0.25  # a power of two, so x / S is exact and ties are real ties


def _per_tensor(fmt="int8", zp=None):
    consts = {"s": torch.tensor(S)}
    if zp is not None:
        consts["z"] = torch.tensor(zp)
    return QuantSpec(fmt, scale="s", zero_point="z" if zp is not None else None), consts


def test_int_range():
    assert int_range("int8") == (-128, 127)
    assert int_range("uint8") == (0, 255)
    assert int_range("int4") == (-8, 7)
    assert int_range("uint1") == (0, 1)


@pytest.mark.parametrize("fmt", ["int9", "float4", "int", "uint0", "mxfp5"])
def test_bad_format_names(fmt):
    with pytest.raises(ConfigError, match="unknown numeric format"):
        QuantSpec(fmt, scale="s")


def test_bad_specs():
    with pytest.raises(ConfigError, match="group_size"):
        QuantSpec("int4", Granularity.PER_GROUP, axis=1, scale="s")
    with pytest.raises(ValueError):
        QuantSpec("int8", "per_row", scale="s")
    with pytest.raises(ConfigError, match="no parameter 'meta'"):
        QuantSpec("int4", scale="s", meta="m")
    with pytest.raises(ConfigError, match="without a scale"):
        QuantSpec("uint8", zero_point="z")
    with pytest.raises(ConfigError, match="no option"):
        QuantSpec("int4", options={"colour": "red"})
    assert QuantSpec("int8", "per_token").dynamic  # dynamic scales need no constant
    assert QuantSpec("INT8", scale="s").fmt.name == "int8"  # names are case-insensitive


def test_format_defaults_fill_the_spec():
    mx = QuantSpec("mxfp4", axis=-1)
    assert mx.granularity == Granularity.PER_GROUP and mx.group_size == 32 and mx.bits == 4
    assert QuantSpec("bf16").granularity == Granularity.NONE
    assert QuantSpec("nvfp4", scale="s", tensor_scale="t").fmt.group_size == 16
    asym = QuantSpec("int8", scale="s", zero_point="z")  # a stored zero point: asymmetric
    assert asym.fmt.symmetric is False and dict(asym.options) == {"symmetric": False}


def test_round_half_to_even():
    q, c = _per_tensor()
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, 0.51]) * S
    assert q.quantize(x, c).codes.tolist() == [0, 2, 2, 0, -2, -2, 0, 1]
    assert (q.fake_quant(x, c) / S).tolist() == [0, 2, 2, 0, -2, -2, 0, 1]


def test_saturation_per_tensor():
    q, c = _per_tensor("int8")
    x = torch.tensor([1000.0, -1000.0, 127.4 * S, -128.4 * S])
    assert q.quantize(x, c).codes.tolist() == [127, -128, 127, -128]
    assert q.fake_quant(x, c).tolist() == [127 * S, -128 * S, 127 * S, -128 * S]
    u, cu = _per_tensor("uint4", zp=8)
    y = torch.tensor([-100.0, 100.0, 0.0, 1.1 * S])
    assert u.quantize(y, cu).codes.tolist() == [0, 15, 8, 9]
    assert u.fake_quant(y, cu).tolist() == [-8 * S, 7 * S, 0.0, S]


def test_per_tensor_values_on_grid():
    q, c = _per_tensor("int4")
    x = torch.randn(64) * 2
    y = q.fake_quant(x, c)
    codes = y / S
    assert torch.equal(codes, codes.round()) and codes.min() >= -8 and codes.max() <= 7
    inside = (x / S).abs() < 7
    assert (y - x)[inside].abs().max() <= S / 2


def test_per_channel():
    s = torch.tensor([0.5, 0.25, 0.125])
    q = QuantSpec("int8", "per_channel", axis=1, scale="s")  # rows share a scale along axis 1
    x = torch.randn(3, 5)
    y = q.fake_quant(x, {"s": s})
    assert torch.equal(y, torch.clamp(torch.round(x / s[:, None]), -128, 127) * s[:, None])
    codes = y / s[:, None]
    assert torch.equal(codes, codes.round())
    q1 = QuantSpec("int8", "per_channel", axis=-2, scale="s")  # negative axes count from the end
    assert torch.equal(q1.fake_quant(x.T, {"s": s}), y.T)
    conv = QuantSpec("int8", "per_channel", axis=(1, 2, 3), scale="s")  # [O, I, kh, kw]
    w = torch.randn(3, 2, 3, 3)
    torch.testing.assert_close(conv.fake_quant(w, {"s": s}),
                               torch.clamp(torch.round(w / s.view(3, 1, 1, 1)), -128, 127)
                               * s.view(3, 1, 1, 1), rtol=0, atol=0)


def test_per_group():
    q = QuantSpec("int4", "per_group", axis=1, group_size=4, scale="s")
    s = torch.tensor([[0.5, 0.25], [0.125, 1.0]])
    x = torch.randn(2, 8)
    y = q.fake_quant(x, {"s": s})
    full = s.repeat_interleave(4, dim=1)
    assert full.shape == x.shape
    assert torch.equal(y, torch.clamp(torch.round(x / full), -8, 7) * full)
    for g in range(2):  # each group of 4 columns sits on its own grid
        codes = y[:, 4 * g:4 * g + 4] / s[:, g:g + 1]
        assert torch.equal(codes, codes.round())


def test_per_token_dynamic_scale():
    q = QuantSpec("int8", "per_token")
    x = torch.randn(4, 16) * torch.tensor([[0.1], [1.0], [10.0], [100.0]])
    qt = q.quantize(x, {})
    s = qt.params["scale"]
    assert s.shape == (4, 1) and torch.equal(s, x.abs().amax(-1, keepdim=True) / 127)
    assert "zero_point" not in qt.params
    y = q.fake_quant(x, {})
    codes = y / s
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert torch.equal(codes.abs().amax(-1).round(), torch.full((4,), 127.0))  # max -> +-127
    torch.testing.assert_close(y.abs().amax(-1), x.abs().amax(-1), rtol=1e-6, atol=0)
    assert ((y - x).abs() <= s / 2 * (1 + 1e-6)).all()


def test_straight_through_gradient():
    q, c = _per_tensor("int8")
    x = (torch.randn(32) * 5 * S).requires_grad_()
    y = q.fake_quant(x, c)
    assert torch.equal(y.detach(), q.fake_quant(x.detach(), c))
    w = torch.randn(32)
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)  # d fake_quant / dx = 1 inside the range
    assert not x.grad.eq(0).all()


def test_to_json_and_str():
    q = QuantSpec("int4", "per_group", axis=1, group_size=32, scale="ws")
    assert q.to_json() == {"format": "int4", "granularity": "per_group", "axis": 1,
                           "group_size": 32, "scale": "ws"}
    assert QuantSpec.from_json(q.to_json()) == q
    assert str(q) == "int4 per_group(axis=1, g=32)" and q.bits == 4
    assert q.constants() == ["ws"]
    assert QuantSpec("uint8", scale="s", zero_point="z").constants() == ["s", "z"]


def test_non_integer_formats_and_json():
    w = torch.randn(4, 64)
    mx = QuantSpec("mxfp4", axis=-1, scale="ws")
    ref = mx.fmt.quantize(w)
    consts = {"ws": ref.params["scale"]}
    assert torch.equal(mx.fake_quant(w, consts), mx.fmt.dequantize(ref))
    dyn = QuantSpec("mxfp4", axis=-1)
    assert dyn.dynamic and torch.equal(dyn.fake_quant(w, {}), mx.fake_quant(w, consts))
    nv = QuantSpec("nvfp4", axis=-1, scale="bs", tensor_scale="ts")
    q = nv.fmt.quantize(w)
    y = nv.fake_quant(w, {"bs": q.params["scale"], "ts": q.params["tensor_scale"]})
    assert torch.equal(y, nv.fmt.dequantize(q))
    for spec in (mx, nv, QuantSpec("bf16"), QuantSpec("int4", "per_channel", axis=(1, 2),
                                                         scale="s", options={"clip_ratio": 0.9})):
        d = spec.to_json()
        assert QuantSpec.from_json(json.loads(json.dumps(d))) == spec
    assert str(QuantSpec("mxfp4", axis=1)) == "mxfp4 per_group(axis=1, g=32) dynamic"


def test_onnx_style_zero_point_defaults_to_zero():
    q = QuantSpec("uint8", scale="s")  # ONNX: no zero point means 0
    x = torch.tensor([-1.0, 0.0, 0.3, 100.0])
    assert q.quantize(x, {"s": torch.tensor(0.25)}).codes.tolist() == [0, 0, 1, 255]
