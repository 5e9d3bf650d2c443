"""StreamBP (arXiv 2506.03077) for megatron-core ``TransformerLayer``s, in place of megatron's recompute.

The mechanism is :mod:`ds_ext.streambp.layer` unchanged (:func:`ds_ext.streambp.layer.stream_layer` with
:class:`MegatronLayerAdapter`): forward keeps only the layer's input; backward computes the
roped keys/values of all positions once (no graph), then walks the sequence in chunks of ``chunk_size`` tokens, last
to first (``input_layernorm``, the chunk's queries/keys/values, attention over keys ``< e``, ``linear_proj``,
bias-add + residual, pre-MLP norm, MLP and its residual on the chunk only) and backpropagates each chunk's output
gradient with the finished key/value gradients of its rows. Parameter and input gradients
are sums of the same terms as plain autograd's, so they are exact (fp32 rel err <= 1e-5, tested).

:class:`MegatronLayerAdapter` reaches a megatron layer's parts. megatron works on ``[s, b, h]``; StreamBP slices the
sequence on dim 1, so the adapter hands StreamBP ``[b, s, h]`` views (transposes, no copies) and transposes back
around every megatron call. RoPE: the layer's ``rotary_pos_emb`` (``[s, 1 or b, 1, d]``, also Prefix Grouper's
per-row table) is sliced per chunk and applied with megatron's own ``apply_rotary_pos_emb``. A chunk's queries, keys
and values come from one megatron ``get_query_key_value_tensors`` call on the chunk rows (exactly megatron's layout
and q/k norms); the keys/values of all rows are computed once more, without a graph, at the start of the backward.

Gradient buckets: each chunk's backward fires megatron DDP's per-parameter hook, which adds ``param.grad`` into
``main_grad`` (a sum again, exact). With ``overlap_grad_reduce`` the hook would mark a parameter ready once per
chunk, so :func:`streambp_layers` refuses it; use ``overlap_grad_reduce=False`` (the reduction then runs in
``finalize_model_grads``).

Call order: build the model (and DDP) first, then :func:`streambp_layers`; refused: ``recompute_granularity`` set
(StreamBP replaces it), hidden dropout (a chunk would draw other random bits), MoE layers (aux losses span the
sequence), cross attention.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer

from ds_ext.megatron.attention import GroupedMask, unwrap_gpt
from ds_ext.streambp.config import StreamBPConfig
from ds_ext.ops.stream import LayerAdapter, StreamCall
from ds_ext.streambp.layer import stream_layer
from ds_ext.streambp.offload import input_store


def _sb(x: torch.Tensor) -> torch.Tensor:
    """``[s, b, h] <-> [b, s, h]`` (a view)."""
    return x.transpose(0, 1)


class MegatronLayerAdapter(LayerAdapter):
    """StreamBP's view of one megatron ``TransformerLayer``. ``positions`` is ``None`` (no RoPE) or the pair
    ``(q_freqs, k_freqs)``, each ``[T, 1 or B, 1, d]``. Refuses a layer StreamBP cannot stream exactly."""

    def __init__(self, layer: TransformerLayer):
        _check_layer(layer)
        super().__init__(layer)
        self.attn = layer.self_attention
        self.scale = getattr(self.attn.core_attention, "softmax_scale", None)
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config)
        self.mscale = _yarn_get_concentration_factor_from_config(self.attn.config)

    def streamed_call(self, hidden_states, attention_mask=None, context=None, context_mask=None,
                      rotary_pos_emb=None, **kwargs) -> Optional[StreamCall]:
        """Streamed without an inference context or ``packed_seq_params``; masks: None (causal) or a
        :class:`GroupedMask` (a tensor mask is refused: StreamBP's chunk mask is causal or grouped)."""
        if kwargs.get("inference_context") is not None or kwargs.get("packed_seq_params") is not None:
            return None
        if attention_mask is not None and not isinstance(attention_mask, GroupedMask):
            raise ValueError("StreamBP streams causal attention (attention_mask=None) or Prefix Grouper's "
                             "GroupedMask; got a tensor mask")

        def full(x, _positions, _padding):
            out, _ = self.own_forward(_sb(x), attention_mask=attention_mask, context=context,
                                      context_mask=context_mask, rotary_pos_emb=rotary_pos_emb, **kwargs)
            return _sb(out)
        return StreamCall(_sb(hidden_states), _rotary_pair(rotary_pos_emb), None, full,
                          attention_mask.chunk_mask if attention_mask is not None else None,
                          output=lambda y: (_sb(y), context))

    def slice_positions(self, positions, s: int, e: int):
        return None if positions is None else tuple(f[s:e] for f in positions)

    def _rope(self, z: torch.Tensor, freqs: Optional[torch.Tensor]) -> torch.Tensor:
        if freqs is None:
            return z
        return apply_rotary_pos_emb(z, freqs, config=self.attn.config, mscale=self.mscale,
                                    cp_group=self.attn.pg_collection.cp)

    def norm1(self, x):
        return _sb(self.layer.input_layernorm(_sb(x)))

    def _qkv(self, h):
        q, k, v = self.attn.get_query_key_value_tensors(_sb(h), None)  # [t, B, heads, D]
        return q, k, v

    def queries(self, h, positions):
        q, _, _ = self._qkv(h)
        return self._rope(q, None if positions is None else positions[0]).permute(1, 2, 0, 3)

    def keys_values(self, h, positions):
        _, k, v = self._qkv(h)
        k = self._rope(k, None if positions is None else positions[1])
        return k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)

    def queries_keys_values(self, h, positions):
        q, k, v = self._qkv(h)  # one fused projection for the three
        q_freqs, k_freqs = (None, None) if positions is None else positions
        return (self._rope(q, q_freqs).permute(1, 2, 0, 3), self._rope(k, k_freqs).permute(1, 2, 0, 3),
                v.permute(1, 2, 0, 3))

    def attention_out(self, attn):
        b, _, c, _ = attn.shape
        out, bias = self.attn.linear_proj(attn.permute(2, 0, 1, 3).reshape(c, b, -1))
        return _sb(out if bias is None else out + bias)

    def mlp_block(self, y):
        return _sb(self.layer._forward_mlp(_sb(y)))


