"""The ONNX backend: targets ``onnx`` (ONNX Runtime's CPU execution provider) and ``npu``
(Qualcomm's QNN HTP through ONNX Runtime, ``npu``).

``export`` writes the quantized IR graph as QDQ ONNX (opset 21); the executable of target
``onnx`` is an ONNX Runtime session on that file, and its artifact is the plain ``.onnx`` file
any ONNX Runtime (or OpenVINO) opens. Target ``npu`` lives in :mod:`.npu`.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from qcompile.backends.base import Backend, register_backend
from qcompile.errors import ArtifactError, BackendError, ConfigError
from qcompile.ir.graph import Graph

from .export import OPSET, Exported, check_exportable, export

__all__ = ["OnnxBackend", "OnnxExecutable", "export", "Exported", "MODEL_FILE", "ORIGIN_FILE",
           "OPSET", "ort_session", "check_exportable"]

MODEL_FILE, ORIGIN_FILE = "model.onnx", "onnx_nodes.json"


def _require_ort():
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"target 'onnx' runs on ONNX Runtime ({e})",
                          hint="pip install 'qcompile[onnx]'") from None


def ort_session(model_bytes: bytes, *, threads: int | None = None):
    """An ONNX Runtime CPU-EP session on ``model_bytes`` (all graph optimisations on)."""
    _require_ort()
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # ORT fuses a block-quantized DQ → MatMul into MatMulNBits at accuracy level 4 by default,
    # which quantizes the activations to int8 on the fly; level 0 keeps them fp32, so the
    # session computes what the file (and the interpreter) says
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model_bytes, sess_options=so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise BackendError(f"ONNX Runtime could not load the exported model: {e}",
                           hint="please report this with the model") from None


class OnnxExecutable:
    """A callable running the exported model on ONNX Runtime: torch tensors in and out."""

    def __init__(self, graph: Graph, target: str, model_bytes: bytes, origin: dict[str, str],
                 session=None):
        self.graph = graph
        self.target = target
        self.model_bytes = model_bytes
        self.origin = dict(origin)
        self._session = session
        self.isa = None  # ONNX Runtime picks its kernels at run time

    @property
    def session(self):
        if self._session is None:
            self._session = ort_session(self.model_bytes)
        return self._session

    @property
    def model(self):
        import onnx
        return onnx.load_from_string(self.model_bytes)

    def feeds(self, inputs) -> dict[str, np.ndarray]:
        from qcompile.interpreter import bind_inputs
        tensors, _ = bind_inputs(self.graph, inputs)
        out = {}
        for v, t in zip(self.graph.inputs, tensors):
            t = t.detach().cpu().contiguous()
            out[v.name] = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        return out

    def __call__(self, *inputs):
        res = self.session.run(None, self.feeds(inputs))
        return [torch.from_numpy(np.ascontiguousarray(r)) for r in res]

    def files(self) -> dict[str, bytes]:
        origin = json.dumps({"onnx_nodes": self.origin}, indent=1, sort_keys=True) + "\n"
        return {MODEL_FILE: self.model_bytes, ORIGIN_FILE: origin.encode()}


def _read_origin(files: dict[str, bytes]) -> dict[str, str]:
    try:
        return dict(json.loads(files[ORIGIN_FILE])["onnx_nodes"])
    except (KeyError, ValueError, TypeError) as e:
        raise ArtifactError(f"{ORIGIN_FILE} is missing or corrupt ({e})",
                            hint="rebuild the artifact") from None


class OnnxBackend(Backend):
    """Target ``onnx``: the graph exported as QDQ ONNX, run by ONNX Runtime's CPU EP."""

    name = "onnx"
    #: ``onnx:qdq`` writes weight-only int4 as DequantizeLinear + MatMul instead of MatMulNBits
    targets = ("onnx", "onnx:qdq")
    versioned = ("onnx", "onnxruntime")

    def supports(self, node) -> bool:
        from .export import _OPS
        return node.op in _OPS

    def cost(self, node, device, env=None) -> float:
        raise NotImplementedError("target 'onnx' has no cost model yet")

    def lower(self, graph: Graph, target: str, *, weight_only_int4: str | None = None):
        _require_ort()
        if weight_only_int4 is None:
            weight_only_int4 = "qdq" if target == "onnx:qdq" else "matmulnbits"
        ex = export(graph, target=target, weight_only_int4=weight_only_int4)
        data = ex.model.SerializeToString()
        return OnnxExecutable(graph, target, data, ex.origin)

    def artifacts(self, executable: OnnxExecutable) -> dict[str, bytes]:
        return executable.files()

    def load(self, graph: Graph, target: str, files: dict[str, bytes]):
        if MODEL_FILE not in files:
            raise ArtifactError(f"the artifact has no {MODEL_FILE}", hint="rebuild it")
        return OnnxExecutable(graph, target, files[MODEL_FILE], _read_origin(files))


register_backend(OnnxBackend())

from . import npu as _npu  # noqa: E402,F401  (registers npu, npu:v68 … npu:v81)
