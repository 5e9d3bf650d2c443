"""StreamBP for HF transformers Llama/Qwen2-family decoder layers, unmodified (transformers is optional).

A layer is recognised by its structure: ``input_layernorm``, ``post_attention_layernorm``, ``mlp`` and a
``self_attn`` with ``q_proj/k_proj/v_proj/o_proj`` and ``head_dim`` (Llama, Qwen2, Mistral without sliding window;
an optional per-head ``q_norm``/``k_norm`` as in Qwen3). :class:`HFLayerAdapter` is its adapter for
:func:`ds_ext.streambp.layer.stream_layer` (the forward is replaced on the instance only): with gradients, no KV
cache and a causal (+ key padding) mask, it runs through StreamBP; otherwise the layer's own forward runs (call
the model with ``use_cache=False`` when training, as :func:`causal_lm_loss` does). RoPE comes from the model's
``position_embeddings`` (``cos, sin: [B, T, D]``), sliced per chunk.

The LM head: :func:`causal_lm_loss` runs ``model.model`` for hidden states and the final norm, head + token
cross-entropy in chunks, shifted as HF's ``ForCausalLMLoss`` does (position t predicts token t + 1, mean over
labels != -100).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from ds_ext.ops.losses import IGNORE_INDEX
from ds_ext.ops.rope import apply_rope
from ds_ext.streambp.layer import LayerAdapter, StreamCall
from ds_ext.streambp.loss import TokenCrossEntropy, chunked_lm_loss


def is_hf_decoder_layer(module: nn.Module) -> bool:
    attn = getattr(module, "self_attn", None)
    return (all(hasattr(module, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp"))
            and attn is not None and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")))


class HFLayerAdapter(LayerAdapter):
    """``positions`` is HF's ``position_embeddings`` tuple ``(cos, sin)``, each ``[B, T, D]``."""

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        attn = layer.self_attn
        if getattr(attn, "sliding_window", None):
            raise ValueError(f"{type(layer).__name__} uses sliding-window attention, which StreamBP does not stream")
        self.attn, self.head_dim = attn, attn.head_dim
        self.scale = getattr(attn, "scaling", self.head_dim ** -0.5)

    def streamed_call(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                      use_cache=False, position_embeddings=None, **kwargs) -> Optional[StreamCall]:
        """Streamed without a KV cache and with the model's ``position_embeddings``; the mask must be causal +
        key padding (:func:`key_padding_from_mask`)."""
        if use_cache or past_key_values is not None or kwargs.get("cache") is not None or position_embeddings is None:
            return None
        padding = key_padding_from_mask(attention_mask, hidden_states.shape[1])

        def full(x, positions, _padding):
            return self.own_forward(x, attention_mask=attention_mask, position_ids=position_ids,
                                    position_embeddings=positions, **kwargs)
        return StreamCall(hidden_states, position_embeddings, padding, full)

    def slice_positions(self, positions, s: int, e: int):
        cos, sin = positions
        return cos[:, s:e], sin[:, s:e]

    def _heads(self, proj, h, norm=None):
        b, t, _ = h.shape
        z = proj(h).view(b, t, -1, self.head_dim)
        return (norm(z) if norm is not None else z).transpose(1, 2)

    @staticmethod
    def _rope(z, positions):
        cos, sin = (p[:, None] for p in positions)
        return apply_rope(z, cos, sin)

    def norm1(self, x):
        return self.layer.input_layernorm(x)

    def queries(self, h, positions):
        return self._rope(self._heads(self.attn.q_proj, h, getattr(self.attn, "q_norm", None)), positions)

    def keys_values(self, h, positions):
        k = self._rope(self._heads(self.attn.k_proj, h, getattr(self.attn, "k_norm", None)), positions)
        return k, self._heads(self.attn.v_proj, h)

    def attention_out(self, attn):
        b, _, c, _ = attn.shape
        return self.attn.o_proj(attn.transpose(1, 2).reshape(b, c, -1))

    def mlp_block(self, y):
        return y + self.layer.mlp(self.layer.post_attention_layernorm(y))


def key_padding_from_mask(mask: Optional[torch.Tensor], t: int) -> Optional[torch.Tensor]:
    """HF's 4-D attention mask ``[B, 1, T, T]`` (bool: True = attend, or additive float) -> key padding ``[B, T]``.

    Refuses masks that are not "causal and key padding" (packed sequences, sliding windows, prefix-LM): StreamBP's
    chunk mask could not reproduce them."""
    if mask is None:
        return None
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    padding = allowed[:, -1, :]
    causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    expected = causal & padding[:, None, :]
    rows = padding[:, :, None].expand_as(expected)
    if not torch.equal(allowed[rows], expected[rows]):
        raise ValueError("StreamBP streams causal attention with key padding only; this attention mask is another")
    return padding


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None, logits_chunk_size: int = 256) -> torch.Tensor:
    """HF causal-LM loss with the final norm, head and cross-entropy in chunks: ``model.model`` gives the hidden
    states ``[B, T, C]`` before its final norm (without a KV cache, which would keep every layer's keys and values),
    and :func:`ds_ext.streambp.loss.chunked_lm_loss` applies that norm, the head and the loss chunk by chunk (no
    full-length normed copy or norm activations are kept); labels are shifted like HF (``labels[:, 1:]``, -100
    ignored)."""
    with _without_final_norm(model.model) as norm:
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    return chunked_lm_loss(hidden, model.lm_head.weight, TokenCrossEntropy(shifted), logits_chunk_size, norm=norm)


@contextmanager
def _without_final_norm(backbone: nn.Module):
    """Run the HF backbone with its final ``norm`` set aside (an identity in its place); yields the norm."""
    norm = backbone.norm
    backbone.norm = nn.Identity()
    try:
        yield norm
    finally:
        backbone.norm = norm
