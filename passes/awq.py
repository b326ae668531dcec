"""AWQ: activation-aware weight quantization — scale up the input channels that carry large
activations before rounding, so their weights lose less, and fold the inverse scale into the
producer of the input.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan & Han, "AWQ: Activation-aware Weight
Quantization for On-Device LLM Compression and Acceleration", MLSys 2024:

- ``Q(W·diag(s))·(diag(s)⁻¹X)``: scaling a channel by ``s > 1`` shrinks its relative rounding
  error (§3.2, eq. 2–3);
- the search ``s = s_X^α``, ``α* = argmin_α ‖Q(W·diag(s))(diag(s)⁻¹ X) − WX‖`` over a grid of
  ``α ∈ [0, 1)`` (eq. 4–5), with ``s_X`` the per-channel mean ``|x|`` and ``s`` normalised by
  ``sqrt(max s · min s)`` (the reference implementation); every linear reading the same input
  shares ``s`` and the error is summed over them;
- a clipping search per output row and group, ``max = amax·(1 − i/20)`` for ``i < 10``,
  scored by the group's partial output error (§3.3 / the reference's ``auto_clip``); the layers
  whose outputs feed attention scores (q, k) are not clipped, as in the reference.

``α = 0`` is plain RTN, so the chosen scale is never worse than RTN on the calibration sample,
and a clipped weight is kept only when it lowers the layer's output error too. As in the
reference, every scale is searched and folded first (``awq_search``), and the weights are
clipped and quantized afterwards (``awq_quantize``), once a producer linear has absorbed the
scales of the layers it feeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from qcompile.errors import PassError
from qcompile.formats import QuantizedTensor
from qcompile.ir.quant import Granularity

__all__ = ["awq_search", "awq_quantize", "clip_search", "awq_scales", "AWQResult", "CLIP_GRID"]

CLIP_GRID = tuple(1 - i / 20 for i in range(10))  # 1.0 … 0.55


@dataclass
class AWQResult:
    #: per input channel (float64); the input is divided by it, the weights' columns multiplied
    scales: torch.Tensor
    alpha: float
    #: summed squared output error on the sample: the chosen candidate, and RTN's
    loss: float
    rtn_loss: float


def _out_err(x: torch.Tensor, ys, ws_hat) -> float:
    return sum(float(((x @ w.T) - y).pow(2).sum()) for w, y in zip(ws_hat, ys))


def awq_scales(absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = absmean.double().pow(alpha).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def _clip_groups(fmt, shape) -> int:
    """Elements per clip group along the input axis: the format's block, or the whole row."""
    return fmt.layout(shape, -1).block if fmt.granularity == Granularity.PER_GROUP else shape[1]


def clip_search(w: torch.Tensor, x: torch.Tensor, fmt, grid: Sequence[float] = CLIP_GRID,
                rows_per_chunk: int = 512) -> torch.Tensor:
    """``w`` clipped per (row, group) to the ratio of ``grid`` whose quantized group gives the
    least partial output error ``Σ_tokens (x_g · (w_g − Q(w_g)))²`` (AWQ §3.3)."""
    out, n = w.shape
    g = _clip_groups(fmt, w.shape)
    if n % g:
        return w  # padded block formats: the last group is partial; keep the plain weight
    nb = n // g
    xg = x.reshape(-1, nb, g)
    amax = w.abs().reshape(out, nb, g).amax(-1, keepdim=True)
    best_err = torch.full((out, nb), float("inf"), dtype=torch.float64)
    best = w.clone()
    for r in grid:
        lim = amax * r
        wc = torch.maximum(torch.minimum(w.reshape(out, nb, g), lim), -lim).reshape(out, n)
        d = (wc - fmt.fake_quant(wc, -1)).reshape(out, nb, g)
        err = torch.empty(out, nb, dtype=torch.float64)
        for o in range(0, out, rows_per_chunk):
            part = torch.einsum("kbg,obg->kob", xg, d[o:o + rows_per_chunk])
            err[o:o + rows_per_chunk] = part.double().pow(2).sum(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.repeat_interleave(g, 1), wc, best)
    return best


def awq_search(weights: Sequence[torch.Tensor], absmean: torch.Tensor, sample: torch.Tensor, fmt,
               *, grid: int | Sequence[float] = 20) -> AWQResult:
    """Search AWQ's scale for ``weights`` (``[out_i, in]`` each, sharing one input) on the
    calibration ``sample`` (``[tokens, in]``) with per-channel mean ``|x|`` ``absmean``."""
    if isinstance(weights, torch.Tensor):
        weights = [weights]
    if sample is None or sample.shape[0] == 0:
        raise PassError("AWQ needs a sample of calibration rows",
                        hint="calibrate with reservoir > 0 (compile() does for algorithm='awq')")
    alphas = [i / grid for i in range(grid)] if isinstance(grid, int) else list(grid)
    x = sample.float()
    ws = [w.float() for w in weights]
    ys = [x @ w.T for w in ws]
    rtn_loss = _out_err(x, ys, [fmt.fake_quant(w, -1) for w in ws])
    best = (rtn_loss, 0.0, torch.ones(x.shape[1]))
    for a in alphas:
        if a == 0:
            continue  # s = 1: RTN, already scored
        s = awq_scales(absmean, a).float()
        err = _out_err(x, ys, [fmt.fake_quant(w * s, -1) / s for w in ws])
        if err < best[0]:
            best = (err, a, s)
    loss, alpha, s = best
    return AWQResult(s.double(), alpha, loss, rtn_loss)


def awq_quantize(w: torch.Tensor, x: torch.Tensor | None, fmt, *, clip: bool = True,
                 clip_grid: Sequence[float] = CLIP_GRID) -> QuantizedTensor:
    """Quantize an (already scaled) weight, with AWQ's clip search on its input rows ``x`` when
    ``clip``; the clipped weight is kept only if its whole output error is lower."""
    w = w.float()
    if clip and x is not None and x.shape[0]:
        x = x.float()
        wc = clip_search(w, x, fmt, clip_grid)
        y = x @ w.T
        if _out_err(x, [y], [fmt.fake_quant(wc, -1)]) < _out_err(x, [y], [fmt.fake_quant(w, -1)]):
            w = wc
    return fmt.quantize(w, -1)
