"""QuantSpec: fake quantization lies on the grid, rounds half to even, saturates, and has a
straight-through gradient; bad specs are ConfigErrors."""
from __future__ import annotations

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


@pytest.mark.parametrize("fmt", ["int9", "float4", "fp8", "int", "uint0", "INT8"])
def test_bad_format_names(fmt):
    with pytest.raises(ConfigError, match="unknown integer format"):
        QuantSpec(fmt, scale="s")


def test_bad_specs():
    with pytest.raises(ConfigError, match="group_size"):
        QuantSpec("int4", Granularity.PER_GROUP, axis=1, scale="s")
    with pytest.raises(ConfigError, match="needs a scale"):
        QuantSpec("int8", Granularity.PER_CHANNEL, axis=0)
    with pytest.raises(ValueError):
        QuantSpec("int8", "per_row", scale="s")
    assert QuantSpec("int8", "per_token").scale is None  # dynamic scales need no constant


def test_round_half_to_even():
    q, c = _per_tensor()
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, 0.51]) * S
    assert q.quantize(x, c).tolist() == [0, 2, 2, 0, -2, -2, 0, 1]
    assert (q.fake_quant(x, c) / S).tolist() == [0, 2, 2, 0, -2, -2, 0, 1]


def test_saturation_per_tensor():
    q, c = _per_tensor("int8")
    x = torch.tensor([1000.0, -1000.0, 127.4 * S, -128.4 * S])
    assert q.quantize(x, c).tolist() == [127, -128, 127, -128]
    assert q.fake_quant(x, c).tolist() == [127 * S, -128 * S, 127 * S, -128 * S]
    u, cu = _per_tensor("uint4", zp=8)
    y = torch.tensor([-100.0, 100.0, 0.0, 1.1 * S])
    assert u.quantize(y, cu).tolist() == [0, 15, 8, 9]
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
    q = QuantSpec("int8", "per_channel", axis=0, scale="s")
    x = torch.randn(3, 5)
    y = q.fake_quant(x, {"s": s})
    assert torch.equal(y, torch.clamp(torch.round(x / s[:, None]), -128, 127) * s[:, None])
    codes = y / s[:, None]
    assert torch.equal(codes, codes.round())
    q1 = QuantSpec("int8", "per_channel", axis=-1, scale="s")  # negative axes count from the end
    assert torch.equal(q1.fake_quant(x.T, {"s": s}), y.T)


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
    s, z = q.scale_zero_point(x, {})
    assert s.shape == (4, 1) and torch.equal(s, x.abs().amax(-1, keepdim=True) / 127)
    assert float(z) == 0.0
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
