"""``CompiledModel``: runs the lowered graph; ``save(dir)`` writes an artifact and
``qcompile.load(dir)`` reads it back after checking versions and hashes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from qcompile.errors import ArtifactError, InputError
from qcompile.ir.graph import Graph
from qcompile.ir.serialize import graph_to_json, load_graph, save_graph

__all__ = ["CompiledModel", "load", "LAYER_OPS"]

MANIFEST_VERSION = 1
#: ops listed as layers in ``summary()``
LAYER_OPS = ("linear", "conv", "matmul", "embedding", "attention", "layer_norm", "rms_norm",
             "batch_norm")


def _versions() -> dict:
    from qcompile import __version__
    try:
        import tvm
        tvm_version = tvm.__version__
    except Exception:
        tvm_version = None
    return {"qcompile": __version__, "torch": torch.__version__.split("+")[0], "tvm": tvm_version}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def graph_hash(graph: Graph) -> str:
    text = json.dumps(graph_to_json(graph), sort_keys=True).encode()
    h = hashlib.sha256(text)
    for name in sorted(graph.constants):
        t = graph.constants[name].detach().contiguous().cpu()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes: bf16 has no numpy
    return h.hexdigest()


class CompiledModel:
    """A compiled model: call it with torch tensors or numpy arrays (positionally in the
    order of ``graph.inputs``, or by input name)."""

    def __init__(self, graph: Graph, target: str, executable, *, config: Any = None,
                 timings: dict | None = None):
        self.graph = graph
        self.target = target
        self._exec = executable
        self.config = config
        self.timings = dict(timings or {})

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs]

    def _order(self, args, kwargs) -> list:
        if not kwargs:
            return list(args)
        names = self.input_names
        unknown = set(kwargs) - set(names)
        if unknown:
            raise InputError(f"unknown input name(s) {sorted(unknown)}; inputs are {names}")
        given = dict(zip(names, args))
        given.update(kwargs)
        missing = [n for n in names if n not in given]
        if missing:
            raise InputError(f"missing input(s) {missing}; inputs are {names}")
        return [given[n] for n in names]

    def run(self, *args, **kwargs) -> list[torch.Tensor]:
        """Always a list of output tensors."""
        with torch.no_grad():
            return list(self._exec(*self._order(args, kwargs)))

    def __call__(self, *args, **kwargs):
        outs = self.run(*args, **kwargs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def summary(self) -> dict:
        layers = []
        for n in self.graph.nodes:
            if n.op not in LAYER_OPS:
                continue
            w = n.inputs[1] if n.op in ("linear", "conv") else n.inputs[0] if n.op == "embedding" \
                else None
            fmt = str(w.quant) if w is not None and w.quant is not None else \
                (w.dtype if w is not None else n.outputs[0].dtype)
            act = n.inputs[0] if n.op != "embedding" else None
            layers.append({"name": n.name, "op": n.op, "module": n.provenance.module,
                           "format": fmt,
                           "activations": str(act.quant) if act is not None and act.quant
                           else (act.dtype if act is not None else None),
                           "target": self.target})
        return {"target": self.target, "inputs": {v.name: str(v.type) for v in self.graph.inputs},
                "outputs": {v.name: str(v.type) for v in self.graph.outputs},
                "nodes": len(self.graph.nodes), "constants": len(self.graph.constants),
                "parameters": int(sum(t.numel() for t in self.graph.constants.values())),
                "ops": self.graph.op_histogram(), "layers": layers, "timings": self.timings,
                **({"mixed_precision": mp.to_dict()} if (mp := self.graph.meta.get(
                    "mixed_precision")) is not None else {})}

    def __repr__(self) -> str:
        return f"<CompiledModel target={self.target!r} {self.graph!r}>"

    # -- artifacts ------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the artifact atomically: everything goes to a temporary directory beside the
        destination, which is renamed into place only when complete."""
        from qcompile.backends import get_backend
        dest = Path(directory).resolve()
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            save_graph(self.graph, tmp)
            for fname, data in get_backend(self.target).artifacts(self._exec).items():
                (tmp / fname).write_bytes(data)
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {"manifest_version": MANIFEST_VERSION, "versions": _versions(),
                        "target": self.target, "graph_hash": graph_hash(self.graph),
                        "inputs": [v.name for v in self.graph.inputs],
                        "files": {f: _sha256(tmp / f) for f in files}}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                dest.rename(old)
                tmp.rename(dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest


def load(directory: str | os.PathLike) -> CompiledModel:
    """Load a saved artifact; versions and SHA-256 hashes are checked before any code loads."""
    from qcompile.backends import get_backend
    d = Path(directory)
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{d} is not a qcompile artifact (no manifest.json)",
                            hint="build one with qcompile.compile(...).save(dir) or `qcompile build`")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        target = manifest["target"]
        versions = manifest["versions"]
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{mpath} is corrupt: {e}") from e
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise ArtifactError(f"artifact manifest version {manifest.get('manifest_version')} is "
                            f"not supported (expected {MANIFEST_VERSION})")
    mine = _versions()
    from qcompile.backends import get_backend as _backend
    try:
        needs = ("qcompile", "torch") + tuple(_backend(target).versioned)
    except Exception:  # noqa: BLE001 - an unknown target is reported below with the rest
        needs = ("qcompile", "torch")
    for k in needs:
        if versions.get(k) != mine[k]:
            raise ArtifactError(f"artifact was built with {k} {versions.get(k)}, this is {mine[k]}",
                                hint="rebuild the artifact with the installed versions")
    present = {p.name for p in d.iterdir() if p.name != "manifest.json"}
    if present != set(files):
        raise ArtifactError(f"artifact files {sorted(present)} differ from the manifest's "
                            f"{sorted(files)}")
    for fname, digest in files.items():
        if _sha256(d / fname) != digest:
            raise ArtifactError(f"{fname} in {d} does not match its SHA-256 in the manifest",
                                hint="the artifact was modified or corrupted; rebuild it")
    graph = load_graph(d)
    if graph_hash(graph) != manifest["graph_hash"]:
        raise ArtifactError("the graph's hash does not match the manifest")
    backend = get_backend(target)
    extra = {f: (d / f).read_bytes() for f in files if f not in ("graph.json", "params.safetensors")}
    return CompiledModel(graph, target, backend.load(graph, target, extra))
