"""The devices a model is placed on, their roofline specs, and the links between them.

:func:`parse_devices` turns what a user passes as ``compile(model, target=...)`` into
:class:`DeviceConfig` s and a link for every ordered pair of devices:

* a list of targets, ``["npu", "cpu"]`` (or ``"npu,cpu"``; a repeated target gets numbered
  names ``cpu0``, ``cpu1``);
* a mapping ``{name_or_target: {target, spec, memory, measure, options..., <backend option>}}``;
* a TOML file (``[devices.NAME]`` tables with the same keys, and ``[[links]]`` with ``from``,
  ``to`` and ``latency``/``bandwidth`` or a ``spec`` from :data:`LINKS`);
* the name of a preset in :data:`PRESETS` (modelled device sets for benchmarks).

A device's costs are measured here (``measure=True``: targets whose code runs on this host
or on a TVM RPC remote) or modelled from a roofline :class:`DeviceSpec` (Williams, Waterman &
Patterson, "Roofline", CACM 52(4), 2009): ``time = max(flops / peak, bytes / bandwidth) /
efficiency + launch``. The NPU is modelled by default: the QNN HTP here is an x86 simulator
whose times are not NPU latencies.

Numbers are vendor datasheet figures where one exists; everything else says "estimate" in
its ``source``.
"""
from __future__ import annotations

import functools
import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from qcompile.errors import ConfigError
from qcompile.placement.costgraph import Link

__all__ = ["DeviceSpec", "LinkSpec", "DeviceConfig", "Preset", "SPECS", "LINKS", "PRESETS",
           "HOST_TARGETS", "get_spec", "host_spec", "host_link", "default_link", "parse_devices",
           "is_rpc", "known_targets"]

G, T = 1e9, 1e12
GiB = 1 << 30


@dataclass(frozen=True)
class DeviceSpec:
    """A device's roofline: peak throughput in ops/s by precision, memory bandwidth in B/s,
    a fixed cost per call (kernel launch or op dispatch, seconds), memory in bytes, ``link``
    (a :data:`LINKS` key: how its memory reaches the host's; None when it *is* the host) and
    ``efficiency``, the fraction of the roofline compiled kernels reach (an estimate, replaced
    by a fitted factor where the device is also measured: ``costs.calibrate``)."""

    kind: str                 # "cpu" | "gpu" | "npu"
    fp32: float
    fp16: float
    int8: float
    bandwidth: float
    launch: float
    memory: float | None
    source: str
    link: str | None = None
    efficiency: float = 0.5

    def peak(self, precision: str) -> float:
        """Ops/s for ``precision``: ``float`` runs at fp32 on CPUs and fp16 on GPUs/NPUs;
        ``int16`` (16-bit activations × 8-bit weights) at half the int8 rate (estimate)."""
        if precision == "int8":
            return self.int8
        if precision == "int16":
            return self.int8 / 2
        return self.fp32 if self.kind == "cpu" else self.fp16


@dataclass(frozen=True)
class LinkSpec:
    """A link's per-transfer latency (s) and bandwidth (B/s), with where the numbers come from."""

    latency: float
    bandwidth: float
    source: str

    @property
    def link(self) -> Link:
        return Link(self.latency, self.bandwidth)


