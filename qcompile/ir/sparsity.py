"""How a constant (a linear's weight) is sparse: the fraction of zeros a pass made, the
method that chose them and the pattern (``unstructured`` or ``N:M``). Backends read it to pick
sparse kernels; the verifier checks the tensor really has that many zeros."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SparsitySpec", "PATTERNS"]

PATTERNS = ("unstructured", "2:4")


@dataclass(frozen=True)
class SparsitySpec:
    """``zeros`` of the tensor's ``numel`` elements are zero (``ratio = zeros / numel``), chosen
    by ``method`` (``"magnitude"`` or ``"wanda"``) in ``pattern``."""

    zeros: int
    numel: int
    method: str
    pattern: str = "unstructured"

    @property
    def ratio(self) -> float:
        return self.zeros / max(self.numel, 1)

    def __str__(self) -> str:
        return f"sparse({self.ratio:.2f} {self.method} {self.pattern})"

    def to_json(self) -> dict:
        return {"zeros": self.zeros, "numel": self.numel, "method": self.method,
                "pattern": self.pattern}

    @staticmethod
    def from_json(d: dict) -> "SparsitySpec":
        return SparsitySpec(int(d["zeros"]), int(d["numel"]), str(d["method"]),
                            str(d.get("pattern", "unstructured")))
