"""Sessions with remote devices over TVM RPC, opened once per address and shared.

A TVM RPC server serves one session at a time (a second client waits until the first hangs
up), so every executable and link measurement in this process that names the same remote
shares one open :class:`Remote`; it closes when the last of them is gone. Before connecting,
the address is probed with a short timeout, so an unreachable or busy server is reported in
seconds, naming the address and the command that starts a server there.
"""
from __future__ import annotations

import socket
import struct
import threading
import weakref
from dataclasses import dataclass, field

from qcompile.backends.rpc.url import RemoteTarget
from qcompile.backends.tvm.target import require_tvm
from qcompile.errors import BackendError

__all__ = ["CONNECT_TIMEOUT", "Remote", "RemoteCpu", "connect", "remote_error"]

#: seconds to wait for a server or tracker to answer before calling it unreachable
CONNECT_TIMEOUT = 5.0

_SESSIONS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


@dataclass(frozen=True)
class RemoteCpu:
    """What the remote's TVM says about its CPU (LLVM's names)."""

    triple: str
    cpu: str
    features: frozenset[str]  # every feature LLVM finds on it

    @property
    def arch(self) -> str:
        return self.triple.split("-", 1)[0]

    @property
    def level(self) -> str:
        """The :mod:`qcompile.isa` level its features reach."""
        from qcompile import isa
        if self.arch not in ("x86_64", "i686", "i386"):
            return "generic"
        have, need = "generic", frozenset()
        for lv in isa.LEVELS[1:]:
            need = need | isa.REQUIRES[lv]
            if not need <= self.features:
                break
            have = lv
        return have


@dataclass(eq=False)
class Remote:
    """An open session with one remote device: its CPU device, and a lock that serialises
    calls (an RPC session carries one call at a time)."""

    where: RemoteTarget
    sess: object  # tvm.rpc.RPCSession
    dev: object  # the remote's cpu(0)
    lock: threading.RLock = field(default_factory=threading.RLock)
    _cpu: RemoteCpu | None | bool = False  # False: not asked yet
    _uploads: int = 0

    def uploads(self) -> int:
        """A number not used before in this session (to name an upload)."""
        self._uploads += 1
        return self._uploads

    def cpu(self) -> RemoteCpu | None:
        """The remote CPU's triple, name and features, or None when its TVM cannot say (a
        runtime built without LLVM)."""
        if self._cpu is False:
            self._cpu = _ask_cpu(self.sess)
        return self._cpu


def _ask_cpu(sess) -> RemoteCpu | None:
    import tvm_ffi
    try:
        triple = str(sess.get_function("target.llvm_get_system_triple")())
        cpu = str(sess.get_function("target.llvm_get_system_cpu")())
        # an ffi Map does not cross RPC; its JSON graph does
        ref = sess.get_function("tvm.codegen.llvm.GetHostCPUFeatures")()
        text = sess.get_function("ffi.ToJSONGraphString")(ref, None)
        flags = tvm_ffi.get_global_func("ffi.FromJSONGraphString")(str(text))
        features = frozenset(str(k) for k, v in flags.items() if bool(v))
    except Exception:  # noqa: BLE001 - a minimal remote runtime has none of these functions
        return None
    return RemoteCpu(triple, cpu, features)


def remote_error(where: RemoteTarget, what: str, e: BaseException) -> BackendError:
    """A failure talking to the remote, as a ``BackendError`` naming it."""
    msg = str(e).strip().splitlines()
    detail = msg[-1] if msg else type(e).__name__
    return BackendError(f"{what} on the remote ({where}) failed: {detail}",
                        hint="check that the server is still running (its log says why a "
                             "session ended); a remote session dies with the server")


def _server_hint(where: RemoteTarget) -> str:
    if where.key:
        return (f"start a tracker there (`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port "
                f"{where.port}`) and a server registered under the key (`python -m "
                f"tvm.exec.rpc_server --tracker {where.address} --key {where.key}`)")
    return (f"start one on {where.host}: `python -m tvm.exec.rpc_server --host 0.0.0.0 --port "
            f"{where.port}` (check the port is open between the machines)")


def _dial(where: RemoteTarget, timeout: float) -> socket.socket:
    what = "tracker" if where.key else "server"
    try:
        return socket.create_connection((where.host, where.port), timeout=timeout)
    except socket.timeout:
        why = f"no answer within {timeout:g} s"
    except ConnectionRefusedError:
        why = "connection refused: nothing listens on that port"
    except OSError as e:
        why = e.strerror or str(e)
    raise BackendError(f"cannot reach the TVM RPC {what} at {where.address} ({why})",
                       hint=_server_hint(where))


def _probe_server(where: RemoteTarget, timeout: float) -> None:
    """Check, within ``timeout``, that a TVM RPC server listens at ``where`` and is free: it
    is sent a word that is not the RPC magic, which a server in its accept loop answers by
    hanging up (without logging anything); a busy one answers nothing until its session ends."""
    with _dial(where, timeout) as s:
        try:
            s.sendall(struct.pack("<i", 0))
            answer = s.recv(4)
        except socket.timeout:
            raise BackendError(
                f"the TVM RPC server at {where.address} accepts connections but did not answer "
                f"within {timeout:g} s: it is serving another session (a server serves one "
                "session at a time)",
                hint="wait for the other client to finish, start another server, or register "
                     "servers with a tracker and use rpc://TRACKER:PORT/KEY") from None
        except OSError:  # reset: the server hung up, as it should
            return
    if answer:
        raise BackendError(f"{where.address} is not a TVM RPC server (it answered {answer!r})",
                           hint=_server_hint(where))


def _open(where: RemoteTarget, timeout: float):
    require_tvm()
    from tvm import rpc
    if where.key is None:
        _probe_server(where, timeout)
        try:
            return rpc.connect(where.host, where.port)
        except Exception as e:  # noqa: BLE001
            raise remote_error(where, "connecting", e) from None
    _dial(where, timeout).close()
    try:
        tracker = rpc.connect_tracker(where.host, where.port)
        summary = tracker.summary()
    except Exception as e:  # noqa: BLE001
        raise remote_error(where, "asking the tracker", e) from None
    keys = sorted({str(s["key"]).split(":", 1)[-1] for s in summary.get("server_info", [])})
    if where.key not in keys:
        raise BackendError(f"no server is registered under the key {where.key!r} at the tracker "
                           f"{where.address} (keys there: {', '.join(keys) or 'none'})",
                           hint=_server_hint(where))
    try:  # waits while every server under the key is busy: that is what a tracker is for
        return tracker.request(where.key, max_retry=2)
    except Exception as e:  # noqa: BLE001
        raise remote_error(where, f"requesting {where.key!r} from the tracker", e) from None
    finally:
        tracker.close()


def _alive(remote: Remote) -> bool:
    try:
        with remote.lock:
            remote.sess.get_function("tvm.rpc.server.upload")  # one round trip
        return True
    except Exception:  # noqa: BLE001 - the server went away or the session ended
        return False


def connect(where: RemoteTarget, *, timeout: float = CONNECT_TIMEOUT) -> Remote:
    """The open session with ``where``: this process's existing one while it is alive, else a
    new one. Raises a ``BackendError`` within about ``timeout`` seconds when the remote is
    unreachable, busy or not a TVM RPC server."""
    ident = (where.host, where.port, where.key)
    with _LOCK:
        remote = _SESSIONS.get(ident)
        if remote is not None and _alive(remote):
            return remote
        sess = _open(where, timeout)
        remote = Remote(where, sess, sess.cpu(0))
        _SESSIONS[ident] = remote
        return remote