#: roofline specs of real parts (see each ``source``)
SPECS: dict[str, DeviceSpec] = {
    "hexagon-v73": DeviceSpec(
        "npu", fp32=26 * T / 16, fp16=26 * T / 2, int8=26 * T, bandwidth=67.2 * G, launch=10e-6,
        memory=4 * GiB, link="soc-npu", efficiency=0.3,
        source="Snapdragon 8 Gen 2 Hexagon (HTP v73). Qualcomm publishes no TOPS figure for it; "
               "26 TOPS int8 is an estimate (4.35x the 8 Gen 1 'AI performance' claim is for the "
               "whole AI engine). fp16 at 1/2 and fp32 (HVX qf32) at 1/16 of int8: estimates. "
               "Bandwidth: LPDDR5X-8400 (4200 MHz), 64-bit bus = 8.4e9 x 8 B (Qualcomm product "
               "brief). Launch 10 us per op and 4 GiB (the DSP's 32-bit address space): estimates"),
    "cortex-x3": DeviceSpec(
        "cpu", fp32=4 * 4 * 2 * 3.19 * G, fp16=4 * 8 * 2 * 3.19 * G, int8=4 * 32 * 3.19 * G,
        bandwidth=30 * G, launch=1e-6, memory=8 * GiB,
        source="Arm Cortex-X3 prime core of the Snapdragon 8 Gen 2 at 3.19 GHz: 4x128-bit ASIMD "
               "pipes (Arm Cortex-X3 Software Optimization Guide): fp32 4 lanes x FMA, fp16 8 "
               "lanes, int8 SDOT 16 MACs per pipe per cycle. One core's DRAM bandwidth (30 GB/s "
               "of the 67.2 GB/s bus), 1 us launch and 8 GiB usable of a 12 GB phone: estimates"),
    "adreno-740": DeviceSpec(
        "gpu", fp32=3.7 * T, fp16=7.4 * T, int8=7.4 * T, bandwidth=67.2 * G, launch=20e-6,
        memory=8 * GiB, link="soc-gpu",
        source="Snapdragon 8 Gen 2 Adreno 740 at 719 MHz: 3.7 TFLOPS fp32 / 7.4 fp16 are "
               "third-party database figures (Qualcomm publishes none): estimate; int8 at the fp16 "
               "rate (no dedicated int8 path known): estimate. Bandwidth: the shared LPDDR5X-8400 "
               "bus. Launch 20 us per OpenCL kernel: estimate"),
    "rtx-4060-laptop": DeviceSpec(
        "gpu", fp32=3072 * 2 * 2.37 * G, fp16=2 * 3072 * 2 * 2.37 * G, int8=8 * 3072 * 2 * 2.37 * G,
        bandwidth=256 * G, launch=5e-6, memory=8 * GiB, link="pcie4-x8",
        source="NVIDIA GeForce RTX 4060 Laptop GPU (AD107): 3072 CUDA cores at up to 2370 MHz "
               "boost (NVIDIA spec page; the clock depends on the laptop's power limit), 8 GB "
               "GDDR6 on a 128-bit bus at 16 Gbps = 256 GB/s, PCIe 4.0 x8. Tensor rates from the "
               "Ada whitepaper ratios: fp16 with fp32 accumulate 2x fp32, dense int8 8x fp32. "
               "Launch 5 us: estimate"),
    "a100-40gb-pcie": DeviceSpec(
        "gpu", fp32=19.5 * T, fp16=312 * T, int8=624 * T, bandwidth=1555 * G, launch=5e-6,
        memory=40e9, link="pcie4-x16",
        source="NVIDIA A100 40GB PCIe datasheet: fp32 19.5 TFLOPS, fp16 tensor 312 TFLOPS, int8 "
               "tensor 624 TOPS (dense), HBM2 1555 GB/s, 40 GB, PCIe 4.0 x16. Launch 5 us: estimate"),
    "h100-pcie": DeviceSpec(
        "gpu", fp32=51 * T, fp16=756 * T, int8=1513 * T, bandwidth=2000 * G, launch=5e-6,
        memory=80e9, link="pcie5-x16",
        source="NVIDIA H100 PCIe datasheet: fp32 51 TFLOPS, fp16 tensor 1513 / int8 3026 with "
               "sparsity (dense: half), HBM2e 2 TB/s, 80 GB, PCIe 5.0 x16. Launch 5 us: estimate"),
    "t4": DeviceSpec(
        "gpu", fp32=8.1 * T, fp16=65 * T, int8=130 * T, bandwidth=320 * G, launch=5e-6,
        memory=16e9, link="pcie3-x16",
        source="NVIDIA T4 datasheet: fp32 8.1 TFLOPS, fp16 mixed 65 TFLOPS, int8 130 TOPS, GDDR6 "
               "320 GB/s, 16 GB, PCIe 3.0 x16. Launch 5 us: estimate"),
    "xeon-8358": DeviceSpec(
        "cpu", fp32=32 * 2.6 * G * 64, fp16=32 * 2.6 * G * 64, int8=32 * 2.6 * G * 256,
        bandwidth=204.8 * G, launch=5e-6, memory=256e9,
        source="Intel Xeon Platinum 8358 (Ice Lake-SP, Intel ARK): 32 cores, 2.6 GHz base, two "
               "AVX-512 FMA units = 64 fp32 flops/cycle/core, VNNI int8 256 ops/cycle/core; no "
               "fp16 arithmetic (fp16 = fp32). 8 channels DDR4-3200 = 204.8 GB/s. The AVX-512 "
               "all-core clock may sit below base (estimate at base). 256 GB installed and 5 us "
               "thread-pool fork/join: estimates"),
}

