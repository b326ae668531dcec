"""QNN HTP runtime layer for the ``npu`` target: sessions, capability reports, EPContext binaries.

Everything here goes through ONNX Runtime's plugin-EP API (onnxruntime >= 1.24) and the
``onnxruntime-qnn`` wheel, which ships Qualcomm's HTP backend. On x86 that backend is a
*simulator*: its times and "cycles" say nothing about NPU latency, so nothing here reports
them as such. Facts behind the defaults and the deny-list: ``shared/reference/npu.md``.

- ``available()`` / ``versions()``: whether the EP can be used here, and what to record in a
  manifest (onnxruntime, onnxruntime-qnn and QNN SDK versions).
- ``session(model, ...)``: an ``InferenceSession`` on the HTP backend with CPU fallback
  disabled; failures become ``BackendError`` naming the refused nodes.
- ``capability(model, ...)``: which ONNX nodes QNN takes, from the EP's op trace, its log and
  ``deny_list``, a static list of what only fails at HTP graph finalize or runs wrong.
- ``compile_context`` / ``session_from_context``: ahead-of-time EPContext models (the QNN
  context binary embedded), loaded without graph preparation.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from qcompile.errors import BackendError, ConfigError

__all__ = [
    "DEFAULT_HTP_ARCH", "EP_NAME", "available", "versions", "session_options", "session",
    "Refusal", "CapabilityReport", "capability", "deny_list", "compile_context",
    "session_from_context", "context_info",
]

EP_NAME = "QNNExecutionProvider"
#: Snapdragon 8 Gen 2 class. Unset, the EP prepares for v68, where int4 block-quantized
#: weights and MatMulNBits fail (npu.md §2, §4).
DEFAULT_HTP_ARCH = 73
#: the first htp_arch that takes block-quantized DQ weights and com.microsoft.MatMulNBits
BLOCK_QUANT_MIN_ARCH = 73
MIN_ORT = (1, 24)

Model = Union["onnx.ModelProto", bytes, str, os.PathLike]  # noqa: F821

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_log_lock = threading.RLock()  # the ORT log callback is process-global: one capture at a time
_devices: list | None = None

_FALLBACK_ERROR = "fallback to CPU EP has been explicitly disabled"
_FINALIZE_ERROR = "Failed to finalize QNN graph"
_HINT_REFUSED = ("qcompile.backends.onnx.qnn.capability(model) lists the refused nodes with "
                 "reasons; rewrite them or place them off the NPU (fallback=True runs them on the CPU EP)")
_HINT_FINALIZE = ("an op passed QNN validation but failed HTP graph preparation (known: Where/Select, "
                  "float Gather and Gelu); qcompile.backends.onnx.qnn.deny_list(model) names them")


# --------------------------------------------------------------------------- environment

def _parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _ep_devices() -> list:
    """The QNN EP devices, registering the plugin library once per process."""
    global _devices
    with _lock:
        if _devices is not None:
            return _devices
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError("onnxruntime is not installed",
                               hint="pip install 'qcompile[npu]'") from e
        has_plugin_api = hasattr(ort, "register_execution_provider_library")
        if _parse_version(ort.__version__) < MIN_ORT or not has_plugin_api:
            raise BackendError(f"onnxruntime {ort.__version__} has no plugin-EP API (needs >= 1.24)",
                               hint="pip install -U 'onnxruntime>=1.24'")
        try:
            import onnxruntime_qnn as qnn
        except ImportError as e:
            raise BackendError("onnxruntime-qnn is not installed",
                               hint="pip install 'qcompile[npu]' (wheels for x86_64/arm64)") from e
        if not Path(qnn.get_qnn_htp_path()).exists():
            raise BackendError(f"the QNN HTP backend library is missing: {qnn.get_qnn_htp_path()}",
                               hint="reinstall onnxruntime-qnn")
        # Another component may have registered the library already: registering twice fails.
        if not any(d.ep_name == EP_NAME for d in ort.get_ep_devices()):
            try:
                ort.register_execution_provider_library(EP_NAME, qnn.get_library_path())
            except Exception as e:
                raise BackendError(f"cannot register the QNN EP library: {e}",
                                   hint="check that onnxruntime and onnxruntime-qnn versions match") from e
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
        if not devices:
            raise BackendError("the QNN EP library registered but lists no device",
                               hint="check onnxruntime-qnn against this onnxruntime version")
        _devices = devices
        return devices


def available() -> tuple[bool, str]:
    """Whether QNN HTP sessions can be created here; the reason when not ("" when they can)."""
    try:
        _ep_devices()
    except BackendError as e:
        return False, str(e).splitlines()[0]
    return True, ""


def versions() -> dict[str, str | None]:
    """Versions for an artifact manifest: onnxruntime, onnxruntime-qnn and the QNN SDK it bundles
    (``onnxruntime_qnn.build_and_package_info.qnn_version``); None for what is not installed."""
    out: dict[str, str | None] = {"onnxruntime": None, "onnxruntime-qnn": None, "qnn-sdk": None}
    try:
        import onnxruntime as ort
        out["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    try:
        from onnxruntime_qnn import build_and_package_info as info
        out["onnxruntime-qnn"] = getattr(info, "__version__", None)
        out["qnn-sdk"] = getattr(info, "qnn_version", None)
    except ImportError:
        pass
    return out


# --------------------------------------------------------------------------- sessions

def _model_bytes(model: Model) -> bytes:
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        return Path(model).read_bytes()
    return model.SerializeToString()


def _model_proto(model: Model):
    import onnx
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(os.fspath(model))
    return model


@contextlib.contextmanager
def _ort_log() -> Iterator[list[str]]:
    """Collect ORT's log messages (warning and up) raised on this thread, instead of stderr.

    The callback is process-global: it is removed afterwards, which restores the platform sink
    (at ORT's default severity, warning). Lines go to this module's logger at DEBUG level.
    """
    import onnxruntime as ort
    lines: list[str] = []
    if not hasattr(ort, "set_default_logger_callback"):
        yield lines
        return

    def sink(severity, category, logid, location, message):
        lines.append(f"{'VIWEF'[min(int(severity), 4)]} {location}: {str(message).strip()}")

    with _log_lock:
        ort.set_default_logger_callback(sink, 2)
        try:
            yield lines
        finally:
            ort.set_default_logger_callback(None)
            for line in lines:
                _log.debug("ort: %s", line)


def session_options(*, htp_arch: int | None = DEFAULT_HTP_ARCH, fallback: bool = False,
                    trace_dir: str | os.PathLike | None = None, profiling: str | None = None,
                    profiling_file: str | os.PathLike | None = None,
                    provider_options: dict[str, str] | None = None,
                    config: dict[str, str] | None = None):
    """``ort.SessionOptions`` with the QNN EP on the HTP backend.

    ``htp_arch``: the HTP generation to prepare for (73 = v73); None leaves the EP default (v68).
    ``fallback``: let ORT run what QNN refuses on the CPU EP (off: a refused node is an error).
    ``trace_dir``: write the EP's op trace ``qnn_op_trace.json`` there (see ``capability``).
    ``profiling``: "basic" or "detailed" per-op profile written to ``profiling_file`` (CSV). On x86
    these are *simulator* cycles, not NPU latency; never report them as device time.
    ``provider_options`` / ``config``: extra QNN provider options / session config entries.
    """
    devices = _ep_devices()
    import onnxruntime as ort
    import onnxruntime_qnn as qnn
    opts = {"backend_path": qnn.get_qnn_htp_path()}
    if htp_arch is not None:
        if isinstance(htp_arch, bool) or not isinstance(htp_arch, int) or htp_arch < 68:
            raise ConfigError(f"htp_arch={htp_arch!r} is not an HTP generation",
                              hint="an int such as 68, 69, 73, 75, 79 or 81 (73 = v73), or None")
        opts["htp_arch"] = str(htp_arch)
    if trace_dir is not None:
        opts["enable_framework_op_trace"] = "1"
        opts["framework_op_trace_dir"] = os.fspath(trace_dir)
    if profiling is not None:
        if profiling not in ("basic", "detailed") or profiling_file is None:
            raise ConfigError(f"profiling={profiling!r} needs 'basic' or 'detailed' and a profiling_file",
                              hint="session(model, profiling='detailed', profiling_file='qnn.csv')")
        opts["profiling_level"] = profiling
        opts["profiling_file_path"] = os.fspath(profiling_file)
    opts.update({k: str(v) for k, v in (provider_options or {}).items()})
    so = ort.SessionOptions()
    so.add_provider_for_devices(devices, opts)
    if not fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, str(v))
    return so


def _refused_in_log(lines: list[str]) -> list[tuple[str, str]]:
    """(node, op_type) from the EP's "Unsupported nodes in QNN EP: { name: X, type: Y }" lines."""
    found: list[tuple[str, str]] = []
    for line in lines:
        if "Unsupported nodes in QNN EP" in line:
            for name, op in re.findall(r"\{ name: ([^,]*), type: ([^ }]*) \}", line):
                if (name, op) not in found:
                    found.append((name, op))
    return found


def _validation_in_log(lines: list[str]) -> dict[str, str]:
    """node -> the QNN op-validation failure the EP logged for it (error code included)."""
    out = {}
    for line in lines:
        m = re.search(r"backendValidateOpConfig\(\) failed for node `([^`]*)` of type `([^`]*)`"
                      r" with error code (\d+)", line)
        if m:
            out[m.group(1)] = f"QNN validation of {m.group(2)} failed (error {m.group(3)})"
    return out


def _create(model_bytes: bytes, so, what: str):
    """Create a session; turn ORT's error into a BackendError that names refused nodes."""
    import onnxruntime as ort
    with _ort_log() as lines:
        try:
            return ort.InferenceSession(model_bytes, sess_options=so, enable_fallback=0)
        except Exception as e:  # ORT raises its own pybind exception types
            raise _session_error(e, lines, what) from e


def _session_error(e: Exception, lines: list[str], what: str) -> BackendError:
    text = str(e)
    if _FALLBACK_ERROR in text:
        refused = _refused_in_log(lines)
        valid = _validation_in_log(lines)
        names = ", ".join(f"{n or '<unnamed>'} ({op}{': ' + valid[n] if n in valid else ''})"
                          for n, op in refused) or "(the EP log named none)"
        return BackendError(f"{what}: QNN refuses nodes and CPU fallback is disabled: {names}",
                            hint=_HINT_REFUSED)
    if _FINALIZE_ERROR in text:
        return BackendError(f"{what}: HTP graph finalize failed: {text}", hint=_HINT_FINALIZE)
    return BackendError(f"{what}: {text}", hint="run with fallback=True or inspect capability(model)")


def session(model: Model, *, htp_arch: int | None = DEFAULT_HTP_ARCH, fallback: bool = False, **options):
    """An ``ort.InferenceSession`` of ``model`` (ModelProto, bytes or path) on the QNN HTP backend.

    Keyword options are those of ``session_options``. Raises ``BackendError`` when QNN refuses a
    node (with fallback off) or HTP graph finalize fails. Run times of this session on x86 are
    simulator times, not NPU latency.
    """
    so = session_options(htp_arch=htp_arch, fallback=fallback, **options)
    return _create(_model_bytes(model), so, "QNN session")


# --------------------------------------------------------------------------- deny-list

@dataclass(frozen=True)
class Refusal:
    """One ONNX node QNN does not take (or runs wrong): where the verdict came from is
    ``source``: "trace" (the EP's op trace), "log" (the EP's log) or "deny-list"."""
    node: str
    op_type: str
    reason: str
    source: str

    def __str__(self) -> str:
        return f"{self.node or '<unnamed>'} ({self.op_type}) [{self.source}]: {self.reason}"


_SIGNED = {"INT4", "INT8", "INT16", "INT32"}
_BITS = {"INT4": 4, "UINT4": 4, "INT8": 8, "UINT8": 8, "INT16": 16, "UINT16": 16, "INT32": 32}
_FLOATS = {"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"}


class _GraphView:
    """Producers, constants and element types of a model's main graph."""

    def __init__(self, model):
        import onnx
        from onnx import numpy_helper
        self.onnx = onnx
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.consts = {t.name: t for t in model.graph.initializer}
        for n in model.graph.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = a.t
        self.to_array = numpy_helper.to_array
        self.elem: dict[str, int] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # custom domains can defeat inference; types then stay unknown
            inferred = model
        g = inferred.graph
        for vi in [*g.value_info, *g.input, *g.output]:
            if vi.type.HasField("tensor_type"):
                self.elem[vi.name] = vi.type.tensor_type.elem_type
        for name, t in self.consts.items():
            self.elem[name] = t.data_type

    def type_name(self, value: str) -> str | None:
        t = self.elem.get(value)
        return self.onnx.TensorProto.DataType.Name(t) if t else None

    def array(self, value: str) -> np.ndarray | None:
        t = self.consts.get(value)
        return None if t is None else np.asarray(self.to_array(t))

    def dq(self, value: str):
        """The DequantizeLinear node producing ``value``, or None."""
        n = self.producer.get(value)
        if n is not None and n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx", "com.microsoft"):
            return n
        return None

    @staticmethod
    def attr(node, name: str, default=0):
        for a in node.attribute:
            if a.name == name:
                return a.i
        return default

    def zero_point(self, dq) -> np.ndarray | None:
        if len(dq.input) > 2 and dq.input[2]:
            z = self.array(dq.input[2])
            return None if z is None else z.astype(np.int64)
        return np.zeros(1, np.int64)  # absent zero point = 0

    def is_zero_constant(self, value: str) -> bool:
        """Whether ``value`` is a constant whose (dequantized) entries are all zero."""
        a = self.array(value)
        if a is not None:
            return a.size > 0 and a.dtype.kind in "fiub" and not np.any(a.astype(np.float64))
        dq = self.dq(value)
        if dq is None or self.attr(dq, "block_size"):
            return False
        q_node = self.producer.get(dq.input[0])
        if q_node is not None and q_node.op_type == "QuantizeLinear":  # DQ(Q(0)) is exactly 0
            return self.is_zero_constant(q_node.input[0])
        q, s, z = self.array(dq.input[0]), self.array(dq.input[1]), self.zero_point(dq)
        if q is None or s is None or z is None or q.size == 0:
            return False
        if s.size > 1:  # per-axis: broadcast scale and zero point along the axis
            axis = self.attr(dq, "axis", 1) % q.ndim
            shape = [1] * q.ndim
            shape[axis] = -1
            s = s.reshape(shape)
            z = z.reshape(shape) if z.size > 1 else z
        return not np.any((q.astype(np.int64) - z) * s.astype(np.float64))


def deny_list(model: Model, htp_arch: int | None = DEFAULT_HTP_ARCH) -> list[Refusal]:
    """Nodes QNN must not get, known without opening a session (npu.md §1, §3, §4, §7).

    Some pass the EP's validation and only fail at HTP graph finalize (no op trace is written
    then, and the error names no node); some run but compute the wrong result (an Add of zeros,
    block-quantized weights with zero points); the rest duplicate what the EP refuses, with the
    fix in the reason. Static: reads the ONNX graph only. ``htp_arch`` None means the EP's v68.
    """
    proto = _model_proto(model)
    g = _GraphView(proto)
    arch = htp_arch if htp_arch is not None else 68
    out: list[Refusal] = []

    def deny(node, reason):
        out.append(Refusal(node.name, node.op_type, reason, "deny-list"))

    for n in proto.graph.node:
        op = n.op_type
        if op == "Where":
            deny(n, "Where (QNN ElementWiseSelect) fails at HTP graph finalize, with or without "
                    "fallback; rewrite a mask select as arithmetic (Mul/Sub) or keep it off the NPU")
        elif op == "Reciprocal" and n.input and g.dq(n.input[0]) is not None:
            deny(n, "a quantized Reciprocal runs but is WRONG on HTP (uint16: rel 0.98 vs the CPU "
                    "EP, QNN 2.51, measured on RMSNorm's 1/sqrt); divide instead (Div(x, y))")
        elif op == "Erf":
            deny(n, "Erf is not supported by the QNN EP; fuse the Erf sequence into Gelu")
        elif op == "LayerNormalization" and len(n.input) > 1:
            dq = g.dq(n.input[1])
            t = dq is not None and g.type_name(dq.input[0])
            if t in _SIGNED:
                deny(n, f"LayerNorm scale (gamma) is a signed {t} DequantizeLinear: QNN validation "
                        "fails (error 3110); quantize gamma as uint8")
        if op in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx") and len(n.input) > 1:
            dq = g.dq(n.input[1])
            if dq is not None and not g.attr(dq, "block_size"):
                s, z, t = g.array(dq.input[1]), g.zero_point(dq), g.type_name(dq.input[0])
                if s is not None and s.size > 1 and z is not None and t in _BITS:
                    mid = 0 if t in _SIGNED else 1 << (_BITS[t] - 1)
                    if np.any(z != mid):
                        deny(n, f"per-channel {t} weights with asymmetric zero points (not all {mid}): "
                                "QNN rejects the fused MatMul; quantize weights symmetrically per channel")
        if op == "DequantizeLinear" and g.attr(n, "block_size"):
            z = g.zero_point(n)
            if z is None or np.any(z != 0):
                deny(n, "block-quantized DequantizeLinear with non-zero zero points runs but is WRONG on "
                        "HTP (uint8 zp 128: rel 1.45 vs the CPU EP, QNN 2.51); use signed weights, zp 0")
        if arch < BLOCK_QUANT_MIN_ARCH:
            if op == "DequantizeLinear" and g.attr(n, "block_size"):
                deny(n, f"block-quantized DequantizeLinear needs htp_arch >= {BLOCK_QUANT_MIN_ARCH} "
                        f"(target is v{arch})")
            elif op == "MatMulNBits" and n.domain == "com.microsoft":
                deny(n, f"MatMulNBits needs htp_arch >= {BLOCK_QUANT_MIN_ARCH} (target is v{arch})")
        if op == "Gather" and n.input and g.dq(n.input[0]) is None and g.type_name(n.input[0]) in _FLOATS:
            deny(n, "float (non-QDQ) Gather fails at HTP graph finalize ('could not create op: "
                    "q::Gather'); quantize the table (DequantizeLinear before Gather)")
        elif op == "Gelu" and n.input and g.dq(n.input[0]) is None:
            deny(n, "float (non-QDQ) Gelu fails at HTP graph finalize ('no properties registered "
                    "for q::QNN_Gelu'); quantize its input and output")
        elif op == "Add" and n.domain in ("", "ai.onnx") and any(g.is_zero_constant(i) for i in n.input):
            deny(n, "Add of an all-zero constant runs but is WRONG on HTP: the preparer drops it with "
                    "the requantization to its output encoding (npu.md §1); fold it away or put the "
                    "bias inside Gemm")
    return out


# --------------------------------------------------------------------------- capability

@dataclass
class CapabilityReport:
    """What the QNN HTP backend takes of a model, for one ``htp_arch``.

    ``refused`` lists each node QNN does not take (or runs wrong), from the op trace, the EP
    log and the deny-list. ``supported_nodes`` / ``total_nodes`` / ``qnn_subgraphs`` come from
    the op trace (whose node count includes DQs that ORT duplicated), else from ORT's record of
    node assignment; None when no session got that far. ``session_ok`` says whether a session
    with CPU fallback disabled could be created; ``session_error`` is its error otherwise.
    """
    htp_arch: int | None
    session_ok: bool
    session_error: str | None = None
    supported_nodes: int | None = None
    total_nodes: int | None = None
    qnn_subgraphs: int | None = None
    refused: list[Refusal] = field(default_factory=list)
    trace: dict | None = None
    log: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The whole model runs on QNN, and nothing in it is known to be wrong there."""
        return self.session_ok and not self.refused

    def refused_nodes(self) -> set[str]:
        return {r.node for r in self.refused}

    def __str__(self) -> str:
        arch = f"v{self.htp_arch}" if self.htp_arch is not None else "default arch"
        counts = (f"{self.supported_nodes}/{self.total_nodes} ONNX nodes on QNN in "
                  f"{self.qnn_subgraphs} subgraph(s)" if self.total_nodes is not None else "no placement")
        state = "session ok" if self.session_ok else f"session failed: {self.session_error}"
        return "\n".join([f"QNN HTP {arch}: {counts}; {state}", *(f"  refused {r}" for r in self.refused)])


_IO_OFFLOAD_REASONS = ("not take Q nodes that consume a graph input",
                       "not take DQ nodes that generate a graph output")


def _read_trace(trace_dir: Path) -> dict | None:
    path = trace_dir / "qnn_op_trace.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def capability(model: Model, *, htp_arch: int | None = DEFAULT_HTP_ARCH,
               probe: bool = True) -> CapabilityReport:
    """Which ONNX nodes of ``model`` QNN's HTP backend takes, and why not the others.

    The static ``deny_list`` runs first; with ``probe=False`` nothing else does (no session, so
    nothing can crash or hang). Otherwise a session with CPU fallback disabled and the EP's op
    trace (``enable_framework_op_trace``) is opened in a temp dir; its ``unsupported_nodes``
    give the refusals with reasons, and the EP log adds QNN's validation error codes. When that
    session fails in GetCapability without writing a trace (no node went to QNN at all), a
    second session with fallback allowed records ORT's node assignment to fill the counts.
    A finalize failure (Where and friends) leaves no trace: only its error text is recorded.
    Opening sessions costs seconds; no time measured here is an NPU latency.
    """
    data = _model_bytes(model)
    refused = deny_list(data, htp_arch)
    report = CapabilityReport(htp_arch=htp_arch, session_ok=False, refused=[])
    if not probe:
        report.session_error = "not probed"
        report.refused = refused
        return report
    import onnxruntime as ort
    with tempfile.TemporaryDirectory(prefix="qcompile-qnn-") as tmp:
        trace_dir = Path(tmp) / "trace"
        trace_dir.mkdir()
        so = session_options(htp_arch=htp_arch, trace_dir=trace_dir)
        with _ort_log() as lines:
            try:
                ort.InferenceSession(data, sess_options=so, enable_fallback=0)
                report.session_ok = True
            except Exception as e:
                report.session_error = str(e)
        report.log = list(lines)
        trace = _read_trace(trace_dir)
        assigned = None
        if trace is None and report.session_error and _FALLBACK_ERROR in report.session_error:
            trace, assigned, more = _fallback_probe(data, htp_arch, Path(tmp) / "probe")
            report.log += more
    report.trace = trace
    validation = _validation_in_log(report.log)
    from_trace: list[Refusal] = []
    if trace is not None:
        summary = trace.get("summary", {})
        report.supported_nodes = summary.get("supported_nodes")
        report.total_nodes = summary.get("total_onnx_nodes")
        report.qnn_subgraphs = summary.get("qnn_subgraphs")
        for u in trace.get("unsupported_nodes", []):
            reason = u.get("reason", "")
            if any(s in reason for s in _IO_OFFLOAD_REASONS):
                continue  # an artefact of the fallback probe (graph I/O Q/DQ offloaded to the CPU EP)
            name = u.get("node_name", "")
            if name in validation:
                reason = f"{reason} ({validation[name]})"
            from_trace.append(Refusal(name, u.get("op_type", ""), reason, "trace"))
    elif assigned is not None:
        qnn = [nodes for ep, nodes in assigned if ep == EP_NAME]
        report.supported_nodes = sum(len(n) for n in qnn)
        report.total_nodes = sum(len(n) for _, n in assigned)
        report.qnn_subgraphs = len(qnn)
    seen = {r.node for r in from_trace}
    from_log = [Refusal(n, op, validation.get(n, "refused by the QNN EP's GetCapability"), "log")
                for n, op in _refused_in_log(report.log) if n not in seen]
    if trace is None and assigned is not None:  # nodes the assignment put on the CPU EP, unexplained
        seen |= {r.node for r in from_log}
        from_log += [Refusal(n, op, "assigned to the CPU EP (part of a refused node unit or a lone Q/DQ)",
                             "log")
                     for ep, nodes in assigned if ep != EP_NAME for n, op in nodes if n not in seen]
    report.refused = from_trace + from_log + refused
    return report


def _fallback_probe(data: bytes, htp_arch, trace_dir: Path):
    """A session with CPU fallback allowed: (op trace or None, [(ep, [(node, op)])] or None, log)."""
    import onnxruntime as ort
    trace_dir.mkdir()
    so = session_options(htp_arch=htp_arch, fallback=True, trace_dir=trace_dir,
                         provider_options={"offload_graph_io_quantization": "0"},
                         config={"session.record_ep_graph_assignment_info": "1"})
    with _ort_log() as lines:
        try:
            s = ort.InferenceSession(data, sess_options=so, enable_fallback=0)
            assigned = [(sg.ep_name, [(n.name, n.op_type) for n in sg.get_nodes()])
                        for sg in s.get_provider_graph_assignment_info()]
        except Exception as e:
            lines.append(f"E fallback probe: {e}")
            assigned = None
    return _read_trace(trace_dir), assigned, list(lines)


# --------------------------------------------------------------------------- EPContext

def compile_context(model: Model, *, htp_arch: int | None = DEFAULT_HTP_ARCH,
                    provider_options: dict[str, str] | None = None) -> bytes:
    """Compile ``model`` ahead of time into an EPContext ONNX model (bytes) whose ``EPContext``
    node(s) embed the QNN context binary (ORT's compile API, ``ort.ModelCompiler``, with
    ``embed_compiled_data_into_model``; the same as session config ``ep.context_enable=1``,
    ``ep.context_embed_mode=1``). CPU fallback is off, so every node must go to QNN.
    """
    import onnxruntime as ort
    so = session_options(htp_arch=htp_arch, provider_options=provider_options)
    with _ort_log() as lines:
        try:
            compiler = ort.ModelCompiler(so, _model_bytes(model), embed_compiled_data_into_model=True,
                                         flags=ort.OrtCompileApiFlags.ERROR_IF_NO_NODES_COMPILED)
            ctx = compiler.compile_to_bytes()
        except Exception as e:
            raise _session_error(e, lines, "QNN context compile") from e
    info = context_info(ctx)
    if info["other_nodes"]:
        raise BackendError(f"QNN context compile left {info['other_nodes']} node(s) outside EPContext",
                           hint=_HINT_REFUSED)
    return ctx


def context_info(ctx: bytes) -> dict:
    """What an EPContext model holds, for a manifest: EPContext node count, other node count,
    embedded binary bytes, the EP's SDK version and its compatibility string (which encodes the
    QNN SDK version and the htp_arch it was prepared for)."""
    import onnx
    try:
        proto = onnx.load_from_string(bytes(ctx))
    except Exception as e:
        raise BackendError(f"not an ONNX model: {e}", hint="pass the bytes compile_context returned") from e
    ep_nodes = [n for n in proto.graph.node if n.op_type == "EPContext"]
    attrs = [{a.name: a for a in n.attribute} for n in ep_nodes]
    meta = {p.key: p.value for p in proto.metadata_props}
    return {
        "epcontext_nodes": len(ep_nodes),
        "other_nodes": len(proto.graph.node) - len(ep_nodes),
        "binary_bytes": sum(len(a["ep_cache_context"].s) for a in attrs if "ep_cache_context" in a),
        "ep_sdk_version": next((a["ep_sdk_version"].s.decode() for a in attrs if "ep_sdk_version" in a),
                               None),
        "compatibility": meta.get(f"ep_compatibility_info.{EP_NAME}"),
    }


def session_from_context(ctx: bytes, *, sha256: str | None = None, **options):
    """A QNN session from ``compile_context``'s bytes, skipping graph preparation.

    ``session.disable_model_compile=1`` makes ORT refuse to compile anything, so a model that is
    not a complete EPContext model fails instead of being prepared again. The EP does not check
    ``htp_arch`` against the one the binary was prepared for (``context_info`` records it).

    The context binary carries no checksum: a mangled header raises ``BackendError``, but a
    single flipped byte elsewhere may load unnoticed, fail at run time, or crash the process
    (one did, in QNN 2.51). Pass ``sha256`` (of ``ctx``, as recorded when it was compiled) to
    have it checked before QNN sees the bytes. Keyword options are those of ``session_options``.
    """
    ctx = bytes(ctx)
    if sha256 is not None and hashlib.sha256(ctx).hexdigest() != sha256.lower():
        raise BackendError("the EPContext model does not match its recorded SHA-256",
                           hint="recompile it with compile_context(model); never load a mismatched binary")
    info = context_info(ctx)
    if not info["epcontext_nodes"]:
        raise BackendError("the model holds no EPContext node", hint="compile it with compile_context(model)")
    config = {**(options.pop("config", None) or {}), "session.disable_model_compile": "1"}
    so = session_options(config=config, **options)
    return _create(ctx, so, "QNN context session")
