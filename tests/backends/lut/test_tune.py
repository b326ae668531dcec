"""Tuning: the grid, the per-machine JSON cache, and the untuned default."""
from __future__ import annotations

import json

from qcompile.backends.lut import tune as T
from qcompile.backends.lut.build import host_variants


def test_default_is_used_without_a_cache_entry(tmp_path, monkeypatch, isa_level):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    c = T.choose(512, 256, 2, 32, "sym", 1)
    assert c == T.default_config(2, 32, "sym", 1)
    assert c.variant == host_variants()[0] and c.mt == 1
    assert T.default_config(2, 32, "sym", 8).mt > 1
    assert not T.cache_path().exists()


def test_grid():
    cs = T.candidates(3, 64, "sym", 1, variants=["vpermb", "shufb256"])
    assert {c.rb for c in cs} == set(T.ROW_BLOCKS)
    assert {c.u for c in cs if c.variant == "vpermb"} == set(T.KFACTORS)
    assert {c.u for c in cs if c.variant == "shufb256"} == {1}
    assert {c.mt for c in T.candidates(3, 64, "sym", 16)} == {2, 4}
    assert [T.m_bucket(m) for m in (1, 2, 15, 16, 500)] == [1, 4, 4, 16, 16]


def test_tuning_caches_the_fastest(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    v = [host_variants()[0]]
    best = T.tune(256, 128, 2, 32, "sym", 1, variants=v, progress=False)
    data = json.loads(T.cache_path().read_text())
    (key, entry), = data.items()
    assert key == "n256_k128_b2_g32_sym_m1"
    assert entry["seconds"] == min(entry["all"].values())
    assert entry["all"][best.name] == entry["seconds"]
    assert T.choose(256, 128, 2, 32, "sym", 1) == best
    assert T.choose(256, 128, 2, 32, "sym", 4) == T.default_config(2, 32, "sym", 4)