#: link specs; ``soc-*`` are zero-copy shared LPDDR buffers whose cost is the call into the
#: other processor and cache maintenance
LINKS: dict[str, LinkSpec] = {
    "pcie3-x16": LinkSpec(10e-6, 12e9, "PCIe 3.0 x16: 15.75 GB/s per direction (8 GT/s x 16 "
                          "lanes x 128/130); 12 GB/s pinned-copy rate and 10 us per copy call: estimates"),
    "pcie4-x8": LinkSpec(10e-6, 12.5e9, "PCIe 4.0 x8: 15.75 GB/s per direction; 12.5 GB/s "
                         "pinned-copy rate and 10 us per copy call: estimates"),
    "pcie4-x16": LinkSpec(10e-6, 25e9, "PCIe 4.0 x16: 31.5 GB/s per direction (16 GT/s x 16 "
                          "lanes x 128/130); 25 GB/s pinned-copy rate and 10 us per copy: estimates"),
    "pcie5-x16": LinkSpec(10e-6, 50e9, "PCIe 5.0 x16: 63 GB/s per direction; 50 GB/s "
                          "pinned-copy rate and 10 us per copy call: estimates"),
    "soc-npu": LinkSpec(200e-6, 20e9, "SoC shared LPDDR5X between CPU and Hexagon (rpcmem "
                        "buffers, no copy): 200 us per FastRPC graph call and 20 GB/s for the CPU "
                        "writing/flushing the float tensors: estimates"),
    "soc-gpu": LinkSpec(50e-6, 20e9, "SoC shared LPDDR5X between CPU and Adreno (mapped OpenCL "
                        "buffers): 50 us per enqueue/finish and 20 GB/s: estimates"),
    "1gbe": LinkSpec(200e-6, 117e6, "1 Gigabit Ethernet: 125 MB/s line rate, ~117 MB/s TCP "
                     "payload at MTU 1500 (1448/1538 of line rate); 200 us per RPC round trip: "
                     "estimate"),
    "host": LinkSpec(20e-6, 10e9, "two backends in this process (declared fallback when not "
                     "measured): 20 us thread handoff, 10 GB/s memcpy: estimates"),
}

#: targets whose code runs in this process on host memory
HOST_TARGETS = ("cpu", "lut", "amx", "onnx", "onnx:qdq", "reference")

_RPC = re.compile(r"^rpc://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")


def is_rpc(target: str) -> bool:
    return isinstance(target, str) and target.startswith("rpc://")


def known_targets() -> list[str]:
    from qcompile.backends import all_targets
    return [*all_targets(), "rpc://host:port"]


def _check_target(target, where: str) -> str:
    from qcompile.backends import all_targets, get_backend
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{where}: a target is a name such as 'cpu', got {target!r}",
                          hint=f"known targets: {', '.join(known_targets())}")
    if is_rpc(target):
        try:
            get_backend(target)  # the rpc backend checks the URL
            return target
        except ConfigError as e:
            if not str(e).startswith("unknown target"):
                raise ConfigError(f"{where}: {str(e).splitlines()[0]}", hint=e.hint) from None
        m = _RPC.match(target)  # no rpc backend registered: check the plain form here
        if m is None or not 0 < int(m.group(2)) < 65536:
            raise ConfigError(f"{where}: bad remote target {target!r}",
                              hint="write it as rpc://host:port, e.g. rpc://192.168.1.20:9090")
        return target
    if target not in all_targets():
        raise ConfigError(f"{where}: unknown target {target!r}",
                          hint=f"known targets: {', '.join(known_targets())}")
    return target


