"""Sampling with a KV cache for the reference model: what the rollout workers of async GRPO run.

``generate(model, prompt_ids, prompt_mask, max_new_tokens, ...)``: prompts ``[B, P]`` left-padded (``prompt_mask``
True on real tokens), positions counted from each prompt's first real token. One prefill over the prompts fills
every layer's cache ``k, v: [B, Hkv, P, D]``; each decode step appends one position. Returns the sampled tokens
``[B, L]``, their log-probabilities under the sampling distribution ``[B, L]`` (the behaviour log-probs GRPO's ratio
needs) and each response's length (through its first ``eos_id``, included; later positions are ``pad_id``).

``step_hook`` (optional) is called between decode steps, after token ``t`` is sampled and before the forward that
gives token ``t + 1``: it may change the model's weights in place (AsyncFlow's partial rollouts load newer weights
there); the KV cache of earlier positions is kept as it was computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from ds_ext.models.llama import LlamaForCausalLM
from ds_ext.ops.attention import grouped_sdpa


@dataclass
class Generation:
    tokens: torch.Tensor     # [B, L] int64, pad after the end
    logprobs: torch.Tensor   # [B, L] fp32, 0 after the end
    lengths: torch.Tensor    # [B] int64, EOS included


def sample(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``logits [..., V]`` -> (tokens ``[...]``, their log-probs ``[...]``, fp32): a draw from
    ``softmax(logits / temperature)`` (argmax at 0), restricted to the nucleus of mass ``top_p`` and renormalised
    when ``top_p < 1``; the log-prob is that of the distribution the token was drawn from. Shared by
    :class:`TokenSampler` and the rollout slot decoders (``ds_ext.asyncflow.slots`` / ``hf_slots``)."""
    if temperature == 0:
        logprobs = torch.log_softmax(logits.float(), -1)
        tok = logprobs.argmax(-1)
        return tok, logprobs.gather(-1, tok[..., None]).squeeze(-1)
    logprobs = torch.log_softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        probs, order = logprobs.exp().sort(-1, descending=True)
        # keep a token if the mass strictly before it is below top_p (the most likely token is always kept)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logprobs = torch.log_softmax(logprobs.masked_fill(drop, float("-inf")), -1)
    flat = logprobs.reshape(-1, logprobs.shape[-1]).exp()
    tok = torch.multinomial(flat, 1, generator=generator).view(logprobs.shape[:-1])
    return tok, logprobs.gather(-1, tok[..., None]).squeeze(-1)


class TokenSampler:
    """The sampling half of a KV-cache loop, shared by the reference model's and transformers' samplers: draw each
    next token from ``softmax(logits / temperature)`` (argmax at 0), record it and its log-prob, pad after EOS."""

    def __init__(self, batch: int, max_new_tokens: int, temperature: float, eos_id: Optional[int], pad_id: int,
                 generator: Optional[torch.Generator]):
        self.temperature, self.eos_id, self.pad_id, self.generator = temperature, eos_id, pad_id, generator
        self.tokens: List[torch.Tensor] = []
        self.logps: List[torch.Tensor] = []
        self.done = torch.zeros(batch, dtype=torch.bool)
        self.lengths = torch.full((batch,), max_new_tokens, dtype=torch.long)

    def step(self, logits: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        """``logits: [B, V]`` of the next position -> (tokens ``[B]``, whether every sequence has ended)."""
        tok, lp = sample(logits, self.temperature, 1.0, self.generator)
        self.tokens.append(torch.where(self.done, torch.full_like(tok, self.pad_id), tok))
        self.logps.append(torch.where(self.done, torch.zeros_like(lp), lp))
        if self.eos_id is not None:
            ended = ~self.done & (tok == self.eos_id)
            self.lengths[ended] = len(self.tokens)
            self.done |= ended
        return tok, bool(self.done.all())

    def result(self) -> Generation:
        return Generation(torch.stack(self.tokens, 1), torch.stack(self.logps, 1), self.lengths)


def _layer_step(layer, x, positions, cache: Optional[Tuple[torch.Tensor, torch.Tensor]], key_mask):
    """One decoder layer on new positions ``x: [B, t, C]`` given the cached keys/values; returns (out, cache)."""
    attn = layer.attn
    b, t, _ = x.shape
    h = layer.input_norm(x)
    q, k, v = attn.project_qkv(h, positions)  # the model's own projection + RoPE (one copy)
    if cache is not None:
        k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
    total = k.shape[2]
    causal = torch.ones(t, total, dtype=torch.bool).tril(total - t)
    mask = causal[None, None] & key_mask[:, None, None, :]
    mask = mask | (torch.arange(total)[None, :] == torch.arange(total - t, total)[:, None])[None, None]
    out = grouped_sdpa(q, k, v, attn_mask=mask)
    x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
    return x + layer.mlp(layer.post_attn_norm(x)), (k, v)


@torch.no_grad()
def generate(model: LlamaForCausalLM, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, eos_id: Optional[int] = None, pad_id: int = 0,
             generator: Optional[torch.Generator] = None,
             step_hook: Optional[Callable[[], None]] = None) -> Generation:
    b = prompt_ids.shape[0]
    key_mask = prompt_mask.bool()
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    x = model.embed(prompt_ids)
    caches: List = [None] * len(model.layers)
    next_pos = positions[:, -1:] + 1

    def next_logits(tok: Optional[torch.Tensor]) -> torch.Tensor:
        nonlocal x, positions, next_pos, key_mask
        if tok is not None:  # one new token per row, at the next position
            x, positions = model.embed(tok[:, None]), next_pos
            next_pos = next_pos + 1
            key_mask = torch.cat([key_mask, torch.ones(b, 1, dtype=torch.bool)], 1)
        for i, layer in enumerate(model.layers):
            x, caches[i] = _layer_step(layer, x, positions, caches[i], key_mask)
        return model.lm_head(model.norm(x[:, -1]))
    return decode(next_logits, TokenSampler(b, max_new_tokens, temperature, eos_id, pad_id, generator),
                  max_new_tokens, step_hook)


def decode(next_logits: Callable[[Optional[torch.Tensor]], torch.Tensor], sampler: TokenSampler,
           max_new_tokens: int, step_hook: Optional[Callable[[], None]] = None) -> Generation:
    """The decode loop of every KV-cache decoder (the reference model's and transformers'): ``next_logits(None)``
    runs the prompts, ``next_logits(tok)`` one sampled token per row (``tok: [B]``); each returns the last
    position's logits ``[B, V]``. ``step_hook`` runs between decode steps, before the next token goes in (new
    weights land there: the next token's embedding and every later step use them)."""
    tok = None
    for _ in range(max_new_tokens):
        tok, finished = sampler.step(next_logits(tok))
        if finished:
            break
        if step_hook is not None:
            step_hook()
    return sampler.result()
