"""The op registry: one ``OpSchema`` per op with its inputs, attributes, type inference and
torch reference kernel. Ops are registered with the ``@op`` decorator (see ``qcompile.ir.ops``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from qcompile.errors import UnsupportedOpError, VerificationError
from qcompile.ir.types import TensorType, eval_dim, make_dim

__all__ = ["Attr", "OpSchema", "op", "get_schema", "all_ops", "REQUIRED"]

REQUIRED = object()

# kinds of attribute; "dim"/"dims" may hold symbolic expressions evaluated at run time
_KINDS = {"int", "float", "bool", "str", "ints", "floats", "dim", "dims", "dtype", "any"}


@dataclass(frozen=True)
class Attr:
    kind: str
    default: Any = REQUIRED
    optional: bool = False  # None is allowed

    def __post_init__(self):
        assert self.kind in _KINDS, self.kind

    def check(self, value: Any, op: str, name: str, where: str) -> Any:
        if value is None:
            if self.optional or self.default is None:
                return None
            raise VerificationError(f"attribute '{name}' of {op} ({where}) must not be None")
        k = self.kind
        ok = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": lambda v: isinstance(v, bool),
            "str": lambda v: isinstance(v, str),
            "dtype": lambda v: isinstance(v, str),
            "ints": lambda v: isinstance(v, (list, tuple)) and all(isinstance(i, int) for i in v),
            "floats": lambda v: isinstance(v, (list, tuple)),
            "dim": lambda v: isinstance(v, (int, str)) and not isinstance(v, bool),
            "dims": lambda v: isinstance(v, (list, tuple)) and all(
                isinstance(i, (int, str)) and not isinstance(i, bool) for i in v),
            "any": lambda v: True,
        }[k](value)
        if not ok:
            raise VerificationError(f"attribute '{name}' of {op} ({where}) should be {k}, "
                                    f"got {value!r}")
        if k == "float":
            return float(value)
        if k in ("ints", "floats"):
            return [float(v) for v in value] if k == "floats" else list(value)
        if k == "dims":
            return [make_dim(v) for v in value]
        if k == "dim":
            return make_dim(value)
        return value


@dataclass
class OpSchema:
    """What an op takes and how it computes.

    ``inputs`` are names; ``name?`` marks an optional input (may be ``None``) and a leading
    ``*`` a variadic tail. ``infer(types, attrs)`` returns the output type(s);
    ``kernel(*tensors, **attrs)`` is the torch reference.
    """

    name: str
    inputs: tuple
    attrs: dict
    infer: Callable
    kernel: Callable
    doc: str = ""
    num_outputs: int = 1
    dim_attrs: tuple = field(default=(), init=False)

    def __post_init__(self):
        self.dim_attrs = tuple(k for k, a in self.attrs.items() if a.kind in ("dim", "dims"))

    @property
    def variadic(self) -> bool:
        return bool(self.inputs) and self.inputs[-1].startswith("*")

    def check_arity(self, n: int, where: str) -> None:
        required = sum(1 for i in self.inputs if not i.endswith("?") and not i.startswith("*"))
        if n < required or (not self.variadic and n > len(self.inputs)):
            raise VerificationError(f"{self.name} takes inputs ({', '.join(self.inputs)}), "
                                    f"got {n} at {where}")

    def normalize_attrs(self, attrs: dict, where: str) -> dict:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise VerificationError(f"{self.name} ({where}) has no attribute(s) "
                                    f"{sorted(unknown)}; it takes {sorted(self.attrs)}")
        out = {}
        for k, spec in self.attrs.items():
            if k in attrs:
                out[k] = spec.check(attrs[k], self.name, k, where)
            elif spec.default is REQUIRED:
                raise VerificationError(f"{self.name} ({where}) needs attribute '{k}'")
            else:
                out[k] = spec.default
        return out

    def infer_types(self, node) -> list[TensorType]:
        self.check_arity(len(node.inputs), node.describe())
        for i, v in enumerate(node.inputs):
            if v is None and not self._optional(i):
                raise VerificationError(f"input {i} of {self.name} is required", node=node)
        types = [v.type if v is not None else None for v in node.inputs]
        if not self.variadic:  # omitted trailing optional inputs read as None
            types += [None] * (len(self.inputs) - len(types))
        try:
            out = self.infer(types, node.attrs)
        except VerificationError as e:
            if e.node is None:
                raise VerificationError(str(e), node=node) from None
            raise
        except Exception as e:  # a shape rule rejected the inputs
            raise VerificationError(f"type inference of {self.name} failed for inputs "
                                    f"{[str(t) for t in types]}: {e}", node=node) from e
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def _optional(self, i: int) -> bool:
        if i >= len(self.inputs):
            return False
        return self.inputs[i].endswith("?")

    def run(self, tensors: Sequence[torch.Tensor | None], attrs: Mapping[str, Any],
            env: Mapping[str, int]) -> list[torch.Tensor]:
        if self.dim_attrs:
            attrs = dict(attrs)
            for k in self.dim_attrs:
                v = attrs[k]
                if isinstance(v, list):
                    attrs[k] = [eval_dim(d, env) for d in v]
                elif v is not None:
                    attrs[k] = eval_dim(v, env)
        if not self.variadic and len(tensors) < len(self.inputs):  # omitted optional inputs
            tensors = list(tensors) + [None] * (len(self.inputs) - len(tensors))
        out = self.kernel(*tensors, **attrs)
        return list(out) if isinstance(out, (list, tuple)) else [out]


_REGISTRY: dict[str, OpSchema] = {}


def op(name: str, *, inputs: Sequence[str], infer: Callable, attrs: Mapping[str, Attr] | None = None,
       num_outputs: int = 1):
    """Register the decorated function as the reference kernel of op ``name``."""
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"op {name} registered twice")
        _REGISTRY[name] = OpSchema(name, tuple(inputs), dict(attrs or {}), infer, fn,
                                   (fn.__doc__ or "").strip(), num_outputs)
        return fn
    return deco


def get_schema(name: str) -> OpSchema:
    from qcompile.ir import ops  # noqa: F401  (registers the op set)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnsupportedOpError(f"'{name}' is not an op of the qcompile IR",
                                 hint="see qcompile.ir.all_ops() for the op set") from None


def all_ops() -> list[str]:
    from qcompile.ir import ops  # noqa: F401
    return sorted(_REGISTRY)


