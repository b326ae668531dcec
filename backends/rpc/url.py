"""``rpc://`` target names: a TVM RPC server (``rpc://HOST:PORT``) or a key on a TVM RPC
tracker (``rpc://TRACKER-HOST:PORT/KEY``), optionally with ``?isa=LEVEL`` (a
:mod:`qcompile.isa` level the remote CPU runs, e.g. an AVX2-only board: ``?isa=avx2``)."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from qcompile.errors import ConfigError

__all__ = ["SCHEME", "RemoteTarget", "parse_target"]

SCHEME = "rpc://"
_FORMS = "rpc://HOST:PORT (a server) or rpc://TRACKER-HOST:PORT/KEY (a tracker key), " \
         "optionally ending in ?isa=generic|avx2|avx512|amx"


@dataclass(frozen=True)
class RemoteTarget:
    """Where a remote device is: a server's or a tracker's address, and the tracker key."""

    host: str
    port: int
    key: str | None = None  # set: (host, port) is a tracker and ``key`` names the device kind
    isa: str | None = None  # the remote's qcompile.isa level, when the URL says it

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"tracker {self.address} key {self.key!r}" if self.key else f"server {self.address}"


def _bad(target: str, why: str) -> ConfigError:
    return ConfigError(f"malformed remote target {target!r}: {why}", hint=f"write {_FORMS}")


def parse_target(target: str) -> RemoteTarget:
    """The :class:`RemoteTarget` an ``rpc://`` name means, or a ``ConfigError`` saying what is
    wrong with it (no network access: a malformed name fails before any work)."""
    from qcompile import isa
    if not isinstance(target, str) or not target.startswith(SCHEME):
        raise _bad(str(target), f"a remote target starts with {SCHEME}")
    parts = urlsplit(target)
    if parts.username is not None or parts.password is not None:
        raise _bad(target, "user names and passwords have no place in it")
    if parts.fragment:
        raise _bad(target, f"unexpected '#{parts.fragment}'")
    host = parts.hostname
    if not host:
        raise _bad(target, "no host")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is None or not 0 < port < 65536:
        raise _bad(target, "the port must be a number from 1 to 65535")
    key = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.path and (not key or "/" in key or any(c.isspace() for c in key)):
        raise _bad(target, f"the tracker key {key!r} must be one non-empty word")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False) \
        if parts.query else {}
    if set(query) - {"isa"} or any(len(v) != 1 for v in query.values()):
        raise _bad(target, f"unknown options {parts.query!r} (only isa=LEVEL is known)")
    level = query.get("isa", [None])[0]
    if level is not None and level not in isa.LEVELS:
        raise _bad(target, f"isa={level!r} is not one of {', '.join(isa.LEVELS)}")
    return RemoteTarget(host, port, key or None, level)
