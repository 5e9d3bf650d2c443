"""Prefix-grouped attention: a group's prompt is encoded once, each response attends to it (arXiv 2506.05433).

Per packed row ``[prefix (P); suffix_1 (S_1); ...; suffix_G (S_G)]`` (see :mod:`ds_ext.prefix_grouper.layout`):

* prefix queries attend causally to the prefix keys (once per group, not G times);
* suffix ``j``'s queries attend to all prefix keys and causally to their own keys: all suffix queries of the row
  meet the prefix keys in one unmasked flash call, each suffix its own keys in a causal one, and the parts are
  merged by log-sum-exp (:class:`SuffixAttention`); the prefix K/V are read once per row, never copied.

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
from ds_ext.streambp.attention import _BACKWARD, _OPS, merged_attention, merged_attention_available


class SuffixAttention(torch.autograd.Function):
    """All suffixes of one row: ``q_s, k_s, v_s: [1, H(kv), sum(S), D]``, prefix ``kp, vp: [1, Hkv, P, D]``.

    One flash call for every suffix query against the prefix (unmasked), one causal call per suffix on its own
    keys, merged by log-sum-exp; backward mirrors it with the merged ``out`` and ``lse`` (see
    :mod:`ds_ext.streambp.attention` for why that is exact).
    """

    @staticmethod
    def forward(ctx, q_s, kp, vp, k_s, v_s, lens, scale):
        out_p, lse_p = _OPS(q_s, kp, vp, 0.0, False, scale=scale)
        out_o, lse_o = torch.empty_like(out_p), torch.empty_like(lse_p)
        for a, b in _bounds(lens):
            out_o[:, :, a:b], lse_o[:, :, a:b] = _OPS(q_s[:, :, a:b], k_s[:, :, a:b], v_s[:, :, a:b], 0.0, True,
                                                      scale=scale)
        lse = torch.logaddexp(lse_p, lse_o)
        out = torch.exp(lse_p - lse)[..., None] * out_p + torch.exp(lse_o - lse)[..., None] * out_o
        ctx.save_for_backward(q_s, kp, vp, k_s, v_s, out, lse)
        ctx.lens, ctx.scale = lens, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_s, kp, vp, k_s, v_s, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dkp, dvp = _BACKWARD(grad_out, q_s, kp, vp, out, lse, 0.0, False, scale=ctx.scale)
        dk_s, dv_s = torch.empty_like(k_s), torch.empty_like(v_s)
        for a, b in _bounds(ctx.lens):
            dq_j, dk_s[:, :, a:b], dv_s[:, :, a:b] = _BACKWARD(
                grad_out[:, :, a:b], q_s[:, :, a:b], k_s[:, :, a:b], v_s[:, :, a:b], out[:, :, a:b],
                lse[:, :, a:b], 0.0, True, scale=ctx.scale)
            dq[:, :, a:b] += dq_j
        return dq, dkp, dvp, dk_s, dv_s, None, None


def _bounds(lens):
    offset = 0
    for s in lens:
        yield offset, offset + s
        offset += s


def _row_attention(q, k, v, prefix_len: int, suffix_lens: List[int], scale: float) -> torch.Tensor:
    """One packed row (``q: [1, H, L, D]``) -> ``[1, H, P + sum(S), D]``."""
    p, total = prefix_len, prefix_len + sum(suffix_lens)
    kp, vp = k[:, :, :p], v[:, :, :p]
    prefix = merged_attention(q[:, :, :p], [(kp, vp, True)], scale)
    if total == p:
        return prefix
    suffixes = SuffixAttention.apply(q[:, :, p:total], kp, vp, k[:, :, p:total], v[:, :, p:total],
                                     tuple(suffix_lens), scale)
    return torch.cat([prefix, suffixes], dim=2)


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
