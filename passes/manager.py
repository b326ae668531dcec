"""Pass registry and ``PassManager``: run passes by name, time each, verify around each
(always under pytest, and with ``QCOMPILE_VERIFY=1``), dump the IR after each when
``QCOMPILE_DUMP=dir``, and wrap a failure once as ``PassError`` naming the pass and those
before it."""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from qcompile.errors import ConfigError, PassConfigError, PassError, QCompileError
from qcompile.ir.graph import Graph
from qcompile.ir.verify import verify

__all__ = ["register_pass", "get_pass", "all_passes", "PassManager", "run_passes", "PassRecord"]

PassFn = Callable[..., Graph]
_PASSES: dict[str, PassFn] = {}


def register_pass(name: str):
    """Register ``fn(graph, **options) -> Graph`` under ``name``."""
    def deco(fn: PassFn) -> PassFn:
        if name in _PASSES and _PASSES[name] is not fn:
            raise ValueError(f"pass {name} registered twice")
        _PASSES[name] = fn
        fn.pass_name = name
        return fn
    return deco


def get_pass(name: str) -> PassFn:
    try:
        return _PASSES[name]
    except KeyError:
        from qcompile.errors import ConfigError
        raise ConfigError(f"unknown pass {name!r}",
                          hint=f"known passes: {', '.join(sorted(_PASSES))}") from None


def all_passes() -> list[str]:
    return sorted(_PASSES)


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int


def _verify_enabled() -> bool:
    return os.environ.get("QCOMPILE_VERIFY") == "1" or "PYTEST_CURRENT_TEST" in os.environ


@dataclass
class PassManager:
    """Run named passes in order. ``pipeline`` is a list of names or a comma-separated string."""

    pipeline: Sequence[str] | str
    options: dict = field(default_factory=dict)
    verify: bool | None = None
    dump_dir: str | None = None
    records: list[PassRecord] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.pipeline, str):
            self.pipeline = [p.strip() for p in self.pipeline.split(",") if p.strip()]
        for name in self.pipeline:
            get_pass(name)  # unknown names fail before anything runs
        if self.verify is None:
            self.verify = _verify_enabled()
        if self.dump_dir is None:
            self.dump_dir = os.environ.get("QCOMPILE_DUMP") or None

    def run(self, graph: Graph) -> Graph:
        done: list[str] = []
        if self.verify:
            self._check(graph, "the input graph", done)
        for i, name in enumerate(self.pipeline):
            fn = get_pass(name)
            before = len(graph.nodes)
            t0 = time.perf_counter()
            try:
                graph = fn(graph, **self.options.get(name, {}))
            except PassError:
                raise
            except Exception as e:
                after = f" after [{', '.join(done)}]" if done else " (first pass)"
                kind = type(e).__name__
                msg = str(e) if isinstance(e, QCompileError) else f"{kind}: {e}"
                cls = PassConfigError if isinstance(e, ConfigError) else PassError
                raise cls(f"in pass {name}{after}: {msg}") from e
            self.records.append(PassRecord(name, time.perf_counter() - t0, before, len(graph.nodes)))
            done.append(name)
            if self.verify:
                self._check(graph, f"pass {name}", done[:-1])
            if self.dump_dir:
                d = Path(self.dump_dir)
                d.mkdir(parents=True, exist_ok=True)
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
                (d / f"{i:02d}_{safe}.txt").write_text(str(graph) + "\n")
        return graph

    def _check(self, graph: Graph, what: str, done: list[str]) -> None:
        try:
            verify(graph)
        except QCompileError as e:
            after = f" after [{', '.join(done)}]" if done else ""
            raise PassError(f"{what}{after} left a malformed graph: {e}") from e


def run_passes(graph: Graph, pipeline: Sequence[str] | str, **kw) -> Graph:
    return PassManager(pipeline, **kw).run(graph)
