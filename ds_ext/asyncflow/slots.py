"""Continuous-batching decode for the rollout: a fixed number of sequence slots sharing one KV cache.

:class:`SlotDecoder` (the reference model, :class:`~ds_ext.models.LlamaForCausalLM`) keeps, per decoder layer, keys
and values ``[S, Hkv, C, D]`` for ``S`` slots of capacity ``C`` positions, a key mask ``[S, C]`` and each slot's
write position. Call order:

* :meth:`prefill` ``(prompt [P]) -> Prefix``: one forward over a prompt (batch 1) -> its keys/values per layer and
  the next-token logits. A GRPO group's ``G`` responses share one prefill.
* :meth:`admit` ``(slot, prefix) -> (token, logprob)``: copy the prefix into a free slot and sample the response's
  first token from the prefix's logits.
* :meth:`step` ``() -> (tokens [S], logprobs [S])``: one decode position for every slot at once (idle slots are
  computed too and their results ignored: that waste is what the fill fraction measures). Slot ``s`` attends to its
  own cached positions only (key mask), its new token at its own position (RoPE by the slot's position).
* :meth:`release` ``(slot)``: the slot is free for the next :meth:`admit` (its stale cache is masked out then).

Sampling (:func:`ds_ext.models.generate.sample`, shared with :class:`~ds_ext.models.generate.TokenSampler`) is
``softmax(logits / temperature)``, cut to the top-p nucleus when ``top_p < 1`` (the smallest set of most likely
tokens whose probability reaches ``top_p``, renormalised), with the decoder's generator; ``temperature == 0`` is
greedy. The log-prob returned is the behaviour log-prob of the sampled token under the
distribution it was drawn from (the untempered softmax when greedy, as
:class:`~ds_ext.models.generate.TokenSampler`). Weights may change between calls (partial rollouts): cached
positions keep the keys/values they were computed with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ds_ext.models.generate import sample
from ds_ext.ops.attention import grouped_sdpa


@dataclass
class Prefix:
    keys: List[torch.Tensor]     # per layer [Hkv, P, D]
    values: List[torch.Tensor]   # per layer [Hkv, P, D]
    logits: torch.Tensor         # [V] next-token logits after the prompt
    length: int


def _attend(layer, x, positions, k_cache, v_cache, key_mask, write_at):
    """One decoder layer on ``x: [B, t, C]`` at absolute ``positions [B, t]``; writes the new keys/values into the
    caches ``[B, Hkv, L, D]`` at ``write_at [B]`` .. ``+ t`` (``t > 1`` only with ``B == 1``) and attends to every
    unmasked cached position at or before each query's own."""
    attn = layer.attn
    b, t, _ = x.shape
    h = layer.input_norm(x)
    q, k, v = attn.project_qkv(h, positions)  # the model's own projection + RoPE (one copy)
    if t == 1:
        rows = torch.arange(b)
        k_cache[rows, :, write_at] = k[:, :, 0]
        v_cache[rows, :, write_at] = v[:, :, 0]
    else:
        start = int(write_at[0])
        k_cache[0, :, start:start + t], v_cache[0, :, start:start + t] = k[0], v[0]
    used = int(write_at.max()) + t
    query_at = write_at[:, None] + torch.arange(t)[None]                       # [B, t]
    visible = key_mask[:, None, :used] & (torch.arange(used)[None, None] <= query_at[..., None])
    out = grouped_sdpa(q, k_cache[:, :, :used], v_cache[:, :, :used], attn_mask=visible[:, None])
    x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
    return x + layer.mlp(layer.post_attn_norm(x))


class SlotDecoder:
    def __init__(self, model, slots: int, capacity: int, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None, top_p: float = 1.0):
        cfg = model.cfg
        self.model, self.slots, self.capacity = model, slots, capacity
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        shape = (slots, cfg.num_kv_heads, capacity, cfg.head_dim)
        dtype = next(model.parameters()).dtype
        self.k = [torch.zeros(shape, dtype=dtype) for _ in model.layers]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in model.layers]
        self.key_mask = torch.zeros(slots, capacity, dtype=torch.bool)
        self.fill = torch.zeros(slots, dtype=torch.long)      # next write position (= the slot's next position)
        self.last = torch.zeros(slots, dtype=torch.long)      # the token the next step feeds
        self.busy = torch.zeros(slots, dtype=torch.bool)

    def ensure_capacity(self, positions: int) -> None:
        """Grow every slot to at least ``positions`` cached positions (a longer prompt arrived)."""
        grow = positions - self.capacity
        if grow <= 0:
            return
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], grow, t.shape[3])], 2)  # noqa: E731
        self.k, self.v = [pad(t) for t in self.k], [pad(t) for t in self.v]
        self.key_mask = torch.cat([self.key_mask, self.key_mask.new_zeros(self.slots, grow)], 1)
        self.capacity = positions

    def _sample(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return sample(logits, self.temperature, self.top_p, self.generator)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> Prefix:
        p, m = len(prompt), self.model
        if p >= self.capacity:
            raise ValueError(f"prompt of {p} tokens does not fit a slot of {self.capacity} positions")
        x = m.embed(prompt[None])
        shape = (1, m.cfg.num_kv_heads, p, m.cfg.head_dim)
        keys, values = [], []
        mask = torch.ones(1, p, dtype=torch.bool)
        for layer in m.layers:
            kc, vc = torch.zeros(shape, dtype=x.dtype), torch.zeros(shape, dtype=x.dtype)
            x = _attend(layer, x, torch.arange(p)[None], kc, vc, mask, torch.zeros(1, dtype=torch.long))
            keys.append(kc[0])
            values.append(vc[0])
        return Prefix(keys, values, m.lm_head(m.norm(x[0, -1])), p)

    def admit(self, slot: int, prefix: Prefix) -> Tuple[int, float]:
        for i in range(len(self.k)):
            self.k[i][slot, :, :prefix.length] = prefix.keys[i]
            self.v[i][slot, :, :prefix.length] = prefix.values[i]
        self.key_mask[slot] = False
        self.key_mask[slot, :prefix.length] = True
        self.fill[slot] = prefix.length
        tok, lp = self._sample(prefix.logits)
        self.last[slot], self.busy[slot] = tok, True
        return int(tok), float(lp)

    @torch.no_grad()
    def step(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if int(self.fill.max()) >= self.capacity:
            raise ValueError(f"a slot is full ({self.capacity} positions): release it before the next step")
        m = self.model
        write_at = self.fill.clone()
        self.key_mask[torch.arange(self.slots), write_at] = True
        x = m.embed(self.last[:, None])
        for i, layer in enumerate(m.layers):
            x = _attend(layer, x, write_at[:, None], self.k[i], self.v[i], self.key_mask, write_at)
        tok, lp = self._sample(m.lm_head(m.norm(x[:, -1])))
        self.fill = torch.where(self.busy, write_at + 1, 0)  # an idle slot stays at position 0
        self.key_mask[~self.busy, 0] = False
        self.last = torch.where(self.busy, tok, self.last)
        return tok, lp

    def release(self, slot: int) -> None:
        self.busy[slot] = False
        self.fill[slot] = 0
        self.key_mask[slot] = False
