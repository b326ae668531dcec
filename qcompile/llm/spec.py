"""What qcompile needs to know of a Hugging Face decoder LLM, read from the model itself.

The Llama family — ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` and
models built the same way — shares one layout: token embedding, N blocks of (RMSNorm,
attention with rotary positions and grouped KV heads, RMSNorm, gated SiLU MLP), a final
RMSNorm and the LM head (possibly tied to the embedding). :func:`read_spec` checks a model
has that layout and collects the sizes the KV cache and the runtime need.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.errors import ConfigError

__all__ = ["LlmSpec", "read_spec", "SUPPORTED"]

#: model types whose layout :func:`read_spec` checks and ``qcompile.llm`` runs
SUPPORTED = ("llama", "qwen2", "mistral")


@dataclass
class LlmSpec:
    """Sizes of a decoder LLM and the choices its runtime makes.

    ``sliding_window``: every layer attends to at most that many past positions (Mistral);
    None: full attention. ``eos``: the token ids that end a sequence by default.
    ``kv_bits``: 0 (an fp32 KV cache), 8 or 4 (stored quantized per token)."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_seq_len: int
    max_batch: int
    sliding_window: int | None = None
    eos: tuple[int, ...] = ()
    pad: int = 0
    kv_bits: int = 0

    @property
    def cache_shape(self) -> tuple[int, int, int, int]:
        """One layer's K (or V) cache: [max_batch, kv_heads, max_seq_len, head_dim] fp32, or
        with ``kv_bits`` uint8 rows of codes and their scale (``kv_row_bytes``)."""
        from qcompile.ir.ops.nn import kv_row_bytes
        last = kv_row_bytes(self.head_dim, self.kv_bits) if self.kv_bits else self.head_dim
        return (self.max_batch, self.kv_heads, self.max_seq_len, last)

    @property
    def cache_dtype(self):
        return torch.uint8 if self.kv_bits else torch.float32

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: dict) -> "LlmSpec":
        d = dict(d)
        d["eos"] = tuple(d.get("eos", ()))
        return cls(**d)


def _eos(cfg, gen) -> tuple[int, ...]:
    ids = getattr(gen, "eos_token_id", None) if gen is not None else None
    if ids is None:
        ids = getattr(cfg, "eos_token_id", None)
    if ids is None:
        return ()
    return tuple(int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]))


def read_spec(model: torch.nn.Module, *, max_seq_len: int, max_batch: int) -> LlmSpec:
    """The :class:`LlmSpec` of a Hugging Face causal LM, or a ``ConfigError`` saying what
    about the model qcompile cannot run."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if cfg is None or mtype not in SUPPORTED:
        raise ConfigError(f"compile_llm takes a Hugging Face causal LM of the Llama family "
                          f"({', '.join(SUPPORTED)}); got {type(model).__name__}"
                          + (f" (model_type {mtype!r})" if mtype else ""),
                          hint="load it with transformers.AutoModelForCausalLM; other decoders "
                               "can still be compiled for one forward pass with qcompile.compile")
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    missing = [a for a in needed if not hasattr(inner, a)] + \
        ([] if hasattr(model, "lm_head") else ["lm_head"])
    if missing:
        raise ConfigError(f"{type(model).__name__} lacks {missing} of the Llama layout",
                          hint="compile it with qcompile.compile for one forward pass instead")
    for name, v in (("max_seq_len", max_seq_len), ("max_batch", max_batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    limit = getattr(cfg, "max_position_embeddings", None)
    rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type == "dynamic" and limit is not None and max_seq_len > limit:
        raise ConfigError(f"dynamic NTK RoPE rescales its frequencies past {limit} positions, "
                          f"which one table for max_seq_len={max_seq_len} cannot follow",
                          hint=f"use max_seq_len <= {limit}")
    attn = inner.layers[0].self_attn
    head_dim = int(getattr(attn, "head_dim", cfg.hidden_size // cfg.num_attention_heads))
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if mtype == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        window = None
    if window is not None and window >= max_seq_len:
        window = None  # nothing to slide: every position is in reach
    if window is not None and types and len(set(types)) > 1:
        raise ConfigError(f"{type(model).__name__} mixes sliding-window and full-attention "
                          f"layers, and max_seq_len={max_seq_len} passes the window ({window})",
                          hint=f"use max_seq_len <= {window}")
    gen = getattr(model, "generation_config", None)
    pad = getattr(cfg, "pad_token_id", None)
    return LlmSpec(model_type=mtype, layers=len(inner.layers), hidden=int(cfg.hidden_size),
                   heads=int(cfg.num_attention_heads),
                   kv_heads=int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
                   head_dim=head_dim, vocab=int(cfg.vocab_size), max_seq_len=max_seq_len,
                   max_batch=max_batch, sliding_window=window, eos=_eos(cfg, gen),
                   pad=int(pad) if pad is not None else 0)
