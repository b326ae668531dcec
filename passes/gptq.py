"""GPTQ: quantize a weight column by column, spreading each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian of the layer's squared output error.

Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023:

- the layer loss is ``‖XWᵀ − XŴᵀ‖²``, whose Hessian in each row of ``W`` is ``H = 2XᵀX/N``
  (eq. 1–2; ``calibrate`` accumulates it);
- after quantizing column ``q``, the remaining columns move by ``δ = −(w_q − Q(w_q)) /
  [H⁻¹]_qq · (H⁻¹)_{q,:}`` (eq. 3, the OBS update); with ``U`` the upper Cholesky factor of
  ``H⁻¹`` this is ``W[:, q:] −= e ⊗ U[q, q:]`` with ``e = (w_q − Q(w_q)) / U_qq``
  (Algorithm 1, "Cholesky reformulation", §4 step 3);
- updates are applied lazily in blocks of ``block_size`` columns (§4 step 2);
- ``damp`` adds ``damp · mean(diag H) · I`` (§5, "dampening"), dead columns (``H_jj = 0``) get
  ``H_jj = 1`` and a zero weight (the reference implementation);
- ``act_order`` quantizes columns in decreasing ``diag H`` (the reference's ``--act-order``);
  with groups it needs ``static_groups`` (group parameters computed from the whole weight up
  front), so no run-time permutation is needed.

Group parameters are computed, when a group starts, from the current (already updated)
columns (Frantar et al., App. "grouping"). The accumulated loss ``Σ (w−Q(w))² / (2U_qq²)``
equals ``½ tr(ΔW H ΔWᵀ)`` for the damped ``H``. Any ``qcompile.formats`` format works: its
parameters are computed per block and every column is quantized against them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.errors import ConfigError, PassError
from qcompile.formats import QuantizedTensor
from qcompile.ir.quant import Granularity

__all__ = ["gptq", "GPTQResult"]


@dataclass
class GPTQResult:
    qt: QuantizedTensor
    #: GPTQ's accumulated loss ``Σ (w − Q(w))² / (2 U_qq²)`` over every weight
    loss: float
    #: the column order used (act-order), or None
    perm: torch.Tensor | None = None


def _cholesky_inverse_upper(h: torch.Tensor) -> torch.Tensor:
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError:
        raise PassError("GPTQ: the layer's Hessian is not positive definite",
                        hint="raise the damping (QuantConfig(gptq={'damp': 0.1})) or give more "
                             "calibration samples") from None


def gptq(w: torch.Tensor, hessian: torch.Tensor, fmt, *, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False, static_groups: bool = True) -> GPTQResult:
    """Quantize ``w`` ``[out, in]`` (along ``in``) into ``fmt`` with the Hessian ``[in, in]``."""
    out, n = w.shape
    if tuple(hessian.shape) != (n, n):
        raise PassError(f"GPTQ: Hessian of shape {list(hessian.shape)} for a weight of shape "
                        f"{list(w.shape)}", hint="calibrate the graph you quantize")
    if damp < 0 or block_size < 1:
        raise ConfigError(f"GPTQ: damp must be ≥ 0 and block_size ≥ 1, got {damp}, {block_size}")
    lay = fmt.layout(w.shape, -1)
    grouped = fmt.granularity == Granularity.PER_GROUP
    if act_order and grouped and not static_groups:
        raise ConfigError("GPTQ act_order with groups needs static_groups=True (group parameters "
                          "fixed up front), otherwise the kernel would need a run-time permutation",
                          hint="QuantConfig(gptq={'act_order': True, 'static_groups': True})")
    npad = lay.npad if grouped else n  # grouped formats may pad the last group
    W = torch.zeros(out, npad, dtype=torch.float64)
    W[:, :n] = w.double()
    H = torch.eye(npad, dtype=torch.float64)
    H[:n, :n] = hessian.double()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diagonal(H).mean() * torch.eye(npad, dtype=torch.float64)

    fixed = {r: v for r, v in fmt.quantize(w.float(), -1).params.items() if r in fmt.tensor_roles}
    g = lay.block if grouped else npad
    nb = npad // g
    if grouped and (static_groups or act_order):
        params = fmt.block_params(W.float().reshape(out, nb, g), fixed)
    elif grouped:
        params = None  # computed at each group start from the updated columns
    else:  # per channel / tensor / none: from the whole weight, as the reference does
        params = fmt.block_params(lay.to_blocks(W[:, :n].float()), fixed)
    group_p: dict[int, dict] = {}

    def col_params(j: int, W1: torch.Tensor, i: int) -> dict:
        if not grouped:
            return params
        b = j // g
        if b not in group_p:
            if params is not None:
                group_p[b] = {r: (p if r in fmt.tensor_roles else p[:, b:b + 1])
                              for r, p in params.items()}
            else:  # j starts group b (sequential order); its columns are W1[:, i:i+g]
                group_p[b] = fmt.block_params(W1[:, i:i + g].float()[:, None, :], fixed)
        return group_p[b]

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = _cholesky_inverse_upper(H)
    B = max(g, block_size // g * g) if grouped else block_size
    Q = torch.zeros_like(W)
    loss = 0.0
    for i1 in range(0, npad, B):
        i2 = min(i1 + B, npad)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i if perm is None else int(perm[i1 + i])
            c = W1[:, i]
            q = fmt.fake_quant_blocks(c.float()[:, None, None], col_params(j, W1, i))
            q = q.reshape(out).double()
            d = U[i1 + i, i1 + i]
            e = (c - q) / d
            loss += float((e * e).sum()) / 2
            W1[:, i:] -= e[:, None] * U[i1 + i, i1 + i:i2][None, :]
            Q[:, i1 + i] = q
            E1[:, i] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    qf = Q[:, :n].float()
    if grouped:
        full = {r: (group_p[0][r] if r in fmt.tensor_roles else
                    torch.cat([group_p[b][r] for b in range(nb)], dim=1)) for r in group_p[0]}
    else:
        full = params
    keep = {r: (p.reshape(()) if r in fmt.tensor_roles else lay.param_from_blocks(p))
            for r, p in full.items()}
    qt = fmt.quantize(qf, -1, params=keep or None)
    if not torch.equal(qt.dequantize(torch.float32), qf):
        raise PassError(f"GPTQ: {fmt} did not reproduce its own grid values when re-encoded",
                        hint="quantize this layer with algorithm='rtn'")
    return GPTQResult(qt, loss, perm)
