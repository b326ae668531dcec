"""The fused attention, row-norm, activation and Hadamard kernels against float64 torch: ragged
sizes (rows not a multiple of the row block, widths not a multiple of the vector), every mask
kind, GQA, causal, symbolic batch, once per instruction-set level this host supports
(``isa_level``: AVX-512, AVX2, the portable 128-bit build). Bounds are derived from each
kernel's arithmetic (:mod:`._bounds`), elementwise."""
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

from ._bounds import U32, assert_within, gamma  # noqa: E402

#: the vectorised ``exp`` (Cephes expf): its documented peak relative error 2.3e-7 on
#: [-87.3, 88], rounded up for the polynomial evaluated with or without FMA
EXP_ERR = 4e-7


def _run(func, target, *arrays, out_shape):
    rt = tvm.compile(func.with_attr("global_symbol", "main"), target=target)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    rt(*args, out)
    return torch.from_numpy(out.numpy())


def _attention_bound(q, k, v, full, scale):
    """``o = Σ_j p_j·v_j``, ``p = softmax(s)``, ``s_j = scale·q·k_j (+ mask)``: each score is a
    d-term dot, scaled, the mask added (γ_{d+2}·(scale·Σ|q||k_j| + |mask_j|)); ``e_j = exp(s_j −
    max)`` adds the subtraction's rounding (u·|s_j − max|, absolute in the exponent) and ``exp``'s
    own error, so each ``e_j`` is off by a relative η ≤ 2·max_j Δs_j + u·|s_j − max| + EXP_ERR.
    A relative η on every weight moves ``Σ e_j v_j / Σ e_j`` by at most 2η·Σ p_j|v_j|; the two
    sk-term sums and the division add (2γ_{sk} + u)·Σ p_j|v_j|. First order in u (×1.01)."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = scale * (q @ k.transpose(-1, -2))
    ds = gamma(q.shape[-1] + 2) * scale * (q.abs() @ k.abs().transpose(-1, -2))
    if full is not None and full.dtype != torch.bool:
        ds = ds + gamma(2) * full.double().abs()
        s = s + full.double()
    if full is not None and full.dtype == torch.bool:
        s = s.masked_fill(~full, float("-inf"))
    p = torch.softmax(s, -1)
    live = p > 0
    ds = torch.where(live, ds, 0)
    spread = torch.where(live, (s - s.amax(-1, keepdim=True)).abs(), 0)
    eta = 2 * ds.amax(-1, keepdim=True) + U32 * spread.amax(-1, keepdim=True) + EXP_ERR
    sk = k.shape[-2]
    return 1.01 * (2 * eta + 2 * gamma(sk) + U32) * (p @ v.abs())


@pytest.mark.parametrize("mask,causal,heads,kvh,sq,sk", [
    (None, False, 4, 4, 9, 19), ("bool", False, 4, 2, 13, 16), ("float", True, 2, 1, 6, 6),
    ("bool", True, 3, 3, 5, 33)])
def test_attention(isa_level, mask, causal, heads, kvh, sq, sk):
    target = cpu_target()
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
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                         attn_mask=full if full is None or full.dtype == torch.bool
                                         else full.double(), enable_gqa=kvh != heads)
    func = attention(tvm.tirx.Var("bh", "int64"), sq, sk, d, dv, heads=heads, kv_heads=kvh,
                     mask=mask, mask_heads=1, mask_rows=1 if m is None else m.shape[2],
                     causal=causal, info=info)
    args = [q.reshape(b * heads, sq, d), k.reshape(b * kvh, sk, d), v.reshape(b * kvh, sk, dv)]
    if m is not None:
        args.append(m.reshape(b, m.shape[2], sk).numpy())
    out = _run(func, target, *[a if isinstance(a, np.ndarray) else a.numpy() for a in args],
               out_shape=(b * heads, sq, dv))
    bound = _attention_bound(q, k, v, full, 1 / d ** 0.5)
    assert_within(out.reshape(ref.shape), ref, bound, f"attention {mask} causal={causal}")


def _layer_norm_bound(x, g, b, eps):
    """LayerNorm as the kernel computes it: ``μ = Σx/n`` (|Δμ| ≤ γ_{n+1}·mean|x|), ``d = x − μ``
    (|Δd| ≤ δ = |Δμ| + u|d|), ``var = Σd²/n`` (|Δvar| ≤ (Σ 2|d|δ + γ_{n+1}·Σd²)/n), ``inv =
    1/√(var + eps)`` (relative ρ = |Δvar|/(2(var + eps)) + 3u: the add, the square root, the
    division), ``y = d·inv·g + b`` (three roundings): |Δy| ≤ |g|·inv·(δ + |d|·ρ) + 3u·(|y| + |b|).
    First order in u (×1.01)."""
    x = x.double()
    n = x.shape[-1]
    mu = x.mean(-1, keepdim=True)
    d = x - mu
    var = (d * d).mean(-1, keepdim=True)
    inv = 1 / torch.sqrt(var + eps)
    dmu = gamma(n + 1) * x.abs().mean(-1, keepdim=True)
    delta = dmu + U32 * d.abs()
    dvar = (2 * d.abs() * delta).mean(-1, keepdim=True) + gamma(n + 1) * var
    rho = dvar / (2 * (var + eps)) + 3 * U32
    g = torch.ones(n, dtype=torch.float64) if g is None else g.double().abs()
    b = torch.zeros(n, dtype=torch.float64) if b is None else b.double().abs()
    return 1.01 * (g * inv * (delta + d.abs() * rho) + 3 * U32 * ((d * inv).abs() * g + b))


def _rms_norm_bound(x, g, eps):
    """RMSNorm: ``ms = Σx²/n`` (relative γ_{n+2}: the squares, the sum, the division), ``inv``
    relative ρ = γ_{n+2}/2 + 3u, ``y = x·inv·g`` two more roundings. First order in u (×1.01)."""
    x = x.double()
    inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    rho = gamma(x.shape[-1] + 2) / 2 + 3 * U32
    return 1.01 * (x.abs() * inv * g.double().abs() * (rho + 2 * U32))


@pytest.mark.parametrize("n", [7, 48, 384])
def test_norms(isa_level, n):
    target = cpu_target()
    info = host_cpu(target)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(11, n, generator=gen) * 3 + 1
    g, b = torch.rand(n, generator=gen) + 0.5, torch.randn(n, generator=gen)
    m = tvm.tirx.Var("m", "int64")
    xd = x.double()
    out = _run(layer_norm(m, n, eps=1e-12, weight=True, bias=True, info=info), target,
               x.numpy(), g.numpy(), b.numpy(), out_shape=(11, n))
    assert_within(out, F.layer_norm(xd, (n,), g.double(), b.double(), 1e-12),
                  _layer_norm_bound(x, g, b, 1e-12), "layer_norm")
    out = _run(layer_norm(11, n, eps=1e-5, weight=False, bias=False, info=info), target,
               x.numpy(), out_shape=(11, n))
    assert_within(out, F.layer_norm(xd, (n,), eps=1e-5), _layer_norm_bound(x, None, None, 1e-5),
                  "layer_norm (no affine)")
    out = _run(rms_norm(m, n, eps=1e-6, weight=True, info=info), target, x.numpy(), g.numpy(),
               out_shape=(11, n))
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * g.double()
    assert_within(out, ref, _rms_norm_bound(x, g, 1e-6), "rms_norm")


@pytest.mark.parametrize("kind,ref", [("gelu", F.gelu), ("silu", F.silu), ("relu", F.relu),
                                      ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"))])
def test_activation(isa_level, kind, ref):
    """The activations' own error: the claim ``test_dense`` composes (ACT_ABS, ACT_REL there)."""
    from .test_dense import ACT_ABS, ACT_REL
    x = torch.linspace(-12, 12, 5 * 37).reshape(5, 37)
    target = cpu_target()
    info = host_cpu(target)
    out = _run(activation(tvm.tirx.Var("m", "int64"), 37, kind=kind, info=info), target,
               x.numpy(), out_shape=(5, 37))
    torch.testing.assert_close(out.double(), ref(x.double()), rtol=ACT_REL, atol=ACT_ABS)
    with pytest.raises(ValueError, match="unknown activation"):
        activation(4, 4, kind="swish", info=info)


