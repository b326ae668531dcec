"""OCP MX formats, bit-exact on hand-computed vectors.

Reading guide for the literals below. A block of 32 shares X = 2^E, stored as the E8M0 code
E + 127, with E = floor(log2 amax) - emax_elem (emax: E2M1 2, E2M3 2, E3M2 4, E4M3 8, E5M2 15,
INT8 0). Element codes:

- E2M1 (sign bit 3): 0:0  1:0.5  2:1  3:1.5  4:2  5:3  6:4  7:6;
- E2M3 (sign bit 5, bias 1): eeemmm... = s ee mmm, subnormal step 1/8;
- E3M2 (sign bit 5, bias 3): s eee mm, subnormal step 1/16;
- E4M3 (bias 7): s eeee mmm, max 0x7E = 448;  E5M2 (bias 15): s eeeee mm, max 0x7B = 57344;
- MXINT8: two's complement k, the value k/64, k in [-127, 127].
"""
from __future__ import annotations

import math

import pytest
import torch

from qcompile import formats as F
from qcompile.errors import QuantizationError


def _block(*head: float, n: int = 32) -> torch.Tensor:
    """A row of ``n`` values: ``head`` then zeros."""
    x = torch.zeros(1, n)
    x[0, : len(head)] = torch.tensor(head)
    return x


def _codes(qt) -> list[int]:
    return [int(c) for c in qt.codes.flatten()]


def test_all_zero_block_scale_codes():
    x = torch.zeros(2, 32)
    # E = max(-126 - emax, -127): MXFP4 -128 -> -127 (code 0); MXINT8 -126 (code 1);
    # MXFP8 E4M3 -134 -> -127 (code 0); MXFP6 E3M2 -130 -> -127 (code 0)
    for name, code in (("mxfp4", 0), ("mxint8", 1), ("mxint4", 1), ("mxfp8_e4m3", 0),
                       ("mxfp6_e3m2", 0), ("mxfp6_e2m3", 0), ("mxfp8_e5m2", 0)):
        fmt = F.get(name)
        qt = fmt.quantize(x)
        assert qt.params["scale"].dtype == torch.uint8
        assert qt.params["scale"].tolist() == [[code], [code]], name
        assert _codes(qt) == [0] * 64, name
        assert torch.equal(fmt.dequantize(qt), x), name


def test_mxfp4_one_outlier_block():
    x = _block(100.0, 1.0, 5.0, 4.0, 24.0, 40.0, -56.0, 0.3)
    # amax 100: floor(log2 100) = 6, E = 6 - 2 = 4, X = 16, code 131
    #  100/16 = 6.25 -> saturates to 6    code 7
    #    1/16 = 0.0625 -> 0 (< 0.25)      code 0
    #    5/16 = 0.3125 -> 0.5             code 1
    #    4/16 = 0.25   tie 0|0.5 -> 0     code 0   (even)   | 0.5 code 1 (nearest)
    #   24/16 = 1.5                       code 3
    #   40/16 = 2.5    tie 2|3 -> 2       code 4   (even)   | 3 code 5 (nearest)
    #  -56/16 = -3.5   tie 3|4 -> -4      code 14  (both: 4 is even and away from zero)
    #  0.3/16 -> 0                        code 0
    even = [7, 0, 1, 0, 3, 4, 14, 0] + [0] * 24
    away = [7, 0, 1, 1, 3, 5, 14, 0] + [0] * 24
    qt = F.get("mxfp4").quantize(x)
    assert qt.params["scale"].tolist() == [[131]]
    assert _codes(qt) == even
    assert F.get("mxfp4").dequantize(qt)[0, :8].tolist() == [96, 0, 8, 0, 24, 32, -64, 0]
    qn = F.get("mxfp4", rounding="nearest").quantize(x)
    assert qn.params["scale"].tolist() == [[131]]
    assert _codes(qn) == away


