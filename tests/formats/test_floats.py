"""Minifloat and plain float storage: casts bit-exact against ml_dtypes, every code decodes
to ml_dtypes' value, tie rounding modes, per-tensor scaling, and the NaN policies."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from qcompile import formats as F
from qcompile.errors import QuantizationError

# (registry name, alias, ml_dtypes type)
ELEMENT_TYPES = [
    ("fp8_e4m3", "float8_e4m3fn", ml_dtypes.float8_e4m3fn),
    ("fp8_e5m2", "float8_e5m2", ml_dtypes.float8_e5m2),
    ("fp6_e2m3", "float6_e2m3fn", ml_dtypes.float6_e2m3fn),
    ("fp6_e3m2", "float6_e3m2fn", ml_dtypes.float6_e3m2fn),
    ("fp4_e2m1", "float4_e2m1fn", ml_dtypes.float4_e2m1fn),
]
IDS = [t[0] for t in ELEMENT_TYPES]


def _raw(name: str, **options):
    return F.get(name, granularity="none", **options)


def _expected_codes(arr: np.ndarray, np_dtype) -> np.ndarray:
    mx = float(ml_dtypes.finfo(np_dtype).max)
    return arr.astype(np.float32).clip(-mx, mx).astype(np_dtype).view(np.uint8)


def _finite_grid(np_dtype) -> np.ndarray:
    """Every finite value of the type, sorted, with -0 dropped."""
    bits = ml_dtypes.finfo(np_dtype).bits
    v = np.arange(1 << bits, dtype=np.uint8).view(np_dtype).astype(np.float64)
    return np.unique(v[np.isfinite(v)])


def _inputs(np_dtype, rng) -> dict[str, np.ndarray]:
    fi = ml_dtypes.finfo(np_dtype)
    mx, sub = float(fi.max), float(fi.smallest_subnormal)
    grid = _finite_grid(np_dtype)
    mags = 2.0 ** rng.uniform(math.log2(sub) - 3, math.log2(mx) + 3, 2000)
    return {
        "random": np.concatenate([rng.standard_normal(2000) * mx / 4,
                                  mags * rng.choice([-1.0, 1.0], 2000)]),
        "tiny": np.concatenate([rng.uniform(-3, 3, 1000) * sub,
                                np.arange(-8, 9) * (sub / 2)]),  # subnormal ties included
        "huge": np.concatenate([np.array([1, 1.0001, 1.5, 2, 1e3, 1e30]).repeat(2) * mx
                                * np.tile([1.0, -1.0], 6), [3.4e38, -3.4e38]]),
        "ties": (grid[1:] + grid[:-1]) / 2,  # exact midpoints of neighbouring values
    }


@pytest.mark.parametrize("name,alias,np_dtype", ELEMENT_TYPES, ids=IDS)
def test_raw_cast_bit_exact(name, alias, np_dtype):
    rng = np.random.default_rng(0)
    for fmt in (_raw(name), _raw(alias)):
        for kind, arr in _inputs(np_dtype, rng).items():
            arr32 = arr.astype(np.float32)
            if kind == "ties":  # the midpoints must survive the float32 cast
                assert np.array_equal(arr32.astype(np.float64), arr)
            qt = fmt.quantize(torch.from_numpy(arr32))
            assert qt.codes.dtype == torch.uint8
            assert np.array_equal(qt.codes.numpy(), _expected_codes(arr32, np_dtype)), (alias, kind)
            expect = _expected_codes(arr32, np_dtype).view(np_dtype).astype(np.float32)
            assert np.array_equal(fmt.dequantize(qt).numpy(), expect), (alias, kind)


@pytest.mark.parametrize("name,alias,np_dtype", ELEMENT_TYPES, ids=IDS)
def test_raw_cast_keeps_layout(name, alias, np_dtype):
    x = torch.randn(3, 5, 7)
    qt = _raw(name).quantize(x, axis=1)
    assert qt.codes.shape == x.shape and qt.params == {}
    want = _expected_codes(x.numpy(), np_dtype)
    assert np.array_equal(qt.codes.numpy(), want)


def _ocp_decode(code: int, ebits: int, mbits: int, name: str) -> float:
    """The value of a bit pattern by the OCP OFP8 / MX encodings, from the bits alone."""
    bias = (1 << (ebits - 1)) - 1
    sign = -1.0 if code >> (ebits + mbits) & 1 else 1.0
    e = code >> mbits & ((1 << ebits) - 1)
    m = code & ((1 << mbits) - 1)
    if name == "fp8_e5m2" and e == 31:
        return sign * math.inf if m == 0 else math.nan
    if name == "fp8_e4m3" and e == 15 and m == 7:
        return math.nan
    if e == 0:
        return sign * m / (1 << mbits) * 2.0 ** (1 - bias)
    return sign * (1 + m / (1 << mbits)) * 2.0 ** (e - bias)


@pytest.mark.parametrize("name,alias,np_dtype", ELEMENT_TYPES, ids=IDS)
def test_decode_every_code(name, alias, np_dtype):
    fi = ml_dtypes.finfo(np_dtype)
    codes = np.arange(1 << fi.bits, dtype=np.uint8)
    fmt = _raw(name)
    qt = F.QuantizedTensor(fmt, torch.from_numpy(codes), {}, (len(codes),), None)
    got = fmt.dequantize(qt).numpy()
    want = codes.view(np_dtype).astype(np.float32)
    np.testing.assert_array_equal(got, want)  # NaN where ml_dtypes has NaN
    # ... and ml_dtypes agrees with the encoding read from the bits
    ocp = np.array([_ocp_decode(int(c), fi.nexp, fi.nmant, name) for c in codes])
    np.testing.assert_array_equal(want.astype(np.float64), ocp)


# hand-picked ties: value -> (round to nearest even, round half away from zero)
TIES = {
    "fp4_e2m1": [(0.25, 0.0, 0.5), (-0.25, -0.0, -0.5), (0.75, 1.0, 1.0), (1.25, 1.0, 1.5),
                 (1.75, 2.0, 2.0), (2.5, 2.0, 3.0), (-2.5, -2.0, -3.0), (3.5, 4.0, 4.0),
                 (5.0, 4.0, 6.0), (-5.0, -4.0, -6.0)],
    # E4M3: 1 + 1/16 lies between 1 (mantissa 000) and 1.125 (001); 2^-10 is half the
    # smallest subnormal 2^-9; 3 * 2^-10 lies between 2^-9 (001) and 2^-8 (010)
    "fp8_e4m3": [(1.0625, 1.0, 1.125), (2.0 ** -10, 0.0, 2.0 ** -9),
                 (3 * 2.0 ** -10, 2.0 ** -8, 2.0 ** -8), (-1.0625, -1.0, -1.125),
                 (1.1875, 1.25, 1.25)],
    # E2M3: step 1/8 below 2; 5/16 lies between 2/8 (010) and 3/8 (011)
    "fp6_e2m3": [(5 / 16, 0.25, 0.375), (1 / 16, 0.0, 0.125), (2.125, 2.0, 2.25)],
    # E3M2: 1.125 lies between 1 (00) and 1.25 (01); 2^-5 is half the smallest subnormal
    "fp6_e3m2": [(1.125, 1.0, 1.25), (2.0 ** -5, 0.0, 2.0 ** -4), (22.0, 24.0, 24.0)],
    # E5M2: 1.125 lies between 1 (00) and 1.25 (01)
    "fp8_e5m2": [(1.125, 1.0, 1.25), (1.375, 1.5, 1.5), (2.0 ** -17, 0.0, 2.0 ** -16)],
}


@pytest.mark.parametrize("name", sorted(TIES))
def test_tie_rounding_modes(name):
    x = torch.tensor([t[0] for t in TIES[name]])
    even = torch.tensor([t[1] for t in TIES[name]])
    away = torch.tensor([t[2] for t in TIES[name]])
    got_even = _raw(name, rounding="even").fake_quant(x)
    got_away = _raw(name, rounding="nearest").fake_quant(x)
    assert torch.equal(got_even, even), got_even
    assert torch.equal(got_away, away), got_away


def test_e2m1_tie_codes():
    # E2M1 codes: 0:0 1:.5 2:1 3:1.5 4:2 5:3 6:4 7:6, sign in bit 3
    x = torch.tensor([2.5, 0.25, 5.0, -2.5, 1.25])
    assert _raw("fp4_e2m1").quantize(x).codes.tolist() == [4, 0, 6, 12, 2]
    assert _raw("fp4_e2m1", rounding="nearest").quantize(x).codes.tolist() == [5, 1, 7, 13, 3]


def test_floor_rounding_truncates_magnitude():
    x = torch.tensor([2.9, -2.9, 0.49, 5.99, 7.0])
    got = _raw("fp4_e2m1", rounding="floor").fake_quant(x)
    assert got.tolist() == [2.0, -2.0, 0.0, 4.0, 6.0]


@pytest.mark.parametrize("name,np_dtype", [("fp8_e4m3", ml_dtypes.float8_e4m3fn),
                                           ("fp8_e5m2", ml_dtypes.float8_e5m2)])
def test_scaled_per_tensor_fp8(name, np_dtype):
    x = torch.randn(8, 64) * 3
    x[2, 5] = -17.0  # the abs-max
    fmt = F.get(name)
    assert fmt.granularity.value == "per_tensor"
    qt = fmt.quantize(x)
    mx = float(ml_dtypes.finfo(np_dtype).max)
    s = qt.params["scale"]
    assert s.shape == () and s.dtype == torch.float32
    assert float(s) == pytest.approx(17.0 / mx, rel=1e-7)
    want = _expected_codes((x / s).numpy(), np_dtype)
    assert np.array_equal(qt.codes.numpy(), want)
    deq = fmt.dequantize(qt)
    assert float(deq[2, 5]) == pytest.approx(-17.0, rel=1e-6)  # abs-max maps onto max normal
    assert torch.equal(deq, torch.from_numpy(want.view(np_dtype).astype(np.float32)) * s)


@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_plain_storage_equals_torch_cast(name, dtype):
    x = torch.cat([torch.randn(1000) * 100, torch.tensor([1e-8, -3e-6, 65519.0, 7e4, -1e5, 0.0])])
    fmt = F.get(name, nan_policy="propagate")
    qt = fmt.quantize(x)
    assert qt.codes.dtype == dtype
    assert torch.equal(qt.codes, x.to(dtype))  # fp16 overflow is Inf, as the torch cast
    if name == "fp16":  # by default an overflow is refused rather than stored as Inf
        with pytest.raises(QuantizationError, match="overflows fp16"):
            F.get(name).quantize(x)
    assert torch.equal(fmt.dequantize(qt), x.to(dtype).float())
    assert fmt.dequantize(qt, dtype=dtype).dtype == dtype


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp4_e2m1", "fp16", "mxfp4", "int8"])
def test_nan_raise_names_index(name):
    x = torch.zeros(3, 64)
    x[1, 2] = float("nan")
    x[2, 7] = float("inf")
    fmt = F.get(name) if name != "fp8_e4m3" else _raw(name)
    with pytest.raises(QuantizationError, match=r"index \[1, 2\]"):
        fmt.quantize(x)


def test_propagate_fp8_raw_cast_keeps_nan():
    x = torch.tensor([1.0, float("nan"), -3.3, 1e4, float("inf"), -float("inf"), 0.1])
    for name, np_dtype in (("fp8_e4m3", ml_dtypes.float8_e4m3fn),
                           ("fp8_e5m2", ml_dtypes.float8_e5m2)):
        fmt = _raw(name, nan_policy="propagate")
        deq = fmt.dequantize(fmt.quantize(x))
        assert math.isnan(deq[1])
        fin = torch.isfinite(x)
        want = _expected_codes(x[fin].numpy(), np_dtype).view(np_dtype).astype(np.float32)
        assert torch.equal(deq[fin], torch.from_numpy(want))
        if name == "fp8_e5m2":  # E5M2 has infinities
            assert deq[4] == math.inf and deq[5] == -math.inf
        else:  # E4M3 has none: Inf becomes its NaN
            assert math.isnan(deq[4]) and math.isnan(deq[5])


def test_propagate_fp16_keeps_nan_and_inf():
    x = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    deq = F.get("fp16", nan_policy="propagate").fake_quant(x)
    assert math.isnan(deq[1]) and deq[2] == math.inf and deq[[0, 3]].tolist() == [1.0, -2.0]


@pytest.mark.parametrize("name", ["fp4_e2m1", "fp6_e2m3", "fp6_e3m2"])
def test_propagate_raw_cast_without_nan_encoding_raises(name):
    x = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(QuantizationError, match="no NaN"):
        _raw(name, nan_policy="propagate").quantize(x)
    # finite input still casts
    assert _raw(name, nan_policy="propagate").fake_quant(torch.tensor([1.0, 2.0])).tolist() \
        == [1.0, 2.0]


def test_propagate_scaled_minifloat_poisons_only_bad_group():
    x = torch.randn(2, 64)
    x[0, 40] = float("nan")
    fmt = F.get("fp4_e2m1", group_size=32, nan_policy="propagate")
    deq = fmt.fake_quant(x)
    assert deq[0, 32:].isnan().all()
    assert torch.isfinite(deq[0, :32]).all() and torch.isfinite(deq[1]).all()
    assert torch.equal(deq[1], F.get("fp4_e2m1", group_size=32).fake_quant(x[1:])[0])
