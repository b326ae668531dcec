"""QuantConfig: defaults, validation with helpful errors, per-layer overrides, TOML."""
from __future__ import annotations

import pytest

from qcompile.config import QuantConfig
from qcompile.errors import ConfigError


def test_defaults_resolve_to_formats():
    lc = QuantConfig().layer("encoder.layer.0.attention.self.query")
    fmt = lc.weight_format()
    assert fmt.name == "int4" and fmt.group_size == 128 and lc.activation_format() is None
    per_channel = QuantConfig(weights="int8", group_size=None).layer("x").weight_format()
    assert per_channel.granularity.value == "per_channel"
    mx = QuantConfig(weights="mxfp4", activations="int8").layer("x")
    assert mx.weight_format().group_size == 32  # block formats keep their own blocks
    assert mx.activation_format().granularity.value == "per_token"


@pytest.mark.parametrize("bad,match", [
    (dict(weights="int9"), "unknown numeric format"), (dict(algorithm="sgd"), "algorithm"),
    (dict(rotation="fourier"), "rotation"), (dict(smoothquant=1.5), "smoothquant"),
    (dict(group_size=0), "group_size"), (dict(activation_granularity="per_row"), "granularity"),
    (dict(calibration_size=0), "calibration_size"),
    (dict(overrides={"*.fc": {"rotation": "hadamard"}}), "cannot vary per layer"),
    (dict(overrides={"*.fc": 3}), "dict of fields"),
])
def test_bad_configs(bad, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**bad)


def test_overrides_last_match_wins_and_skip():
    cfg = QuantConfig(weights="int4", overrides={"*.attention.*": {"weights": "int8"},
                                                 "*.attention.output.*": {"group_size": 32},
                                                 "pooler*": "skip"})
    a = cfg.layer("encoder.layer.0.attention.output.dense")
    assert a.weights == "int8" and a.group_size == 32
    assert cfg.layer("encoder.layer.0.intermediate.dense").weights == "int4"
    assert cfg.layer("pooler.dense") is None
    assert cfg.layer("", "pooler.dense.weight") is None  # the weight's name matches too


def test_toml(tmp_path):
    p = tmp_path / "q.toml"
    p.write_text('weights = "int4"\ngroup_size = 64\nactivations = "int8"\nalgorithm = "gptq"\n'
                 'smoothquant = "none"\n[gptq]\ndamp = 0.02\n[overrides]\n"lm_head" = "skip"\n'
                 '[overrides."*.mlp.*"]\nweights = "mxfp4"\n')
    cfg = QuantConfig.from_toml(p)
    assert cfg == QuantConfig(weights="int4", group_size=64, activations="int8", algorithm="gptq",
                              gptq={"damp": 0.02}, overrides={"lm_head": "skip",
                                                              "*.mlp.*": {"weights": "mxfp4"}})
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown QuantConfig field"):
        QuantConfig.from_toml('wieghts = "int4"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        QuantConfig.from_toml("weights = \n")
    assert QuantConfig.coerce({"weights": "nf4"}).weights == "nf4"