def test_mxfp4_saturation_floor_vs_ceil():
    # block 0: amax 7 in [6, 8)*2^0; block 1: amax 26 = 6.5*4; block 2: amax exactly 6
    x = torch.cat([_block(7.0, 1.0, -7.5), _block(26.0, 2.0), _block(6.0, 0.5)], dim=1)
    floor = F.get("mxfp4").quantize(x)
    # floor: E0 = 2-2 = 0 (127): 7 -> 6 (7), 1 (2), -7.5 -> -6 (15)
    #        E1 = 4-2 = 2 (129): 26/4 = 6.5 -> 6 (7), 2/4 = 0.5 (1)
    #        E2 = 2-2 = 0 (127): 6 (7), 0.5 (1)
    assert floor.params["scale"].tolist() == [[127, 129, 127]]
    c = floor.codes[0]
    assert c[[0, 1, 2, 32, 33, 64, 65]].tolist() == [7, 2, 15, 7, 1, 7, 1]
    deq = F.get("mxfp4").dequantize(floor)[0]
    assert deq[[0, 2, 32]].tolist() == [6.0, -6.0, 24.0]  # saturated
    ceil_fmt = F.get("mxfp4", scale_rounding="ceil")
    ceil = ceil_fmt.quantize(x)
    # ceil: smallest E with amax <= 6*2^E
    #        block 0: 7 <= 12 -> E = 1 (128): 7/2 = 3.5 tie -> 4 (6), 1/2 = 0.5 (1),
    #                 -7.5/2 = -3.75 -> -4 (14)
    #        block 1: 26 <= 48 -> E = 3 (130): 26/8 = 3.25 -> 3 (5), 2/8 = 0.25 tie -> 0 (0)
    #        block 2: 6 <= 6 -> E = 0 (127), as with floor
    assert ceil.params["scale"].tolist() == [[128, 130, 127]]
    c = ceil.codes[0]
    assert c[[0, 1, 2, 32, 33, 64, 65]].tolist() == [6, 1, 14, 5, 0, 7, 1]
    deq = ceil_fmt.dequantize(ceil)[0]
    assert deq[[0, 2, 32]].tolist() == [8.0, -8.0, 24.0]  # nothing saturates


def test_mxfp4_just_below_and_at_power_of_two():
    # 7.99 still has floor(log2) = 2: E = 0, saturates to 6; 8 has floor(log2) = 3: E = 1, 8/2 = 4
    x = torch.cat([_block(7.99), _block(8.0)], dim=1)
    qt = F.get("mxfp4").quantize(x)
    assert qt.params["scale"].tolist() == [[127, 128]]
    assert qt.codes[0, [0, 32]].tolist() == [7, 6]


def test_length_not_multiple_of_32_is_padded():
    x = torch.zeros(2, 45)
    x[0, :32] = 1.0  # block 0: amax 1 -> E = -2 (125), 1/0.25 = 4 -> code 6
    x[0, 32] = 3.0  # block 1: amax 3 -> E = 1 - 2 = -1 (126), 3/0.5 = 6 -> code 7
    x[0, 33] = -0.75  # -0.75/0.5 = -1.5 -> code 8 + 3 = 11
    x[0, 34:45] = 0.5  # 0.5/0.5 = 1 -> code 2
    x[1] = -x[0]  # the same magnitudes, sign bit set
    fmt = F.get("mxfp4")
    qt = fmt.quantize(x)
    assert qt.codes.shape == (2, 64)
    assert qt.params["scale"].shape == (2, 2)
    assert qt.params["scale"].tolist() == [[125, 126], [125, 126]]
    row0 = [6] * 32 + [7, 11] + [2] * 11 + [0] * 19
    row1 = [14] * 32 + [15, 3] + [10] * 11 + [0] * 19
    assert qt.codes.tolist() == [row0, row1]
    deq = fmt.dequantize(qt)
    assert deq.shape == (2, 45)
    assert torch.equal(deq, x)  # every value here is on the grid


def test_padding_along_axis0():
    x = torch.ones(45, 3)
    qt = F.get("mxint8").quantize(x, axis=0)
    assert qt.codes.shape == (64, 3) and qt.params["scale"].shape == (2, 3)
    assert (qt.codes[45:] == 0).all()
    # amax 1 -> E = 0 (127); 1 = 64/64
    assert (qt.codes[:45] == 64).all() and (qt.params["scale"] == 127).all()
    assert torch.equal(qt.dequantize(), x)


