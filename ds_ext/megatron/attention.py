"""Prefix Grouper (arXiv 2506.05433) as megatron-core core attention, and the grouped forward of a ``GPTModel``.

:class:`PrefixGroupedCoreAttention` is a drop-in for the layer spec's ``core_attention`` (megatron's
``DotProductAttention`` constructor and forward signature, ``[s, b, h, d]`` tensors in, ``[s, b, h * d]`` out). What
it computes depends on the ``attention_mask`` that megatron hands down unchanged from ``GPTModel.forward``:

* a :class:`GroupedMask` (one GRPO group per row, see :mod:`ds_ext.prefix_grouper.layout`): prefix-grouped
  attention (:func:`ds_ext.prefix_grouper.attention.prefix_grouped_attention`, exact forward and backward);
* ``None``: causal attention (:func:`ds_ext.ops.attention.grouped_sdpa`), so the same spec also trains on ordinary
  batches and runs on CPU, where megatron's ``DotProductAttention`` needs CUDA (its memory buffer and CUDA RNG
  tracker);
* a boolean tensor broadcastable to ``[b, 1, s, s]`` in megatron's convention (True = masked out): SDPA with it.

RoPE: ``GPTModel`` builds its rotary table for positions ``0..s-1`` of every row and ignores ``position_ids``
under ``rope``. :func:`grouped_forward` hooks the model's ``rotary_pos_emb`` for one call and gathers the table at
the grouped ``position_ids`` (``[s, b, 1, d]``, which megatron's unfused ``apply_rotary_pos_emb`` broadcasts per
row), so each response is rotated as if it followed its prompt alone. With ``learned_absolute`` embeddings the
``position_ids`` passed to the model already do this.

Limits (refused at construction, naming the setting): attention dropout, ``apply_query_key_layer_scaling``,
context parallelism, a softmax type other than ``vanilla``, sliding windows; ``packed_seq_params`` and
``attention_bias`` at forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from megatron.core.transformer.module import MegatronModule

from ds_ext.ops.attention import grouped_chunk_mask, grouped_sdpa
from ds_ext.prefix_grouper.attention import prefix_grouped_attention
from ds_ext.prefix_grouper.layout import GroupedBatch


@dataclass
class GroupedMask:
    """The ``attention_mask`` of a grouped batch: tells the core attention the row layout and gives StreamBP its
    chunk masks (the :class:`ds_ext.ops.stream.ChunkMasked` protocol)."""

    batch: GroupedBatch

    @property
    def segment_ids(self) -> Tensor:
        return self.batch.segment_ids

    def chunk_mask(self, start: int, end: int) -> Tensor:
        """Rows ``[start, end)`` of the grouped mask over keys ``[0, end)``: ``[N, 1, end - start, end]``."""
        return grouped_chunk_mask(self.batch.segment_ids, start, end)


class PrefixGroupedCoreAttention(MegatronModule):
    """Core attention for megatron-core layer specs: prefix-grouped for a :class:`GroupedMask`, causal otherwise.

    Args (those of megatron's ``DotProductAttention``): ``config`` (``TransformerConfig``), ``layer_number``,
    ``attn_mask_type``, ``attention_type``, ``attention_dropout`` (must be 0 or None with
    ``config.attention_dropout == 0``), ``softmax_scale`` (None = ``1/sqrt(kv_channels)``), ``cp_comm_type`` and
    ``pg_collection`` (accepted, unused: tensor parallelism splits heads, which this module never mixes).
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        refusals = {"attention_dropout": dropout != 0.0,
                    "apply_query_key_layer_scaling": bool(config.apply_query_key_layer_scaling),
                    "context_parallel_size": config.context_parallel_size != 1,
                    "softmax_type": getattr(config, "softmax_type", "vanilla") != "vanilla",
                    "window_size": getattr(config, "window_size", None) is not None}
        bad = [k for k, v in refusals.items() if v]
        if bad:
            raise ValueError(f"PrefixGroupedCoreAttention does not support TransformerConfig.{bad[0]} = "
                             f"{getattr(config, bad[0], dropout)!r}; use the default (exact attention, no dropout)")
        self.layer_number, self.attn_mask_type, self.attention_type = layer_number, attn_mask_type, attention_type
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask, attn_mask_type=None,
                attention_bias: Optional[Tensor] = None, packed_seq_params=None) -> Tensor:
        """``query: [s, b, H, D]``, ``key, value: [s, b, Hkv, D]`` -> ``[s, b, H * D]``."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("PrefixGroupedCoreAttention takes no attention_bias / packed_seq_params; pack GRPO "
                             "groups with ds_ext.prefix_grouper.layout.pack and call grouped_forward instead")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, D]
        out = self.attend(q, k, v, attention_mask)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attention_mask) -> Tensor:
        """The attention itself on ``[b, heads, s, D]`` tensors (StreamBP's full forward reuses it)."""
        if isinstance(attention_mask, GroupedMask):
            g = attention_mask.batch
            return prefix_grouped_attention(q, k, v, g.prefix_lens, g.suffix_lens, g.segment_ids,
                                            scale=self.softmax_scale)
        if attention_mask is None:
            return grouped_sdpa(q, k, v, is_causal=True, scale=self.softmax_scale)
        return grouped_sdpa(q, k, v, attn_mask=~attention_mask.bool(), scale=self.softmax_scale)


def grouped_rope(emb: Tensor, position_ids: Tensor) -> Tensor:
    """megatron's rotary table ``[s, 1, 1, d]`` (positions ``0..s-1``) -> per-row ``[s, b, 1, d]`` at
    ``position_ids: [b, s]`` (grouped positions never exceed the row length, so the table covers them)."""
    return emb[position_ids.t(), 0, 0][:, :, None, :]


def unwrap_gpt(model):
    """The ``GPTModel`` inside megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "rotary_pos_emb"):
        model = model.module
    return model


def grouped_forward(model, batch: GroupedBatch, **kwargs) -> Tensor:
    """Run a ``GPTModel`` (or its DDP wrapper) whose spec uses :class:`PrefixGroupedCoreAttention` on a grouped
    batch: packed logits ``[N, L, V]`` (map them to per-response log-probs with ``batch.completion_logprobs``).

    ``kwargs`` go to ``GPTModel.forward`` (e.g. ``labels``). The RoPE hook lives for this call only; the backward
    needs nothing from it (autograd keeps the gathered table).
    """
    gpt = unwrap_gpt(model)
    handle = None
    if getattr(gpt, "position_embedding_type", None) == "rope":
        handle = gpt.rotary_pos_emb.register_forward_hook(
            lambda _module, _args, emb: grouped_rope(emb, batch.position_ids.to(emb.device)))
    try:
        return model(batch.input_ids, batch.position_ids, GroupedMask(batch), **kwargs)
    finally:
        if handle is not None:
            handle.remove()
