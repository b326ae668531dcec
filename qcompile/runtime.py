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

__all__ = ["CompiledModel", "load", "is_artifact", "check_destination", "check_isa",
           "LAYER_OPS"]

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
    out = {"qcompile": __version__, "torch": torch.__version__.split("+")[0], "tvm": tvm_version}
    from importlib.metadata import PackageNotFoundError, version
    for pkg in ("onnx", "onnxruntime", "onnxruntime-qnn"):  # the onnx and npu targets' runtimes
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


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
                 timings: dict | None = None, isa: dict | None = None):
        self.graph = graph
        self.target = target
        self._exec = executable
        self.config = config
        self.timings = dict(timings or {})
        #: what the compiled code needs of the CPU, ``{"level": ..., "features": [...]}``
        #: (:mod:`qcompile.isa`), or None when it needs nothing checkable (reference, CUDA,
        #: cross targets): the executable's at compile time, the manifest's when loaded
        self.isa = isa if isa is not None else getattr(executable, "isa", None)
        #: a loaded model's artifact directory and its compiled files' SHA-256s: re-saving copies
        #: those files (a backend need not be able to export code it loaded)
        self._source: tuple[Path, dict[str, str]] | None = None

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
        return {"target": self.target,
                **({"isa": self.isa["level"]} if self.isa is not None else {}),
                "inputs": {v.name: str(v.type) for v in self.graph.inputs},
                "outputs": {v.name: str(v.type) for v in self.graph.outputs},
                "nodes": len(self.graph.nodes), "constants": len(self.graph.constants),
                "parameters": int(sum(t.numel() for t in self.graph.constants.values())),
                "ops": self.graph.op_histogram(), "layers": layers, "timings": self.timings,
                # linears a kernel backend (lut, amx) left to the cpu kernels, and why
                **({"fallbacks": dict(fb)} if (fb := getattr(self._exec, "fallbacks", None))
                   else {}),
                **({"mixed_precision": mp.to_dict()} if (mp := self.graph.meta.get(
                    "mixed_precision")) is not None else {})}

    def __repr__(self) -> str:
        return f"<CompiledModel target={self.target!r} {self.graph!r}>"

    # -- artifacts ------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the artifact to ``directory`` and return its resolved path.

        Nothing is lost: an existing artifact (or an empty directory) is replaced, but any other
        file or non-empty directory there, or an artifact that also holds files its manifest
        does not list, is refused with an ``ArtifactError`` unless ``overwrite=True``.
        Everything is written to a temporary directory beside the destination and renamed into
        place only when complete; if anything fails, what was there before stays (an old
        artifact whole and loadable) and no temporary directory is left behind."""
        dest = check_destination(directory, overwrite=overwrite)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        except OSError as e:
            raise _unwritable(dest, e) from None
        try:
            save_graph(self.graph, tmp)
            for fname, data in self._compiled_files().items():
                (tmp / fname).write_bytes(data)
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {"manifest_version": MANIFEST_VERSION, "versions": _versions(),
                        "target": self.target, "graph_hash": graph_hash(self.graph),
                        "inputs": [v.name for v in self.graph.inputs],
                        "files": {f: _sha256(tmp / f) for f in files}}
            if self.isa is not None:
                manifest["isa"] = self.isa
            manifest.update(self._manifest_extra())
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            _swap_into_place(tmp, dest)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _unwritable(dest, e) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def _manifest_extra(self) -> dict:
        """More manifest entries a subclass records (a placed model: its devices)."""
        return {}

    def _compiled_files(self) -> dict[str, bytes]:
        """The backend's files for the artifact: those it was loaded from while they still
        match the manifest they were checked against, else what the backend exports."""
        from qcompile.backends import get_backend
        return self._source_files() or get_backend(self.target).artifacts(self._exec)

    def _source_files(self) -> dict[str, bytes] | None:
        """A loaded model's compiled files, read back while they still match their hashes."""
        if self._source is None:
            return None
        d, digests = self._source
        try:
            files = {f: (d / f).read_bytes() for f in digests}
        except OSError:
            return None
        if files and all(hashlib.sha256(b).hexdigest() == digests[f] for f, b in files.items()):
            return files
        return None


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a readable qcompile ``manifest.json`` (one with
    a ``manifest_version``): what ``save()`` may replace without ``overwrite=True``."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "manifest_version" in manifest


