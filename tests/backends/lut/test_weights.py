"""The offline weight transform: codes → unsigned codes, scales and bias terms → bit planes →
kernel layouts (decoded back here from the layout's definition)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompile import formats as F
from qcompile.backends.lut import weights as W
from qcompile.errors import ConfigError

FORMATS = [
    ("int1", {"group_size": 32}, "none"),
    ("int2", {"group_size": 64}, "sym"),
    ("int3", {"group_size": 128}, "sym"),
    ("int4", {"group_size": 128}, "sym"),
    ("int4", {"group_size": 32, "full_range": True}, "sym"),
    ("int4", {"granularity": "per_channel"}, "sym"),
    ("int2", {"group_size": 256}, "sym"),
    ("uint2", {"group_size": 32}, "asym"),
    ("uint3", {"group_size": 64}, "asym"),
    ("uint4", {"group_size": 128}, "asym"),
    ("int4", {"group_size": 64, "scale_dtype": "fp16"}, "sym"),
]


@pytest.mark.parametrize("name,kw,mode", FORMATS)
def test_weight_equals_format_dequantization(name, kw, mode):
    w = torch.randn(40, 512)
    fmt = F.get(name, **kw)
    qt = fmt.quantize(w)
    lw = W.from_quantized(qt)
    assert lw.mode == mode and lw.bits == fmt.bits
    np.testing.assert_allclose(lw.dequantize(), fmt.dequantize(qt).double().numpy(),
                               rtol=0, atol=1e-6)
    assert lw.q.max() < 2 ** fmt.bits
    assert lw.group in W.ACT_GROUPS


def test_planes_rebuild_the_codes():
    rng = np.random.default_rng(1)
    for bits in (1, 2, 3, 4):
        q = rng.integers(0, 1 << bits, (24, 128)).astype(np.uint8)
        s = np.ones((24, 1), np.float32)
        lw = W.LutWeight(q=q, s=s, sb=s * 0, bits=bits, group=128, mode="sym", k=128)
        idx = lw.planes()
        back = np.zeros_like(q, dtype=np.int64)
        for i in range(bits):
            for t in range(4):
                back[:, t::4] += ((idx[i] >> t) & 1).astype(np.int64) << i
        np.testing.assert_array_equal(back, q)


def _unpack(pw: W.PackedWeight) -> np.ndarray:
    """idx[plane, n, j] decoded from a packed weight by the layout rules in weights' docstring."""
    L = W.LAYOUTS[pw.layout]
    b, G, rb = pw.bits, pw.group, pw.rb
    steps, ng, tiles = G // (4 * L), pw.kp // G, pw.tiles
    nu = steps * rb * b
    blocks = pw.w.reshape(tiles, ng, nu // 2, 16 * L)
    units = np.zeros((tiles, ng, nu, 16 * L), np.uint8)
    units[:, :, 0::2] = blocks & 15
    units[:, :, 1::2] = blocks >> 4
    out = np.zeros((b, tiles * rb * 16, pw.kp // 4), np.uint8)
    u = 0
    for s in range(steps):
        for r in range(rb):
            for i in range(b):
                for row in range(16):
                    for j in range(L):
                        if pw.layout in ("vpermb", "c"):
                            pos = 4 * row + j
                        else:
                            pos = 16 * j + (2 * row if row < 8 else 2 * (row - 8) + 1)
                        for t in range(tiles):
                            for g in range(ng):
                                out[i, t * rb * 16 + r * 16 + row,
                                    g * G // 4 + s * L + j] = units[t, g, u, pos]
                u += 1
    return out[:, :pw.n]


@pytest.mark.parametrize("layout", sorted(W.LAYOUTS))
@pytest.mark.parametrize("bits,rb", [(1, 1), (3, 1), (2, 2), (4, 1)])
def test_layout_round_trip(layout, bits, rb):
    w = torch.randn(40, 64)
    lw = W.from_quantized(F.get(f"int{bits}", group_size=32).quantize(w))
    pw = W.pack(lw, layout, rb=rb)
    np.testing.assert_array_equal(_unpack(pw), lw.planes())
    # scales: [tile, group, rb, ns, 16]
    sc = pw.sc.reshape(pw.tiles, lw.ng, rb, 1, 16)
    np.testing.assert_array_equal(sc[:, :, :, 0].transpose(0, 2, 3, 1).reshape(-1, lw.ng)[:40],
                                  lw.s)


def test_asymmetric_layout_stores_the_bias_scales():
    w = torch.randn(20, 64)
    lw = W.from_quantized(F.get("uint3", group_size=64).quantize(w))
    pw = W.pack(lw, "vpermb", rb=2)
    sc = pw.sc.reshape(pw.tiles, lw.ng, 2, 2, 16)
    np.testing.assert_array_equal(sc[:, :, :, 1].transpose(0, 2, 3, 1).reshape(-1, lw.ng)[:20],
                                  lw.sb)


def test_k_padded_to_a_multiple_of_32():
    w = torch.randn(16, 200)
    lw = W.from_quantized(F.get("int4", granularity="per_channel").quantize(w))
    assert lw.k == 200 and lw.kp == 224 and lw.group == 32
    assert (lw.q[:, 200:] == 0).all()
    assert lw.dequantize().shape == (16, 200)


@pytest.mark.parametrize("name,kw,msg", [
    ("int8", {"group_size": 128}, "1- to 4-bit"),
    ("int4", {"group_size": 16}, "multiple of 32"),
    ("int4", {"granularity": "per_tensor"}, "per-group or per-channel"),
    ("mxfp4", {}, "integer formats"),
])
def test_formats_the_kernels_cannot_take(name, kw, msg):
    qt = F.get(name, **kw).quantize(torch.randn(8, 128))
    with pytest.raises(ConfigError, match=msg):
        W.from_quantized(qt)


def test_unknown_layout():
    lw = W.from_quantized(F.get("int2", group_size=32).quantize(torch.randn(8, 64)))
    with pytest.raises(ConfigError, match="unknown LUT layout"):
        W.pack(lw, "neon")