def test_nan_inf_propagate_poisons_only_its_block():
    x = torch.randn(3, 64)
    x[0, 5] = float("nan")  # row 0, block 0
    x[1, 40] = float("inf")  # row 1, block 1
    x[2, 0] = -float("inf")  # row 2, block 0
    fmt = F.get("mxfp4", nan_policy="propagate")
    qt = fmt.quantize(x)
    s = qt.params["scale"]
    assert s[0, 0] == 255 and s[1, 1] == 255 and s[2, 0] == 255
    assert int((s == 255).sum()) == 3
    bad = torch.zeros(3, 64, dtype=torch.bool)
    bad[0, :32] = bad[1, 32:] = bad[2, :32] = True
    assert (qt.codes[bad] == 0).all()
    deq = fmt.dequantize(qt)
    assert deq[bad].isnan().all()
    assert torch.isfinite(deq[~bad]).all()
    clean = F.get("mxfp4").fake_quant(torch.where(bad, torch.zeros(()), x))
    assert torch.equal(deq[~bad], clean[~bad])
    with pytest.raises(QuantizationError, match=r"index \[0, 5\]"):
        F.get("mxfp4").quantize(x)


def test_mxint8_hand_vector():
    x = _block(1.5, 1.0, -0.25, 1 / 128, 3 / 128, 5 / 128, -1.49, 0.7)
    # amax 1.5: floor(log2 1.5) = 0, emax 0 -> E = 0, code 127; k = round(v * 64)
    #  1.5 -> 96; 1.0 -> 64; -0.25 -> -16
    #  1/128 -> 0.5 tie: 0 (even) | 1 (nearest);  3/128 -> 1.5 tie: 2 | 2
    #  5/128 -> 2.5 tie: 2 (even) | 3 (nearest);  -1.49 -> -95.36 -> -95;  0.7 -> 44.8 -> 45
    qt = F.get("mxint8").quantize(x)
    assert qt.codes.dtype == torch.int8
    assert qt.params["scale"].tolist() == [[127]]
    assert _codes(qt)[:8] == [96, 64, -16, 0, 2, 2, -95, 45]
    qn = F.get("mxint8", rounding="nearest").quantize(x)
    assert _codes(qn)[:8] == [96, 64, -16, 1, 2, 3, -95, 45]
    deq = F.get("mxint8").dequantize(qt)[0, :8]
    assert deq.tolist() == [k / 64 for k in [96, 64, -16, 0, 2, 2, -95, 45]]


def test_mxint8_saturates_symmetric():
    x = torch.cat([_block(1.99, -1.99, 1.2), _block(-12.0, 3.0)], dim=1)
    # block 0: amax 1.99 -> E = 0 (127): 1.99*64 = 127.36 -> 127; -127 (never -128);
    #          1.2*64 = 76.8 -> 77
    # block 1: amax 12 -> E = 3 (130): -12/8 = -1.5 -> -96; 3/8 = 0.375 -> 24
    qt = F.get("mxint8").quantize(x)
    assert qt.params["scale"].tolist() == [[127, 130]]
    assert qt.codes[0, [0, 1, 2, 32, 33]].tolist() == [127, -127, 77, -96, 24]


def test_mxint8_elements_are_k_over_64():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]
    qt = F.get("mxint8").quantize(x)
    k = qt.codes.to(torch.int32)
    assert int(k.min()) >= -127 and int(k.max()) <= 127
    # the floor rule puts every block's abs-max in [1, 2) * 2^E, i.e. k in [64, 127]
    kmax = k.abs().reshape(64, 8, 32).amax(-1)
    assert int(kmax.min()) >= 64 and int(kmax.max()) <= 127
    x_scale = 2.0 ** (qt.params["scale"].to(torch.float64) - 127)
    elems = qt.dequantize().double().reshape(64, 8, 32) / x_scale[..., None]
    assert torch.equal(elems * 64, torch.round(elems * 64))
    assert torch.equal(elems.reshape(64, 256) * 64, k.double())