def get_spec(name: str) -> DeviceSpec:
    """The spec ``name`` from :data:`SPECS`, or ``"host"`` (this machine: :func:`host_spec`)."""
    if name == "host":
        return host_spec()
    try:
        return SPECS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown device spec {name!r}",
                          hint=f"known specs: {', '.join([*SPECS, 'host'])}") from None


def _gpu_visible() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - torch always imports here
        return False


def _default_measure(target: str) -> bool:
    if is_rpc(target) or target in HOST_TARGETS:
        return True
    if target.startswith("npu"):
        return False  # the x86 QNN simulator's times are not NPU latencies
    if target.startswith("cuda"):
        return _gpu_visible()
    return target != "cpu-aarch64"  # a build-only cross target; third-party backends run here


def _default_spec(target: str) -> str | None:
    if target.startswith("npu"):
        return "hexagon-v73"
    if target == "cuda-sm90":
        return "h100-pcie"
    if target.startswith("cuda"):
        return "a100-40gb-pcie"
    if target == "cpu-aarch64":
        return "cortex-x3"
    if target in HOST_TARGETS:
        return "host"
    return None


# -- quantities with units --------------------------------------------------------------------
_SIZE = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_TIME = {"": 1, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_QTY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ/]*)\s*$")


def _rate_scale(u: str) -> float | None:
    """Bytes/s per unit of a rate: ``B/s`` … ``TiB/s``, or bits: ``bit/s``, ``Gbit/s``, ``Gbps``."""
    if u == "":
        return 1.0
    for suffix in ("bit/s", "bps"):
        if u.endswith(suffix):
            k = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}.get(u[:-len(suffix)])
            return None if k is None else k / 8
    return _SIZE.get(u[:-2]) if u.endswith("/s") and u[:-2] else None


def _quantity(value, what: str, unit: str, where: str) -> float:
    """A non-negative finite number, or a string with a unit: ``unit`` is ``bytes``
    ("8 GiB"), ``rate`` ("25 GB/s", "1 Gbit/s") or ``seconds`` ("10 us")."""
    examples = {"bytes": "'8 GiB' or 8e9", "rate": "'25 GB/s' or 25e9", "seconds": "'10 us' or 1e-5"}
    bad = ConfigError(f"{where}: {what} {value!r} is not a valid {unit} value",
                      hint=f"use a non-negative number or a string such as {examples[unit]}")
    if isinstance(value, bool):
        raise bad
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        m = _QTY.match(value)
        if m is None:
            raise bad
        x, u = float(m.group(1)), m.group(2).lower()
        if unit == "seconds":
            scale = _TIME.get(u)
        elif unit == "bytes":
            scale = _SIZE.get(u)
        else:
            scale = _rate_scale(u)
        if scale is None:
            raise bad
        x *= scale
    else:
        raise bad
    if math.isnan(x) or x < 0 or (unit != "bytes" and x == math.inf):
        raise bad
    if unit == "rate" and x == 0:
        raise bad
    return x


