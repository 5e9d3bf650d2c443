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


class SplitCausalAttention(torch.autograd.Function):
    """Prefix part (no mask) + diagonal part (causal), merged by log-sum-exp; see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        s = k.shape[2] - q.shape[2]
        out, lse = _OPS(q, k[:, :, s:], v[:, :, s:], 0.0, True, scale=scale)
        if s > 0:
            out_p, lse_p = _OPS(q, k[:, :, :s], v[:, :, :s], 0.0, False, scale=scale)
            merged = torch.logaddexp(lse, lse_p)
            out = torch.exp(lse - merged)[..., None] * out + torch.exp(lse_p - merged)[..., None] * out_p
            lse = merged
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        s = k.shape[2] - q.shape[2]
        grad_out = grad_out.contiguous()
        dq, dk_d, dv_d = _BACKWARD(grad_out, q, k[:, :, s:], v[:, :, s:], out, lse, 0.0, True, scale=ctx.scale)
        if s == 0:
            return dq, dk_d, dv_d, None
        dq_p, dk_p, dv_p = _BACKWARD(grad_out, q, k[:, :, :s], v[:, :, :s], out, lse, 0.0, False, scale=ctx.scale)
        return dq + dq_p, torch.cat([dk_p, dk_d], dim=2), torch.cat([dv_p, dv_d], dim=2), None


def chunk_attention(q, k, v, s: int, key_padding_mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention of queries at positions ``[s, s + c)`` over keys ``[0, s + c)``."""
    e = k.shape[2]
    fast = (_OPS is not None and _BACKWARD is not None and key_padding_mask is None and q.device.type == "cpu"
            and q.dtype == torch.float32 and q.shape[1] % k.shape[1] == 0)
    if fast:
        return SplitCausalAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                          scale if scale is not None else q.shape[-1] ** -0.5)
    from ds_ext.models.llama import grouped_sdpa
    return grouped_sdpa(q, k, v, attn_mask=chunk_mask(s, e, key_padding_mask, q.device), scale=scale)
