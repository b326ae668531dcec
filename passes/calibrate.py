"""calibrate: run the interpreter over a calibration set and collect, streaming, the statistics
the quantization passes need, per value (by default: the input of every linear with a
constant weight):

- min / max, per-channel abs-max (SmoothQuant, Xiao et al. 2023, eq. 4; static scales);
- per-channel mean |x| (AWQ, Lin et al. 2024, §3.2: the salient-channel statistic);
- ``XᵀX`` over all tokens (GPTQ's Hessian ``H = 2XᵀX/N``, Frantar et al. 2023, eq. 2; ResQ's
  covariance, Saxena et al. 2024, §3);
- a bounded uniform reservoir of token rows (Vitter 1985, Algorithm R) for output-error
  searches (AWQ).

Accumulators are float64; memory is bounded by the channel counts and the reservoir size,
not by the calibration set. The result is left in ``graph.meta["calibration"]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from qcompile.errors import ConfigError, InputError, PassError
from qcompile.ir.graph import Graph, Value
from qcompile.passes.manager import register_pass

__all__ = ["ChannelStats", "Calibration", "calibrate", "collect_statistics", "linear_inputs",
           "as_positional"]


@dataclass
class ChannelStats:
    """Streaming statistics over the rows of a value seen as ``[tokens, channels]``."""

    channels: int
    want_xtx: bool = False
    reservoir: int = 0
    seed: int = 0
    rows: int = 0
    min: float = math.inf
    max: float = -math.inf
    absmax: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    sqsum: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    sample: torch.Tensor | None = None
    _gen: torch.Generator | None = field(default=None, repr=False)

    def update(self, t: torch.Tensor) -> None:
        x = t.detach().reshape(-1, self.channels)
        x64 = x.to(torch.float64)
        a = x64.abs()
        if self.absmax is None:
            self.absmax = torch.zeros(self.channels, dtype=torch.float64)
            self.abssum = torch.zeros(self.channels, dtype=torch.float64)
            self.sqsum = torch.zeros(self.channels, dtype=torch.float64)
        if x.shape[0]:
            self.absmax = torch.maximum(self.absmax, a.amax(0))
            self.abssum += a.sum(0)
            self.sqsum += (a * a).sum(0)
            self.min = min(self.min, float(x64.min()))
            self.max = max(self.max, float(x64.max()))
        if self.want_xtx:
            if self.xtx is None:
                self.xtx = torch.zeros(self.channels, self.channels, dtype=torch.float64)
            self.xtx.addmm_(x64.T, x64)
        if self.reservoir:
            self._sample_rows(x.to(torch.float32))
        self.rows += x.shape[0]

    def _sample_rows(self, x: torch.Tensor) -> None:
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
            self.sample = x.new_empty(0, self.channels)
        room = self.reservoir - self.sample.shape[0]
        if room > 0:
            self.sample = torch.cat([self.sample, x[:room]])
            x, start = x[room:], self.rows + room
        else:
            start = self.rows
        if not x.shape[0]:
            return
        # Algorithm R: row i (0-based overall) replaces a random slot with probability k/(i+1)
        idx = torch.arange(start, start + x.shape[0], dtype=torch.float64)
        j = (torch.rand(x.shape[0], generator=self._gen, dtype=torch.float64) * (idx + 1)).long()
        keep = j < self.reservoir
        self.sample[j[keep]] = x[keep]

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.rows, 1)

    @property
    def norm(self) -> torch.Tensor:
        """Each channel's L2 norm over all rows seen, ``‖X_j‖₂`` (Wanda's activation term)."""
        return self.sqsum.sqrt()

    def hessian(self) -> torch.Tensor:
        """GPTQ's ``H = 2 XᵀX / N`` (float64)."""
        if self.xtx is None:
            raise PassError("the calibration did not collect XᵀX for this value",
                            hint="calibrate with hessian=True")
        return 2 * self.xtx / max(self.rows, 1)

    def covariance(self) -> torch.Tensor:
        """The uncentred second moment ``XᵀX / N`` (float64)."""
        return self.hessian() / 2