# -- devices ----------------------------------------------------------------------------------
@dataclass
class DeviceConfig:
    """One device of a placement: ``name`` (unique in the plan), ``target`` (a backend target
    or ``rpc://host:port``), ``spec`` (a :data:`SPECS` key or ``"host"``: the roofline for
    modelled costs), ``memory`` (bytes the nodes placed on it may hold; None: no limit),
    ``options`` (keyword arguments for the backend's ``lower``) and ``measure`` (time the
    groups here / on the remote, or model them from ``spec``).

    Defaults: cpu/lut/amx/onnx/reference and rpc targets are measured; ``npu`` is modelled
    with ``hexagon-v73``; ``cuda`` is measured where torch sees a GPU, else modelled as an
    A100 (``cuda-sm90``: H100); ``cpu-aarch64`` (build-only) is modelled as a Cortex-X3.
    ``memory`` defaults to the spec's memory. Invalid values raise ``ConfigError``."""

    name: str
    target: str
    spec: str | None = None
    memory: float | None = None
    options: dict = field(default_factory=dict)
    measure: bool | None = None

    def __post_init__(self):
        where = f"device {self.name!r}"
        if not isinstance(self.name, str) or not self.name or "," in self.name:
            raise ConfigError(f"a device name is a non-empty string without commas, got {self.name!r}")
        self.target = _check_target(self.target, where)
        if self.measure is None:
            self.measure = _default_measure(self.target)
        elif not isinstance(self.measure, bool):
            raise ConfigError(f"{where}: measure must be true or false, got {self.measure!r}")
        if self.spec is None and not self.measure:
            self.spec = _default_spec(self.target)
            if self.spec is None:
                raise ConfigError(f"{where}: target {self.target!r} is not measured, so it needs "
                                  "a spec to model its costs",
                                  hint=f"give spec= one of {', '.join(SPECS)}, or measure=true")
        if self.spec is not None:
            if not isinstance(self.spec, str):
                raise ConfigError(f"{where}: spec must be a name, got {self.spec!r}",
                                  hint=f"known specs: {', '.join([*SPECS, 'host'])}")
            if self.spec != "host":
                get_spec(self.spec)  # unknown -> ConfigError listing SPECS
        if self.memory is None and self.spec not in (None, "host"):
            self.memory = SPECS[self.spec].memory
        if self.memory is not None:
            self.memory = _quantity(self.memory, "memory", "bytes", where)
        if not isinstance(self.options, Mapping):
            raise ConfigError(f"{where}: options must be a mapping of backend options, got "
                              f"{type(self.options).__name__}")
        self.options = dict(self.options)
        if self.measure and self.target == "cpu-aarch64":
            raise ConfigError(f"{where}: target 'cpu-aarch64' is build-only; its code cannot be "
                              "timed here", hint="set measure=false (modelled from a spec) or use "
                                                 "rpc://host:port to measure on an aarch64 board")

    @property
    def spec_obj(self) -> DeviceSpec | None:
        return None if self.spec is None else get_spec(self.spec)

    @property
    def modelled(self) -> bool:
        return not self.measure


@dataclass(frozen=True)
class Preset:
    """A named device set: devices and the links between them (others default)."""

    devices: tuple
    links: dict
    source: str


def _preset_phone() -> Preset:
    return Preset(
        (DeviceConfig("npu", "npu", spec="hexagon-v73", measure=False),
         DeviceConfig("cpu", "cpu-aarch64", spec="cortex-x3", measure=False),
         DeviceConfig("gpu", "cuda", spec="adreno-740", measure=False)),
        {}, "a Snapdragon 8 Gen 2 phone, all modelled: the Hexagon NPU, the Cortex-X3 prime "
            "core, the Adreno 740 (its op coverage taken from the cuda target: no OpenCL "
            "backend yet); links over the shared LPDDR5X")


def _preset_diviml() -> Preset:
    return Preset(
        (DeviceConfig("cpu", "cpu", spec="xeon-8358", measure=False),
         DeviceConfig("a100", "cuda-sm80", spec="a100-40gb-pcie", measure=False),
         DeviceConfig("t4", "cuda", spec="t4", measure=False)),
        {}, "DiviML's setting (one server, a CPU and two distinct GPUs; arXiv 2308.00127), all "
            "modelled: a Xeon 8358, an A100 40GB on PCIe 4.0 x16, a T4 on PCIe 3.0 x16; "
            "GPU-to-GPU copies go through the host")


#: named device sets (modelled, so benchmarks give the same costs on any machine)
PRESETS: dict[str, Preset] = {"phone": _preset_phone(), "diviml-server": _preset_diviml()}


# -- this host ---------------------------------------------------------------------------------
def _measured(name: str, measure) -> float:
    """Milliseconds ``measure()`` returns, cached per machine under ``name``."""
    import json

    from qcompile.backends import latency
    return latency.cached(json.dumps({"placement": "host", "what": name}), measure)[0]


