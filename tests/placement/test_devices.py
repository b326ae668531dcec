"""Device parsing, specs and default links (qcompile.placement.devices); hardware-free."""
import math

import pytest

from qcompile.errors import ConfigError
from qcompile.placement import devices as D
from qcompile.placement.costgraph import Link
from qcompile.placement.devices import LINKS, PRESETS, SPECS, DeviceConfig, parse_devices


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Measurements (host link) go to a fresh cache, never the user's."""
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))


def names(devs):
    return [d.name for d in devs]


# -- forms -----------------------------------------------------------------------------------
def test_list_form_defaults():
    devs, links = parse_devices(["npu", "cpu"])
    npu, cpu = devs
    assert (npu.name, npu.target, npu.spec, npu.measure) == ("npu", "npu", "hexagon-v73", False)
    assert npu.memory == SPECS["hexagon-v73"].memory
    assert (cpu.target, cpu.spec, cpu.measure, cpu.memory) == ("cpu", None, True, None)
    assert links[("npu", "cpu")] == LINKS["soc-npu"].link == links[("cpu", "npu")]
    assert set(links) == {("npu", "cpu"), ("cpu", "npu")}


def test_duplicates_get_numbered_names_and_comma_string():
    devs, links = parse_devices("cpu, cpu,npu")
    assert names(devs) == ["cpu0", "cpu1", "npu"]
    assert len(links) == 6
    assert parse_devices("reference")[0][0].name == "reference"


def test_default_measure_and_spec_by_target(monkeypatch):
    monkeypatch.setattr(D, "_gpu_visible", lambda: False)
    cuda = DeviceConfig("g", "cuda")
    assert (cuda.measure, cuda.spec) == (False, "a100-40gb-pcie")
    assert DeviceConfig("h", "cuda-sm90").spec == "h100-pcie"
    arm = DeviceConfig("a", "cpu-aarch64")
    assert (arm.measure, arm.spec) == (False, "cortex-x3")
    monkeypatch.setattr(D, "_gpu_visible", lambda: True)
    assert DeviceConfig("g", "cuda").measure is True
    assert DeviceConfig("l", "lut").measure and DeviceConfig("o", "onnx").measure
    assert DeviceConfig("m", "cpu", measure=False).spec == "host"


def test_mapping_form_with_options():
    devs, _ = parse_devices({"big": {"target": "cpu", "spec": "xeon-8358", "measure": False,
                                     "memory": "64 GiB", "tune_trials": 0},
                             "npu": {"memory": 1e9},
                             "ref": "reference"})
    big, npu, ref = devs
    assert (big.target, big.spec, big.measure, big.memory) == ("cpu", "xeon-8358", False, 64 * 2 ** 30)
    assert big.options == {"tune_trials": 0}
    assert (npu.target, npu.memory) == ("npu", 1e9)
    assert ref.target == "reference"


def test_toml_file(tmp_path):
    f = tmp_path / "devs.toml"
    f.write_text("""
[devices.fast]
target = "cpu"
spec = "xeon-8358"
measure = false
memory = "16 GB"

[devices.acc]
target = "cuda"
spec = "t4"
measure = false
options = { tune_trials = 0 }

[[links]]
from = "fast"
to = "acc"
latency = "20 us"
bandwidth = "10 GB/s"

[[links]]
from = "acc"
to = "fast"
spec = "pcie3-x16"
""")
    devs, links = parse_devices(str(f))
    assert names(devs) == ["fast", "acc"]
    assert devs[0].memory == 16e9 and devs[1].options == {"tune_trials": 0}
    assert links[("fast", "acc")].latency == pytest.approx(20e-6)
    assert links[("fast", "acc")].bandwidth == 10e9
    assert links[("acc", "fast")] == LINKS["pcie3-x16"].link  # a declared reverse wins
    # the table form of the same thing, and symmetric links when only one way is declared
    devs, links = parse_devices({"devices": {"a": {"target": "cpu"}, "b": {"target": "reference"}},
                                 "links": [{"from": "a", "to": "b", "latency": 1e-6,
                                            "bandwidth": "1 Gbit/s"}]})
    assert links[("a", "b")] == links[("b", "a")] == Link(1e-6, 125e6)


