"""Codebook 4-bit formats: NF4, SF4, and E2M1 with a per-block special value (RaZeR, BitMoD).

- **NF4** (Dettmers et al., "QLoRA", NeurIPS 2023, §3 eq. 4 and Appendix E): the 16 values
  are normal quantiles, 8 on the positive side ``Φ⁻¹(linspace(δ, 1/2, 9)[:-1])`` and 7 on the
  negative side ``-Φ⁻¹(linspace(δ, 1/2, 8)[:-1])``, plus an exact zero, divided by the
  largest; ``δ = 0.9677083`` (bitsandbytes' ``create_normal_map`` offset). Blocks of 64
  share an abs-max scale.
- **SF4** (Dotzel et al., "Learning from Students: Applying t-Distributions to Explore
  Accurate and Efficient Formats for LLMs", ICML 2024, §3): the same recipe with Student-t
  quantiles, ν = 5 by default.
- **RaZeR** (Chen et al., "The Power of Negative Zero: Datatype Customization for Quantized
  LLMs", 2025): E2M1's redundant −0 code (``0b1000``) decodes to a special value chosen per
  block, from ``specials`` (default ±5, ±8), by least squared error; NVFP4-style scaling
  (E4M3 block scale, fp32 tensor scale), blocks of 16.
- **BitMoD** (Chen et al., "BitMoD: Bit-serial Mixture-of-Datatype LLM Acceleration", HPCA
  2025, §IV): per group of 128, one of four datatypes, E2M1 plus one extra value — ±2.5
  ("extra resolution", 5 in the paper's ×2 units) or ±8 ("extra range", 16 in ×2 units) —
  picked by least squared error; fp16 group scale.

For a candidate special value ``v``, the block scale maps the block's abs-max onto
``max(6, |v|)``. Nearest-value rounding; a tie between the special value and an E2M1 value
keeps the E2M1 value. Codebook rounding ties go to the lower codebook entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from qcompile.errors import ConfigError
from qcompile.formats.base import Format, safe_div, scale_dtype
from qcompile.formats.floats import ELEMENTS, decode_elements, encode_elements
from qcompile.formats.nvfp4 import E4M3_NAN, e4m3_block_scales, tensor_scale_of
from qcompile.formats.registry import register_format
from qcompile.ir.quant import Granularity

__all__ = ["CodebookFormat", "SpecialValueFP4", "quantile_codebook", "NF4_OFFSET"]

NF4_OFFSET = 0.9677083
_E2M1 = ELEMENTS["fp4_e2m1"]
_E4M3 = ELEMENTS["fp8_e4m3"]
NEG_ZERO = 8  # the E2M1 code of -0


def quantile_codebook(ppf, offset: float = NF4_OFFSET) -> np.ndarray:
    """The 16-value NF4 construction with quantile function ``ppf`` (float64, ascending)."""
    pos = ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    return v / np.abs(v).max()


@lru_cache(maxsize=None)
def _codebook(kind: str, nu: float) -> tuple[torch.Tensor, torch.Tensor]:
    from scipy import stats
    if kind == "nf4":
        v = quantile_codebook(stats.norm.ppf)
    else:
        v = quantile_codebook(lambda p: stats.t.ppf(p, nu))
    values = torch.tensor(v, dtype=torch.float32)
    return values, (values[1:] + values[:-1]) / 2


@dataclass(frozen=True)
class CodebookFormat(Format):
    codebook: str = "nf4"
    nu: float = 5.0
    scale_dtype: str = "fp32"
    pad: bool = False

    roles = ("scale",)
    _fixed = ("codebook",)

    def __post_init__(self):
        super().__post_init__()
        if self.codebook not in ("nf4", "sf4"):
            raise ConfigError(f"{self.name}: unknown codebook {self.codebook!r}")
        if self.granularity == Granularity.NONE:
            raise ConfigError(f"{self.name} needs an abs-max scale; use per_group")
        if not float(self.nu) > 0:
            raise ConfigError(f"{self.name}: the Student-t ν must be positive, got {self.nu}")
        scale_dtype(self.scale_dtype, self.name)

    @property
    def values(self) -> torch.Tensor:
        return _codebook(self.codebook, float(self.nu))[0]

    @property
    def bits(self):
        return 4

    def param_bits(self, role):
        return torch.finfo(scale_dtype(self.scale_dtype, self.name)).bits

    def _encode(self, xb, given):
        values, mids = _codebook(self.codebook, float(self.nu))
        sdt = scale_dtype(self.scale_dtype, self.name)
        s = given["scale"].to(sdt) if given else xb.abs().amax(-1).to(sdt)
        n = safe_div(xb, s.float()[..., None]).clamp(-1, 1)
        return torch.bucketize(n, mids).to(torch.uint8), {"scale": s}

    def _decode(self, cb, ps):
        return self.values[cb.to(torch.int64)] * ps["scale"].float()[..., None]


@dataclass(frozen=True)
class SpecialValueFP4(Format):
    """E2M1 with the −0 code remapped to a per-block special value (RaZeR, BitMoD)."""

    block_only = True
    specials: tuple = (5.0, -5.0, 8.0, -8.0)
    scaling: str = "nvfp4"
    pad: bool = False

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "specials", tuple(float(v) for v in self.specials))
        if not 1 <= len(self.specials) <= 16 or any(not math.isfinite(v) or v == 0
                                                    for v in self.specials):
            raise ConfigError(f"{self.name}: specials must be 1 to 16 finite non-zero values, "
                              f"got {self.specials}")
        if self.scaling not in ("nvfp4", "fp16", "fp32", "bf16"):
            raise ConfigError(f"{self.name}: scaling must be 'nvfp4' (E4M3 block + fp32 tensor "
                              f"scale) or a float scale dtype, got {self.scaling!r}")

    @property
    def roles(self):
        return ("scale", "meta", "tensor_scale") if self.scaling == "nvfp4" else ("scale", "meta")

    tensor_roles = ("tensor_scale",)

    @property
    def bits(self):
        return 4

    def param_bits(self, role):
        if role == "meta":
            return max(1, math.ceil(math.log2(len(self.specials))))
        if role == "tensor_scale":
            return 32
        return 8 if self.scaling == "nvfp4" else torch.finfo(scale_dtype(self.scaling, self.name)).bits

    def _scales(self, amax, top: float, sg):
        """Stored scale (codes or floats) and its float value, mapping ``amax`` onto ``top``."""
        if self.scaling == "nvfp4":
            codes = e4m3_block_scales(amax, top, sg)
            return codes, decode_elements(codes, _E4M3) * sg
        s = (amax / top).to(scale_dtype(self.scaling, self.name))
        return s, s.float()

    def _stored_scale(self, stored, sg):
        if self.scaling == "nvfp4":
            return decode_elements(stored.to(torch.uint8), _E4M3) * sg
        return stored.float()

    @staticmethod
    def _grid(xb, s, special: torch.Tensor):
        """Codes of ``xb`` on E2M1 ∪ {special} at scale ``s`` and their decoded values."""
        v = safe_div(xb, s[..., None])
        codes = encode_elements(v.clamp(-6, 6), _E2M1)
        codes = codes.masked_fill(codes == NEG_ZERO, 0)  # -0 rounds to +0: its code is taken
        base = decode_elements(codes, _E2M1)
        sp = special[..., None]
        use = (v - sp).abs() < (v - base).abs()
        codes = torch.where(use, torch.tensor(NEG_ZERO, dtype=torch.uint8), codes)
        dec = torch.where(use, sp, base) * s[..., None]
        return codes, dec

    def _encode(self, xb, given):
        specials = torch.tensor(self.specials, dtype=torch.float32)
        sg = torch.ones(())
        if self.scaling == "nvfp4":  # given may hold the tensor scale alone (``block_params``)
            sg = given["tensor_scale"].float().reshape(()) if given and "tensor_scale" in given \
                else tensor_scale_of(xb, 6.0)
        if given is not None and "meta" in given:
            meta = given["meta"].to(torch.int64)
            stored = given["scale"]
            s = self._stored_scale(stored, sg)
            codes, _ = self._grid(xb, s, specials[meta])
        else:
            amax = xb.abs().amax(-1)
            best = None
            for i, v in enumerate(self.specials):
                stored_i, s_i = self._scales(amax, max(6.0, abs(v)), sg)
                codes_i, dec = self._grid(xb, s_i, torch.full_like(amax, v))
                err = ((dec - xb) ** 2).sum(-1)
                if best is None:
                    best = [err, codes_i, stored_i, torch.zeros_like(amax, dtype=torch.int64)]
                    continue
                better = err < best[0]
                best[0] = torch.where(better, err, best[0])
                best[1] = torch.where(better[..., None], codes_i, best[1])
                best[2] = torch.where(better, stored_i, best[2])
                best[3] = torch.where(better, torch.full_like(best[3], i), best[3])
            _, codes, stored, meta = best
        ps = {"scale": stored, "meta": meta.to(torch.uint8)}
        if self.scaling == "nvfp4":
            ps["tensor_scale"] = sg.reshape(())
        return codes, ps

    def _decode(self, cb, ps):
        specials = torch.tensor(self.specials, dtype=torch.float32)
        sg = ps["tensor_scale"].float().reshape(()) if "tensor_scale" in ps else torch.ones(())
        s = self._stored_scale(ps["scale"], sg)
        sp = specials[ps["meta"].to(torch.int64)][..., None]
        v = torch.where(cb == NEG_ZERO, sp, decode_elements(cb, _E2M1))
        return v * s[..., None]

    def _poison(self, codes, ps, bad):
        codes = codes.masked_fill(bad[..., None], 0)
        s = ps["scale"]
        if self.scaling == "nvfp4":
            s = s.masked_fill(bad, E4M3_NAN)
        else:
            s = torch.where(bad, torch.tensor(float("nan"), dtype=s.dtype), s)
        return codes, dict(ps, scale=s)


register_format("nf4", CodebookFormat, codebook="nf4", granularity="per_group", group_size=64)
register_format("sf4", CodebookFormat, codebook="sf4", granularity="per_group", group_size=64)
register_format("razer", SpecialValueFP4, granularity="per_group", group_size=16,
                specials=(5.0, -5.0, 8.0, -8.0), scaling="nvfp4")
register_format("bitmod", SpecialValueFP4, granularity="per_group", group_size=128,
                specials=(2.5, -2.5, 8.0, -8.0), scaling="fp16")