def host_memcpy_bandwidth() -> float:
    """Bytes/s of a 32 MiB host tensor copy (measured once per machine, cached)."""
    import torch

    def measure():
        from qcompile.backends import latency
        src = torch.ones(8 << 20)
        dst = torch.empty_like(src)
        return latency.time_call(dst.copy_, (src,), min_time=0.02, rounds=3)
    return (32 << 20) / (_measured("memcpy-32MiB", measure) / 1e3)


def host_handoff() -> float:
    """Seconds to hand a call to another thread and get its result back (what the placed
    executor does per segment), measured once per machine and cached."""
    from concurrent.futures import ThreadPoolExecutor

    def measure():
        from qcompile.backends import latency
        with ThreadPoolExecutor(max_workers=1) as pool:
            return latency.time_call(lambda: pool.submit(int).result(), (), min_time=0.02, rounds=3)
    return _measured("thread-handoff", measure) / 1e3


def host_link() -> Link:
    """The link between two backends of this process: the measured thread handoff and
    memcpy bandwidth (the ``host`` link spec if measuring fails)."""
    try:
        return Link(host_handoff(), host_memcpy_bandwidth())
    except Exception as e:  # pragma: no cover - torch copies do not fail
        warnings.warn(f"could not measure the host link ({e}); using the declared 'host' spec")
        return LINKS["host"].link


def _clock_hz() -> float:
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
        if mhz:
            return max(mhz) * 1e6
    except (OSError, ValueError):
        pass
    return 2.5e9


@functools.lru_cache(maxsize=1)
def host_spec() -> DeviceSpec:
    """This machine's CPU as a roofline: cores x clock x 2 FMA units x vector lanes x 2
    flops (lanes from the ISA level: 4 generic, 8 AVX2, 16 AVX-512), int8 at 2x (AVX2) or 4x
    (AVX-512 VNNI) that, bandwidth = 2 x the measured memcpy rate (a copy reads and writes).
    An estimate; measured groups calibrate its efficiency."""
    from qcompile import isa
    from qcompile.backends.lut.build import cpu_model
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    level = isa.level()
    lanes = {"generic": 4, "avx2": 8}.get(level, 16)
    int8x = {"generic": 1, "avx2": 2}.get(level, 4)
    clock = _clock_hz()
    fp32 = cores * clock * 2 * lanes * 2
    return DeviceSpec("cpu", fp32=fp32, fp16=fp32, int8=int8x * fp32,
                      bandwidth=2 * host_memcpy_bandwidth(), launch=2e-6, memory=None,
                      source=f"this host ({cpu_model()}, {cores} cores, ISA {level}, "
                             f"{clock / 1e9:.2f} GHz from /proc/cpuinfo): peaks computed at 2 FMA "
                             "units per core and the measured memcpy rate: estimates")


# -- links -------------------------------------------------------------------------------------
def _rpc_link(target: str) -> Link:
    """The measured link to a TVM RPC remote (``qcompile.backends.rpc.measure_link``)."""
    import importlib
    try:
        rpc = importlib.import_module("qcompile.backends.rpc")
        measure = rpc.measure_link
    except (ImportError, AttributeError) as e:
        warnings.warn(f"cannot measure the link to {target} ({e}); assuming 1 GbE "
                      f"({LINKS['1gbe'].source})")
        return LINKS["1gbe"].link
    latency, bandwidth = measure(target)
    return Link(_quantity(latency, "measured latency", "seconds", target),
                _quantity(bandwidth, "measured bandwidth", "rate", target))


def _home(d: DeviceConfig, rpc_links: dict) -> Link | None:
    """How ``d``'s memory reaches the host's (None: ``d`` computes in host memory)."""
    if is_rpc(d.target):
        if d.target not in rpc_links:
            rpc_links[d.target] = _rpc_link(d.target)
        return rpc_links[d.target]
    spec = SPECS.get(d.spec) if d.spec else None
    if spec is not None and spec.link is not None:
        return LINKS[spec.link].link
    if d.target.startswith("cuda"):
        return LINKS["pcie4-x16"].link
    if d.target.startswith("npu"):
        return LINKS["soc-npu"].link
    return None


