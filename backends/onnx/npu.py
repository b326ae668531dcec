"""Target ``npu``: the whole model as QDQ ONNX on Qualcomm's QNN HTP backend (ONNX Runtime's
QNN execution provider), CPU fallback disabled.

The quantization follows the HTP's conventions (reference ``npu.md`` §2, §7): 16-bit
asymmetric activations on every tensor by default (8-bit on request), symmetric per-channel
int8 weights with int32 biases inside ``Gemm``, LayerNorm γ as uint8, int4 block weights only
for ``htp_arch`` ≥ 73. Before calibration the graph is canonicalised for the NPU
(``canonicalize_npu``: finite masks, no ``where``, Erf → Gelu, no ``add`` of zero) and attention
is decomposed so its scores get scales of their own (``decompose_attention``); then every float
value gets a calibrated scale (``quantize_all_activations``).

Building opens a no-fallback QNN session with the op trace on (``qnn.capability``): nodes the
HTP refuses, or is known to run wrong (the deny-list), are reported by IR node and provenance
in a ``BackendError``; otherwise the model is compiled ahead of time into an EPContext model
(the QNN context binary), which is what the executable runs and the artifact stores, so a
load skips graph preparation. Targets ``npu:v68`` … ``npu:v81`` pick the HTP architecture
(``npu`` is v73). Times measured here are the x86 simulator's, never NPU latency.
"""
from __future__ import annotations

import hashlib
import json
import time

from qcompile.backends.base import register_backend
from qcompile.errors import ArtifactError, BackendError, ConfigError
from qcompile.ir.graph import Graph
from qcompile.ir.quant import Granularity

from . import MODEL_FILE, ORIGIN_FILE, OnnxBackend, OnnxExecutable, _read_origin
from .export import export

__all__ = ["NpuBackend", "NpuExecutable", "ARCHS", "CONTEXT_FILE", "NPU_FILE", "arch_of"]

#: HTP architectures a target name may ask for (``npu:v73``); ``npu`` means v73
ARCHS = (68, 69, 73, 75, 79, 81)
DEFAULT_ARCH = 73
CONTEXT_FILE, NPU_FILE = "qnn_context.onnx", "npu.json"


def arch_of(target: str) -> int:
    if target == "npu":
        return DEFAULT_ARCH
    try:
        a = int(target.split(":v", 1)[1])
    except (IndexError, ValueError):
        a = -1
    if a not in ARCHS:
        raise ConfigError(f"unknown NPU target {target!r}",
                          hint=f"use 'npu' (HTP v{DEFAULT_ARCH}) or one of "
                               f"{', '.join(f'npu:v{x}' for x in ARCHS)}")
    return a


def _qnn():
    from . import qnn
    ok, why = qnn.available()
    if not ok:
        raise ConfigError(f"target 'npu' needs ONNX Runtime's QNN execution provider: {why}",
                          hint="pip install 'qcompile[npu]' (onnxruntime>=1.24, onnxruntime-qnn)")
    return qnn


def check_graph(graph: Graph, target: str) -> None:
    """Refuse, before export, what the HTP cannot take: float graphs (it runs integers),
    asymmetric per-channel weights, int4 blocks below v73, dynamic activation scales."""
    arch = arch_of(target)
    if not any(v.quant is not None for v in graph.values()):
        raise ConfigError(f"target '{target}' runs quantized models only (the HTP has no float "
                          "Gather/Gelu)", hint="pass config=QuantConfig(weights='int8', "
                          "group_size=None, activations='uint16', activation_granularity="
                          "'per_tensor') and calibration=[...]")
    for n in graph.nodes:
        if n.op not in ("linear", "conv") or n.inputs[1].quant is None:
            continue
        spec, where = n.inputs[1].quant, f"{n.name} ({n.provenance})"
        if spec.granularity == Granularity.PER_GROUP and arch < 73:
            raise ConfigError(f"layer {where}: block-quantized weights ({spec}) need "
                              f"htp_arch >= 73; target '{target}' is v{arch}", node=n,
                              hint="use target 'npu' (v73) or 'npu:v75', or per-channel int8 "
                                   "weights (group_size=None)")
        if spec.granularity == Granularity.PER_CHANNEL and spec.zero_point is not None:
            raise ConfigError(f"layer {where}: per-channel weights with zero points ({spec}) are "
                              "refused by the HTP (its per-channel weights are symmetric)", node=n,
                              hint="use weights='int8' (symmetric)")
    for v in graph.values():
        if v.quant is not None and v.quant.dynamic:
            raise ConfigError(f"%{v.name}: dynamic quantization ({v.quant}) has no NPU form",
                              hint="use activation_granularity='per_tensor' with calibration")