@pytest.mark.parametrize("size,width,transpose", [(40, 40, False), (40, 80, True), (12, 24, False),
                                                  (384, 384, False), (1536, 1536, True),
                                                  (64, 128, False)])
def test_hadamard(isa_level, size, width, transpose):
    """Each output is ``Σ ±x_i·|h|/√2^k`` over its chunk of ``size`` inputs (``|h| = 1/√K``): each
    term passes through log2(2^k) butterfly additions, the K-term mix (K roundings), the fp32
    rounding of ``h_k``'s ``±1/√K``, and the scale ``fl(1/√2^k)`` and its multiply:
    γ_{log2(2^k)+K+3}·Σ_chunk |x_i|/√size."""
    from qcompile.backends.tvm.kernels.hadamard import hadamard
    from qcompile.hadamard import base_order, fwht, hadamard_matrix
    kf, _ = base_order(size)
    x = torch.randn(3, width)
    target = cpu_target()
    args = [x.numpy()] + ([hadamard_matrix(kf).numpy().astype(np.float32)] if kf > 1 else [])
    out = _run(hadamard(tvm.tirx.Var("m", "int64"), width, size, transpose=transpose,
                        info=host_cpu(target)), target, *args, out_shape=(3, width))
    p = size // kf
    chunk = x.double().abs().reshape(3, width // size, 1, size).sum(-1) / size ** 0.5
    bound = gamma(int(np.log2(p)) + kf + 3) * chunk.expand(3, width // size, size)
    assert_within(out, fwht(x.double(), size, transpose=transpose),
                  bound.reshape(3, width), f"hadamard {size}")


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
