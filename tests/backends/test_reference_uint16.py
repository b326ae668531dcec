"""Target ``reference`` with 16-bit integer activations: ``activations="uint16"`` per tensor is
calibrated asymmetric (a stored int32 zero point), the compiled model is the interpreter bit for
bit and computes Jacob et al. (2018) eq. 1 with the calibrated parameters, and the artifact
round-trips."""
from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.config import QuantConfig
from qcompile.interpreter import Interpreter


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("act", ["uint16", "int16"])
def test_mlp_is_the_interpreter_and_eq1(tmp_path, act):
    model = _mlp()
    cal = [(torch.randn(32, 8) * 2,) for _ in range(2)]
    cfg = QuantConfig(weights="int8", group_size=None, activations=act,
                      activation_granularity="per_tensor")
    cm = qcompile.compile(model, "reference", example_inputs=cal[0], config=cfg,
                          calibration=cal)
    g = cm.graph
    first = next(n for n in g.nodes if n.op == "identity")
    spec = first.outputs[0].quant
    assert spec.format == act and spec.granularity.value == "per_tensor"
    s = g.constants[spec.scale]
    lo = torch.stack([c[0].min() for c in cal]).min()  # fp32, as the format computes
    hi = torch.stack([c[0].max() for c in cal]).max()
    if act == "uint16":  # asymmetric: s = (max − min) / 65535, z = −round(min / s) (eq. 1)
        z = g.constants[spec.zero_point]
        assert z.dtype == torch.int32 and s.dtype == torch.float32
        assert torch.equal(s, (hi - lo) / 65535)
        assert int(z) == -int(torch.round(lo / s)) and 0 < int(z) < 65535
        qmin, qmax, zf = 0, 65535, float(z)
    else:  # symmetric: s = max|x| / 32767, no zero point
        assert spec.zero_point is None
        assert torch.equal(s, torch.maximum(hi, -lo) / 32767)
        qmin, qmax, zf = -32768, 32767, 0.0
    x = torch.randn(32, 8) * 3  # reaches past the calibrated range: saturates
    y = cm(x)
    assert torch.equal(y, Interpreter(g).run(x)[0])
    # the first linear reads r = s·(clamp(round(x/s) + z, qmin, qmax) − z)
    xh = (torch.clamp(torch.round(x / s) + zf, qmin, qmax) - zf) * s
    assert torch.equal(spec.fake_quant(x, g.constants), xh)
    back = qcompile.load(cm.save(tmp_path / "a"))
    assert back.graph.value(first.outputs[0].name).quant == spec
    assert torch.equal(back(x), y)