class NpuExecutable(OnnxExecutable):
    """Runs the EPContext model on a QNN HTP session (no CPU fallback)."""

    def __init__(self, graph, target, model_bytes, origin, context: bytes, meta: dict,
                 session=None, report=None):
        super().__init__(graph, target, model_bytes, origin, session)
        self.context = context
        self.meta = dict(meta)
        #: the build's ``qnn.CapabilityReport`` (None for a loaded artifact)
        self.report = report
        #: seconds to create the session: from the context binary when loaded
        self.load_seconds: float | None = None
        #: seconds the build spent compiling the QNN context (None for a loaded artifact)
        self.prepare_seconds: float | None = None

    @property
    def session(self):
        if self._session is None:
            qnn = _qnn()
            t0 = time.perf_counter()
            self._session = qnn.session_from_context(self.context, sha256=self.meta["context_sha256"],
                                                     htp_arch=self.meta["htp_arch"])
            self.load_seconds = time.perf_counter() - t0
        return self._session

    def files(self) -> dict[str, bytes]:
        out = super().files()
        out[CONTEXT_FILE] = self.context
        out[NPU_FILE] = (json.dumps(self.meta, indent=1, sort_keys=True) + "\n").encode()
        return out


_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _causes(refused) -> list:
    """The refusals that are causes: a Q/DQ node is refused with the op whose node unit it
    belongs to, so it is listed only when no compute node was refused."""
    ops = [r for r in refused if r.op_type not in _QDQ_OPS]
    return ops or list(refused)


def refusal_error(report, origin: dict[str, str], graph: Graph, target: str) -> BackendError:
    """A ``BackendError`` naming each refused ONNX node by its IR node, op and provenance."""
    nodes = {n.name: n for n in graph.nodes}
    lines, seen = [], set()
    for r in _causes(report.refused):
        ir = origin.get(r.node) or ""
        key = (ir or r.node, r.reason)
        if key in seen:
            continue
        seen.add(key)
        n = nodes.get(ir)
        where = f"IR node {n.name} (op {n.op}; {n.provenance})" if n is not None else \
            f"ONNX node {r.node or '?'}"
        lines.append(f"  - {where}: ONNX {r.op_type} {r.node!r}: {r.reason} [{r.source}]")
    if not lines and report.session_error:
        lines.append(f"  - the session failed: {report.session_error.splitlines()[0]}")
    counts = f"{report.supported_nodes}/{report.total_nodes} ONNX nodes on the HTP; " \
        if report.total_nodes is not None else ""
    return BackendError(f"the QNN HTP (v{report.htp_arch}) cannot run the whole model "
                        f"({counts}{len(lines)} refused):\n" + "\n".join(lines),
                        hint=f"change the model so these ops go (npu.md lists what the HTP "
                             f"runs), compile it for target 'onnx' or 'cpu' instead, or — once "
                             f"the placement pass lands — split it with target=['{target}', "
                             "'cpu']")


