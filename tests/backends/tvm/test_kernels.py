"""The fused attention, row-norm and activation kernels against torch: ragged sizes (rows not a
multiple of the row block, widths not a multiple of the vector), every mask kind, GQA, causal,
symbolic batch, and the AVX2 and generic builds."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

tvm = pytest.importorskip("tvm")

from qcompile.backends.tvm.kernels.attention import attention  # noqa: E402
from qcompile.backends.tvm.kernels.elementwise import activation  # noqa: E402
from qcompile.backends.tvm.kernels.norms import layer_norm, rms_norm  # noqa: E402
from qcompile.backends.tvm.target import cpu_target, host_cpu  # noqa: E402

TARGETS = {"host": cpu_target(), "avx2": cpu_target("haswell"), "generic": cpu_target("x86-64")}


def _run(func, target, *arrays, out_shape):
    rt = tvm.compile(func.with_attr("global_symbol", "main"), target=target)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    rt(*args, out)
    return torch.from_numpy(out.numpy())


@pytest.mark.parametrize("which", ["host", "avx2"])
@pytest.mark.parametrize("mask,causal,heads,kvh,sq,sk", [
    (None, False, 4, 4, 9, 19), ("bool", False, 4, 2, 13, 16), ("float", True, 2, 1, 6, 6),
    ("bool", True, 3, 3, 5, 33)])
def test_attention(which, mask, causal, heads, kvh, sq, sk):
    target = TARGETS[which]
    info = host_cpu(target)
    gen = torch.Generator().manual_seed(sq * sk)
    b, d, dv = 2, 12, 20
    q = torch.randn(b, heads, sq, d, generator=gen)
    k = torch.randn(b, kvh, sk, d, generator=gen)
    v = torch.randn(b, kvh, sk, dv, generator=gen)
    m = None
    if mask == "bool":
        m = torch.rand(b, 1, 1, sk, generator=gen) > 0.3
        m[..., 0] = True  # no fully masked row
    elif mask == "float":
        m = torch.randn(b, 1, sq, sk, generator=gen)
    if causal and m is not None and mask == "bool":
        m = m | torch.eye(sq, sk, dtype=torch.bool)[None, None]  # keep each row's diagonal
    tri = torch.ones(sq, sk, dtype=torch.bool).tril()  # torch's causal: top-left aligned
    full = m
    if causal:  # torch takes a mask or is_causal, not both: fold the causal part in
        full = tri if m is None else (m & tri if m.dtype == torch.bool
                                      else m.masked_fill(~tri, float("-inf")))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=full, enable_gqa=kvh != heads)
    func = attention(tvm.tirx.Var("bh", "int64"), sq, sk, d, dv, heads=heads, kv_heads=kvh,
                     mask=mask, mask_heads=1, mask_rows=1 if m is None else m.shape[2],
                     causal=causal, info=info)
    args = [q.reshape(b * heads, sq, d), k.reshape(b * kvh, sk, d), v.reshape(b * kvh, sk, dv)]
    if m is not None:
        args.append(m.reshape(b, m.shape[2], sk).numpy())
    out = _run(func, target, *[a if isinstance(a, np.ndarray) else a.numpy() for a in args],
               out_shape=(b * heads, sq, dv))
    torch.testing.assert_close(out.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", list(TARGETS))
@pytest.mark.parametrize("n", [7, 48, 384])
def test_norms(which, n):
    target = TARGETS[which]
    info = host_cpu(target)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(11, n, generator=gen) * 3 + 1
    g, b = torch.rand(n, generator=gen) + 0.5, torch.randn(n, generator=gen)
    m = tvm.tirx.Var("m", "int64")
    out = _run(layer_norm(m, n, eps=1e-12, weight=True, bias=True, info=info), target,
               x.numpy(), g.numpy(), b.numpy(), out_shape=(11, n))
    torch.testing.assert_close(out, F.layer_norm(x, (n,), g, b, 1e-12), rtol=1e-5, atol=1e-5)
    out = _run(layer_norm(11, n, eps=1e-5, weight=False, bias=False, info=info), target,
               x.numpy(), out_shape=(11, n))
    torch.testing.assert_close(out, F.layer_norm(x, (n,), eps=1e-5), rtol=1e-5, atol=1e-5)
    out = _run(rms_norm(m, n, eps=1e-6, weight=True, info=info), target, x.numpy(), g.numpy(),
               out_shape=(11, n))
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,ref", [("gelu", F.gelu), ("silu", F.silu), ("relu", F.relu),
                                      ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"))])
def test_activation(kind, ref):
    x = torch.linspace(-12, 12, 5 * 37).reshape(5, 37)
    info = host_cpu(TARGETS["host"])
    out = _run(activation(tvm.tirx.Var("m", "int64"), 37, kind=kind, info=info), TARGETS["host"],
               x.numpy(), out_shape=(5, 37))
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=2e-6)
    with pytest.raises(ValueError, match="unknown activation"):
        activation(4, 4, kind="swish", info=info)


@pytest.mark.parametrize("size,width,transpose", [(40, 40, False), (40, 80, True), (12, 24, False),
                                                  (384, 384, False), (1536, 1536, True),
                                                  (64, 128, False)])
def test_hadamard(size, width, transpose):
    from qcompile.backends.tvm.kernels.hadamard import hadamard
    from qcompile.hadamard import base_order, fwht, hadamard_matrix
    kf, _ = base_order(size)
    x = torch.randn(3, width)
    target = TARGETS["host"]
    args = [x.numpy()] + ([hadamard_matrix(kf).numpy().astype(np.float32)] if kf > 1 else [])
    out = _run(hadamard(tvm.tirx.Var("m", "int64"), width, size, transpose=transpose,
                        info=host_cpu(target)), target, *args, out_shape=(3, width))
    torch.testing.assert_close(out, fwht(x, size, transpose=transpose), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,padding,dilation,k,bias", [
    ((1, 1), (1, 1), (1, 1), 3, True), ((2, 1), (0, 2), (1, 2), 3, False), ((1, 1), (0, 0), (1, 1), 1, True)])
def test_conv_as_im2col_dense(stride, padding, dilation, k, bias):
    from qcompile.backends.tvm import TVMExecutable, build
    from qcompile.interpreter import Interpreter
    from qcompile.ir import Graph, TensorType
    gen = torch.Generator().manual_seed(k)
    g = Graph("conv")
    x = g.add_input("x", TensorType(("batch", 5, 9, 11), "float32"))
    w = g.add_constant("w", torch.randn(7, 5, k, k, generator=gen))
    b = g.add_constant("b", torch.randn(7, generator=gen)) if bias else None
    g.outputs = [g.add("conv", x, w, b, stride=list(stride), padding=list(padding),
                       dilation=list(dilation), groups=1)]
    ex, params, low = build(g, "cpu")
    assert low.report == {"conv.im2col_dense": 1}
    xs = torch.randn(3, 5, 9, 11, generator=gen)
    out = TVMExecutable(g, "cpu", ex, params)(xs)[0]
    torch.testing.assert_close(out, Interpreter(g).run(xs)[0], rtol=1e-5, atol=1e-5)
