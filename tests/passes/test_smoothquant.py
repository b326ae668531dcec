"""smoothquant: float equivalence; balanced maxima at α = 0.5; outliers help W8A8."""
from __future__ import annotations

import pytest
import torch

from qcompile.config import QuantConfig
from qcompile.errors import PassError
from qcompile.interpreter import Interpreter
from qcompile.passes import run_passes
from qcompile.passes.calibrate import collect_statistics
from qcompile.passes.pipeline import quantize_graph


def test_float_equivalence_and_balance(ln_block, ln_inputs):
    (x,) = ln_inputs[0]
    ref = Interpreter(ln_block).run(x)[0]
    g = ln_block.clone()
    opts = {"calibrate": {"data": ln_inputs, "progress": False}, "smoothquant": {"alpha": 0.5}}
    # the post-LN norm also feeds the residual, which gets the unsmoothed values back
    g = run_passes(g, ["calibrate", "smoothquant"], options=opts)
    assert g.meta["smoothquant"] == {"smoothed": ["ln"], "skipped": []}
    assert "mul" in g.op_histogram()
    torch.testing.assert_close(Interpreter(g).run(x)[0], ref, rtol=1e-5, atol=1e-5)
    # at α = 0.5 the activation and weight maxima of every channel are equal (SmoothQuant §4)
    lin = [n for n in g.nodes if n.op == "linear"]
    xs = collect_statistics(g, ln_inputs, values=[lin[0].inputs[0].name], progress=False)
    x_max = xs[lin[0].inputs[0].name].absmax
    w_max = torch.stack([g.constants[n.inputs[1].name].abs().amax(0) for n in lin]).amax(0)
    torch.testing.assert_close(x_max.float(), w_max.float(), rtol=1e-4, atol=1e-6)


def test_needs_calibration(ln_block):
    with pytest.raises(PassError, match="calibrate"):
        run_passes(ln_block.clone(), ["smoothquant"])


def test_w8a8_error_drops_with_outliers(ln_block, ln_inputs):
    (x,) = ln_inputs[0]
    ref = Interpreter(ln_block).run(x)[0]
    errs = {}
    for alpha in (None, 0.5):
        cfg = QuantConfig(weights="int8", group_size=None, activations="int8",
                          activation_granularity="per_tensor", smoothquant=alpha)
        g, _ = quantize_graph(ln_block.clone(), cfg, ln_inputs, progress=False)
        errs[alpha] = float((Interpreter(g).run(x)[0] - ref).norm() / ref.norm())
    assert errs[0.5] < 0.7 * errs[None], errs
