"""Continuous-batching decode for transformers causal LMs: a fixed number of sequence slots in one ``DynamicCache``.

:class:`HFSlotDecoder` has :class:`~ds_ext.asyncflow.slots.SlotDecoder`'s interface (``prefill`` -> ``admit`` ->
``step`` ... -> ``release``; :class:`~ds_ext.asyncflow.continuous.ContinuousBatcher` drives either) on a
``transformers`` model (Llama, Qwen2, ...: any causal LM that takes ``position_ids``, a 2-D ``attention_mask`` and a
``DynamicCache``).

Layout: the cache holds per layer keys/values ``[S, Hkv, W, D]`` for ``S`` slots over ``W`` shared columns, and
``mask [S, W]`` marks the live columns. Slots are *right-aligned*: slot ``s`` with ``fill[s]`` positions occupies the
last ``fill[s]`` columns, so every decode step appends one column for all slots (transformers' own
``DynamicCache.update``). Each slot has its own positions (``position_ids = fill``: RoPE by the slot's position, not
the column), so a response admitted late attends exactly as it would alone. Call order:

* :meth:`prefill` ``(prompt [P]) -> Prefix``: one forward over the prompt (batch 1) -> its keys/values per layer
  and the next-token logits; a GRPO group's ``G`` responses share one prefill.
* :meth:`admit` ``(slot, prefix) -> (token, logprob)``: write the prefix into the slot's last ``P`` columns (the
  cache grows on the left first when ``P > W``), mask the rest of the row, sample the first token.
* :meth:`step` ``() -> (tokens [S], logprobs [S])``: drop the columns no busy slot uses (the cache stays as wide as
  the longest live sequence), one forward of one token per slot, sample. An idle slot's row runs too (its result is
  ignored) and sees only its own new column, so no attention row is empty.
* :meth:`release` ``(slot)``: the slot is free; its columns are masked.

Sampling (:func:`ds_ext.models.generate.sample`, shared with the reference decoder): ``softmax(logits /
temperature)``, cut to the top-p nucleus when ``top_p < 1`` (the smallest set of most likely tokens whose
probability reaches ``top_p``, renormalised); ``temperature == 0`` is greedy.
The log-prob returned is the behaviour log-prob of the sampled token under the distribution it was drawn from
(the untempered softmax when greedy, as :class:`~ds_ext.models.generate.TokenSampler`). Weights may change between
calls (partial rollouts): cached columns keep the keys/values they were computed with.
"""
from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch

from ds_ext.asyncflow.slots import Prefix
from ds_ext.models.generate import sample


def cache_kwarg(model) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.x), earlier ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFSlotDecoder:
    def __init__(self, model, slots: int, temperature: float = 1.0, top_p: float = 1.0,
                 generator: Optional[torch.Generator] = None):
        from transformers import DynamicCache
        self.model = getattr(model, "hf", model)  # an HFPolicy or the transformers model itself
        self.slots, self.temperature, self.top_p, self.generator = slots, temperature, top_p, generator
        self.cache = DynamicCache()
        self.cache_kw = cache_kwarg(self.model)
        self.mask = torch.zeros(slots, 0, dtype=torch.long)      # [S, W] live columns
        self.fill = torch.zeros(slots, dtype=torch.long)         # positions per slot (= the next position)
        self.last = torch.zeros(slots, dtype=torch.long)         # the token the next step feeds
        self.busy = torch.zeros(slots, dtype=torch.bool)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def ensure_capacity(self, positions: int) -> None:
        """Nothing to reserve: the cache grows with the sequences (the reference decoder's fixed capacity)."""

    def _layers(self):
        return self.cache.layers

    def _pad_left(self, n: int) -> None:
        """Grow every layer's cache and the mask by ``n`` masked columns on the left (a longer prompt arrived)."""
        for layer in self._layers():
            pad = layer.keys.new_zeros(*layer.keys.shape[:2], n, layer.keys.shape[3])
            layer.keys = torch.cat([pad, layer.keys], 2)
            layer.values = torch.cat([pad.new_zeros(*layer.values.shape[:2], n, layer.values.shape[3]),
                                      layer.values], 2)
        self.mask = torch.cat([self.mask.new_zeros(self.slots, n), self.mask], 1)

    def _compact(self) -> None:
        """Drop the left columns no busy slot reaches (right-aligned: slot ``s`` uses the last ``fill[s]``)."""
        keep = int(self.fill[self.busy].max()) if bool(self.busy.any()) else 0
        cut = self.width - keep
        if cut <= 0:
            return
        for layer in self._layers():
            layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
        self.mask = self.mask[:, cut:]

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> Prefix:
        from transformers import DynamicCache
        cache = DynamicCache()
        out = self.model(input_ids=prompt[None], use_cache=True, **{self.cache_kw: cache})
        return Prefix([layer.keys[0] for layer in cache.layers], [layer.values[0] for layer in cache.layers],
                      out.logits[0, -1], len(prompt))

    def admit(self, slot: int, prefix: Prefix) -> Tuple[int, float]:
        p = prefix.length
        if not self._layers() or not self._layers()[0].is_initialized:  # the first prefix: build an empty cache
            from transformers import DynamicCache
            empty = [(k.new_zeros(self.slots, k.shape[0], 0, k.shape[2]),
                      v.new_zeros(self.slots, v.shape[0], 0, v.shape[2])) for k, v in zip(prefix.keys, prefix.values)]
            self.cache = DynamicCache(ddp_cache_data=empty)
        if p > self.width:
            self._pad_left(p - self.width)
        w = self.width
        for i, layer in enumerate(self._layers()):
            layer.keys[slot, :, w - p:] = prefix.keys[i]
            layer.values[slot, :, w - p:] = prefix.values[i]
        self.mask[slot] = 0
        self.mask[slot, w - p:] = 1
        self.fill[slot] = p
        tok, lp = sample(prefix.logits, self.temperature, self.top_p, self.generator)
        self.last[slot], self.busy[slot] = tok, True
        return int(tok), float(lp)

    @torch.no_grad()
    def step(self) -> Tuple[torch.Tensor, torch.Tensor]:
        self._compact()
        # the new column is visible to every row (an idle slot's row would otherwise see nothing)
        mask = torch.cat([self.mask, self.mask.new_ones(self.slots, 1)], 1)
        out = self.model(input_ids=self.last[:, None], attention_mask=mask, position_ids=self.fill[:, None],
                         use_cache=True, **{self.cache_kw: self.cache})
        tok, lp = sample(out.logits[:, -1], self.temperature, self.top_p, self.generator)
        mask[:, -1] = self.busy.long()  # an idle slot's column stays masked
        self.mask = mask
        self.fill = torch.where(self.busy, self.fill + 1, 0)
        self.last = torch.where(self.busy, tok, self.last)
        return tok, lp

    def release(self, slot: int) -> None:
        self.busy[slot] = False
        self.fill[slot] = 0
        self.mask[slot] = 0
