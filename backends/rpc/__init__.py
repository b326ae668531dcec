"""Remote devices through TVM RPC: targets ``rpc://HOST:PORT`` (a server started with
``python -m tvm.exec.rpc_server``) and ``rpc://TRACKER-HOST:PORT/KEY`` (a server registered
with a tracker under KEY), optionally ending in ``?isa=LEVEL``.

``lower`` connects first (an unreachable server fails in seconds, before any build), builds
the graph here with the TVM ``cpu`` backend at the remote CPU's instruction-set level
(``build.py``), uploads the library and the parameters once, and returns a
:class:`RemoteExecutable` on the remote Relax VM. An artifact holds the library, the
parameters and what the code needs of the remote CPU; loading it uploads them again.
:func:`measure_link` fits the link's latency and bandwidth; :class:`RpcServer` starts a
loopback server for tests and benchmarks.
"""
from __future__ import annotations

import json

from qcompile.backends.base import Backend, register_backend
from qcompile.backends.rpc.executable import REMOTE, RemoteExecutable
from qcompile.backends.rpc.link import measure_link
from qcompile.backends.rpc.server import RpcServer, RpcTracker
from qcompile.backends.rpc.url import SCHEME, RemoteTarget, parse_target
from qcompile.errors import ArtifactError, ConfigError
from qcompile.ir.graph import Graph, Node

__all__ = ["RpcBackend", "RemoteExecutable", "RemoteTarget", "parse_target", "measure_link",
           "RpcServer", "RpcTracker"]


class RpcBackend(Backend):
    name = "rpc"
    prefixes = (SCHEME,)
    versioned = ("tvm",)  # the remote loads a library this TVM built

    def check_target(self, target: str) -> None:
        parse_target(target)

    def supports(self, node: Node) -> bool:
        from qcompile.backends import get_backend
        return get_backend("cpu").supports(node)

    def cost(self, node: Node, device: str = "cpu", env=None) -> float:
        from qcompile.backends import get_backend
        return get_backend("reference").cost(node, device, env)

    def lower(self, graph: Graph, target: str, *, remote_target: str = "cpu",
              isa: str | None = None) -> RemoteExecutable:
        """Build ``graph`` for the remote named by ``target`` and load it there.
        ``remote_target`` is the TVM backend target the remote runs (``cpu``); ``isa`` its
        instruction-set level (default: the URL's ``?isa=``, else what the remote reports,
        capped at this machine's :func:`qcompile.isa.level`)."""
        from qcompile.backends.rpc.build import build_library, check_remote_cpu, choose_level
        from qcompile.backends.rpc.session import connect
        where = parse_target(target)
        if remote_target != "cpu":
            raise ConfigError(f"remote_target={remote_target!r}: an rpc:// remote runs the TVM "
                              "'cpu' backend's code", hint="pass remote_target='cpu' and the "
                                                           "remote's level as isa=")
        if isa is not None and where.isa is not None and isa != where.isa:
            raise ConfigError(f"isa={isa!r} contradicts the target's ?isa={where.isa}",
                              hint="give the level once")
        remote = connect(where)  # before any build: an unreachable server fails in seconds
        level = choose_level(isa or where.isa, remote.cpu())
        library, params, report, record = build_library(graph, level)
        check_remote_cpu(record, remote.cpu(), where)
        return RemoteExecutable(graph, target, remote, library, params, report=report,
                                remote_isa=record)

    def artifacts(self, executable: RemoteExecutable) -> dict[str, bytes]:
        return executable.files()

    def load(self, graph: Graph, target: str, files: dict[str, bytes]) -> RemoteExecutable:
        """Upload a saved artifact's library and parameters to the remote again."""
        from safetensors.numpy import load

        from qcompile.backends.rpc.build import check_remote_cpu
        from qcompile.backends.rpc.session import connect
        from qcompile.backends.tvm import LIBRARY, PARAMS
        where = parse_target(target)
        missing = [f for f in (LIBRARY, PARAMS, REMOTE) if f not in files]
        if missing:
            raise ArtifactError(f"an {target} artifact needs {LIBRARY}, {PARAMS} and {REMOTE} "
                                f"({', '.join(missing)} missing)",
                                hint="rebuild it with qcompile build")
        try:
            record = json.loads(files[REMOTE])["isa"]
            loaded = load(files[PARAMS])
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"the {target} artifact is corrupt: {e}") from None
        remote = connect(where)
        if record is not None:
            check_remote_cpu(record, remote.cpu(), where)
        params = [loaded[k] for k in sorted(loaded)]
        return RemoteExecutable(graph, target, remote, files[LIBRARY], params,
                                remote_isa=record)


register_backend(RpcBackend())
