"""calibrate: streaming statistics equal the same statistics computed in one batch."""
from __future__ import annotations

import pytest
import torch

from qcompile.errors import ConfigError, InputError
from qcompile.passes.calibrate import collect_statistics, linear_inputs


def test_streaming_equals_batch(mlp_graph):
    data = [torch.randn(5, 8) * (i + 1) for i in range(3)]
    cal = collect_statistics(mlp_graph, data, hessian=True, reservoir=7, progress=False)
    assert cal.samples == 3 and set(cal.stats) == {"x", "act"}
    x = torch.cat(data).double()
    st = cal["x"]
    assert st.rows == 15
    assert torch.equal(st.absmax, x.abs().amax(0))
    torch.testing.assert_close(st.absmean, x.abs().mean(0))
    torch.testing.assert_close(st.hessian(), 2 * x.T @ x / 15)
    assert st.min == float(x.min()) and st.max == float(x.max())
    assert st.sample.shape == (7, 8)  # bounded reservoir of real rows
    rows = {tuple(r.tolist()) for r in x.float()}
    assert all(tuple(r.tolist()) in rows for r in st.sample)
    h = torch.relu(torch.nn.functional.linear(x.float(), mlp_graph.constants["w1"],
                                              mlp_graph.constants["b1"]))
    torch.testing.assert_close(cal["act"].absmax.float(), h.abs().amax(0))


def test_linear_inputs_and_dict_samples(ln_block):
    assert [v.name for v in linear_inputs(ln_block)] == ["ln"]
    cal = collect_statistics(ln_block, [{"x": torch.randn(2, 16, 32)}], progress=False)
    assert cal["ln"].rows == 32 and cal["ln"].xtx is None


def test_bad_calibration_sets(mlp_graph):
    with pytest.raises(ConfigError, match="empty"):
        collect_statistics(mlp_graph, [], progress=False)
    with pytest.raises(ConfigError, match="needs calibration data"):
        collect_statistics(mlp_graph, None, progress=False)
    with pytest.raises(InputError, match="calibration sample 1"):
        collect_statistics(mlp_graph, [torch.randn(2, 8), torch.randn(2, 9)], progress=False)
    with pytest.raises(InputError, match="lacks input"):
        collect_statistics(mlp_graph, [{"y": torch.randn(2, 8)}], progress=False)
