"""Prefix Grouper for HF transformers Llama/Qwen2-family models, through their attention-function registry.

:func:`enable_hf_prefix_grouper` registers ``"ds_ext_prefix_grouped"`` in ``transformers.AttentionInterface``
(and, for the mask that transformers builds before calling it, the SDPA mask function) and switches the model to
it; :func:`hf_grouped_logits` runs a :class:`GroupedBatch`: ``input_ids`` packed, ``position_ids`` restarting per
response (so HF's RoPE sees each response right after its prompt), and the batch handed down to the attention
function as the keyword ``prefix_grouped`` (HF passes extra keywords from the model's forward to attention).
"""
from __future__ import annotations

import torch

from ds_ext.prefix_grouper.attention import prefix_grouped_attention
from ds_ext.prefix_grouper.layout import GroupedBatch

NAME = "ds_ext_prefix_grouped"


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, prefix_grouped=None,
               **kwargs):
    """HF attention-function signature: ``[B, H, L, D]`` in, ``([B, L, H, D], None)`` out."""
    if prefix_grouped is None:
        raise ValueError(f"attention '{NAME}' needs the keyword prefix_grouped=<GroupedBatch> in the model call")
    b = prefix_grouped
    out = prefix_grouped_attention(query, key, value, b.prefix_lens, b.suffix_lens, b.segment_ids, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def enable_hf_prefix_grouper(model) -> None:
    """Register the grouped attention with transformers and select it for ``model``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)


def hf_grouped_logits(model, batch: GroupedBatch) -> torch.Tensor:
    """Packed logits ``[N, L, V]`` of an HF causal LM on a grouped batch (after :func:`enable_hf_prefix_grouper`)."""
    return model(input_ids=batch.input_ids, position_ids=batch.position_ids, prefix_grouped=batch,
                 use_cache=False).logits
