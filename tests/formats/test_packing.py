"""Bit packing: the documented layout, and pack → unpack is the identity for every format and
width (hypothesis); corrupt buffers are QuantizationErrors."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile import formats as F
from qcompile.errors import QuantizationError
from qcompile.formats.packing import MAGIC


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 16), data=st.data())
def test_pack_bits_roundtrip(bits, data):
    n = data.draw(st.integers(0, 200))
    codes = np.array(data.draw(st.lists(st.integers(0, 2 ** bits - 1), min_size=n, max_size=n)),
                     dtype=np.uint8 if bits <= 8 else np.uint16)
    packed = F.pack_bits(codes, bits)
    assert len(packed) == -(-n * bits // 8)
    assert np.array_equal(F.unpack_bits(packed, bits, n), codes)


def test_documented_bit_order():
    # 4 bits: code 0 in the low nibble of byte 0, code 1 in its high nibble
    assert F.pack_bits(np.array([0x1, 0xA, 0xF], np.uint8), 4) == bytes([0xA1, 0x0F])
    # 3 bits: codes 5, 3, 6 give stream bits (LSB of each code first) 1,0,1, 1,1,0, 0,1,1;
    # byte 0 holds stream bits 0-7 = 1,0,1,1,1,0,0,1 -> 0x9D, byte 1 bit 0 = 1 -> 0x01
    assert F.pack_bits(np.array([5, 3, 6], np.uint8), 3) == bytes([0x9D, 0x01])
    assert F.pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1], np.uint8), 1) == bytes([0x0D, 0x01])
    with pytest.raises(QuantizationError, match="exceeds 2 bits"):
        F.pack_bits(np.array([4], np.uint8), 2)
    # 16 bits: little-endian words; 12 bits: code 0 = byte 0 + low nibble of byte 1
    assert F.pack_bits(np.array([0x1234, 0xFFFE], np.int32), 16) == bytes([0x34, 0x12, 0xFE, 0xFF])
    assert F.pack_bits(np.array([0xABC, 0x123], np.uint16), 12) == bytes([0xBC, 0x3A, 0x12])
    with pytest.raises(QuantizationError, match="exceeds 16 bits"):
        F.pack_bits(np.array([65536], np.int32), 16)
    with pytest.raises(QuantizationError, match="widths are 1 to 16"):
        F.pack_bits(np.array([1], np.int32), 17)


def _cases():
    out = []
    for name in F.available():
        opts = {}
        if name.startswith(("int", "uint")):
            opts = {"group_size": 8, "pad": True}
        out.append((name, opts))
    out += [("uint4", {"granularity": "per_channel"}), ("int3", {"symmetric": False,
                                                                 "group_size": 4, "pad": True}),
            ("int8", {"granularity": "per_tensor", "scale_dtype": "bf16"}),
            ("fp4_e2m1", {"granularity": "none"}), ("fp6_e3m2", {"group_size": 8, "pad": True}),
            ("nvfp4", {"pad": True}), ("nf4", {"group_size": 8, "pad": True})]
    return out


@pytest.mark.parametrize("name,opts", _cases(), ids=lambda v: str(v))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_pack_unpack_identity_every_format(name, opts, data):
    fmt = F.get(name, **opts)
    rows = data.draw(st.integers(1, 4))
    cols = data.draw(st.sampled_from([1, 7, 8, 16, 33, 64]))
    if fmt.granularity.value == "per_group" and not getattr(fmt, "pad", False) \
            and not fmt.pads and cols % fmt.group_size:
        cols = fmt.group_size
    seed = data.draw(st.integers(0, 2 ** 16))
    scale = data.draw(st.sampled_from([1e-3, 1.0, 300.0]))
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    qt = fmt.quantize(x)
    blob = qt.pack()
    back = F.QuantizedTensor.unpack(blob)
    assert back.format == fmt and back.shape == qt.shape and back.axis == qt.axis
    assert back.codes.dtype == qt.codes.dtype and torch.equal(back.codes, qt.codes)
    assert set(back.params) == set(qt.params)
    for k, p in qt.params.items():
        assert back.params[k].dtype == p.dtype and torch.equal(back.params[k], p), k
    assert torch.equal(fmt.dequantize(back), fmt.dequantize(qt))
    assert back.pack() == blob  # deterministic bytes


def test_packed_size_matches_bits_per_element():
    w = torch.randn(256, 1024)
    for name, want in (("int4", 4.125), ("mxfp4", 4.25), ("nvfp4", 4.5), ("nf4", 4.5)):
        opts = {"group_size": 128, "scale_dtype": "fp16"} if name == "int4" else {}
        qt = F.get(name, **opts).quantize(w)
        assert qt.bits_per_element == pytest.approx(want, abs=1e-3)
        payload_bits = (len(qt.pack()) - 1024) * 8  # less a generous header allowance
        assert payload_bits <= qt.nbits <= len(qt.pack()) * 8


def test_corrupt_buffers():
    blob = F.get("mxfp4").quantize(torch.randn(4, 64)).pack()
    with pytest.raises(QuantizationError, match="bad magic"):
        F.QuantizedTensor.unpack(b"XXXX" + blob[4:])
    for cut in (40, len(blob) - 20):  # inside the header, inside the payload
        with pytest.raises(QuantizationError, match="truncated"):
            F.QuantizedTensor.unpack(blob[:cut])
    with pytest.raises(QuantizationError, match="version"):
        F.QuantizedTensor.unpack(MAGIC + bytes([9]) + blob[5:])
    (hlen,) = struct.unpack("<I", blob[8:12])
    with pytest.raises(QuantizationError, match="header is corrupt"):
        F.QuantizedTensor.unpack(blob[:12] + b"{" * hlen + blob[12 + hlen:])
