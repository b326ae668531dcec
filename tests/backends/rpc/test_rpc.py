"""rpc:// targets through a loopback TVM RPC server: models against the interpreter (fp32,
W8A8, an AVX2 build), artifacts re-uploaded on load, link and remote timings, a tracker key,
and the bad paths (malformed names, nothing listening, a busy server)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
from pathlib import Path

import pytest
import torch

tvm = pytest.importorskip("tvm")

import qcompile  # noqa: E402
from qcompile import isa  # noqa: E402
from qcompile.backends import get_backend  # noqa: E402
from qcompile.backends.rpc import (  # noqa: E402
    RemoteExecutable,
    RpcBackend,
    RpcServer,
    RpcTracker,
    measure_link,
    parse_target,
)
from qcompile.backends.rpc.server import _free_port  # noqa: E402
from qcompile.config import QuantConfig  # noqa: E402
from qcompile.errors import BackendError, ConfigError  # noqa: E402
from qcompile.interpreter import Interpreter  # noqa: E402

W8A8 = QuantConfig(weights="int8", group_size=None, activations="int8")


def _core() -> int:
    return max(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def server():
    """One server for the module, pinned to one core (a server serves one session at a time;
    this process shares one session among everything that names it)."""
    with RpcServer(cores=_core()) as s:
        yield s


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4)).eval()
    return model, torch.randn(3, 8)


@pytest.fixture(scope="module")
def compiled(server, mlp):
    model, x = mlp
    return qcompile.compile(model, server.url, example_inputs=(x,))


def test_an_mlp_on_the_server_matches_the_interpreter(compiled, mlp, server):
    model, x = mlp
    assert isinstance(get_backend(server.url), RpcBackend)
    assert isinstance(compiled._exec, RemoteExecutable)
    assert compiled._exec.remote_isa["level"] == min(
        isa.level(), compiled._exec.remote.cpu().level, key=isa.LEVELS.index)
    assert compiled.isa is None  # nothing to check against this machine: it runs remotely
    out = compiled(x)
    torch.testing.assert_close(out, Interpreter(compiled.graph).run(x)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


class _TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 3)

    def forward(self, x, y):
        return self.a(x), torch.relu(self.b(x)) + y


def test_two_inputs_and_two_outputs_cross_the_link(server):
    model, x, y = _TwoOutputs().eval(), torch.randn(2, 8), torch.randn(2, 3)
    cm = qcompile.compile(model, server.url, example_inputs=(x, y))
    out, ref = cm(x, y), Interpreter(cm.graph).run(x, y)
    assert len(out) == 2
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_w8a8_linear_on_the_server_matches_to_rounding(server):
    model = torch.nn.Sequential(torch.nn.Linear(96, 40)).eval()
    x = torch.randn(5, 96)
    cm = qcompile.compile(model, server.url, example_inputs=(x,), config=W8A8, calibration=[(x,)])
    assert any(n.op == "linear" and n.inputs[1].quant is not None for n in cm.graph.nodes)
    torch.testing.assert_close(cm(x), Interpreter(cm.graph).run(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not isa.LEVELS.index(isa.host_level()) >= 1, reason="needs an AVX2 host")
def test_an_avx2_build_runs_on_the_server(server, mlp):
    model, x = mlp
    cm = qcompile.compile(model, f"{server.url}?isa=avx2", example_inputs=(x,))
    rec = cm._exec.remote_isa
    assert rec["level"] == "avx2" and "avx2" in rec["features"]
    assert not any(f.startswith("avx512") for f in rec["features"])
    torch.testing.assert_close(cm(x), Interpreter(cm.graph).run(x)[0], rtol=1e-5, atol=1e-6)
    # the keyword and the URL must agree; both are checked before connecting
    with pytest.raises(ConfigError, match="contradicts"):
        get_backend(server.url).lower(cm.graph, f"{server.url}?isa=avx2", isa="generic")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 host")
def test_the_level_follows_the_remote_cpu():
    from qcompile.backends.rpc.build import check_remote_cpu, choose_level
    from qcompile.backends.rpc.session import RemoteCpu
    board = RemoteCpu("x86_64-pc-linux-gnu", "haswell", frozenset({"sse4.2", "avx", "avx2", "fma"}))
    assert board.level == "avx2"
    assert choose_level(None, board) == min(isa.level(), "avx2", key=isa.LEVELS.index)
    assert choose_level("generic", board) == "generic"
    host = isa.LEVELS.index(isa.host_level())
    if host >= isa.LEVELS.index("avx512"):
        with pytest.raises(BackendError, match="would fault"):
            choose_level("avx512", board)
    if host < isa.LEVELS.index("amx"):
        with pytest.raises(ConfigError, match="builds code up to"):
            choose_level("amx", None)
    with pytest.raises(BackendError, match="aarch64"):
        choose_level(None, RemoteCpu("aarch64-unknown-linux-gnu", "cortex-a76", frozenset()))
    with pytest.raises(BackendError, match="avx512f") as e:  # an artifact built for more
        check_remote_cpu({"level": "avx512", "features": ["avx2", "avx512f"]}, board, "there")
    assert "?isa=avx2" in str(e.value)


def test_save_and_load_upload_again(compiled, mlp, server, tmp_path):
    _, x = mlp
    d = compiled.save(tmp_path / "a")
    assert {"model.so", "tvm_params.safetensors", "remote.json"} <= {p.name for p in d.iterdir()}
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["target"] == server.url and "isa" not in manifest
    loads = server.log.count("load_module")
    back = qcompile.load(d)
    assert isinstance(back._exec, RemoteExecutable) and back._exec is not compiled._exec
    assert server.log.count("load_module") == loads + 1  # the library went up again
    assert torch.equal(back(x), compiled(x))
    assert (back.save(tmp_path / "b") / "model.so").read_bytes() == (d / "model.so").read_bytes()
    # an artifact whose server is gone fails to load, naming it
    port = _free_port("127.0.0.1")
    manifest["target"] = f"rpc://127.0.0.1:{port}"
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match=f"127.0.0.1:{port}"):
        qcompile.load(d)


def test_time_remote_and_measure_link(compiled, mlp, server):
    _, x = mlp
    times = compiled._exec.time_remote((x,), number=5, repeat=3)
    assert len(times) == 3 and all(0 < t < 1 for t in times)
    link = measure_link(server.url, sizes=(1 << 20, 4 << 20), repeat=3)
    alpha, beta = link
    assert all(math.isfinite(v) and v > 0 for v in (alpha, beta))
    assert alpha < 0.1 and link.seconds(1 << 20) > alpha


def test_the_server_is_pinned_to_one_core_with_one_thread(compiled, server):
    group = os.getpgid(server.proc.pid)
    pids = [p.name for p in Path("/proc").iterdir() if p.name.isdigit()
            and _field(p / "stat", group)]
    assert len(pids) >= 3  # the launcher, the server worker and this module's session
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            allowed = (task / "status").read_text().split("Cpus_allowed_list:")[1].split()[0]
            assert allowed == str(_core())
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"TVM_NUM_THREADS=1" in env and b"TVM_BIND_THREADS=0" in env


def _field(stat: Path, group: int) -> bool:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[2]) == group  # pgrp
    except (OSError, IndexError, ValueError):
        return False


def test_an_unreachable_server_fails_fast_before_building(mlp, monkeypatch):
    import qcompile.backends.rpc.build as build
    monkeypatch.setattr(build, "build_library", lambda *a: pytest.fail("built anyway"))
    model, x = mlp
    port = _free_port("127.0.0.1")
    with pytest.raises(BackendError) as e:
        qcompile.compile(model, f"rpc://127.0.0.1:{port}", example_inputs=(x,))
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "refused" in msg
    assert f"python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}" in msg


def test_a_busy_server_is_reported_not_waited_for(compiled, server):
    from qcompile.backends.rpc.session import _probe_server
    assert compiled._exec.remote is not None  # this process holds the server's one session
    with pytest.raises(BackendError, match="serving another session"):
        _probe_server(parse_target(server.url), timeout=0.5)


@pytest.mark.parametrize("bad", [
    "rpc://", "rpc://host", "rpc://host:port", "rpc://host:0", "rpc://host:70000",
    "rpc://host:9090/", "rpc://host:9090/a/b", "rpc://host:9090?isa=sse2",
    "rpc://host:9090?threads=2", "rpc://me@host:9090", "rpc://host:9090#x"])
def test_malformed_names_are_config_errors(bad):
    with pytest.raises(ConfigError, match="malformed remote target") as e:
        get_backend(bad)
    assert "rpc://HOST:PORT" in str(e.value)
    with pytest.raises(ConfigError):  # before capture: the model is never looked at
        qcompile.compile(object(), bad)


def test_well_formed_names_parse():
    t = parse_target("rpc://127.0.0.1:9090")
    assert (t.host, t.port, t.key, t.isa) == ("127.0.0.1", 9090, None, None)
    t = parse_target("rpc://tracker.lan:9190/rasp4?isa=avx2")
    assert (t.host, t.port, t.key, t.isa) == ("tracker.lan", 9190, "rasp4", "avx2")
    assert parse_target("rpc://[::1]:9090").address == "[::1]:9090"
    with pytest.raises(ConfigError, match=r"rpc://\.\.\."):
        get_backend("rcp://host:9090")  # the unknown-target hint names the URL form


@pytest.mark.skipif(importlib.util.find_spec("tornado") is None,
                    reason="TVM's RPC tracker needs tornado (pip install tornado)")
def test_a_tracker_key(mlp):
    model, x = mlp
    with RpcTracker() as tracker, RpcServer(tracker=tracker, key="loop") as s:
        cm = qcompile.compile(model, s.url, example_inputs=(x,))
        torch.testing.assert_close(cm(x), Interpreter(cm.graph).run(x)[0], rtol=1e-5,
                                   atol=1e-6)
        with pytest.raises(BackendError, match="keys there: loop"):
            get_backend(tracker.url("other")).lower(cm.graph, tracker.url("other"))
