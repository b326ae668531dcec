"""The compiled LLM: prefill, decode steps and ``generate`` over a KV cache held as state.

The cache is one preallocated tensor per layer for keys and one for values, each
[max_batch, kv_heads, max_seq_len, head_dim] (:attr:`LlmSpec.cache_shape`), written in place
by the graph's ``kv_write`` ops: a decode step writes one row per layer and sequence and
copies nothing else. A batch of ``n`` prompts uses the first ``n`` rows of each cache (a
contiguous view). Prompts are left-padded to one length, so every sequence writes the same
slot at each step; a sequence's RoPE positions count its own tokens only, and the mask
hides the padding (Hugging Face's convention for batched generation, so a batch gives the
tokens each prompt gives alone).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from qcompile.errors import InputError
from qcompile.llm.spec import LlmSpec
from qcompile.runtime import CompiledModel

__all__ = ["CompiledLLM", "sample_next", "DECODE"]

#: the prefix of the decode executable's files in an artifact
DECODE = "decode."
#: a Hugging Face tokenizer's files, kept in the artifact when the model's directory has them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` [n, vocab]: argmax when ``temperature`` is
    0, else a draw from softmax(logits / temperature) restricted to the ``top_k`` most likely
    tokens (0: all) and to the smallest set whose probability reaches ``top_p`` (nucleus
    sampling, Holtzman et al. 2020, §3.1)."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        order = torch.sort(scores, descending=True, dim=-1)
        probs = torch.softmax(order.values, -1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        scores = scores.scatter(-1, order.indices, order.values.masked_fill(drop, float("-inf")))
    probs = torch.softmax(scores, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class CompiledLLM(CompiledModel):
    """A decoder LLM compiled by :func:`qcompile.compile_llm`.

    ``generate`` for whole generations; ``prefill`` and ``decode_step`` for callers that run
    their own loop. ``graph`` is the step graph (see :mod:`qcompile.llm.step`); calling the
    model like a ``CompiledModel`` runs one step on explicit inputs."""

    def __init__(self, graph, target, executable, spec: LlmSpec, *, decode=None,
                 tokenizer_files: dict[str, bytes] | None = None, **kw):
        super().__init__(graph, target, executable, **kw)
        self.spec = spec
        #: the model's tokenizer files (saved with the artifact, for ``qcompile generate``)
        self.tokenizer_files = dict(tokenizer_files or {})
        #: the decode step's executable: the step graph lowered with one token per sequence
        #: (static shapes for the GEMV and attention kernels); None: ``executable`` runs both
        self._decode = decode
        self.caches: list[torch.Tensor] = []
        self._n = 0           # sequences of the current batch
        self._slot = 0        # next cache slot to write
        self._valid = None    # [n, S] bool: slots holding a real token
        self._pos = None      # [n] the next token's RoPE position

    # -- state ------------------------------------------------------------------------------
    def _alloc(self) -> None:
        if not self.caches:
            self.caches = [torch.zeros(self.spec.cache_shape, dtype=self.spec.cache_dtype)
                           for _ in range(2 * self.spec.layers)]

    def reset(self) -> None:
        """Forget the current sequences (the cache memory stays allocated)."""
        self._n, self._slot, self._valid, self._pos = 0, 0, None, None

    @property
    def cache_bytes(self) -> int:
        """Bytes the KV cache holds (allocated at the first prefill)."""
        return sum(c.numel() * c.element_size() for c in self.caches)

    def _mask(self, queries: torch.Tensor) -> torch.Tensor:
        """[n, 1, T, S] bool: query i of sequence b sees key slot j when j holds a real token
        of b, is not after i, and is within the sliding window; ``queries`` [n, T] are the
        query slots. A padding query sees itself only (a row of no keys would be NaN)."""
        s = self.spec
        slots = torch.arange(s.max_seq_len)
        pos_of_slot = self._valid.long().cumsum(-1) - 1                    # [n, S]
        q_pos = torch.gather(pos_of_slot, 1, queries)                      # [n, T]
        m = self._valid[:, None, :] & (slots[None, None, :] <= queries[:, :, None])
        if s.sliding_window is not None:
            m &= (q_pos[:, :, None] - pos_of_slot[:, None, :]) < s.sliding_window
        m |= slots[None, None, :] == queries[:, :, None]
        return m[:, None]

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = ids.shape[0]
        slot = torch.tensor([self._slot], dtype=torch.int64)
        caches = [c[:n] for c in self.caches]
        ex = self._decode if self._decode is not None and ids.shape[1] == 1 else self._exec
        with torch.no_grad():
            outs = list(ex(ids, positions, mask, slot, *caches))
        for c, new in zip(caches, outs[1:]):
            if new.data_ptr() != c.data_ptr():  # a backend that returned a fresh cache
                c.copy_(new)
        return outs[0][:, -1].float()

    # -- the two phases ---------------------------------------------------------------------
    def prefill(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Start a batch: ``input_ids`` [n, T] (left-padded, ``attention_mask`` [n, T] with 0
        on padding) or a list of token-id lists of any lengths. Returns the next-token logits
        [n, vocab]."""
        ids, am = _left_pad(input_ids, attention_mask, self.spec.pad)
        n, t = ids.shape
        s = self.spec
        if n > s.max_batch:
            raise InputError(f"a batch of {n} prompts; this model was compiled for max_batch="
                             f"{s.max_batch}", hint="compile_llm(..., max_batch=N) with a larger N")
        if t >= s.max_seq_len:
            raise InputError(f"a prompt of {t} tokens leaves no room in max_seq_len={s.max_seq_len}",
                             hint="compile_llm(..., max_seq_len=N) with a larger N")
        self._alloc()
        self._n, self._slot = n, 0
        self._valid = torch.zeros(n, s.max_seq_len, dtype=torch.bool)
        self._valid[:, :t] = am.bool()
        positions = (am.long().cumsum(-1) - 1).clamp(min=0)
        self._pos = positions[:, -1] + 1
        queries = torch.arange(t).expand(n, t)
        logits = self._run(ids, positions, self._mask(queries))
        self._slot = t
        return logits

    def decode_step(self, tokens) -> torch.Tensor:
        """Feed one token per sequence of the current batch (``tokens`` [n]); returns the
        next-token logits [n, vocab]."""
        if self._valid is None:
            raise InputError("decode_step before prefill", hint="call prefill(prompts) first")
        tokens = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
        if tokens.numel() != self._n:
            raise InputError(f"decode_step got {tokens.numel()} tokens for a batch of {self._n}")
        if self._slot >= self.spec.max_seq_len:
            raise InputError(f"the KV cache is full ({self.spec.max_seq_len} positions)",
                             hint="compile_llm(..., max_seq_len=N) with a larger N, or start again")
        self._valid[:, self._slot] = True
        queries = torch.full((self._n, 1), self._slot, dtype=torch.int64)
        logits = self._run(tokens[:, None], self._pos[:, None].clone(), self._mask(queries))
        self._slot += 1
        self._pos += 1
        return logits

    # -- generation -------------------------------------------------------------------------
    def generate(self, input_ids, max_new_tokens: int = 32, *, attention_mask=None,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, stop_tokens: Iterable[int] | None = None,
                 callback: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """New tokens for each prompt (``input_ids`` as for :meth:`prefill`): greedy when
        ``temperature`` is 0 (the default), else sampled (:func:`sample_next`, seeded by
        ``seed``). A sequence stops after a token of ``stop_tokens`` (default: the model's
        EOS ids), which is kept, or after ``max_new_tokens``. ``callback(index, token)`` sees
        each token as it comes (streaming)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        stops = set(self.spec.eos if stop_tokens is None else stop_tokens)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if max_new_tokens == 0:
            return [[] for _ in range(_left_pad(input_ids, attention_mask, self.spec.pad)[0].shape[0])]
        logits = self.prefill(input_ids, attention_mask)
        n = logits.shape[0]
        out: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        room = self.spec.max_seq_len - self._slot
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=gen)
            for b in range(n):
                if not done[b]:
                    tok = int(nxt[b])
                    out[b].append(tok)
                    if callback is not None:
                        callback(b, tok)
                    done[b] = tok in stops
            if all(done) or step == max_new_tokens - 1:
                break
            if step >= room:
                raise InputError(f"the KV cache is full after {step + 1} new tokens "
                                 f"(max_seq_len={self.spec.max_seq_len})",
                                 hint="compile_llm(..., max_seq_len=N) with a larger N")
            nxt = torch.where(torch.tensor(done), torch.full_like(nxt, self.spec.pad), nxt)
            logits = self.decode_step(nxt)
        return out

    # -- artifacts --------------------------------------------------------------------------
    def _manifest_extra(self) -> dict:
        return {"llm": self.spec.to_json()}

    def _compiled_files(self) -> dict[str, bytes]:
        """The prefill executable's files, the decode one's under ``decode.`` (those equal to
        the prefill's — the parameters they share — once) and the tokenizer's."""
        src = self._source_files()
        if src:
            return src
        from qcompile.backends import get_backend
        backend = get_backend(self.target)
        mine = backend.artifacts(self._exec)
        files = {**self.tokenizer_files, **mine}
        if self._decode is not None:
            # a file the decode build shares with the prefill one (its parameters) is kept once
            files.update({f"{DECODE}{k}": v for k, v in backend.artifacts(self._decode).items()
                          if mine.get(k) != v})
        return files

    def tokenizer(self, directory=None):
        """The Hugging Face tokenizer saved with the model (or the one in ``directory``)."""
        import tempfile
        from pathlib import Path

        from transformers import AutoTokenizer
        if directory is not None:
            return AutoTokenizer.from_pretrained(directory)
        if not self.tokenizer_files:
            raise InputError("this model was compiled without its tokenizer's files",
                             hint="pass the model directory's tokenizer (--tokenizer DIR)")
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in self.tokenizer_files.items():
                (Path(tmp) / name).write_bytes(data)
            return AutoTokenizer.from_pretrained(tmp)

    def __repr__(self) -> str:
        s = self.spec
        return (f"<CompiledLLM {s.model_type} target={self.target!r} layers={s.layers} "
                f"max_seq_len={s.max_seq_len} max_batch={s.max_batch}>")


def _left_pad(input_ids, attention_mask, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [n, T], mask [n, T]) from a tensor (with its mask, default all ones) or from a
    list of token-id lists, padded on the left."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.to(torch.int64)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise InputError(f"input_ids must be [batch, length] with length >= 1, got {list(ids.shape)}")
        am = (torch.ones_like(ids) if attention_mask is None
              else torch.as_tensor(attention_mask).to(torch.int64))
        if am.shape != ids.shape:
            raise InputError(f"attention_mask {list(am.shape)} does not match input_ids {list(ids.shape)}")
        if bool((am[:, -1] == 0).any()):
            raise InputError("prompts must be left-padded (the last position is padding)",
                             hint="pad on the left, or pass a list of token-id lists")
        return ids, am
    rows: Sequence = list(input_ids)
    if not rows or not all(isinstance(r, (list, tuple)) for r in rows):
        rows = [rows]
    if any(len(r) == 0 for r in rows):
        raise InputError("an empty prompt", hint="give every prompt at least one token (e.g. BOS)")
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.int64)
    am = torch.zeros(len(rows), t, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor([int(x) for x in r])
        am[i, t - len(r):] = 1
    return ids, am
