"""Conversions: Slice-and-Scale from an MXINT8 / MXFP8 anchor against direct quantization,
and requantize between every pair of registered formats."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompile import formats as F
from qcompile.errors import ConfigError


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(1024, 96, generator=gen)  # 98 304 values, 3072 blocks of 32


@pytest.mark.parametrize("rounding", ["even", "nearest"])
@pytest.mark.parametrize("target,k", [("mxint6", 2), ("mxint4", 4)])
def test_slice_mxint8_against_direct(gaussian, target, k, rounding):
    anchor = F.get("mxint8", rounding=rounding).quantize(gaussian)
    sliced = F.slice_and_scale(anchor, target, rounding=rounding)
    direct = F.get(target, rounding=rounding).quantize(gaussian)
    assert sliced.format == F.get(target, rounding=rounding)
    assert sliced.codes.shape == direct.codes.shape and sliced.codes.dtype == torch.int8
    assert torch.equal(sliced.params["scale"], direct.params["scale"])
    diff = sliced.codes.to(torch.int32) - direct.codes.to(torch.int32)
    assert int(diff.abs().max()) == 1  # some double-rounding misses, never more than a step
    rate = float((diff != 0).double().mean())
    expect = 2.0 ** -(k + 1)  # 12.5% and 3.1%: the anchor lands on a tie of the target grid
    assert abs(rate - expect) <= 0.15 * expect, rate
    lim = 2 ** (7 - k) - 1
    assert int(sliced.codes.abs().max()) <= lim


def test_slice_mxint8_hand_vector():
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([100, 24, 8, -127, 40, 56]) / 64  # amax 127/64: E = 0, code 127
    anchor = F.get("mxint8").quantize(x)
    assert anchor.codes[0, :6].tolist() == [100, 24, 8, -127, 40, 56]
    sliced = F.slice_and_scale(anchor, "mxint4")
    # k = 4: q / 16 = 6.25 -> 6; 1.5 -> 2 (tie, even); 0.5 -> 0 (tie, even);
    # -7.94 -> -8 -> clamped to -7; 2.5 -> 2 (tie, even); 3.5 -> 4 (tie, even)
    assert sliced.codes[0, :6].tolist() == [6, 2, 0, -7, 2, 4]
    assert sliced.params["scale"].tolist() == [[127]]
    # MXINT4 elements are k/4: the scale is unchanged, the element lost 4 fraction bits
    assert sliced.dequantize()[0, :6].tolist() == [1.5, 0.5, 0.0, -1.75, 0.5, 1.0]


def _grid_index(values: torch.Tensor, fmt) -> np.ndarray:
    """Position of each element value on the sorted grid of ``fmt``'s element type."""
    e = fmt.elem
    codes = torch.arange(1 << e.bits, dtype=torch.uint8)
    grid = np.unique(F.floats.decode_elements(codes, e).double().numpy())  # -0 merges with 0
    v = values.double().numpy()
    idx = np.searchsorted(grid, v)
    assert np.array_equal(grid[idx], v), "a value off the target grid"
    return idx


@pytest.mark.parametrize("anchor_name", ["mxfp8_e4m3", "mxfp8_e5m2"])
@pytest.mark.parametrize("target", ["mxfp6_e2m3", "mxfp6_e3m2", "mxfp4"])
def test_slice_mxfp8_against_direct(gaussian, anchor_name, target):
    if F.element(F.get(target).element).mbits > F.element(F.get(anchor_name).element).mbits:
        with pytest.raises(ConfigError, match="mantissa"):  # E5M2 -> E2M3 is no slice
            F.slice_and_scale(F.get(anchor_name).quantize(gaussian), target)
        return
    x = gaussian * torch.logspace(-3, 3, 1024)[:, None]
    anchor = F.get(anchor_name).quantize(x)
    sliced = F.slice_and_scale(anchor, target)
    direct = F.get(target).quantize(x)
    assert sliced.format == F.get(target)
    assert torch.equal(sliced.params["scale"], direct.params["scale"])
    # compare element values (scale removed) by their position on the target grid
    e = F.get(target).elem
    a = _grid_index(F.floats.decode_elements(sliced.codes, e), F.get(target))
    b = _grid_index(F.floats.decode_elements(direct.codes, e), F.get(target))
    assert np.abs(a - b).max() <= 1
    assert (a != b).mean() < 0.5


