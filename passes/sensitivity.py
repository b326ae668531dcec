"""Second-order sensitivity of each layer's weights, for mixed precision.

- **Loss.** With labels, the task loss (cross entropy for integer labels, MSE for float
  ones); without, the divergence of the model from its own float output on the calibration
  samples: ``"mse"`` (mean squared error summed over the outputs) or ``"kl"``
  (``KL(softmax(f) ‖ softmax(f̂))`` over the last axis). At the float weights the last two have
  zero gradient and their Hessian is the Gauss–Newton matrix ``2JᵀJ`` (resp. the Fisher), so
  every layer's curvature is non-negative.
- **Hessian-vector products** by double back-propagation through the reference interpreter:
  ``g = ∇_W L`` kept differentiable, then ``Hv = ∇_W (gᵀv)`` (Pearlmutter 1994; PyHessian, Yao
  et al. 2020, §3). One product over all layers gives every block's quadratic form.
- **Hutchinson's trace** (HAWQ-V2, Dong et al., NeurIPS 2020, §3.1 eq. 3–4): with Rademacher
  ``v``, ``E[vᵀHv] = Tr(H)``, and per block ``E[v_iᵀ(Hv)_i] = Tr(H_ii)``; the variance is
  ``2Σ_{j≠k} H_jk²``, so a diagonal Hessian is exact after one probe. Stopping rule of
  PyHessian: at most ``max_iters`` probes, or when every block's running mean moves by less
  than ``tol`` relative.
- **Top eigenvalue** of each block ``H_ii`` by power iteration on ``H_ii v`` (HAWQ, Dong et
  al., ICCV 2019, §3.1; Q-BERT, Shen et al., AAAI 2020, §3.1, which ranks layers by it).
- **Ω** (HAWQ-V2 eq. 5 as written in HAWQ-V3's ILP, Yao et al., ICML 2021, eq. 10):
  ``Ω_i(b) = s_i·‖Q_b(W_i) − W_i‖²`` with ``s_i = Tr(H_ii)/n_i`` (or ``λ_max(H_ii)``).
  Negative curvature (possible under a task loss away from a minimum) is clamped to zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from qcompile.errors import ConfigError, InputError
from qcompile.ir.graph import Graph, Node

__all__ = ["SensitivityLoss", "hessian_traces", "top_eigenvalues", "TraceResult",
           "omega", "nonneg", "make_loss"]


@dataclass
class SensitivityLoss:
    """``loss(params)``: the mean loss over the calibration samples with the given weights
    (a dict constant name → tensor) substituted; ``per_sample`` evaluates sample ``s`` alone."""

    graph: Graph
    samples: list
    kind: str
    targets: list  # per sample: float outputs (kl/mse) or labels (task)
    interp: object = field(repr=False, default=None)

    def per_sample(self, s: int, params: dict | None = None) -> torch.Tensor:
        if params:  # float32 leaves (autograd) or decoded weights, at each constant's dtype
            dt = self.graph.constants
            params = {k: v if v.dtype == dt[k].dtype else v.to(dt[k].dtype)
                      for k, v in params.items()}
        outs = self.interp.run(*self.samples[s], params=params)
        tgt = self.targets[s]
        if self.kind == "task":
            y = outs[0]
            if not y.is_floating_point():
                raise InputError("the task loss needs a floating-point model output")
            if tgt.is_floating_point():
                return torch.nn.functional.mse_loss(y, tgt.to(y.dtype))
            return torch.nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]).float(),
                                                     tgt.reshape(-1).long())
        total = 0.0
        for y, r in zip(outs, tgt):
            if not y.is_floating_point():
                continue
            y, r = y.float(), r.float()
            if self.kind == "kl":
                lp, lq = torch.log_softmax(r, -1), torch.log_softmax(y, -1)
                total = total + (lp.exp() * (lp - lq)).sum(-1).mean()
            else:
                total = total + (y - r).pow(2).mean()
        return total

    def __call__(self, params: dict | None = None) -> torch.Tensor:
        return sum(self.per_sample(s, params) for s in range(len(self.samples))) / len(self.samples)


def make_loss(graph: Graph, samples: Sequence, labels: Sequence | None, kind: str = "auto"
              ) -> SensitivityLoss:
    """The sensitivity loss of ``graph`` (float) on ``samples`` (positional input lists)."""
    from qcompile.interpreter import Interpreter
    if kind == "auto":
        kind = "task" if labels is not None else "mse"
    if kind == "task" and labels is None:
        raise ConfigError("the 'task' sensitivity loss needs labels",
                          hint="pass labels=[...] (one per calibration sample) to compile(), "
                               "or use loss='mse' / 'kl' (to the float model's output)")
    if not samples:
        raise ConfigError("mixed precision needs calibration samples",
                          hint="pass calibration=[inputs, ...] to compile()")
    interp = Interpreter(graph, fake_quant=False)
    if kind == "task":
        if len(labels) < len(samples):
            raise ConfigError(f"{len(labels)} labels for {len(samples)} calibration samples",
                              hint="give one label tensor per calibration sample")
        targets = [torch.as_tensor(np.asarray(t)) if not isinstance(t, torch.Tensor) else t
                   for t in labels[:len(samples)]]
    else:
        with torch.no_grad():
            targets = [[t.detach() for t in interp.run(*x)] for x in samples]
    return SensitivityLoss(graph, list(samples), kind, targets, interp)


def _weights(graph: Graph, layers: Sequence[Node]) -> dict[str, torch.Tensor]:
    return {n.inputs[1].name: graph.constants[n.inputs[1].name].detach().float()
            .clone().requires_grad_(True) for n in layers}


def _hvp(loss: SensitivityLoss, params: dict[str, torch.Tensor],
         vs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``H v`` of the mean loss (blocks by constant name), accumulated over the samples."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    names = list(params)
    out = {k: torch.zeros_like(p) for k, p in params.items()}
    S = len(loss.samples)
    for s in range(S):
        with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernels have no double backward
            lo = loss.per_sample(s, params) / S
            grads = torch.autograd.grad(lo, [params[k] for k in names], create_graph=True,
                                        allow_unused=True)
            gv = sum((g * vs[k]).sum() for k, g in zip(names, grads) if g is not None)
            if not isinstance(gv, torch.Tensor) or not gv.requires_grad:
                continue  # the loss does not depend on these weights (to second order)
            hv = torch.autograd.grad(gv, [params[k] for k in names], allow_unused=True)
        for k, h in zip(names, hv):
            if h is not None:
                out[k] += h.detach()
    return out


@dataclass
class TraceResult:
    """Per-layer ``Tr(H_ii)`` estimates (by weight name), their standard errors and the
    number of probes used."""

    traces: dict[str, float]
    stderr: dict[str, float]
    probes: int
    history: list = field(default_factory=list, repr=False)


def hessian_traces(graph: Graph, layers: Sequence[Node], loss: SensitivityLoss, *,
                   max_iters: int = 100, tol: float = 1e-3, seed: int = 0,
                   progress: bool = False) -> TraceResult:
    """Hutchinson's estimate of each layer's Hessian-block trace (HAWQ-V2 eq. 4)."""
    params = _weights(graph, layers)
    gen = torch.Generator().manual_seed(seed)
    est: list[np.ndarray] = []
    names = list(params)
    mean = None
    it = range(max_iters)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="hutchinson", leave=False, unit="probe")
    for _ in it:
        vs = {k: (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype)
              for k, p in params.items()}
        hv = _hvp(loss, params, vs)
        est.append(np.array([float((vs[k] * hv[k]).sum()) for k in names]))
        new = np.mean(est, axis=0)
        if mean is not None and np.all(np.abs(new - mean) <= tol * (np.abs(mean) + 1e-12)):
            mean = new
            break
        mean = new
    arr = np.array(est)
    se = arr.std(axis=0, ddof=1) / np.sqrt(len(est)) if len(est) > 1 else np.zeros(len(names))
    return TraceResult(dict(zip(names, map(float, mean))), dict(zip(names, map(float, se))),
                       len(est), est)


def top_eigenvalues(graph: Graph, layers: Sequence[Node], loss: SensitivityLoss, *,
                    max_iters: int = 100, tol: float = 1e-3, seed: int = 0,
                    progress: bool = False) -> dict[str, float]:
    """``λ_max(H_ii)`` of each layer's block by power iteration (Q-BERT §3.1), by weight
    name; the iteration stops when the Rayleigh quotient moves by less than ``tol`` relative."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    it = layers
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(layers, desc="power iteration", leave=False, unit="layer")
    for n in it:
        params = _weights(graph, [n])
        (k, p), = params.items()
        v = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        v /= v.norm()
        lam = None
        for _ in range(max_iters):
            hv = _hvp(loss, params, {k: v})[k]
            new = float((v * hv).sum())
            norm = float(hv.norm())
            if norm == 0:
                lam = 0.0
                break
            v = hv / norm
            if lam is not None and abs(new - lam) <= tol * (abs(lam) + 1e-12):
                lam = new
                break
            lam = new
        out[k] = float(lam)
    return out


def nonneg(x: float) -> float:
    """``max(x, 0)`` with NaN kept (the caller decides what a broken estimate means)."""
    return x if x != x else max(x, 0.0)


def omega(curvature: float, sq_err: float) -> float:
    """``Ω = max(s, 0)·‖Q(W) − W‖²`` (HAWQ-V3 eq. 10): the layer's curvature ``s`` times the
    squared quantization error ``sq_err``; NaN stays NaN."""
    return nonneg(float(curvature)) * sq_err
