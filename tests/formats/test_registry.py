"""The format registry: names, aliases, options, JSON, bits per element, helpful errors."""
from __future__ import annotations

import json

import pytest

from qcompile import formats as F
from qcompile.errors import ConfigError

BITS_PER_ELEMENT = {  # element bits + per-block parameters / block size
    "int4": 4, "uint8": 8, "fp16": 16, "bf16": 16, "fp8_e4m3": 8, "fp4_e2m1": 4,
    "mxint8": 8 + 8 / 32, "mxfp8_e4m3": 8.25, "mxfp8_e5m2": 8.25, "mxfp6_e2m3": 6.25,
    "mxfp6_e3m2": 6.25, "mxfp4": 4.25, "mxint4": 4.25, "mxint6": 6.25,
    "nvfp4": 4 + 8 / 16, "nf4": 4 + 32 / 64, "sf4": 4.5, "razer": 4 + (8 + 2) / 16,
    "bitmod": 4 + (16 + 2) / 128,
}


def test_every_registered_format_has_a_known_size():
    assert set(BITS_PER_ELEMENT) <= set(F.available())
    for name, bpe in BITS_PER_ELEMENT.items():
        assert F.get(name).bits_per_element == pytest.approx(bpe), name
    assert F.get("int4", group_size=128).bits_per_element == 4 + 32 / 128
    assert F.get("uint4", group_size=128).bits_per_element == 4 + (32 + 4) / 128


@pytest.mark.parametrize("alias,name", [("fp8", "fp8_e4m3"), ("E4M3", "fp8_e4m3"),
                                        ("mxfp8", "mxfp8_e4m3"), ("mxfp6", "mxfp6_e2m3"),
                                        ("bfloat16", "bf16"), ("half", "fp16"),
                                        ("float4_e2m1fn", "fp4_e2m1"), (" INT4 ", "int4")])
def test_aliases(alias, name):
    assert F.get(alias).name == name


def test_unknown_names_and_options():
    with pytest.raises(ConfigError, match="unknown numeric format 'mxfp5'") as e:
        F.get("mxfp5")
    assert "did you mean" in str(e.value) and "mxfp4" in str(e.value)
    with pytest.raises(ConfigError, match="no option"):
        F.get("int4", groupsize=128)
    with pytest.raises(ConfigError, match="fixes"):
        F.get("int4", bits=8)
    with pytest.raises(ConfigError, match="granularity must be per_group"):
        F.get("mxfp4", granularity="per_tensor")
    with pytest.raises(ConfigError, match="scale_rounding"):
        F.get("mxfp4", scale_rounding="up")
    with pytest.raises(ConfigError, match="only applies to per_group"):
        F.get("int8", granularity="per_channel", group_size=32)
    with pytest.raises(ConfigError, match="string"):
        F.get(4)


def test_group_size_implies_groups():
    fmt = F.get("int4", group_size=64)
    assert fmt.granularity.value == "per_group" and fmt.group_size == 64
    assert str(fmt) == "int4(granularity=per_group, group_size=64)"
    assert str(F.get("mxfp4")) == "mxfp4"  # registry defaults are not repeated


@pytest.mark.parametrize("name,opts", [
    ("int4", {"group_size": 32, "symmetric": False, "scale_dtype": "fp16", "clip_ratio": 0.9}),
    ("mxfp4", {"scale_rounding": "ceil", "rounding": "nearest"}), ("nvfp4", {"tensor_scale": False}),
    ("sf4", {"nu": 3.0, "group_size": 128}), ("razer", {"specials": [4.0, -4.0]}),
    ("fp8_e5m2", {"granularity": "per_channel"}), ("bf16", {}),
])
def test_json_roundtrip(name, opts):
    fmt = F.get(name, **opts)
    d = json.loads(json.dumps(fmt.to_json()))
    assert d["name"] == name
    assert F.from_json(d) == fmt
    assert F.get(fmt) is fmt and F.get(fmt, nan_policy="propagate").nan_policy == "propagate"
