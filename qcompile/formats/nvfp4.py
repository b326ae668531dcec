"""NVFP4: E2M1 elements in blocks of 16, an E4M3 block scale and an fp32 tensor scale.

Two-level scaling (NVIDIA, "Pretraining Large Language Models with NVFP4", arXiv 2509.25147,
§2, eqs. 1–3; as implemented in torchao's ``NVFP4Tensor``):

1. tensor scale ``s_g = max|x| / (448 · 6)`` (fp32);
2. block scale ``s_b = E4M3(max|x_blk| / (6 · s_g))``, round to nearest even, never above 448;
3. ``q = E2M1(clamp(x / (s_b · s_g), -6, 6))``, round to nearest even.

With ``tensor_scale=False`` the tensor scale is 1 (block scales alone, as for activations
quantized on the fly by some kernels). An all-zero tensor gets ``s_g = 1``. Blocks whose E4M3
scale underflows to zero decode to zero. NaN/Inf policy ``"propagate"``: the block's E4M3
scale becomes NaN (``0x7F``), so the block decodes to NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.formats.base import Format, safe_div
from qcompile.formats.floats import ELEMENTS, decode_elements, encode_elements
from qcompile.formats.registry import register_format

__all__ = ["NVFP4Format", "E4M3_MAX", "E2M1_MAX"]

E4M3_MAX = 448.0
E2M1_MAX = 6.0
_E4M3 = ELEMENTS["fp8_e4m3"]
_E2M1 = ELEMENTS["fp4_e2m1"]
E4M3_NAN = 0x7F


def tensor_scale_of(x: torch.Tensor, top: float) -> torch.Tensor:
    """``max|x| / (448 · top)`` in fp32; 1 for an all-zero tensor."""
    amax = x.abs().amax() if x.numel() else torch.zeros(())
    s = (amax.to(torch.float32) / (E4M3_MAX * top))
    return torch.where(s > 0, s, torch.ones(()))


def e4m3_block_scales(amax_blk: torch.Tensor, top: float, sg: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of ``amax_blk / (top · s_g)``, saturated at 448."""
    return encode_elements((amax_blk.to(torch.float32) / (top * sg)).clamp(max=E4M3_MAX), _E4M3)


@dataclass(frozen=True)
class NVFP4Format(Format):
    tensor_scale: bool = True

    roles = ("scale", "tensor_scale")
    tensor_roles = ("tensor_scale",)
    block_only = True
    pad: bool = False

    @property
    def bits(self):
        return 4

    def param_bits(self, role):
        return 8 if role == "scale" else 32

    def _encode(self, xb, given):
        given = given or {}  # may hold the tensor scale alone (``block_params``)
        if "tensor_scale" in given:
            sg = given["tensor_scale"].to(torch.float32).reshape(())
        else:
            sg = tensor_scale_of(xb, E2M1_MAX) if self.tensor_scale else torch.ones(())
        if "scale" in given:
            sb_codes = given["scale"].to(torch.uint8)
        else:
            sb_codes = e4m3_block_scales(xb.abs().amax(-1), E2M1_MAX, sg)
        denom = decode_elements(sb_codes, _E4M3) * sg
        v = safe_div(xb, denom[..., None]).clamp(-E2M1_MAX, E2M1_MAX)
        codes = encode_elements(v, _E2M1)
        codes = codes.masked_fill((denom == 0)[..., None], 0)
        return codes, {"scale": sb_codes, "tensor_scale": sg.reshape(())}

    def _decode(self, cb, ps):
        s = decode_elements(ps["scale"], _E4M3) * ps["tensor_scale"].to(torch.float32)
        return decode_elements(cb, _E2M1) * s[..., None]

    def _poison(self, codes, ps, bad):
        codes = codes.masked_fill(bad[..., None], 0)
        return codes, dict(ps, scale=ps["scale"].masked_fill(bad, E4M3_NAN))


register_format("nvfp4", NVFP4Format, granularity="per_group", group_size=16)
