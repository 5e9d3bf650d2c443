"""Prefix-grouped attention: a group's prompt is encoded once, each response attends to it (arXiv 2506.05433).

Per packed row ``[prefix (P); suffix_1 (S_1); ...; suffix_G (S_G)]`` (see :mod:`ds_ext.prefix_grouper.layout`):

* prefix queries attend causally to the prefix keys (once per group, not G times);
* suffix ``j``'s queries attend to all prefix keys and causally to their own keys: two parts, the prefix one
  unmasked and the own one causal, merged by log-sum-exp (:func:`ds_ext.streambp.attention.merged_attention`); the
  prefix K/V are read by every suffix's call, never copied.

Where the CPU flash kernels are not available (CUDA, other dtypes) each row runs one SDPA with the block mask of
:func:`ds_ext.prefix_grouper.layout.grouped_attention_mask` (exact; ``L x L`` booleans per row, K/V not repeated).
Shapes: ``q: [N, H, L, D]``, ``k, v: [N, Hkv, L, D]``, output ``[N, H, L, D]`` (padding rows: unused values).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from ds_ext.models.llama import grouped_sdpa
from ds_ext.prefix_grouper.layout import grouped_attention_mask
from ds_ext.streambp.attention import merged_attention, merged_attention_available


def _row_attention(q, k, v, prefix_len: int, suffix_lens: List[int], scale: float) -> torch.Tensor:
    """One packed row (``q: [1, H, L, D]``) -> ``[1, H, P + sum(S), D]``."""
    p = prefix_len
    pieces = [merged_attention(q[:, :, :p], [(k[:, :, :p], v[:, :, :p], True)], scale)]
    offset = p
    for s in suffix_lens:
        own = slice(offset, offset + s)
        parts = [(k[:, :, :p], v[:, :, :p], False), (k[:, :, own], v[:, :, own], True)]
        pieces.append(merged_attention(q[:, :, own], parts, scale))
        offset += s
    return torch.cat(pieces, dim=2)


def prefix_grouped_attention(q, k, v, prefix_lens: List[int], suffix_lens: List[List[int]],
                             segment_ids: Optional[torch.Tensor] = None, scale: Optional[float] = None):
    """Attention in the grouped layout; ``segment_ids: [N, L]`` is needed only by the masked fallback."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    if not merged_attention_available(q, k):
        if segment_ids is None:
            raise ValueError("the masked fallback of prefix-grouped attention needs segment_ids")
        return grouped_sdpa(q, k, v, attn_mask=grouped_attention_mask(segment_ids), scale=scale)
    length = q.shape[2]
    rows = []
    for n, (p, lens) in enumerate(zip(prefix_lens, suffix_lens)):
        row = _row_attention(q[n:n + 1], k[n:n + 1], v[n:n + 1], p, lens, scale)
        rows.append(F.pad(row, (0, 0, 0, length - row.shape[2])))
    return torch.cat(rows, dim=0)


class GroupedAttention:
    """The reference model's ``attention_fn`` for one grouped batch: ``fn(q, k, v, key_padding_mask)``."""

    def __init__(self, batch):
        self.batch = batch

    def __call__(self, q, k, v, key_padding_mask=None):
        b = self.batch
        return prefix_grouped_attention(q, k, v, b.prefix_lens, b.suffix_lens, b.segment_ids)
