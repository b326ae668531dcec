"""Shape functions in canonical order: the same stores in any order give one function, and a
store still comes after the stores whose slots it reads."""
from __future__ import annotations

import itertools

import pytest

tvm = pytest.importorskip("tvm")

from qcompile.backends.tvm._shape_func import stable_shape_funcs  # noqa: E402


def _module(order):
    from tvm import tirx
    H = tirx.decl_buffer((6,), "int64", name="H")
    i = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    load = lambda s: tirx.BufferLoad(H, [i(s)])  # noqa: E731
    stores = {3: tirx.BufferStore(H, i(40) * load(0), [i(3)]),
              1: tirx.BufferStore(H, i(512) * load(0), [i(1)]),
              2: tirx.BufferStore(H, load(5) * i(256), [i(2)]),  # reads slot 5, written below
              5: tirx.BufferStore(H, load(0) + load(4), [i(5)])}
    f = tirx.PrimFunc([H], tirx.SeqStmt([stores[s] for s in order]))
    return tvm.IRModule({"shape_func": f, "other": f})


def test_every_valid_order_becomes_one():
    outs = set()
    for order in itertools.permutations([1, 2, 3, 5]):
        if order.index(5) > order.index(2):
            continue  # VMShapeLower only emits orders that respect the data flow
        mod = stable_shape_funcs()(_module(order))
        text = mod["shape_func"].script()
        outs.add(text)
        assert mod["other"].script() == _module(order)["other"].script()  # not a shape_func
    assert len(outs) == 1
    lines = [ln.strip() for ln in outs.pop().splitlines() if ln.strip().startswith("H[")]
    assert [ln.split("]")[0] for ln in lines] == ["H[T.int64(1)", "H[T.int64(3)",
                                                  "H[T.int64(5)", "H[T.int64(2)"]