def test_mxfp8_e4m3_hand_vector():
    x = _block(1000.0, 3.0, 2.125, -5 * 2.0 ** -9, 2.0 ** -9, -1.0)
    # amax 1000: floor(log2 1000) = 9, E = 9 - 8 = 1 (code 128), X = 2
    #  1000/2 = 500 > 448 -> 448              0 1111 110 = 0x7E = 126
    #  3/2 = 1.5 = 2^0 * 1.100b               0 0111 100 = 0x3C = 60
    #  2.125/2 = 1.0625 tie 1.000b|1.001b -> 1.000b (even)   0 0111 000 = 56 | 57 (nearest)
    #  -5*2^-10 = -2.5 * 2^-9 (subnormal step 2^-9) tie 2|3 -> 2 (even)  1 0000 010 = 130
    #                                                        | 3 (nearest) 1 0000 011 = 131
    #  2^-10: half the smallest subnormal, tie 0|1 -> 0 (even) | 1 (nearest)
    #  -1/2 = -0.5 = 2^-1                     1 0110 000 = 176
    qt = F.get("mxfp8_e4m3").quantize(x)
    assert qt.params["scale"].tolist() == [[128]]
    assert _codes(qt)[:6] == [126, 60, 56, 130, 0, 176]
    assert F.get("mxfp8").quantize(x).codes.equal(qt.codes)  # the alias
    qn = F.get("mxfp8_e4m3", rounding="nearest").quantize(x)
    assert _codes(qn)[:6] == [126, 60, 57, 131, 1, 176]
    deq = F.get("mxfp8_e4m3").dequantize(qt)[0, :6]
    assert deq.tolist() == [896.0, 3.0, 2.0, -4 * 2.0 ** -9, 0.0, -1.0]


def test_mxfp8_e5m2_hand_vector():
    x = _block(1e6, 20.0, -3.0, 2.0 ** -12)
    # amax 1e6: floor(log2 1e6) = 19, E = 19 - 15 = 4 (code 131), X = 16
    #  1e6/16 = 62500 > 57344 -> 57344     0 11110 11 = 0x7B = 123
    #  20/16 = 1.25 = 2^0 * 1.01b          0 01111 01 = 61
    #  -3/16 = -0.1875 = -2^-3 * 1.1b      1 01100 10 = 128 + 50 = 178
    #  2^-12/16 = 2^-16: the smallest subnormal   0 00000 01 = 1
    qt = F.get("mxfp8_e5m2").quantize(x)
    assert qt.params["scale"].tolist() == [[131]]
    assert _codes(qt)[:4] == [123, 61, 178, 1]
    assert F.get("mxfp8_e5m2").dequantize(qt)[0, :4].tolist() == [917504.0, 20.0, -3.0,
                                                                  2.0 ** -12]


def test_mxfp6_e2m3_hand_vector():
    x = _block(30.0, 1.0, -9.0, 1.25, 2.0)
    # amax 30: floor(log2 30) = 4, E = 4 - 2 = 2 (code 129), X = 4
    #  30/4 = 7.5 = 2^2 * 1.111b (max)     0 11 111 = 31
    #  1/4 = 0.25 = 2/8 (subnormal)        0 00 010 = 2
    #  -9/4 = -2.25 = -2^1 * 1.001b        1 10 001 = 32 + 17 = 49
    #  1.25/4 = 5/16 tie 2/8|3/8 -> 2/8 (even) 0 00 010 = 2 | 3/8 (nearest) 0 00 011 = 3
    #  2/4 = 0.5 = 4/8                     0 00 100 = 4
    qt = F.get("mxfp6_e2m3").quantize(x)
    assert qt.params["scale"].tolist() == [[129]]
    assert _codes(qt)[:5] == [31, 2, 49, 2, 4]
    assert F.get("mxfp6").quantize(x).codes.equal(qt.codes)  # the alias
    assert _codes(F.get("mxfp6_e2m3", rounding="nearest").quantize(x))[:5] == [31, 2, 49, 3, 4]
    assert F.get("mxfp6_e2m3").dequantize(qt)[0, :5].tolist() == [30.0, 1.0, -9.0, 1.0, 2.0]


