"""NVFP4: E4M3 block scales never exceed 448, the tensor scale is amax/(448*6), the error is
within half an E2M1 step of the block's effective scale, and a hand-computed example."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from qcompile import formats as F
from qcompile.errors import QuantizationError


def _e4m3(codes: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(codes.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32))


def _data(kind: str) -> torch.Tensor:
    rng = np.random.default_rng(3)
    if kind == "gaussian":
        x = rng.standard_normal((64, 256))
    elif kind == "student_t2":
        x = rng.standard_t(2, (64, 256))
    else:  # one outlier 1000x the rest
        x = rng.standard_normal((64, 256))
        x[17, 100] = 1000.0 * np.abs(x).max()
    return torch.from_numpy(x.astype(np.float32))


def _half_step(v: torch.Tensor) -> torch.Tensor:
    """Half the E2M1 grid spacing at |v| (|v| <= 6): 0.25 below 2, 0.5 in [2, 4), 1 above."""
    a = v.abs()
    return torch.where(a < 2, 0.25, torch.where(a < 4, 0.5, 1.0))


@pytest.mark.parametrize("kind", ["gaussian", "student_t2", "outlier"])
def test_scales_and_error_bound(kind):
    x = _data(kind)
    fmt = F.get("nvfp4")
    qt = fmt.quantize(x)
    assert qt.codes.shape == x.shape and qt.codes.dtype == torch.uint8
    assert int(qt.codes.max()) < 16
    sb_codes = qt.params["scale"]
    assert sb_codes.shape == (64, 16) and sb_codes.dtype == torch.uint8
    sb = _e4m3(sb_codes)
    assert torch.isfinite(sb).all() and (sb >= 0).all()
    assert float(sb.max()) <= 448.0
    # the block holding the tensor's abs-max maps it onto 448 * 6
    assert float(sb.max()) == 448.0
    sg = qt.params["tensor_scale"]
    assert sg.shape == () and sg.dtype == torch.float32
    assert float(sg) == pytest.approx(float(x.abs().max()) / (448 * 6), rel=1e-7)
    # block scale: RNE E4M3 of amax_blk / (6 s_g)
    amax_blk = x.reshape(64, 16, 16).abs().amax(-1)
    want = (amax_blk / (6 * sg)).clamp(max=448).numpy().astype(ml_dtypes.float8_e4m3fn)
    assert np.array_equal(sb_codes.numpy(), want.view(np.uint8))
    # error: at most half an E2M1 step of the effective scale where nothing saturates
    eff = (sb * sg)[..., None].expand(64, 16, 16).reshape(64, 256)
    deq = fmt.dequantize(qt)
    v = x / eff
    unsat = v.abs() <= 6
    assert unsat.float().mean() > 0.9  # only block maxima that E4M3 rounded down
    err = (x - deq).abs()
    bound = _half_step(v) * eff
    assert (err[unsat] <= bound[unsat] * (1 + 1e-6)).all()
    # saturated elements stay within 1 ULP (the top step, 2) of the scale
    assert (err[~unsat] <= 2 * eff[~unsat]).all()


def test_hand_computed_example():
    # tensor amax 10.5 = 2688 / 256, so s_g = 10.5 / 2688 = 2^-8 exactly
    # block 0: amax 10.5 -> s_b = E4M3(10.5 / (6 * 2^-8)) = E4M3(448) = 448, code 0x7E = 126;
    #          effective scale 448 * 2^-8 = 1.75
    b0 = [10.5, 1.75, -0.875, 4.375, 0.4375, 6.125, -7.0, 2.625,
          5.25, 0.0, -10.5, 3.5, 0.7, -2.2, 8.0, -1.3125]
    # x/1.75 = 6, 1, -0.5, 2.5 (tie -> 2), 0.25 (tie -> 0), 3.5 (tie -> 4), -4, 1.5,
    #          3, 0, -6, 2, 0.4 (-> 0.5), -1.2571 (-> -1.5), 4.571 (-> 4), -0.75 (tie -> -1)
    c0 = [7, 2, 9, 4, 0, 6, 14, 3, 5, 0, 15, 4, 1, 11, 6, 10]
    d0 = [10.5, 1.75, -0.875, 3.5, 0.0, 7.0, -7.0, 2.625,
          5.25, 0.0, -10.5, 3.5, 0.875, -2.625, 7.0, -1.75]
    # block 1: amax 3.15 -> 3.15 / (6 * 2^-8) = 134.4 -> E4M3 128 (binade [128, 256) has step
    #          16), code 0 1110 000 = 112; effective scale 128 * 2^-8 = 0.5
    b1 = [3.15, 1.0, -0.3, 0.125] + [0.0] * 12
    # x/0.5 = 6.3 (saturates -> 6), 2, -0.6 (-> -0.5), 0.25 (tie -> 0)
    c1 = [7, 4, 9, 0] + [0] * 12
    d1 = [3.0, 1.0, -0.25, 0.0] + [0.0] * 12
    x = torch.tensor([b0 + b1])
    fmt = F.get("nvfp4")
    qt = fmt.quantize(x)
    assert float(qt.params["tensor_scale"]) == 2.0 ** -8
    assert qt.params["scale"].tolist() == [[126, 112]]
    assert qt.codes.tolist() == [c0 + c1]
    assert fmt.dequantize(qt).tolist() == [d0 + d1]


def test_all_zero_tensor():
    x = torch.zeros(4, 32)
    fmt = F.get("nvfp4")
    qt = fmt.quantize(x)
    assert float(qt.params["tensor_scale"]) == 1.0
    assert (qt.codes == 0).all() and (qt.params["scale"] == 0).all()
    deq = fmt.dequantize(qt)
    assert torch.equal(deq, x)


def test_zero_block_in_nonzero_tensor():
    x = torch.randn(2, 48)
    x[1, 16:32] = 0.0
    qt = F.get("nvfp4").quantize(x)
    assert qt.params["scale"][1, 1] == 0
    deq = qt.dequantize()
    assert torch.equal(deq[1, 16:32], torch.zeros(16)) and torch.isfinite(deq).all()


def test_without_tensor_scale():
    x = torch.randn(8, 64) * 50
    fmt = F.get("nvfp4", tensor_scale=False)
    qt = fmt.quantize(x)
    assert float(qt.params["tensor_scale"]) == 1.0
    sb = _e4m3(qt.params["scale"])
    want = (x.reshape(8, 4, 16).abs().amax(-1) / 6).clamp(max=448)
    assert torch.equal(sb, torch.from_numpy(
        want.numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32)))


def test_given_params_and_packing_bits():
    x = torch.randn(4, 64)
    fmt = F.get("nvfp4")
    qt = fmt.quantize(x)
    again = fmt.quantize(x, params=qt.params)
    assert torch.equal(again.codes, qt.codes)
    assert fmt.bits_per_element == 4 + 8 / 16
    assert qt.nbits == 256 * 4 + 16 * 8 + 32


def test_nan_policies():
    x = torch.randn(2, 32)
    x[0, 20] = float("nan")
    with pytest.raises(QuantizationError, match=r"index \[0, 20\]"):
        F.get("nvfp4").quantize(x)
    deq = F.get("nvfp4", nan_policy="propagate").fake_quant(x)
    assert deq[0, 16:].isnan().all()
    assert not deq[0, :16].isnan().any() and not deq[1].isnan().any()
    # the other blocks are quantized as if the bad value were zero (tensor scale included)
    clean = F.get("nvfp4").fake_quant(torch.nan_to_num(x, nan=0.0))
    assert torch.equal(deq[1], clean[1]) and torch.equal(deq[0, :16], clean[0, :16])


def test_not_multiple_of_16_needs_pad():
    from qcompile.errors import ConfigError
    with pytest.raises(ConfigError, match="pad=True"):
        F.get("nvfp4").quantize(torch.randn(2, 40))
    qt = F.get("nvfp4", pad=True).quantize(torch.randn(2, 40))
    assert qt.codes.shape == (2, 48) and (qt.codes[:, 40:] == 0).all()
    assert qt.dequantize().shape == (2, 40)
