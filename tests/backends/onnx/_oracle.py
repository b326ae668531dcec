"""The export oracle: every quantized activation of an exported model against the interpreter.

Comparing only final outputs cannot hold a tight bound: ONNX Runtime and torch sum in
different orders, so a pre-quantization value within a float rounding error of a rounding
boundary may land on the neighbouring code (one step), and the flip then travels through
every later layer. So the interpreter is *teacher-forced*: it runs node by node from the
inputs, and at each quantized activation it records its own codes, then continues from ONNX
Runtime's codes (exposed as extra graph outputs). Each activation then sees the same inputs
in both runs and differs only by the float error of the op that produced it, δ ≤ γ_K·Σ|x||w|
(Higham §3.1) plus the int32 bias rounding ≤ s_x·s_w/2; a code can therefore differ by at most
one step, and only where |x/s − (k + ½)| < δ/s, a small fraction of elements. The float output
of the last op is then compared within a float tolerance.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch

from qcompile.backends.onnx import ort_session
from qcompile.backends.onnx.export import _QDQ_TYPES, export
from qcompile.interpreter import bind_inputs
from qcompile.ir.quant import Granularity
from qcompile.ir.registry import get_schema


def _codes(spec, t, consts):
    s = consts[spec.scale].float()
    z = consts[spec.zero_point].float() if spec.zero_point else \
        (0.0 if spec.fmt.signed else float(1 << (spec.fmt.bits - 1)))
    qmin, qmax = spec.fmt.qrange
    return torch.clamp(torch.round(t / s) + z, qmin, qmax).to(torch.int64), s, z


def forced_compare(graph, inputs, **export_kw):
    """(per-activation code differences {name: (max |Δcode|, fraction differing)}, ORT's
    final outputs, the teacher-forced interpreter's final outputs)."""
    ex = export(graph, **export_kw)
    model = ex.model
    probes = {}
    for v in [o for n in graph.nodes for o in n.outputs] + list(graph.inputs):
        spec = v.quant
        if spec is None or spec.dynamic or spec.granularity != Granularity.PER_TENSOR \
                or v.name not in ex.codes:
            continue
        elem = getattr(onnx.TensorProto, _QDQ_TYPES[(spec.fmt.bits, spec.fmt.signed)])
        model.graph.output.append(onnx.helper.make_tensor_value_info(ex.codes[v.name], elem, None))
        probes[v.name] = len(model.graph.output) - 1
    sess = ort_session(model.SerializeToString())
    tensors, env = bind_inputs(graph, inputs)
    feeds = {v.name: t.numpy() for v, t in zip(graph.inputs, tensors)}
    res = sess.run(None, feeds)
    consts = dict(graph.constants)
    vals = {}
    diffs = {}

    def produce(v, t):
        spec = v.quant
        if spec is not None and t.is_floating_point():
            if v.name in probes:
                mine, s, z = _codes(spec, t, consts)
                theirs = torch.from_numpy(res[probes[v.name]].astype(np.int64))
                d = (mine - theirs).abs()
                diffs[v.name] = (int(d.max()) if d.numel() else 0, float((d > 0).float().mean()))
                return (theirs.float() - z) * s
            return spec.fake_quant(t, consts)
        return t

    for v, t in zip(graph.inputs, tensors):
        vals[id(v)] = produce(v, t)
    for name, t in consts.items():
        v = graph.constant_value(name)
        vals[id(v)] = spec_fq(v, t, consts)
    for node in graph.nodes:
        outs = get_schema(node.op).run([None if v is None else vals[id(v)] for v in node.inputs],
                                       node.attrs, env)
        for v, t in zip(node.outputs, outs):
            vals[id(v)] = produce(v, t)
    ours = [vals[id(v)] for v in graph.outputs]
    theirs = [torch.from_numpy(np.asarray(r)) for r in res[:len(graph.outputs)]]
    return diffs, theirs, ours


def spec_fq(v, t, consts):
    return v.quant.fake_quant(t, consts) if v.quant is not None and t.is_floating_point() else t