def test_mxfp6_e3m2_hand_vector():
    x = _block(100.0, 1.0, -3.0, 0.25, 90.0)
    # amax 100: floor(log2 100) = 6, E = 6 - 4 = 2 (code 129), X = 4
    #  100/4 = 25 (binade [16, 32), step 4) -> 24 = 2^4 * 1.10b   0 111 10 = 30
    #  1/4 = 0.25 = 2^-2 (smallest normal, bias 3)               0 001 00 = 4
    #  -3/4 = -0.75 = -2^-1 * 1.10b                              1 010 10 = 32 + 10 = 42
    #  0.25/4 = 1/16: the smallest subnormal                     0 000 01 = 1
    #  90/4 = 22.5 -> 24 (22 would be the tie)                   0 111 10 = 30
    qt = F.get("mxfp6_e3m2").quantize(x)
    assert qt.params["scale"].tolist() == [[129]]
    assert _codes(qt)[:5] == [30, 4, 42, 1, 30]
    assert F.get("mxfp6_e3m2").dequantize(qt)[0, :5].tolist() == [96.0, 1.0, -3.0, 0.25, 96.0]


MX_NAMES = ["mxint8", "mxint6", "mxint4", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3",
            "mxfp6_e3m2", "mxfp4"]


@pytest.mark.parametrize("name", MX_NAMES)
def test_given_params_reproduce_codes(name):
    x = torch.randn(6, 77) * torch.logspace(-2, 2, 6)[:, None]
    fmt = F.get(name)
    qt = fmt.quantize(x)
    again = fmt.quantize(x, params=qt.params)
    assert torch.equal(again.codes, qt.codes)
    assert torch.equal(again.params["scale"], qt.params["scale"])
    # another tensor through fixed scales: codes computed against them, saturating
    y = x * 3
    fixed = fmt.quantize(y, params=qt.params)
    assert torch.equal(fixed.params["scale"], qt.params["scale"])
    assert not torch.equal(fixed.codes, fmt.quantize(y).codes)


@pytest.mark.parametrize("name", MX_NAMES)
def test_axis0_equals_transpose(name):
    x = torch.randn(70, 5) * 4
    fmt = F.get(name)
    a = fmt.quantize(x, axis=0)
    b = fmt.quantize(x.t().contiguous(), axis=-1)
    assert a.codes.shape == (96, 5) and a.params["scale"].shape == (3, 5)
    assert torch.equal(a.codes, b.codes.t())
    assert torch.equal(a.params["scale"], b.params["scale"].t())
    assert torch.equal(fmt.dequantize(a), fmt.dequantize(b).t())


@pytest.mark.parametrize("name", MX_NAMES)
def test_scale_matches_floor_log2_rule(name):
    """E = max(floor(log2 amax) - emax, -127) on random blocks over a wide range."""
    x = torch.randn(40, 64) * torch.logspace(-38, 30, 40)[:, None]
    x[0] *= 1e-4  # fp32 subnormals, ~2^-138: every element type clamps E at -127
    fmt = F.get(name)
    qt = fmt.quantize(x)
    amax = x.double().abs().reshape(40, 2, 32).amax(-1)
    e = (torch.floor(torch.log2(amax)) - fmt.elem.emax).clamp_min(-127)
    assert (e[0] == -127).all()
    assert torch.equal(qt.params["scale"].double(), e + 127)
    # E8M0 decodes to exactly 2^E, so every block's amax decodes within one element step
    deq = fmt.dequantize(qt).double()
    assert torch.isfinite(deq).all()
    assert (deq.abs().reshape(40, 2, 32).amax(-1) <= fmt.elem.max_norm * 2.0 ** e).all()


def test_bits_per_element():
    assert F.get("mxfp4").bits_per_element == 4 + 8 / 32
    assert F.get("mxint8").bits_per_element == 8 + 8 / 32
    qt = F.get("mxfp6_e3m2").quantize(torch.randn(2, 45))
    assert qt.nbits == 2 * 64 * 6 + 4 * 8
    assert math.isclose(qt.bits_per_element, (2 * 64 * 6 + 4 * 8) / 90)
