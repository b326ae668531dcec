"""One step of a decoder LLM as a torch module with its KV cache as explicit state — what
``qcompile.llm`` captures into the IR.

``forward(input_ids, positions, mask, slot, *caches)`` runs ``T`` new tokens per sequence
(``T`` = the prompt length in prefill, 1 in decode) through the model's own submodules:

* ``positions`` [B, T] index the rotary tables (cos/sin for every position up to
  ``max_seq_len``, made once by the model's own ``rotary_emb``, so RoPE scaling — linear,
  Llama 3, YaRN — is the model's);
* each layer writes its new keys and values into its caches at ``slot`` .. ``slot + T - 1``
  (``kv_write``, in place; quantized per token when ``LlmSpec.kv_bits`` is 8 or 4, read back
  by ``kv_read``) and attends over the whole cache with ``mask`` [B, 1, T, S]
  (bool, True = attend; S = ``max_seq_len``), so one graph serves prefill and decode and
  every shape but B and T is static;
* only the last position's hidden state reaches the LM head (the logits [B, 1, vocab] of
  the next token), so a 64-token prompt does not pay 64 vocabulary projections.

The outputs are the logits and the updated caches (the same tensors, written in place).
The caller lays prompts out left-padded, so every sequence of a batch writes the same slots;
:mod:`qcompile.llm.runtime` builds the positions and masks.
"""
from __future__ import annotations

import torch

from qcompile.frontends.pytorch import kv_read, kv_write
from qcompile.llm.spec import LlmSpec

__all__ = ["Step", "rotary_tables"]


def rotary_tables(model, spec: LlmSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim] for positions 0 .. max_seq_len - 1, from the model's
    ``rotary_emb`` (its RoPE type and scaling, Su et al. 2021 eq. 34)."""
    rope = model.model.rotary_emb
    pos = torch.arange(spec.max_seq_len)[None]
    probe = torch.zeros(1, dtype=model.model.embed_tokens.weight.dtype)
    with torch.no_grad():
        cos, sin = rope(probe, pos)
    return cos[0].float().contiguous(), sin[0].float().contiguous()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Step(torch.nn.Module):
    """See the module docstring. Holds references to ``model``'s submodules (their
    parameters keep their names, so pins and per-layer configs name them as in the model)."""

    def __init__(self, model, spec: LlmSpec):
        super().__init__()
        self.model = model.model
        self.lm_head = model.lm_head
        self.spec = spec
        cos, sin = rotary_tables(model, spec)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids, positions, mask, slot, *caches):
        s = self.spec
        b, t = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        cos = self.rope_cos[positions].unsqueeze(1).to(x.dtype)  # [B, 1, T, D]
        sin = self.rope_sin[positions].unsqueeze(1).to(x.dtype)
        new_caches = []
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(b, t, s.heads, s.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc = kv_write(caches[2 * i], k, slot, bits=s.kv_bits)
            vc = kv_write(caches[2 * i + 1], v, slot, bits=s.kv_bits)
            new_caches += [kc, vc]
            if s.kv_bits:  # a quantized cache: attention reads its rows dequantized
                kc, vc = kv_read(kc, s.kv_bits, s.head_dim), kv_read(vc, s.kv_bits, s.head_dim)
            o = torch.nn.functional.scaled_dot_product_attention(
                q, kc, vc, attn_mask=mask, scale=attn.scaling,
                enable_gqa=s.kv_heads != s.heads)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(b, t, s.heads * s.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = self.model.norm(x[:, -1:])
        return (self.lm_head(last), *new_caches)
