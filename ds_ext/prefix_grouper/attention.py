"""Prefix-grouped attention: a group's prompt is encoded once, each response attends to it (arXiv 2506.05433).

Per packed row ``[prefix (P); suffix_1 (S_1); ...; suffix_G (S_G)]`` (see :mod:`ds_ext.prefix_grouper.layout`), one
call of the merged attention op (:func:`ds_ext.ops.attention.merged_attention`) with the parts:

* prefix queries over the prefix keys, causal (once per group, not G times);
* all suffix queries over the prefix keys, unmasked (one flash call for the whole row);
* suffix ``j``'s queries over its own keys, causal;

merged by log-sum-exp. The prefix K/V are read once per row, never copied; padding rows get 0.

The kernel is :func:`ds_ext.ops.attention_kernels.select_kernel`'s (CPU flash in fp32, CUDA flash or
memory-efficient attention). Where no fused kernel applies (e.g. bf16 on CPU, no kernels; logged once with the
reason) each row runs one SDPA with the block mask of :func:`ds_ext.ops.attention.grouped_attention_mask`
(exact; ``L x L`` booleans per row, K/V not repeated). Shapes: ``q: [N, H, L, D]``, ``k, v: [N, Hkv, L, D]``, output ``[N, H, L, D]`` (padding rows:
unused values).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ds_ext.ops.attention import (MASKED_SDPA, Part, grouped_attention_mask, grouped_chunk_mask, grouped_sdpa,
                                  merged_attention, select_kernel)


def row_parts(k: torch.Tensor, v: torch.Tensor, prefix_len: int, suffix_lens: List[int]) -> List[Part]:
    """The key parts of one packed row (``k, v: [1, Hkv, L, D]``), see the module docstring."""
    p, total = prefix_len, prefix_len + sum(suffix_lens)
    parts = [Part(k, v, True, q_rows=(0, p), kv_rows=(0, p))]
    if total > p:
        parts.append(Part(k, v, False, q_rows=(p, total), kv_rows=(0, p)))
    offset = p
    for s in suffix_lens:
        parts.append(Part(k, v, True, q_rows=(offset, offset + s), kv_rows=(offset, offset + s)))
        offset += s
    return parts


def prefix_grouped_attention(q, k, v, prefix_lens: List[int], suffix_lens: List[List[int]],
                             segment_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    """Attention in the grouped layout; ``segment_ids: [N, L]`` is needed only by the masked fallback."""
    kernel, reason = select_kernel(q, k, what="prefix-grouped attention")
    if kernel == MASKED_SDPA:
        if segment_ids is None:
            raise ValueError(f"the masked fallback of prefix-grouped attention ({reason}) needs segment_ids")
        return grouped_sdpa(q, k, v, attn_mask=grouped_attention_mask(segment_ids), scale=scale)
    rows = [merged_attention(q[n:n + 1], row_parts(k[n:n + 1], v[n:n + 1], p, lens), scale, kernel)
            for n, (p, lens) in enumerate(zip(prefix_lens, suffix_lens))]
    return torch.cat(rows, dim=0)


class GroupedAttention:
    """The reference model's per-call ``attention_fn`` for one grouped batch: ``fn(q, k, v, key_padding_mask)``.
    Gives StreamBP its chunk masks (:meth:`chunk_mask`, the :class:`ds_ext.ops.stream.ChunkMasked` protocol)."""

    def __init__(self, batch):
        self.batch = batch

    def __call__(self, q, k, v, key_padding_mask=None):
        b = self.batch
        return prefix_grouped_attention(q, k, v, b.prefix_lens, b.suffix_lens, b.segment_ids)

    def chunk_mask(self, start: int, end: int) -> torch.Tensor:
        """Rows ``[start, end)`` of the grouped mask over keys ``[0, end)``: ``[N, 1, end - start, end]``."""
        return grouped_chunk_mask(self.batch.segment_ids, start, end)