@dataclass
class Calibration:
    """Statistics by value name, and how many samples produced them."""

    stats: dict[str, ChannelStats]
    samples: int

    def __getitem__(self, name: str) -> ChannelStats:
        try:
            return self.stats[name]
        except KeyError:
            raise PassError(f"no calibration statistics for %{name}",
                            hint="run calibrate after the passes that change the graph") from None

    def __contains__(self, name: str) -> bool:
        return name in self.stats


def linear_inputs(graph: Graph) -> list[Value]:
    """Float inputs of ``linear`` nodes whose weight is a graph constant, in graph order."""
    out, seen = [], set()
    for n in graph.nodes:
        if n.op == "linear" and graph.is_constant(n.inputs[1]) and id(n.inputs[0]) not in seen:
            seen.add(id(n.inputs[0]))
            out.append(n.inputs[0])
    return out


def as_positional(graph: Graph, item: Any, index: int) -> list:
    """One calibration sample as the graph's positional inputs: a tensor, a tuple/list of
    tensors, or a dict by input name."""
    names = [v.name for v in graph.inputs]
    if isinstance(item, dict):
        missing = [n for n in names if n not in item]
        if missing:
            raise InputError(f"calibration sample {index} lacks input(s) {missing}; the graph's "
                             f"inputs are {names}")
        return [item[n] for n in names]
    if isinstance(item, (tuple, list)):
        return list(item)
    return [item]


def collect_statistics(graph: Graph, data: Iterable, *, values: Sequence[str] | None = None,
                       hessian: bool = False, reservoir: int = 0, max_samples: int | None = None,
                       seed: int = 0, progress: bool = True) -> Calibration:
    """Run ``graph`` (float, without fake quantization) over ``data`` and collect statistics of
    ``values`` (names; default: every linear input)."""
    from qcompile.interpreter import Interpreter
    if data is None:
        raise ConfigError("quantization with calibration statistics needs calibration data",
                          hint="pass calibration=[inputs, ...] (a list of example inputs)")
    targets = [graph.value(n) for n in values] if values is not None else linear_inputs(graph)
    stats: dict[str, ChannelStats] = {}
    by_id = {}
    for v in targets:
        last = v.type.shape[-1] if v.type.rank else 1
        if not isinstance(last, int):
            raise PassError(f"%{v.name} has a symbolic last dimension ({last}); statistics "
                            "need a fixed channel count")
        stats[v.name] = ChannelStats(last, want_xtx=hessian, reservoir=reservoir, seed=seed)
        by_id[id(v)] = stats[v.name]

    def hook(v, t):
        s = by_id.get(id(v))
        if s is not None:
            s.update(t)

    interp = Interpreter(graph, fake_quant=False)
    interp.add_hook(hook)
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_samples is not None and total is not None:
        total = min(total, max_samples)
    n = 0
    it = data
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(data, total=total, desc="calibrate", leave=False, unit="sample")
    with torch.no_grad():
        for item in it:
            if max_samples is not None and n >= max_samples:
                break
            try:
                interp.run(*as_positional(graph, item, n))
            except InputError as e:
                raise InputError(f"calibration sample {n} does not fit the model: {e}") from None
            n += 1
    if n == 0:
        raise ConfigError("the calibration set is empty",
                          hint="pass at least one sample (64-128 are typical)")
    return Calibration(stats, n)


@register_pass("calibrate")
def calibrate(graph: Graph, *, data=None, values=None, hessian: bool = False, reservoir: int = 0,
              max_samples: int | None = None, seed: int = 0, progress: bool = True) -> Graph:
    graph.meta["calibration"] = collect_statistics(
        graph, data, values=values, hessian=hessian, reservoir=reservoir,
        max_samples=max_samples, seed=seed, progress=progress)
    return graph
