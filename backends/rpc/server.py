"""Loopback TVM RPC servers (and trackers) as subprocesses, for tests and benchmarks.

``with RpcServer(cores=1) as s: qcompile.compile(model, s.url)`` runs ``python -m
tvm.exec.rpc_server`` on a free port of 127.0.0.1, pinned with ``taskset -c 1``, and kills it
(with the session processes it forked) on exit. A pinned server runs TVM's thread pool on
exactly its cores: ``TVM_NUM_THREADS`` (and ``OMP_NUM_THREADS``) is set to their number, and
``TVM_BIND_THREADS=0`` stops the pool pinning its workers itself (it would spread them over
every core of the machine, outside the ``taskset`` mask). The server never compiles, so
``QCOMPILE_ISA`` means nothing to it: a reduced-ISA remote is emulated by building for that
level (``rpc://...?isa=avx2``).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qcompile.errors import BackendError, ConfigError

__all__ = ["RpcServer", "RpcTracker"]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _cpu_list(cores) -> list[int]:
    """``1``, ``"0,2-3"`` or ``[0, 2]`` -> the core numbers."""
    if isinstance(cores, int):
        return [cores]
    if isinstance(cores, str):
        out: list[int] = []
        for part in cores.split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
        return out
    return [int(c) for c in cores]


class _Subprocess:
    """A TVM RPC program (``python -m tvm.exec.NAME``) on a free port, in its own process
    group so that stopping it also stops whatever it forked."""

    module = ""
    what = ""

    def __init__(self, *, host: str = "127.0.0.1", cores=None, threads: int | None = None,
                 env: dict[str, str] | None = None, startup_timeout: float = 60.0):
        self.host = host
        self.cores = None if cores is None else _cpu_list(cores)
        if self.cores is not None and (not self.cores or min(self.cores) < 0):
            raise ConfigError(f"cores={cores!r} names no CPU", hint="give e.g. cores=1 or '0-1'")
        self.threads = threads if threads is not None else (
            len(self.cores) if self.cores is not None else None)
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None

    # -- what subclasses say --------------------------------------------------------------
    def _args(self, port: int) -> list[str]:
        return ["--host", self.host, "--port", str(port), "--port-end", str(port + 1)]

    def _ready(self) -> bool:
        try:
            socket.create_connection((self.host, self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    # -- life cycle -----------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.threads is not None:
            env["TVM_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(self.threads)
        if self.cores is not None:
            env["TVM_BIND_THREADS"] = "0"
        env.update(self.extra_env)
        return env

    def _argv(self, port: int) -> list[str]:
        argv = [sys.executable, "-m", self.module, *self._args(port)]
        if self.cores is not None:
            taskset = shutil.which("taskset")
            if taskset is None:
                raise ConfigError("pinning a server to cores needs taskset (util-linux)",
                                  hint="install util-linux, or pass cores=None")
            argv = [taskset, "-c", ",".join(map(str, self.cores)), *argv]
        return argv

    @property
    def log(self) -> str:
        """What the process has printed so far."""
        if self._log is None:
            return ""
        return Path(self._log.name).read_text(errors="replace")

    def start(self):
        for _ in range(3):  # a free port may be taken between choosing it and binding it
            self.port = _free_port(self.host)
            self._log = tempfile.NamedTemporaryFile(prefix="qcompile-rpc-", suffix=".log")
            self.proc = subprocess.Popen(self._argv(self.port), env=self._env(),
                                         stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if self._ready():
                    return self
                time.sleep(0.1)
            if self.proc.poll() is None:  # still starting after the timeout
                tail = self.log[-2000:]
                self.stop()
                raise BackendError(f"the {self.what} ({self.module}) did not start within "
                                   f"{self.startup_timeout:g} s; its output:\n{tail}")
            if "cannot bind" not in self.log:  # died for another reason than a taken port
                break
        tail = self.log[-2000:]
        self.stop()
        raise BackendError(f"the {self.what} ({self.module}) exited while starting; its "
                           f"output:\n{tail}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)  # the group start_new_session made for it
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc is not None:
            try:  # session processes the server forked may outlive it: end the group
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RpcTracker(_Subprocess):
    """``python -m tvm.exec.rpc_tracker`` on a free loopback port."""

    module = "tvm.exec.rpc_tracker"
    what = "RPC tracker"

    def url(self, key: str) -> str:
        """The target name of the servers registered here under ``key``."""
        return f"rpc://{self.host}:{self.port}/{key}"


class RpcServer(_Subprocess):
    """``python -m tvm.exec.rpc_server`` on a free loopback port, optionally pinned to
    ``cores`` (``taskset -c``) and registered with a ``tracker`` under ``key``.

    ``url`` is its target name. Ready means: its accept loop answers (it hangs up on a word
    that is not the RPC magic), or, with a tracker, the tracker lists it."""

    module = "tvm.exec.rpc_server"
    what = "RPC server"

    def __init__(self, *, tracker: RpcTracker | None = None, key: str = "qcompile", **kw):
        super().__init__(**kw)
        self.tracker = tracker
        self.key = key if tracker is not None else ""

    @property
    def url(self) -> str:
        if self.tracker is not None:
            return self.tracker.url(self.key)
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"rpc://{host}:{self.port}"

    def _args(self, port: int) -> list[str]:
        args = super()._args(port)
        if self.tracker is not None:
            args += ["--tracker", f"{self.tracker.host}:{self.tracker.port}", "--key", self.key]
        return args

    def _ready(self) -> bool:
        if self.tracker is not None:
            return self._registered()
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(struct.pack("<i", 0))
                return s.recv(4) == b""
        except OSError:
            return False

    def _registered(self) -> bool:
        from tvm import rpc
        try:
            session = rpc.connect_tracker(self.tracker.host, self.tracker.port)
            try:
                summary = session.summary()
            finally:
                session.close()
        except Exception:  # noqa: BLE001 - the tracker is still starting
            return False
        return any(str(s.get("key")) == f"server:{self.key}"
                   for s in summary.get("server_info", []))
