"""Deterministic VM shape functions.

Relax's ``VMShapeLower`` writes the stores of a shape function (``H[slot] = expr`` on the
shape heap) in an order that changes from process to process — it walks a pointer-keyed map —
so two builds of one model with symbolic sizes could differ in ``model.so`` (measured: 4
variants of the MLP's ``shape_func`` in 16 builds). :func:`stable_shape_funcs` runs after the
Relax pipeline and puts those stores in one canonical order: a store after the stores whose
slots it reads, otherwise by slot. A shape function of any other form is left as it is.
"""
from __future__ import annotations

import re

__all__ = ["stable_shape_funcs"]


def _canonical(func):
    """``func``'s body with its stores in canonical order, or None (unchanged / other form)."""
    from tvm import tirx
    body = func.body
    if not isinstance(body, tirx.SeqStmt):
        return None
    stmts = list(body.seq)
    if len(stmts) < 2 or not all(isinstance(s, tirx.BufferStore) and len(s.indices) == 1
                                 and isinstance(s.indices[0], tirx.IntImm) for s in stmts):
        return None
    buf = stmts[0].buffer
    if any(not s.buffer.same_as(buf) for s in stmts):
        return None
    writes = [int(s.indices[0].value) for s in stmts]
    if len(set(writes)) != len(writes):
        return None
    load = re.compile(rf"(?<![\w.]){re.escape(buf.name)}\[T\.int64\((\d+)\)\]")
    reads = []
    for s in stmts:
        text = str(s.value)
        found = load.findall(text)
        if len(found) != text.count(f"{buf.name}["):  # a load this pattern does not read
            return None
        reads.append({int(i) for i in found})
    slot_of = {w: i for i, w in enumerate(writes)}
    deps = [{slot_of[r] for r in rs if r in slot_of} - {i} for i, rs in enumerate(reads)]
    order, done = [], set()
    while len(order) < len(stmts):
        ready = [i for i in range(len(stmts)) if i not in done and deps[i] <= done]
        if not ready:  # a cycle cannot come from VMShapeLower; leave the function alone
            return None
        i = min(ready, key=lambda j: writes[j])
        order.append(i)
        done.add(i)
    if order == list(range(len(stmts))):
        return None
    return tirx.SeqStmt([stmts[i] for i in order])


def stable_shape_funcs():
    """A module pass: every ``shape_func*`` PrimFunc's stores in canonical order."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="StableShapeFuncs")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("shape_func"):
                body = _canonical(func)
                if body is not None:
                    mod.update_func(gv, func.with_body(body))
        return mod
    return _pass
