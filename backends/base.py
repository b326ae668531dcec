"""The backend interface and the target registry (third-party backends plug in through the
``qcompile.backends`` entry-point group)."""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable, Sequence

import torch

from qcompile.errors import ConfigError
from qcompile.ir.graph import Graph, Node

__all__ = ["Backend", "Executable", "register_backend", "get_backend", "all_targets"]

Executable = Callable[..., Sequence[torch.Tensor]]


class Backend:
    """Subclass and register an instance. ``targets`` are the names users pass to compile()."""

    name: str = "backend"
    targets: tuple[str, ...] = ()
    #: target-name prefixes the backend claims: every target starting with one (``rpc://``
    #: URLs) resolves to it, after :meth:`check_target`
    prefixes: tuple[str, ...] = ()
    #: packages whose version an artifact must match (besides qcompile and torch)
    versioned: tuple[str, ...] = ()
    #: targets whose ``lower`` takes ``tune_trials`` (a search measured on this machine)
    tunable: tuple[str, ...] = ()
    #: the backend runs every op on integers (NPU runtimes): the pipeline canonicalises and
    #: decomposes fused ops, then quantizes every activation (``quantize_all_activations``)
    full_qdq: bool = False

    def default_config(self):
        """The ``QuantConfig`` used when ``compile()`` gets calibration data but no config
        (None: a config is required)."""
        return None

    def check_target(self, target: str) -> None:
        """Raise a ``ConfigError`` when ``target``, claimed through :attr:`prefixes`, is
        malformed (so that it fails before any work)."""

    def supports(self, node: Node) -> bool:
        """Whether this backend can run ``node``."""
        raise NotImplementedError

    def cost(self, node: Node, device: str, env: dict[str, int] | None = None) -> float:
        """Seconds to run ``node`` on ``device`` (measured or modelled); ``env`` binds symbols."""
        raise NotImplementedError

    def lower(self, graph: Graph, target: str) -> Executable:
        """Turn a graph into a callable taking and returning torch tensors."""
        raise NotImplementedError

    def artifacts(self, executable: Executable) -> dict[str, bytes]:
        """Compiled files to store beside the graph in a saved artifact (none by default)."""
        return {}

    def load(self, graph: Graph, target: str, files: dict[str, bytes]) -> Executable:
        """Rebuild the executable from a saved artifact."""
        return self.lower(graph, target)


_BACKENDS: dict[str, Backend] = {}
_PREFIXES: dict[str, Backend] = {}
_PLUGINS_LOADED = False


def register_backend(backend: Backend) -> Backend:
    for t in backend.targets:
        _BACKENDS[t] = backend
    for p in backend.prefixes:
        _PREFIXES[p] = backend
    return backend


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in entry_points(group="qcompile.backends"):
        register_backend(ep.load()())


def all_targets() -> list[str]:
    _load_plugins()
    return sorted(_BACKENDS)


def get_backend(target: str) -> Backend:
    _load_plugins()
    if not isinstance(target, str):
        raise ConfigError(f"a target is a name such as 'reference', got {target!r}")
    if target in _BACKENDS:
        return _BACKENDS[target]
    for prefix, backend in _PREFIXES.items():
        if target.startswith(prefix):
            backend.check_target(target)
            return backend
    urls = "".join(f", {p}..." for p in sorted(_PREFIXES))
    raise ConfigError(f"unknown target {target!r}",
                      hint=f"known targets: {', '.join(all_targets())}{urls}")