def _check_layer(layer: nn.Module) -> None:
    cfg = layer.config
    problems = {"recompute_granularity": cfg.recompute_granularity is not None,
                "hidden_dropout": cfg.hidden_dropout != 0.0,
                "num_moe_experts": bool(getattr(layer, "is_moe_layer", False)),
                "cross_attention": not isinstance(layer.cross_attention, IdentityOp)}
    bad = [k for k, v in problems.items() if v]
    if bad:
        raise ValueError(f"StreamBP cannot stream this megatron layer: {bad[0]} is set "
                         f"({getattr(cfg, bad[0], '<module>')!r}); StreamBP replaces recompute and needs "
                         "deterministic, per-token layers without cross attention")


def _rotary_pair(rotary_pos_emb):
    if rotary_pos_emb is None or isinstance(rotary_pos_emb, tuple):
        return rotary_pos_emb
    return rotary_pos_emb, rotary_pos_emb


def streambp_layers(model, cfg: StreamBPConfig) -> List[TransformerLayer]:
    """Stream every ``TransformerLayer`` of a ``GPTModel`` (bare, or inside megatron's DDP) with
    ``cfg.chunk_size``; returns the streamed layers (none when ``cfg.enabled`` is false).

    Refuses a DDP wrapper with ``overlap_grad_reduce`` (see the module docstring). The LM head is not chunked on
    this path (``GPTModel`` computes its logits itself).
    """
    if not cfg.enabled:
        return []
    ddp_config = getattr(model, "ddp_config", None)
    if ddp_config is not None and ddp_config.overlap_grad_reduce:
        raise ValueError("StreamBP with megatron DDP needs overlap_grad_reduce=False: each chunk's backward would "
                         "mark the parameters ready again")
    layers = [m for m in unwrap_gpt(model).modules() if isinstance(m, TransformerLayer)]
    store = input_store(model, cfg)  # offload_layer_inputs (CUDA only)
    for index, layer in enumerate(layers):
        stream_layer(layer, MegatronLayerAdapter(layer), cfg.chunk_size, store, index)
    return layers