def test_presets():
    devs, links = parse_devices("diviml-server")
    assert names(devs) == ["cpu", "a100", "t4"] and not any(d.measure for d in devs)
    assert links[("cpu", "a100")] == LINKS["pcie4-x16"].link
    assert links[("cpu", "t4")] == LINKS["pcie3-x16"].link
    via_host = links[("a100", "t4")]  # GPU to GPU through the host
    assert via_host.latency == pytest.approx(LINKS["pcie4-x16"].latency + LINKS["pcie3-x16"].latency)
    assert via_host.bandwidth == LINKS["pcie3-x16"].bandwidth
    devs, links = parse_devices("phone")
    assert [d.spec for d in devs] == ["hexagon-v73", "cortex-x3", "adreno-740"]
    assert links[("npu", "cpu")] == LINKS["soc-npu"].link
    devs[0].options["x"] = 1  # a copy: the preset itself is untouched
    assert PRESETS["phone"].devices[0].options == {}


def test_host_link_is_measured_and_cached(monkeypatch):
    from qcompile.backends import latency
    devs, links = parse_devices(["cpu", "reference"])
    link = links[("cpu", "reference")]
    assert 0 < link.latency < 0.1 and link.bandwidth > 1e8
    monkeypatch.setattr(latency, "time_call", lambda *a, **k: pytest.fail("measured twice"))
    assert parse_devices(["cpu", "reference"])[1][("cpu", "reference")] == link


def test_rpc_link_measured_by_the_rpc_package(monkeypatch):
    import qcompile.backends.rpc as rpc
    seen = []
    monkeypatch.setattr(rpc, "measure_link", lambda t: seen.append(t) or (1e-3, 1e8))
    devs, links = parse_devices(["rpc://10.0.0.7:9090", "cpu", "npu"])
    assert devs[0].measure and devs[0].spec is None
    assert links[("cpu", "rpc://10.0.0.7:9090")] == Link(1e-3, 1e8)
    assert links[("rpc://10.0.0.7:9090", "npu")] == Link(1e-3 + LINKS["soc-npu"].latency, 1e8)
    assert seen == ["rpc://10.0.0.7:9090"]  # measured once per remote


def test_rpc_link_falls_back_to_1gbe(monkeypatch):
    import qcompile.backends.rpc as rpc
    monkeypatch.delattr(rpc, "measure_link")
    with pytest.warns(UserWarning, match="1 GbE"):
        _, links = parse_devices(["rpc://10.0.0.7:9090", "cpu"])
    assert links[("cpu", "rpc://10.0.0.7:9090")] == LINKS["1gbe"].link


# -- specs -----------------------------------------------------------------------------------
def test_specs_are_complete_and_sourced():
    for name, s in SPECS.items():
        assert s.kind in ("cpu", "gpu", "npu"), name
        assert min(s.fp32, s.fp16, s.int8, s.bandwidth) > 0 and s.launch >= 0, name
        assert len(s.source) > 40 and (s.link is None or s.link in LINKS), name
    for name, link in LINKS.items():
        assert link.latency > 0 and link.bandwidth > 0 and link.source, name
    a100 = SPECS["a100-40gb-pcie"]
    assert (a100.fp32, a100.fp16, a100.int8, a100.bandwidth) == (19.5e12, 312e12, 624e12, 1555e9)
    assert a100.peak("float") == a100.fp16 and a100.peak("int16") == a100.int8 / 2
    assert SPECS["xeon-8358"].peak("float") == SPECS["xeon-8358"].fp32  # CPUs compute in fp32
    host = D.get_spec("host")
    assert host.kind == "cpu" and host.fp32 > 1e9 and host.bandwidth > 1e8


