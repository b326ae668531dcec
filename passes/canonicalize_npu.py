"""canonicalize_npu: rewrite a float graph so that every op can run quantized on a QNN HTP NPU.

Why (the NPU notes, npu.md §1, §3, §4, measured with onnxruntime-qnn on the HTP simulator):

- **Finite masks.** SDPA exports build the attention mask as ``where(m, 0, -inf)``; MinMax
  calibration of -inf gives a NaN scale, and MiniLM's naive u16 QDQ model came out at token
  cosine 0.556. A large negative ``mask_value`` replaces every value ≤ -1e4 (-inf,
  ``finfo.min``) of a float constant or ``full`` whose every use flows, through
  mask-building ops, into a softmax or an attention mask; bool attention masks become the
  additive mask ``(1 - m) · mask_value``. -50 is the value the measured MiniLM runs used
  (fp32 graph unchanged, rel 0.0000; u16/u8 QDQ on QNN token cosine 0.999): after softmax
  a masked key weighs exp(-50 + Δ) ≈ 2e-22·e^Δ, Δ being how far its score exceeds the
  row's largest unmasked one, far below one uint16 step (2^-16 ≈ 1.5e-5) of a [0, 1]
  probability; yet the mask's [-50, 0] range costs only 7.6e-4 per uint16 step. Rows
  masked entirely average their values instead of giving NaN (-inf) or 0 (guarded, or
  torch's bool-mask SDPA).
- **NaN guards.** ``where(isnan(s), 0, s)`` after a softmax whose input is provably finite
  (the analysis below) is ``s``: dropped.
- **No where.** QNN HTP graph finalize rejects ElementWiseSelect ("could not create op:
  q::Select.exe") for u8, u16 and fp32 alike, with or without CPU fallback, so a model with
  one ``where`` gets no session at all. ``where(c, a, b)`` with float branches becomes the
  arithmetic select ``cast(c)·a + (1 - cast(c))·b`` (``cast(c)·a`` when b is 0,
  ``(1 - cast(c))·b`` when a is 0). That is exact in fp32 when a and b are finite
  (x·1 + y·0 = x); the shorter ``b + c·(a - b)`` is not (b + (a - b) ≠ a after rounding).
  A ``where`` with a non-float result or a branch that may be infinite stays, and is listed
  in the report so that placement can put it on the CPU.
- **Erf → GELU.** The QNN EP rejects ``Erf``; the HTP has a fused Gelu. The exact GELU of
  Hendrycks & Gimpel (2016, §2), x·Φ(x) = 0.5·x·(1 + erf(x/√2)), in any operand order (x/√2
  or x·(1/√2), the 0.5 on either product), becomes ``gelu(x)``; their tanh approximation
  0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) becomes ``gelu(x, approximate="tanh")``.
- **Neutral elements.** The HTP graph preparer drops ``ElementWiseAdd(x, all-zero
  constant)`` and with it the requantization to the Add's output encoding: outputs came
  back on the input's grid, 78% relative error on a MatMul+Add+Relu with a zero bias.
  ``add(x, 0)``, ``sub(x, 0)``, ``mul(x, 1)``, ``div(x, 1)`` and float ``identity`` are
  folded where the result has x's shape and dtype, carries no quantization annotation and
  is not a graph output.

A value is *provably finite* when finite graph inputs cannot make it ±inf or NaN: its cone
holds no non-finite constant and no op that can create one from finite operands (exp, log,
sqrt, rsqrt, reciprocal, pow by a non-natural exponent, division by a non-constant or by
zero, attention with a bool mask, which gives NaN for a row masked entirely).

Requires: a verified float graph, before calibration. Guarantees: a verified graph; same
outputs on finite inputs, exactly for the select, guard and neutral-element rewrites,
within fp32 rounding for GELU, and up to exp(mask_value + Δ) for finite masks.
``graph.meta["canonicalize_npu"]`` holds a ``NpuCanonReport``: counts per rewrite and the
``where``/``erf`` nodes left in place, with why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from qcompile.errors import ConfigError
from qcompile.ir.graph import Graph, Node, Provenance, Value
from qcompile.ir.types import is_float, to_torch_dtype
from qcompile.passes.manager import register_pass

__all__ = ["canonicalize_npu", "NpuCanonReport", "Refusal", "MASK_THRESHOLD"]

#: float values at or below this, used as an additive mask, are "minus infinity"
MASK_THRESHOLD = -1e4
#: ops a mask passes through on its way to a softmax (value -> output, elementwise/shape)
_MASK_OPS = {"add", "sub", "mul", "where", "expand", "reshape", "permute", "cast", "slice",
             "select", "concat", "tile", "minimum", "maximum", "clamp", "identity", "tril",
             "triu", "index", "take", "gather", "pad"}
#: ops that can turn finite operands into ±inf or NaN
_NONFINITE_OPS = {"exp", "log", "sqrt", "rsqrt", "reciprocal", "var"}


@dataclass
class Refusal:
    """A node the pass left in place, and why; placement should keep it off the NPU."""

    node: str
    op: str
    reason: str
    provenance: Provenance

    def __str__(self) -> str:
        return f"{self.op} node '{self.node}' ({self.provenance}): {self.reason}"


@dataclass
class NpuCanonReport:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("finite_mask", "bool_mask", "nan_guard", "where", "gelu", "neutral"), 0))
    refused: list[Refusal] = field(default_factory=list)


class _Rewriter:
    def __init__(self, g: Graph, mask_value: float):
        self.g, self.mask_value = g, mask_value
        self.report = NpuCanonReport()
        self._cast: dict[tuple, Value] = {}
        self._not: dict[tuple, Value] = {}
        self.refresh()

    def refresh(self) -> None:
        self.users = self.g.users()
        self.outputs = {id(v) for v in self.g.outputs}

    # -- queries ----------------------------------------------------------------------
    def scalar(self, v: Value | None) -> float | None:
        """The number a constant holds in every element, else None."""
        if v is None or not self.g.is_constant(v):
            return None
        t = self.g.constants[v.name].reshape(-1)
        if t.numel() == 0 or t.dtype == torch.bool or not bool((t == t[0]).all()):
            return None
        return float(t[0])

    def is_scalar(self, v: Value | None, want: float, rtol: float = 1e-6) -> bool:
        s = self.scalar(v)
        return s is not None and math.isclose(s, want, rel_tol=rtol, abs_tol=0.0)

    def private(self, v: Value) -> bool:
        return len(self.users.get(v, [])) == 1 and id(v) not in self.outputs

    def only_user(self, v: Value, op: str) -> Node | None:
        us = self.users.get(v, [])
        return us[0] if self.private(v) and us[0].op == op else None

    def finite_values(self) -> set[int]:
        """ids of the values that are finite whenever the graph inputs are."""
        g = self.g
        fin = {id(v) for v in g.inputs}
        for name, t in g.constants.items():
            if not t.is_floating_point() or _all_finite(t):
                fin.add(id(g.constant_value(name)))
        for n in g.nodes:
            ok = all(v is None or id(v) in fin for v in n.inputs)
            if n.op in _NONFINITE_OPS or n.op == "full" and not math.isfinite(n.attrs["value"]):
                ok = False
            elif n.op in ("div", "remainder"):
                d = g.constants[n.inputs[1].name] if g.is_constant(n.inputs[1]) else None
                ok = ok and d is not None and bool((d != 0).all())
            elif n.op == "pow":
                e = self.scalar(n.inputs[1])
                ok = ok and e is not None and e >= 0 and e == int(e)
            elif n.op == "attention":
                ok = ok and (_mask_of(n) is None or _mask_of(n).dtype != "bool")
            if ok:
                fin.update(id(o) for o in n.outputs)
        return fin

    # -- building ---------------------------------------------------------------------
    def add(self, op: str, *inputs, at: Node, **attrs) -> Value:
        return self.g.add_node(op, inputs, attrs, name=f"{at.name}_{op}", before=at,
                               provenance=at.provenance).output

    def const(self, name: str, value: float, dtype: str) -> Value:
        return self.g.add_constant(name, torch.tensor(value, dtype=to_torch_dtype(dtype)))

    def cast(self, c: Value, dtype: str, at: Node) -> Value:
        """cast(c, dtype), one per condition (CSE: the six layers of a BERT share one)."""
        key = (id(c), dtype)
        if key not in self._cast:
            self._cast[key] = self.add("cast", c, at=at, dtype=dtype)
        return self._cast[key]

    def not_(self, c: Value, dtype: str, at: Node) -> Value:
        """1 - cast(c, dtype), one per condition."""
        key = (id(c), dtype)
        if key not in self._not:
            cf = self.cast(c, dtype, at)
            one = self.const("npu_one", 1.0, dtype)
            self._not[key] = self.add("sub", one, cf, at=at)
        return self._not[key]

    def select(self, c: Value, a: Value, b: Value, dtype: str, at: Node) -> Value:
        """where(c, a, b) as arithmetic, for finite a and b."""
        za, zb = self.scalar(a) == 0.0, self.scalar(b) == 0.0
        if zb:
            return self.add("mul", self.cast(c, dtype, at), a, at=at)
        if za:
            return self.add("mul", self.not_(c, dtype, at), b, at=at)
        return self.add("add", self.add("mul", self.cast(c, dtype, at), a, at=at),
                        self.add("mul", self.not_(c, dtype, at), b, at=at), at=at)

    def refuse(self, n: Node, reason: str) -> None:
        self.report.refused.append(Refusal(n.name, n.op, reason, n.provenance))


def _all_finite(t: torch.Tensor) -> bool:
    # a finite sum proves it cheaply (inf/NaN propagate); an overflowing one gets the full check
    return t.numel() == 0 or math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _mask_of(n: Node) -> Value | None:
    return n.inputs[3] if len(n.inputs) > 3 else None


def _substitute(g: Graph, subst: dict[int, Value]) -> None:
    """Make every reader of a replaced value read its replacement (following chains)."""
    def res(v):
        while v is not None and id(v) in subst:
            v = subst[id(v)]
        return v
    for n in g.nodes:
        n.inputs = [res(v) for v in n.inputs]
    g.outputs = [res(v) for v in g.outputs]


# -- 1. finite masks --------------------------------------------------------------------
def _feeds_softmax(r: _Rewriter, v: Value, memo: dict[int, bool]) -> bool:
    """Every use of v reaches a softmax or an attention mask through mask-building ops."""
    if id(v) in memo:
        return memo[id(v)]
    memo[id(v)] = False  # (a DAG has no cycles; this only guards re-entry)
    users = r.users.get(v, [])
    ok = bool(users) and id(v) not in r.outputs
    for u in users:
        if not ok:
            break
        if u.op == "softmax" or u.op == "attention" and _mask_of(u) is v and v not in u.inputs[:3]:
            continue
        ok = (u.op in _MASK_OPS and not (u.op == "sub" and u.inputs[1] is v)
              and not (u.op == "where" and u.inputs[0] is v)
              and all(_feeds_softmax(r, o, memo) for o in u.outputs))
    memo[id(v)] = ok
    return ok


def _finite_masks(r: _Rewriter) -> None:
    g, memo, mv = r.g, {}, r.mask_value
    for name, t in list(g.constants.items()):
        if t.is_floating_point() and t.numel() and float(t.amin()) <= MASK_THRESHOLD \
                and _feeds_softmax(r, g.constant_value(name), memo):
            g.constants[name] = torch.where(t <= MASK_THRESHOLD, torch.tensor(mv, dtype=t.dtype), t)
            r.report.counts["finite_mask"] += 1
    for n in g.nodes:
        value = n.attrs.get("value") if n.op == "full" else None
        if isinstance(value, (int, float)) and is_float(n.attrs["dtype"]) \
                and value <= MASK_THRESHOLD and _feeds_softmax(r, n.output, memo):
            n.attrs["value"] = mv
            r.report.counts["finite_mask"] += 1
    additive: dict[tuple, Value] = {}
    for n in list(g.nodes):  # bool attention masks -> additive, (1 - m) * mask_value
        m = _mask_of(n) if n.op == "attention" else None
        if m is not None and m.dtype == "bool":
            key = (id(m), n.inputs[0].dtype)
            if key not in additive:
                neg = r.const("npu_mask_value", mv, key[1])
                additive[key] = r.add("mul", r.not_(m, key[1], n), neg, at=n)
            n.inputs[3] = additive[key]
            r.report.counts["bool_mask"] += 1
    r.refresh()


# -- 2. erf / tanh -> gelu --------------------------------------------------------------
def _cube_of(r: _Rewriter, v: Value) -> Value | None:
    p = v.producer
    if p is None or not r.private(v):
        return None
    if p.op == "pow" and r.is_scalar(p.inputs[1], 3.0):
        return p.inputs[0]
    if p.op == "mul":
        for x, sq in (p.inputs, p.inputs[::-1]):
            s = sq.producer
            if s is not None and s.op == "mul" and s.inputs == [x, x] and r.private(sq):
                return x
    return None


def _gelu_input(r: _Rewriter, act: Node) -> tuple[Value, str] | None:
    """x when act is erf(x/√2) or tanh(√(2/π)·(x + 0.044715·x³))."""
    u = act.inputs[0]
    p = u.producer
    if p is None or not r.private(u):
        return None
    if act.op == "erf":
        if p.op == "div" and r.is_scalar(p.inputs[1], math.sqrt(2)):
            return p.inputs[0], "none"
        for x, k in (p.inputs, p.inputs[::-1]) if p.op == "mul" else ():
            if r.is_scalar(k, math.sqrt(0.5)):
                return x, "none"
        return None
    for w, k in (p.inputs, p.inputs[::-1]) if p.op == "mul" else ():
        if not r.is_scalar(k, math.sqrt(2 / math.pi)) or w.producer is None \
                or w.producer.op != "add" or not r.private(w):
            continue
        for x, term in (w.producer.inputs, w.producer.inputs[::-1]):
            t = term.producer
            if t is None or t.op != "mul" or not r.private(term):
                continue
            for c, cube in (t.inputs, t.inputs[::-1]):
                if r.is_scalar(c, 0.044715, 1e-5) and _cube_of(r, cube) is x:
                    return x, "tanh"
    return None


def _half(r: _Rewriter, n: Node | None, v: Value) -> bool:
    """n computes 0.5·v (or v/2)."""
    if n is None:
        return False
    if n.op == "mul":
        return v in n.inputs and any(r.is_scalar(k, 0.5) for k in n.inputs if k is not v)
    return n.op == "div" and n.inputs[0] is v and r.is_scalar(n.inputs[1], 2.0)


def _gelu_match(r: _Rewriter, act: Node) -> Node | None:
    """The last node of 0.5·x·(1 + act(..x..)), in any association and operand order."""
    hit = _gelu_input(r, act)
    if hit is None:
        return None
    x, _ = hit
    plus = r.only_user(act.output, "add")
    if plus is None or not any(r.is_scalar(k, 1.0) for k in plus.inputs if k is not act.output):
        return None
    m1 = r.only_user(plus.output, "mul")
    if m1 is None:
        return None
    other = m1.inputs[1] if m1.inputs[0] is plus.output else m1.inputs[0]
    us = r.users.get(m1.output, [])
    nxt = us[0] if r.private(m1.output) else None
    if other is x:  # (x·p)·0.5
        return nxt if _half(r, nxt, m1.output) else None
    if r.is_scalar(other, 0.5):  # (0.5·p)·x
        return nxt if nxt is not None and nxt.op == "mul" and x in nxt.inputs \
            and m1.output in nxt.inputs else None
    h = other.producer  # (0.5·x)·p
    if h is not None and x in h.inputs and _half(r, h, x) and r.private(other):
        return m1
    return None


def _gelus(r: _Rewriter) -> None:
    subst: dict[int, Value] = {}
    for n in list(r.g.nodes):
        if n.op not in ("erf", "tanh"):
            continue
        last = _gelu_match(r, n)
        if last is None:
            if n.op == "erf":
                r.refuse(n, "erf outside the GELU pattern 0.5·x·(1 + erf(x/√2)); QNN has no Erf")
            continue
        x, approximate = _gelu_input(r, n)
        new = r.g.add_node("gelu", [x], {"approximate": approximate}, name=f"{last.name}_gelu",
                           before=last, provenance=last.provenance).output
        if new.type.same_as(last.output.type) and last.output.quant is None:
            subst[id(last.output)] = new
            r.report.counts["gelu"] += 1
    _substitute(r.g, subst)
    r.refresh()


# -- 3. NaN guards and where ------------------------------------------------------------
def _is_nan_guard(r: _Rewriter, n: Node, finite: set[int]) -> Value | None:
    """s when n is where(isnan(s), 0, s) with s = softmax(finite)."""
    c, zero, s = n.inputs
    p = c.producer
    isnan = p is not None and p.op == "ne" and p.inputs[0] is s and p.inputs[1] is s
    soft = s.producer is not None and s.producer.op == "softmax" \
        and id(s.producer.inputs[0]) in finite
    if isnan and soft and r.scalar(zero) == 0.0 and s.type.same_as(n.output.type):
        return s
    return None


def _wheres(r: _Rewriter) -> None:
    subst: dict[int, Value] = {}
    finite = r.finite_values()
    for n in list(r.g.nodes):
        if n.op != "where":
            continue
        out = n.output
        s = _is_nan_guard(r, n, finite)
        if s is not None:
            subst[id(out)] = s
            r.report.counts["nan_guard"] += 1
            continue
        c, a, b = n.inputs
        if not is_float(out.dtype):
            r.refuse(n, f"{out.dtype} result: no arithmetic select")
            continue
        bad = [f"'{v.name}'" for v in (a, b) if id(v) not in finite]
        if bad or c.dtype != "bool":
            r.refuse(n, f"branch {', '.join(bad)} may be ±inf/NaN, where cast(c)·a would give "
                     "NaN" if bad else f"{c.dtype} condition")
            continue
        new = r.select(c, a, b, out.dtype, n)
        if not new.type.same_as(out.type):  # a zero branch broadcast the result: general form
            new = r.add("add", r.add("mul", r.cast(c, out.dtype, n), a, at=n),
                        r.add("mul", r.not_(c, out.dtype, n), b, at=n), at=n)
        if not new.type.same_as(out.type):
            r.refuse(n, f"arithmetic select gives {new.type}, not {out.type}")
            continue
        new.quant = out.quant
        subst[id(out)] = new
        r.report.counts["where"] += 1
    _substitute(r.g, subst)
    r.refresh()


# -- 4. neutral elements ----------------------------------------------------------------
def _neutral_operand(r: _Rewriter, n: Node) -> Value | None:
    ins = n.inputs
    if n.op == "add":
        return ins[0] if r.scalar(ins[1]) == 0.0 else ins[1] if r.scalar(ins[0]) == 0.0 else None
    if n.op == "mul":
        return ins[0] if r.scalar(ins[1]) == 1.0 else ins[1] if r.scalar(ins[0]) == 1.0 else None
    if n.op == "sub" and r.scalar(ins[1]) == 0.0:
        return ins[0]
    if n.op == "div" and n.attrs["rounding_mode"] is None and r.scalar(ins[1]) == 1.0:
        return ins[0]
    return ins[0] if n.op == "identity" and is_float(ins[0].dtype) else None


def _neutrals(r: _Rewriter) -> None:
    subst: dict[int, Value] = {}
    for n in r.g.nodes:
        out = n.outputs[0]
        if out.quant is not None or id(out) in r.outputs:
            continue
        x = _neutral_operand(r, n)
        if x is not None and x.type.same_as(out.type):  # no broadcast, no promotion
            subst[id(out)] = x
            r.report.counts["neutral"] += 1
    _substitute(r.g, subst)


@register_pass("canonicalize_npu")
def canonicalize_npu(graph: Graph, *, mask_value: float = -50.0) -> Graph:
    """Finite masks, no NaN guards, no ``where``, erf→gelu, no neutral elements (see module)."""
    if not (math.isfinite(mask_value) and MASK_THRESHOLD < mask_value < 0):
        raise ConfigError(f"canonicalize_npu: mask_value {mask_value!r} must be finite and in "
                          f"({MASK_THRESHOLD:g}, 0)", hint="-50 is what was measured to work "
                          "with uint16 activations (exp(-50) ≈ 2e-22)")
    r = _Rewriter(graph.clone(), float(mask_value))
    _finite_masks(r)
    _gelus(r)
    _wheres(r)
    _neutrals(r)
    r.g.remove_dead()
    alive = {n.name for n in r.g.nodes}
    r.report.refused = [x for x in r.report.refused if x.node in alive]
    r.g.meta["canonicalize_npu"] = r.report
    return r.g