#: the links to TVM RPC remotes measured by the latest :func:`parse_devices` (target -> Link)
_MEASURED: dict[str, Link] = {}


def link_to_host(d: DeviceConfig) -> Link | None:
    """How the host's memory (where the caller's tensors are) reaches ``d``: None when ``d``
    computes in it; a remote's link as :func:`parse_devices` measured it (measured now if it
    did not); a GPU's or NPU's from its spec."""
    return _home(d, _MEASURED)


def _through_host(a: Link, b: Link) -> Link:
    return Link(a.latency + b.latency, min(a.bandwidth, b.bandwidth))


def default_link(a: DeviceConfig, b: DeviceConfig, _rpc_links: dict | None = None) -> Link:
    """The link ``a -> b`` when none is declared: two host-memory devices get the measured
    thread handoff and memcpy (:func:`host_link`); a device and the host get the device's own
    link (its spec's ``link``: PCIe for GPUs, the SoC's shared memory for the NPU, the measured
    network for ``rpc://``); two non-host devices go through the host (latencies add, the
    slower bandwidth wins)."""
    rpc_links = {} if _rpc_links is None else _rpc_links
    ha, hb = _home(a, rpc_links), _home(b, rpc_links)
    if ha is None and hb is None:
        return host_link()
    if ha is None or hb is None:
        return ha or hb
    return _through_host(ha, hb)


# -- parsing -----------------------------------------------------------------------------------
def _device_from_options(key: str, opts, where: str) -> DeviceConfig:
    if opts is None:
        opts = {}
    if isinstance(opts, str):
        opts = {"target": opts}
    if not isinstance(opts, Mapping):
        raise ConfigError(f"{where}: device {key!r} takes a table of options, got {opts!r}",
                          hint="e.g. {'target': 'cpu', 'spec': 'xeon-8358', 'memory': '64 GiB'}")
    opts = dict(opts)
    target = opts.pop("target", key)
    backend = dict(opts.pop("options", None) or {})
    fields = {k: opts.pop(k) for k in ("spec", "memory", "measure") if k in opts}
    backend.update(opts)  # anything else is a backend option (e.g. isa="avx2" for rpc)
    return DeviceConfig(name=str(key), target=target, options=backend, **fields)


def _from_list(items) -> list[DeviceConfig]:
    items = [it.strip() if isinstance(it, str) else it for it in items]
    targets = [it.target if isinstance(it, DeviceConfig) else it for it in items]
    counts = {t: targets.count(t) for t in targets if isinstance(t, str)}
    seen: dict[str, int] = {}
    out = []
    for it in items:
        if isinstance(it, DeviceConfig):
            out.append(replace(it))
            continue
        if not isinstance(it, str):
            raise ConfigError(f"a device list holds target names, got {it!r}",
                              hint="e.g. ['npu', 'cpu'], or a mapping {name: {target: ...}}")
        t = name = it
        if counts[t] > 1:
            name = f"{t}{seen.get(t, 0)}"
            seen[t] = seen.get(t, 0) + 1
        out.append(DeviceConfig(name=name, target=t))
    return out


