"""qcompile: a compiler stack for quantized neural networks.

``qcompile.compile(model, target, example_inputs=...)`` captures a torch or ONNX model into
the IR, runs passes and lowers it for a target; ``qcompile.load(dir)`` reads a saved artifact.
"""
__version__ = "0.1.0"

from qcompile import formats  # noqa: E402
from qcompile.api import capture, compile  # noqa: E402
from qcompile.config import Budget, QuantConfig  # noqa: E402
from qcompile.errors import (  # noqa: E402
    ArtifactError,
    BackendError,
    CaptureError,
    ConfigError,
    InputError,
    PassError,
    QCompileError,
    QuantizationError,
    UnsupportedOpError,
    VerificationError,
)
from qcompile.ir import Graph, TensorType, verify  # noqa: E402
from qcompile.llm import CompiledLLM, compile_llm  # noqa: E402
from qcompile.runtime import CompiledModel, load  # noqa: E402


def targets() -> list[str]:
    """Names accepted as ``target``."""
    from qcompile.backends import all_targets
    return all_targets()


__all__ = [
    "__version__", "compile", "compile_llm", "capture", "load", "targets", "CompiledModel",
    "CompiledLLM", "Graph",
    "TensorType", "verify", "QCompileError", "CaptureError", "UnsupportedOpError",
    "VerificationError", "PassError", "BackendError", "ArtifactError", "ConfigError", "InputError",
    "QuantizationError", "formats", "QuantConfig", "Budget",
]
