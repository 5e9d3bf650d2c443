"""Attention of a chunk of queries over all earlier keys, without a ``[c, e]`` mask where possible.

Queries are positions ``[s, e)``, keys ``[0, e)``. Split the keys into the part every query sees (``[0, s)``, no
mask) and the square diagonal block (``[s, e)``, ordinary causal), run the flash kernel on each, and merge by
log-sum-exp (as flash-decoding and Prefix Grouper do)::

    lse = logaddexp(lse_1, lse_2);   out = exp(lse_1 - lse) * out_1 + exp(lse_2 - lse) * out_2

Backward calls the flash backward kernel once per part with the *merged* ``out`` and ``lse``: the kernel forms
``P = exp(S - lse)`` and ``rowsum(dO * O)`` from them, which are the true full-softmax quantities, so the two
calls' ``dQ`` add up and their ``dK, dV`` are the parts' exact gradients.

This uses PyTorch's CPU flash kernels (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward). When
they are not there (other devices, other builds) or a key padding mask is given, it falls back to SDPA with a
boolean ``[c, e]`` mask aligned bottom-right, which is exact too, only slower. Shapes: ``q: [B, H, c, D]``,
``k, v: [B, Hkv, e, D]`` (grouped-query heads are handled by the kernels, K/V are not repeated), output
``[B, H, c, D]``.
"""
from __future__ import annotations

from typing import Optional

import torch

_OPS = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def chunk_mask(s: int, e: int, key_padding_mask: Optional[torch.Tensor], device) -> torch.Tensor:
    """Boolean ``[B or 1, 1, c, e]`` mask: causal aligned bottom-right, key padding, and each query sees itself
    (so a padded row never becomes all-masked; its output is unused)."""
    q_pos = torch.arange(s, e, device=device)[:, None]
    k_pos = torch.arange(e, device=device)[None, :]
    mask = k_pos <= q_pos
    if key_padding_mask is not None:
        mask = (mask & key_padding_mask[:, None, None, :e]) | (k_pos == q_pos)
    return mask if mask.dim() == 4 else mask[None, None]


class MergedAttention(torch.autograd.Function):
    """Attention of ``q`` over several key/value parts at once, one flash call per part, merged by log-sum-exp.

    ``apply(q, scale, causal_flags, k_1, v_1, ..., k_m, v_m)``: part ``i`` is attended causally (square,
    upper-left aligned) when ``causal_flags[i]``, else fully. The result equals one softmax over the concatenated
    keys with the parts' masks; see the module docstring for why the backward is exact.
    """

    @staticmethod
    def forward(ctx, q, scale, causal_flags, *kv):
        out = lse = None
        for i, causal in enumerate(causal_flags):
            o_i, lse_i = _OPS(q, kv[2 * i], kv[2 * i + 1], 0.0, causal, scale=scale)
            if out is None:
                out, lse = o_i, lse_i
                continue
            merged = torch.logaddexp(lse, lse_i)
            out = torch.exp(lse - merged)[..., None] * out + torch.exp(lse_i - merged)[..., None] * o_i
            lse = merged
        ctx.save_for_backward(q, out, lse, *kv)
        ctx.scale, ctx.causal_flags = scale, causal_flags
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, out, lse, *kv = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dkv = torch.zeros_like(q), []
        for i, causal in enumerate(ctx.causal_flags):
            dq_i, dk_i, dv_i = _BACKWARD(grad_out, q, kv[2 * i], kv[2 * i + 1], out, lse, 0.0, causal,
                                         scale=ctx.scale)
            dq += dq_i
            dkv += [dk_i, dv_i]
        return (dq, None, None, *dkv)


def merged_attention_available(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :class:`MergedAttention` can run: CPU flash kernels present, fp32 CPU tensors, grouped heads."""
    return (_OPS is not None and _BACKWARD is not None and q.device.type == "cpu" and q.dtype == torch.float32
            and q.shape[1] % k.shape[1] == 0)


def merged_attention(q, parts, scale: float) -> torch.Tensor:
    """``parts``: list of ``(k, v, causal)``; see :class:`MergedAttention`. Strided views are fine (the kernels take
    them), so slices of one K/V tensor are read in place, not copied."""
    kv = [t for k, v, _ in parts for t in (k, v)]
    return MergedAttention.apply(q, scale, tuple(c for _, _, c in parts), *kv)


def chunk_attention(q, k, v, s: int, key_padding_mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention of queries at positions ``[s, s + c)`` over keys ``[0, s + c)``; with ``segment_ids``
    (Prefix Grouper's packed rows) the grouped mask's rows ``[s, s + c)`` instead."""
    e = k.shape[2]
    if segment_ids is not None:
        from ds_ext.models.llama import grouped_sdpa
        from ds_ext.prefix_grouper.layout import grouped_chunk_mask
        return grouped_sdpa(q, k, v, attn_mask=grouped_chunk_mask(segment_ids, s, e), scale=scale)
    if key_padding_mask is None and merged_attention_available(q, k):
        parts = [(k[:, :, :s], v[:, :, :s], False)] if s > 0 else []
        parts.append((k[:, :, s:], v[:, :, s:], True))
        return merged_attention(q, parts, scale if scale is not None else q.shape[-1] ** -0.5)
    from ds_ext.models.llama import grouped_sdpa
    return grouped_sdpa(q, k, v, attn_mask=chunk_mask(s, e, key_padding_mask, q.device), scale=scale)