@pytest.mark.parametrize("value, unit, want", [
    ("8 GiB", "bytes", 8 * 2 ** 30), (4096, "bytes", 4096.0), ("1.5MB", "bytes", 1.5e6),
    ("25 GB/s", "rate", 25e9), ("1 Gbit/s", "rate", 125e6), ("100 Mbps", "rate", 12.5e6),
    ("10 us", "seconds", 1e-5), ("2ms", "seconds", 2e-3), (0, "seconds", 0.0)])
def test_quantities(value, unit, want):
    assert D._quantity(value, "x", unit, "here") == pytest.approx(want)


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("target, match", [
    (["tpu"], "unknown target 'tpu'"),
    ({"x": {"target": "gpu9"}}, "unknown target 'gpu9'"),
    ({"npu": {"spec": "hexagon-v99"}}, "unknown device spec 'hexagon-v99'"),
    ({"npu": {"memory": "lots"}}, "memory 'lots' is not a valid bytes value"),
    ({"npu": {"memory": -1}}, "memory -1"),
    ({"npu": {"memory": True}}, "memory True"),
    ({"npu": {"memory": math.nan}}, "memory nan"),
    ({"cpu": {"measure": "yes"}}, "measure must be true or false"),
    ({"cpu": 3}, "takes a table of options"),
    ({"arm": {"target": "cpu-aarch64", "measure": True}}, "build-only"),
    ({"r": {"target": "rpc://10.0.0.7:9090", "measure": False}}, "needs a spec"),
    (["rpc://nohost"], "port"),
    ([], "no devices"),
    ([3], "holds target names"),
    (42, "devices are a list"),
    ({"devices": {}}, "declares no devices"),
    ({"devices": {"a": "cpu"}, "links": [{"from": "a", "to": "zz", "spec": "1gbe"}]},
     "unknown device 'zz'"),
    ({"devices": {"a": "cpu", "b": "reference"}, "links": [{"from": "a", "to": "a"}]},
     "itself"),
    ({"devices": {"a": "cpu", "b": "reference"}, "links": [{"from": "a", "to": "b"}]},
     "needs latency and bandwidth"),
    ({"devices": {"a": "cpu", "b": "reference"},
      "links": [{"from": "a", "to": "b", "latency": "fast", "bandwidth": 1}]}, "latency 'fast'"),
    ({"devices": {"a": "cpu", "b": "reference"},
      "links": [{"from": "a", "to": "b", "latency": 0, "bandwidth": 0}]}, "bandwidth 0"),
    ({"devices": {"a": "cpu", "b": "reference"},
      "links": [{"from": "a", "to": "b", "spec": "warp"}]}, "unknown link spec 'warp'"),
    ({"devices": {"a": "cpu", "b": "reference"},
      "links": [{"from": "a", "to": "b", "spec": "1gbe", "mtu": 9000}]}, "unknown keys"),
])
def test_bad_devices(target, match):
    with pytest.raises(ConfigError, match=match):
        parse_devices(target)


def test_unknown_target_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        parse_devices(["tpu"])
    assert "cpu" in e.value.hint and "npu" in e.value.hint and "rpc://host:port" in e.value.hint
    with pytest.raises(ConfigError) as e:
        parse_devices({"npu": {"spec": "nope"}})
    assert "hexagon-v73" in e.value.hint and "a100-40gb-pcie" in e.value.hint


def test_duplicate_names_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="used twice"):
        parse_devices([DeviceConfig("x", "cpu"), DeviceConfig("x", "reference")])
    bad = tmp_path / "bad.toml"
    bad.write_text("[devices.a\ntarget = 'cpu'")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_devices(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        parse_devices(str(tmp_path / "missing.toml"))
    other = tmp_path / "other.toml"
    other.write_text("[device.a]\ntarget = 'cpu'\n")
    with pytest.raises(ConfigError, match="unknown top-level keys"):
        parse_devices(other)
