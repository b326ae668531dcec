"""Every op of the IR's op table lowers to TVM for ``cpu`` and matches the interpreter (fp32
within 1e-5), at two batch sizes where a dimension is symbolic."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from ir.test_registry import CASES, B, _one_node_graph  # noqa: E402  (the shared op table)

from qcompile.backends.tvm import TVMExecutable, build  # noqa: E402
from qcompile.interpreter import Interpreter  # noqa: E402


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_the_interpreter(case):
    g, _ = _one_node_graph(case)
    ex, params, _ = build(g, "cpu")
    run = TVMExecutable(g, "cpu", ex, params)
    for batch in case.batches:
        env = {} if batch is None else {B: batch}
        gen = torch.Generator().manual_seed(1234 + (batch or 0))
        xs = [i.sample(env, gen) for i in case.inputs if i is not None]
        ref = Interpreter(g).run(*xs)[0]
        out = run(*xs)[0]
        assert out.dtype == ref.dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_every_registered_op_has_a_lowering():
    from qcompile.backends.tvm.lower import LOWERINGS
    from qcompile.ir import all_ops
    missing = sorted(set(all_ops()) - set(LOWERINGS))
    assert not missing, missing