class NpuBackend(OnnxBackend):
    """Target ``npu``: QDQ ONNX on the QNN HTP, CPU fallback disabled."""

    name = "npu"
    targets = ("npu",) + tuple(f"npu:v{a}" for a in ARCHS)
    versioned = ("onnx", "onnxruntime", "onnxruntime-qnn")
    #: quantize every activation (the pipeline then runs canonicalize_npu, decompose_attention
    #: and quantize_all_activations)
    full_qdq = True

    def default_config(self):
        """What ``compile(model, 'npu', calibration=...)`` quantizes with when no config is
        given: the HTP's recipe (npu.md §2): uint16 activations, int8 per-channel weights."""
        from qcompile.config import QuantConfig
        return QuantConfig(weights="int8", group_size=None, activations="uint16",
                           activation_granularity="per_tensor")

    def supports(self, node) -> bool:
        from .export import _OPS
        return node.op in _OPS and node.op not in ("where", "erf")

    def capability(self, graph: Graph, target: str = "npu") -> dict[str, list[str]]:
        """The IR nodes the HTP refuses (or is known to run wrong) in ``graph`` (quantized for
        ``target``), each with QNN's reasons: what placement keeps off the NPU. Exports the
        graph and probes a no-fallback session (seconds); empty when the whole graph runs."""
        qnn = _qnn()
        ex = export(graph, target=target, static=True, weight_only_int4="qdq")
        report = qnn.capability(ex.model.SerializeToString(), htp_arch=arch_of(target))
        out: dict[str, list[str]] = {}
        for r in _causes(report.refused):
            ir = ex.origin.get(r.node) or r.node
            out.setdefault(ir, [])
            if r.reason not in out[ir]:
                out[ir].append(r.reason)
        if not report.session_ok and not out:
            out[""] = [report.session_error or "the QNN session could not be created"]
        return out

    def lower(self, graph: Graph, target: str):
        qnn = _qnn()
        arch = arch_of(target)
        check_graph(graph, target)
        ex = export(graph, target=target, static=True, weight_only_int4="qdq")
        data = ex.model.SerializeToString()
        report = qnn.capability(data, htp_arch=arch)
        if not report.ok:
            raise refusal_error(report, ex.origin, graph, target)
        t0 = time.perf_counter()
        ctx = qnn.compile_context(data, htp_arch=arch)
        prepare_s = time.perf_counter() - t0
        info = qnn.context_info(ctx)
        meta = {"htp_arch": arch, "qnn": qnn.versions(), "compatibility": info["compatibility"],
                "context_sha256": hashlib.sha256(ctx).hexdigest(),
                "nodes_on_htp": report.supported_nodes, "onnx_nodes": report.total_nodes,
                "qnn_subgraphs": report.qnn_subgraphs}
        exe = NpuExecutable(graph, target, data, ex.origin, ctx, meta, report=report)
        exe.prepare_seconds = prepare_s
        return exe

    def load(self, graph: Graph, target: str, files: dict[str, bytes]):
        qnn = _qnn()
        for f in (MODEL_FILE, CONTEXT_FILE, NPU_FILE, ORIGIN_FILE):
            if f not in files:
                raise ArtifactError(f"the npu artifact has no {f}", hint="rebuild it")
        try:
            meta = json.loads(files[NPU_FILE])
            arch = int(meta["htp_arch"])
            built = dict(meta["qnn"])
            digest = str(meta["context_sha256"])
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{NPU_FILE} is corrupt ({e})", hint="rebuild the artifact") from None
        if arch != arch_of(target):
            raise ArtifactError(f"the artifact's context was prepared for HTP v{arch}, its target "
                                f"is {target!r}", hint="rebuild the artifact")
        mine = qnn.versions()
        for k in ("qnn-sdk", "onnxruntime", "onnxruntime-qnn"):
            if built.get(k) != mine.get(k):
                raise ArtifactError(f"the QNN context was prepared with {k} {built.get(k)}, this "
                                    f"machine has {mine.get(k)}",
                                    hint=f"rebuild it: qcompile build MODEL --target {target} -o DIR")
        if hashlib.sha256(files[CONTEXT_FILE]).hexdigest() != digest:
            raise ArtifactError(f"{CONTEXT_FILE} does not match the SHA-256 recorded in {NPU_FILE}",
                                hint="the context binary was modified; rebuild the artifact")
        exe = NpuExecutable(graph, target, files[MODEL_FILE], _read_origin(files),
                            files[CONTEXT_FILE], meta)
        _ = exe.session  # load now: a bad binary fails here, and load_seconds is measured
        return exe


register_backend(NpuBackend())