def _declared_links(entries, names: list[str], where: str) -> dict[tuple[str, str], Link]:
    if entries is None:
        return {}
    if not isinstance(entries, (list, tuple)):
        raise ConfigError(f"{where}: 'links' is a list of tables ([[links]] in TOML)")
    out: dict[tuple[str, str], Link] = {}
    explicit: set[tuple[str, str]] = set()
    for i, e in enumerate(entries):
        w = f"{where}: link {i}"
        if not isinstance(e, Mapping):
            raise ConfigError(f"{w} is not a table", hint="give from, to, latency, bandwidth")
        unknown = set(e) - {"from", "to", "latency", "bandwidth", "spec"}
        if unknown:
            raise ConfigError(f"{w} has unknown keys {sorted(unknown)}",
                              hint="a link takes from, to, latency, bandwidth and/or spec")
        a, b = e.get("from"), e.get("to")
        for end in (a, b):
            if end not in names:
                raise ConfigError(f"{w} names unknown device {end!r}", hint=f"devices: {names}")
        if a == b:
            raise ConfigError(f"{w} joins {a!r} to itself", hint="same-device transfers are free")
        base = LINKS["host"]
        if "spec" in e:
            if e["spec"] not in LINKS:
                raise ConfigError(f"{w}: unknown link spec {e['spec']!r}",
                                  hint=f"known link specs: {', '.join(LINKS)}")
            base = LINKS[e["spec"]]
        elif not ("latency" in e and "bandwidth" in e):
            raise ConfigError(f"{w} needs latency and bandwidth, or a spec",
                              hint=f"e.g. latency = '10 us', bandwidth = '25 GB/s', or spec = "
                                   f"one of {', '.join(LINKS)}")
        link = Link(_quantity(e.get("latency", base.latency), "latency", "seconds", w),
                    _quantity(e.get("bandwidth", base.bandwidth), "bandwidth", "rate", w))
        out[(a, b)] = link
        explicit.add((a, b))
        if (b, a) not in explicit:  # a link is symmetric unless its reverse is declared too
            out[(b, a)] = link
    return out


def _read_toml(path: Path) -> dict:
    import tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read device file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"device file {path} is not valid TOML: {e}") from None


def _from_table(table: Mapping, where: str):
    unknown = set(table) - {"devices", "links"}
    if unknown:
        raise ConfigError(f"{where}: unknown top-level keys {sorted(unknown)}",
                          hint="a device file has [devices.NAME] tables and [[links]]")
    devs = table.get("devices")
    if not isinstance(devs, Mapping) or not devs:
        raise ConfigError(f"{where} declares no devices", hint="add [devices.NAME] with target = ...")
    devices = [_device_from_options(k, v, where) for k, v in devs.items()]
    return devices, _declared_links(table.get("links"), [d.name for d in devices], where)


def parse_devices(target) -> tuple[list[DeviceConfig], dict[tuple[str, str], Link]]:
    """Devices and a link for every ordered pair of them, from a list of targets, a
    comma-separated string, a mapping, a TOML file path, or a :data:`PRESETS` name (see the
    module docstring). Declared links win; the rest come from :func:`default_link`.
    Raises ``ConfigError`` for an unknown target or spec, a bad number, a duplicate name."""
    declared: dict = {}
    if isinstance(target, DeviceConfig):
        devices = [replace(target)]
    elif isinstance(target, os.PathLike) or (isinstance(target, str) and (
            target.endswith(".toml") or (os.path.isfile(target) and "," not in target))):
        path = Path(target)
        devices, declared = _from_table(_read_toml(path), f"device file {path}")
    elif isinstance(target, str) and target in PRESETS:
        p = PRESETS[target]
        devices, declared = [replace(d, options=dict(d.options)) for d in p.devices], dict(p.links)
    elif isinstance(target, str):
        devices = _from_list([t for t in target.split(",") if t.strip()] or [target])
    elif isinstance(target, Mapping):
        if "devices" in target and set(target) <= {"devices", "links"}:
            devices, declared = _from_table(target, "device table")
        else:
            devices = [_device_from_options(k, v, "devices") for k, v in target.items()]
    elif isinstance(target, (list, tuple)):
        devices = _from_list(target)
    else:
        raise ConfigError(f"devices are a list of targets, a mapping or a TOML path; got "
                          f"{type(target).__name__}", hint="e.g. ['npu', 'cpu']")
    if not devices:
        raise ConfigError("no devices given", hint="e.g. ['npu', 'cpu']")
    names = [d.name for d in devices]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"device names {dup} are used twice", hint="name each device once")
    links = dict(declared)
    rpc_links: dict = {}
    for a in devices:
        for b in devices:
            if a.name != b.name and (a.name, b.name) not in links:
                links[(a.name, b.name)] = default_link(a, b, rpc_links)
    _MEASURED.update(rpc_links)
    return devices, links