def test_slice_mxfp8_hand_vector():
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([100.0, 5.0, 13.0, -0.5])
    anchor = F.get("mxfp8_e4m3").quantize(x)
    # anchor: amax 100 -> E = 6 - 8 = -2 (125), X = 1/4: 400 -> 384 (binade [256, 512),
    # step 32; 400 = 384 + 16 is a tie, 384 = 1.100b is even); 20; 52; -2
    assert anchor.params["scale"].tolist() == [[125]]
    assert anchor.dequantize()[0, :4].tolist() == [96.0, 5.0, 13.0, -0.5]
    sliced = F.slice_and_scale(anchor, "mxfp4")
    # E' = -2 + (8 - 2) = 4 (131), X' = 16: 96/16 = 6 (7); 5/16 = 0.3125 -> 0.5 (1);
    # 13/16 = 0.8125 -> 1 (2); -0.5/16 -> -0 (8)
    assert sliced.params["scale"].tolist() == [[131]]
    assert sliced.codes[0, :4].tolist() == [7, 1, 2, 8]
    direct = F.get("mxfp4").quantize(x)
    # direct: 100/16 = 6.25 -> 6; the same codes here
    assert direct.params["scale"].tolist() == [[131]]
    assert sliced.dequantize()[0, :4].tolist() == direct.dequantize()[0, :4].tolist()


def test_slice_all_zero_and_nan_blocks():
    x = torch.randn(3, 64)
    x[1, :32] = 0.0
    x[2, 40] = float("nan")
    for anchor_name, target in (("mxint8", "mxint4"), ("mxfp8_e4m3", "mxfp4"),
                                ("mxfp8_e4m3", "mxfp6_e3m2")):
        anchor = F.get(anchor_name, nan_policy="propagate").quantize(x)
        sliced = F.slice_and_scale(anchor, target)
        direct = F.get(target, nan_policy="propagate").quantize(x)
        assert torch.equal(sliced.params["scale"], direct.params["scale"]), target
        assert sliced.params["scale"][2, 1] == 255
        assert (sliced.codes[2, 32:] == 0).all() and (sliced.codes[1, :32] == 0).all()
        deq = sliced.dequantize()
        assert deq[2, 32:].isnan().all() and not deq[:, :32].isnan().any()


@pytest.mark.parametrize("anchor_name,target", [("mxfp8_e4m3", "mxfp4"),
                                                ("mxfp8_e4m3", "mxfp6_e2m3"),
                                                ("mxfp8_e5m2", "mxfp4")])
def test_slice_mxfp8_tiny_block_keeps_direct_exponent(anchor_name, target):
    """A block so small that the anchor's exponent is clamped at -127: direct quantization
    picks E = floor(log2 amax) - emax' (here -127 too), and keeps the block non-zero."""
    x = torch.zeros(1, 32)
    x[0, 0] = 2.0 ** -125  # E8 = -125 - 8 -> clamped to -127; direct E' = -127
    x[0, 1] = 2.0 ** -126
    anchor = F.get(anchor_name).quantize(x)
    assert anchor.params["scale"].tolist() == [[0]]
    assert anchor.dequantize()[0, :2].tolist() == [2.0 ** -125, 2.0 ** -126]
    direct = F.get(target).quantize(x)
    assert direct.params["scale"].tolist() == [[0]]
    sliced = F.slice_and_scale(anchor, target)
    assert torch.equal(sliced.params["scale"], direct.params["scale"])
    assert torch.equal(sliced.dequantize(), direct.dequantize())


@pytest.mark.parametrize("src,dst", [("nvfp4", "mxint4"), ("mxint4", "mxint8"),
                                     ("mxint8", "mxfp4"), ("mxfp8_e4m3", "mxint4"),
                                     ("mxfp4", "mxfp8_e4m3"), ("int8", "int4"),
                                     ("mxint8", "nvfp4")])
def test_slice_bad_pairs_raise(src, dst):
    qt = F.get(src).quantize(torch.randn(4, 64))
    with pytest.raises(ConfigError):
        F.slice_and_scale(qt, dst)


def test_slice_different_block_sizes_raise():
    qt = F.get("mxint8").quantize(torch.randn(4, 64))
    with pytest.raises(ConfigError, match="blocks"):
        F.slice_and_scale(qt, "mxint4", group_size=16)


@pytest.mark.parametrize("src", F.available())
def test_requantize_every_pair(src):
    torch.manual_seed(2)
    x = torch.randn(2, 256) * 3
    qt = F.get(src).quantize(x)
    base = qt.dequantize(torch.float32)
    for dst in F.available():
        out = F.requantize(qt, dst)
        target = F.get(dst)
        assert out.format == target, (src, dst)
        assert out.shape == qt.shape
        want = target.dequantize(target.quantize(base))
        assert torch.equal(out.dequantize(torch.float32), want), (src, dst)


def test_requantize_options_and_axis():
    x = torch.randn(64, 32)
    qt = F.get("mxfp8_e4m3").quantize(x, axis=0)
    out = F.requantize(qt, "int4", group_size=32)
    assert out.format == F.get("int4", group_size=32)
    assert out.axis == 0 and out.params["scale"].shape == (2, 32)
    want = F.get("int4", group_size=32).quantize(qt.dequantize(), axis=0)
    assert torch.equal(out.codes, want.codes)
    out1 = F.requantize(qt, "int4", axis=1, group_size=32)
    assert out1.params["scale"].shape == (64, 1)
