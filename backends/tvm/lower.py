"""Lower a qcompile IR ``Graph`` to a Relax ``IRModule``.

One Relax function ``main(*graph inputs, *params)``: every IR node becomes a Relax op
(``qcompile.backends.tvm.ops``) or a call of a hand-scheduled TIR kernel
(``qcompile.backends.tvm.kernels``); symbolic sizes (``batch``) become int64 TIR variables,
so one build serves every batch size. Constants are parameters, not literals: the compiled
library stays small and ``params`` (numpy arrays, in argument order) are bound at run time.
Quantization annotations on activations become fake quantization with the interpreter's
exact arithmetic; annotated weights are stored dequantized already (their fake quantization
is the identity), unless a quantized kernel consumes their codes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import sympy
import torch

from qcompile.errors import BackendError
from qcompile.ir.graph import Graph, Value
from qcompile.ir.registry import get_schema
from qcompile.ir.types import dim_expr

__all__ = ["Lowering", "lower_graph", "LOWERINGS", "register_lowering"]

#: op name -> emitter(lowering, node, inputs) -> relax expression
LOWERINGS: dict[str, Callable] = {}
#: small constants are embedded in the module rather than passed as parameters
_INLINE_NUMEL = 16


def register_lowering(*ops: str):
    def deco(fn):
        for o in ops:
            LOWERINGS[o] = fn
        return fn
    return deco


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: widen (the value is exact)
        t = t.float()
    return t.numpy()


@dataclass
class Lowering:
    """State of one lowering: the block builder, symbolic sizes, values and parameters."""

    graph: Graph
    info: Any = None  # CpuInfo for the cpu target, None for cuda
    kernels: bool = True  # use the hand-scheduled kernels where they apply
    #: tried before the quantized kernels on a linear with a constant annotated weight:
    #: ``hook(L, node, x, bias, k, n)`` -> Relax expression, or None to go on as usual
    #: (target ``lut`` puts low-bit linears on its kernels this way)
    linear_hook: Callable | None = None
    bb: Any = None
    symbols: dict[str, Any] = field(default_factory=dict)
    values: dict[int, Any] = field(default_factory=dict)
    params: list[np.ndarray] = field(default_factory=list)
    param_vars: list[Any] = field(default_factory=list)
    #: constants consumed as packed kernel operands (not passed whole)
    consumed: set[str] = field(default_factory=set)
    #: counts of how each linear was lowered, for reports and tests
    report: dict[str, int] = field(default_factory=dict)
    #: readers of every value (the graph does not change while it is lowered)
    users: dict = field(default_factory=dict)
    #: nodes a kernel computed already (a fused activation or residual add): id -> expr
    absorbed: dict[int, Any] = field(default_factory=dict)
    #: kernel builders' results by their arguments (one PrimFunc per distinct shape)
    kernel_cache: dict = field(default_factory=dict)

    # -- sizes -----------------------------------------------------------------------------
    def prim(self, d):
        """A TIR expression (int64) for a dimension (int or symbolic)."""
        from tvm import tirx
        if isinstance(d, int):
            return tirx.IntImm("int64", d)
        return self._sym(dim_expr(d))

    def _sym(self, e: sympy.Expr):
        from tvm import tirx
        if e.is_Integer:
            return tirx.IntImm("int64", int(e))
        if e.is_Symbol:
            if e.name not in self.symbols:
                self.symbols[e.name] = tirx.Var(e.name, "int64")
            return self.symbols[e.name]
        if e.is_Add:
            out = self._sym(e.args[0])
            for a in e.args[1:]:
                out = out + self._sym(a)
            return out
        if e.is_Mul:
            num = [a for a in e.args if not (a.is_Pow and a.exp == -1) and not a.is_Rational
                   or a.is_Integer]
            den = [a.base for a in e.args if a.is_Pow and a.exp == -1]
            rat = [a for a in e.args if a.is_Rational and not a.is_Integer]
            out = tirx.IntImm("int64", 1)
            for a in num:
                out = out * self._sym(a)
            for r in rat:
                out = out * int(r.p)
                den.append(sympy.Integer(r.q))
            for b in den:
                out = tirx.floordiv(out, self._sym(b))
            return out
        if isinstance(e, sympy.floor):
            inner = e.args[0]
            n, d = sympy.fraction(sympy.together(inner))
            return tirx.floordiv(self._sym(sympy.expand(n)), self._sym(d))
        if isinstance(e, sympy.ceiling):
            n, d = sympy.fraction(sympy.together(e.args[0]))
            return tirx.floordiv(self._sym(sympy.expand(n)) + self._sym(d) - 1, self._sym(d))
        if isinstance(e, sympy.Mod):
            return tirx.floormod(self._sym(e.args[0]), self._sym(e.args[1]))
        if isinstance(e, sympy.Max):
            out = self._sym(e.args[0])
            for a in e.args[1:]:
                out = tirx.max(out, self._sym(a))
            return out
        if isinstance(e, sympy.Min):
            out = self._sym(e.args[0])
            for a in e.args[1:]:
                out = tirx.min(out, self._sym(a))
            return out
        raise BackendError(f"the TVM backend cannot express the symbolic size {e}",
                                 hint="capture with static shapes for this model")

    def shape(self, v: Value) -> list:
        return [self.prim(d) for d in v.type.shape]

    # -- values ------------------------------------------------------------------------------
    def const(self, value, dtype: str):
        from tvm import relax
        return relax.const(np.asarray(value, dtype=dtype), dtype)

    def constant(self, v: Value):
        """A graph constant as a Relax parameter (or an inline literal when tiny)."""
        from tvm import relax
        if id(v) in self.values:
            return self.values[id(v)]
        t = self.graph.constants[v.name]
        arr = _np(t)
        if arr.size <= _INLINE_NUMEL:
            e = relax.const(arr, str(arr.dtype))
        else:
            e = self.add_param(v.name, arr)
        if t.dtype == torch.bfloat16:
            e = self.bb.emit(relax.op.astype(e, "bfloat16"))
        self.values[id(v)] = e
        return e

    def add_param(self, name: str, arr: np.ndarray):
        """A run-time parameter of ``main`` holding ``arr`` (packed kernel operands too)."""
        from tvm import relax
        var = relax.Var(f"p{len(self.params)}_{name}"[:60],
                        relax.TensorType([int(s) for s in arr.shape], str(arr.dtype)))
        self.params.append(np.ascontiguousarray(arr))
        self.param_vars.append(var)
        return var

    def get(self, v: Value | None):
        if v is None:
            return None
        if id(v) in self.values:
            return self.values[id(v)]
        if self.graph.is_constant(v):
            return self.constant(v)
        raise KeyError(v.name)

    def emit(self, expr):
        return self.bb.emit(expr)

    def absorb(self, node, expr) -> None:
        """``node`` was fused into the kernel that produced ``expr``: it lowers to ``expr``."""
        self.absorbed[id(node)] = expr

    def emit_te(self, fn, *args, name: str = "f", **kw):
        return self.bb.emit_te(fn, *args, primfunc_name_hint=name, **kw)

    def call_kernel(self, func, args: list, out: Value, name: str):
        """``call_tir`` of a hand-scheduled PrimFunc; marked opaque so FuseOps leaves it."""
        from tvm import relax
        if func.attrs is not None and "global_symbol" in func.attrs:
            func = func.without_attr("global_symbol")  # the builder names (and dedups) it
        func = _with_root_block(func)
        func = func.with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True)
        gv = self.bb.add_func(func, name)
        return self.bb.emit(relax.call_tir(gv, args, relax.TensorType(self.shape(out), out.dtype)))

    def dtype(self, e) -> str:
        """The dtype of a Relax expression (normalised first when it is not yet typed)."""
        return dtype_of(e if isinstance(e, _relax().Var) or hasattr(e, "ty") and e.ty is not None
                        else self.bb.normalize(e))

    def kernel(self, builder, *args, **kw):
        """``builder(*args, **kw)``, built once per distinct arguments."""
        key = (builder.__module__, builder.__name__, tuple(str(a) for a in args),
               tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in self.kernel_cache:
            self.kernel_cache[key] = builder(*args, **kw)
        return self.kernel_cache[key]

    def cast(self, e, dtype: str):
        """``e`` as ``dtype`` (unchanged when it already is)."""
        from tvm import relax
        if dtype_of(e) == dtype:
            return e
        if dtype == "bool":  # torch: nonzero is True
            return relax.op.not_equal(e, self.const(0, dtype_of(e)))
        return relax.op.astype(e, dtype)


def _with_root_block(func):
    """``func`` with its body under a root block, as Relax's passes expect of every PrimFunc
    (RewriteDataflowReshape asserts it of any one-input one-output function)."""
    from tvm import s_tir
    if isinstance(func.body, s_tir.SBlockRealize):
        return func
    root = s_tir.SBlock([], [], [], "root", func.body)
    return func.with_body(s_tir.SBlockRealize([], True, root))


def _relax():
    from tvm import relax
    return relax


def dtype_of(e) -> str:
    """The dtype of a Relax tensor expression."""
    return str(e.ty.dtype)


def lower_graph(graph: Graph, info=None, *, kernels: bool = True, name: str = "main",
                linear_hook: Callable | None = None):
    """The Relax module of ``graph``, its parameters (numpy, in ``main``'s argument order after
    the graph inputs) and the lowering (for its report); ``linear_hook``: see
    :attr:`Lowering.linear_hook`."""
    from tvm import relax

    from qcompile.backends.tvm import ops  # noqa: F401  (registers the lowerings)
    from qcompile.backends.tvm.quantize import fake_quant

    L = Lowering(graph, info, kernels, linear_hook=linear_hook)
    L.bb = relax.BlockBuilder()
    L.users = graph.users()
    inputs = [relax.Var(v.name, relax.TensorType(L.shape(v), v.dtype)) for v in graph.inputs]
    for v, var in zip(graph.inputs, inputs):
        L.values[id(v)] = var
    holder = []

    def body():
        for v, x in zip(graph.inputs, inputs):
            if v.quant is not None:
                L.values[id(v)] = fake_quant(L, v, x)
        for node in graph.nodes:
            if id(node) in L.absorbed:
                e = L.absorbed[id(node)]
                v = node.outputs[0]
                L.values[id(v)] = fake_quant(L, v, e) if v.quant is not None else e
                continue
            fn = LOWERINGS.get(node.op)
            if fn is None:
                raise BackendError(f"the TVM backend has no lowering for op {node.op!r}",
                                         node=node, hint="run this model on target 'reference', "
                                                         "or report the op")
            # a linear's / conv's constant weight is fetched by its lowering: kernels pack it
            args = [None if v is None or (node.op in ("linear", "conv") and i == 1
                                          and graph.is_constant(v))
                    else L.get(v) for i, v in enumerate(node.inputs)]
            want = get_schema(node.op).inputs
            if not any(i.startswith("*") for i in want):  # absent optional inputs are None
                args += [None] * (len(want) - len(args))
            out = fn(L, node, args)
            outs = [out] if len(node.outputs) == 1 else list(out)
            for v, e in zip(node.outputs, outs):
                if isinstance(e, relax.Expr) and not isinstance(e, relax.Var):
                    e = L.emit(e)
                if v.quant is not None and v.dtype in ("float32", "float16", "bfloat16"):
                    e = fake_quant(L, v, e)
                L.values[id(v)] = e
        res = [L.get(v) for v in graph.outputs]
        holder.append(res)

    # parameters are only known once the body is built: give them at the function's end
    with L.bb.function(name):
        with L.bb.dataflow():
            body()
            res = holder[0]
            out = L.bb.emit_output(relax.Tuple(res) if len(res) != 1 else res[0])
        L.bb.emit_func_output(out, params=inputs + L.param_vars)
    return L.bb.finalize(), L.params, L