def check_destination(directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The resolved path ``save()`` would write, or an ``ArtifactError`` when saving there
    would lose something (unless ``overwrite``: a file, a non-empty directory that is not a
    qcompile artifact, an artifact holding files its manifest does not list) or cannot work
    (a parent that is not a writable directory). Cheap, so the CLI calls it before compiling."""
    dest = Path(directory).expanduser().resolve()
    if not dest.name:
        raise ArtifactError(f"cannot save an artifact as {dest}", hint="give a directory name")
    if not overwrite and (dest.exists() or dest.is_symlink()):
        what = None
        if not dest.is_dir():
            what = "a file"
        elif not is_artifact(dest) and any(dest.iterdir()):
            what = "a non-empty directory that is not a qcompile artifact (no qcompile manifest.json)"
        elif extra := _unlisted(dest):
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            what = f"a qcompile artifact that also holds files it does not list ({shown})"
        if what is not None:
            raise ArtifactError(f"{dest} exists and is {what}; saving there would replace it",
                                hint="choose another output path, remove it, or pass "
                                     "overwrite=True (`qcompile build --force`) to replace it")
    parent = dest.parent
    while not parent.exists():  # the nearest existing ancestor is where directories get made
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"cannot save an artifact as {dest}: {parent} is not a directory",
                            hint="choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _unwritable(dest, PermissionError(13, "Permission denied", str(parent)))
    return dest


def _unlisted(directory: Path) -> list[str]:
    """Entries of an artifact directory that its manifest does not list (someone's notes, a
    subdirectory): replacing the artifact would delete them."""
    try:
        listed = json.loads((directory / "manifest.json").read_text()).get("files", {})
        if not isinstance(listed, dict):
            listed = {}
    except (OSError, ValueError, AttributeError):
        listed = {}
    return sorted(p.name for p in directory.iterdir()
                  if p.name != "manifest.json" and not (p.name in listed and p.is_file()))


def _unwritable(dest: Path, e: OSError) -> ArtifactError:
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return ArtifactError(f"cannot write the artifact {dest}: {e.strerror or e}{where}",
                         hint=f"make {dest.parent} writable, free space there, or choose "
                              "another output path")


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename the complete artifact ``tmp`` to ``dest``. What is at ``dest`` is first renamed
    aside and deleted only once ``tmp`` is in place; should that second rename fail, it is
    renamed back, so ``dest`` never ends up half-written or lost."""
    if not (dest.exists() or dest.is_symlink()):
        os.rename(tmp, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{tmp.name[-8:]}")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


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
    needs = ("qcompile", "torch")
    for t in _targets_of(manifest):
        try:
            needs += tuple(_backend(t).versioned)
        except Exception:  # noqa: BLE001 - an unknown target is reported below with the rest
            pass
    for k in needs:
        if versions.get(k) != mine[k]:
            raise ArtifactError(f"artifact was built with {k} {versions.get(k)}, this is {mine[k]}",
                                hint="rebuild the artifact with the installed versions")
    check_isa(manifest, d)
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
    extra = {f: (d / f).read_bytes() for f in files if f not in ("graph.json", "params.safetensors")}
    if target.startswith(PLACED):
        from qcompile.placed import load_placed
        cm = load_placed(d, graph, manifest, extra)
        cm._source = (d.resolve(), {f: files[f] for f in extra})
        return cm
    backend = get_backend(target)
    if "llm" in manifest:  # a decoder LLM's step graph: generate() and its KV cache
        from qcompile.llm import lower_step
        from qcompile.llm.runtime import TOKENIZER_FILES, CompiledLLM
        from qcompile.llm.spec import LlmSpec
        tok = {f: b for f, b in extra.items() if f in TOKENIZER_FILES}
        prefill, decode = lower_step(backend, graph, target,
                                     {f: b for f, b in extra.items() if f not in tok})
        cm = CompiledLLM(graph, target, prefill, LlmSpec.from_json(manifest["llm"]),
                         decode=decode, isa=manifest.get("isa"), tokenizer_files=tok)
    else:
        cm = CompiledModel(graph, target, backend.load(graph, target, extra), isa=manifest.get("isa"))
    cm._source = (d.resolve(), {f: files[f] for f in extra})
    return cm


#: the target prefix of a model placed across devices (``placed:npu,cpu``)
PLACED = "placed:"


def _targets_of(manifest: dict) -> list[str]:
    """The backend targets an artifact needs (a placed model: each device's)."""
    target = manifest["target"]
    if not target.startswith(PLACED):
        return [target]
    devices = manifest.get("devices")
    if not isinstance(devices, dict):
        raise ArtifactError("a placed artifact's manifest lists no devices", hint="rebuild it")
    return sorted(set(map(str, devices.values())))


def check_isa(manifest: dict, directory: str | os.PathLike = "the artifact") -> None:
    """Refuse, with an ``ArtifactError`` that says how to rebuild, an artifact whose code
    needs CPU features this machine lacks or ``QCOMPILE_ISA`` forbids (its manifest's
    ``isa``, written when the code was built for the host CPU)."""
    from qcompile import isa
    rec = manifest.get("isa")
    if rec is None:
        return
    if not (isinstance(rec, dict) and isinstance(rec.get("level"), str)
            and isinstance(rec.get("features"), list)
            and all(isinstance(f, str) for f in rec["features"])):
        raise ArtifactError(f"{directory}/manifest.json is corrupt: 'isa' must be "
                            f"{{'level': str, 'features': [str]}}, got {rec!r}")
    allowed = isa.allowed_features()
    missing = sorted(f for f in set(rec["features"]) if f not in allowed)
    if not missing:
        return
    here, cap = isa.level(), isa.cap()
    host = isa.host_features()
    hidden = sorted(f for f in missing if f in host)
    why = ""
    if hidden and cap is not None:
        them = "it" if len(hidden) == 1 else "them"
        why = (f"; this CPU has {them} but {isa.ENV}={cap} hides {them}" if hidden == missing
               else f"; this CPU has {', '.join(hidden)} but {isa.ENV}={cap} hides {them}")
    target = manifest.get("target", "cpu")
    build = f"qcompile build MODEL --target {target} -o {directory}"
    hint = (f"rebuild it on this machine (`{build}`), or build a portable artifact on the "
            f"build machine with `{isa.ENV}={here} {build}`")
    if hidden == missing and cap is not None:
        hint = f"unset {isa.ENV} (or set it to {rec['level']}), or " + hint
    raise ArtifactError(f"{directory} was built for instruction-set level {rec['level']} and "
                        f"its code uses CPU features this machine does not allow: "
                        f"{', '.join(missing)} (this machine runs at level {here}, host "
                        f"{isa.host_level()}{why})", hint=hint)
