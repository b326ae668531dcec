"""The qcompile error hierarchy: every user-facing failure is a ``QCompileError``.

Messages say what was wrong, where (node, op, provenance) and what to do.
"""
from __future__ import annotations

__all__ = [
    "QCompileError", "CaptureError", "UnsupportedOpError", "VerificationError", "PassError",
    "BackendError", "ArtifactError", "ConfigError", "InputError", "QuantizationError",
    "PassConfigError",
]


class QCompileError(Exception):
    """Base class of every error qcompile raises on purpose."""

    def __init__(self, message: str, *, node=None, hint: str | None = None):
        self.node = node
        self.hint = hint
        parts = [message]
        if node is not None:
            parts.append(f"  at {node.describe()}")
        if hint:
            parts.append(f"  hint: {hint}")
        super().__init__("\n".join(parts))


class CaptureError(QCompileError):
    """The model could not be captured into the IR (export/trace/ONNX parse failed)."""


class UnsupportedOpError(CaptureError):
    """The model uses an operator outside qcompile's op set."""


class VerificationError(QCompileError):
    """A graph is malformed: bad types, shapes, order or annotations."""


class PassError(QCompileError):
    """A pass failed; the message names the pass and those that ran before it."""


class BackendError(QCompileError):
    """A backend cannot lower or run a (sub)graph."""


class ArtifactError(QCompileError):
    """A saved artifact is missing, corrupt, tampered with or from another version."""


class ConfigError(QCompileError):
    """A configuration, target or option given by the user is invalid."""


class InputError(QCompileError):
    """Run-time inputs do not match what the compiled model expects."""


class QuantizationError(QCompileError):
    """A tensor cannot be quantized as asked: non-finite values under the ``raise`` policy,
    parameters that do not fit the tensor, codes out of range, a corrupt packed buffer."""


class PassConfigError(PassError, ConfigError):
    """A pass refused the configuration it was given (an infeasible budget, conflicting
    overrides): a ``PassError`` naming the pass and a ``ConfigError`` saying what to change."""
