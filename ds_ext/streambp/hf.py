"""StreamBP for HF transformers Llama/Qwen2-family decoder layers, unmodified (transformers is optional).

A layer is recognised by its structure: ``input_layernorm``, ``post_attention_layernorm``, ``mlp`` and a
``self_attn`` with ``q_proj/k_proj/v_proj/o_proj`` and ``head_dim`` (Llama, Qwen2, Qwen3 with its per-head
``q_norm``/``k_norm``, Mistral without sliding window). :class:`HFLayerAdapter` is its adapter for
:func:`ds_ext.streambp.layer.stream_layer` (the forward is replaced on the instance only): with gradients and no KV
cache it runs through StreamBP; otherwise the layer's own forward runs (call the model with ``use_cache=False``
when training, as :func:`causal_lm_loss` does). RoPE comes from the model's ``position_embeddings`` (``cos, sin:
[B, T, D]``, computed by HF from ``position_ids``, so positions restart per packed document), sliced per chunk.
Refused before training, naming the model and setting (:func:`streambp_refusal`): sliding-window attention, MoE
layers, attention dropout, sandwich-norm (Gemma-2 style) layers.

**Packed documents without a T x T mask.** A packed batch (``attention_mask=None``, ``position_ids`` restarting
at 0 per document) makes transformers build a ``[B, 1, T, T]`` mask in ``create_causal_mask``. :func:`route_attention`
(called by :func:`ds_ext.streambp.apply.stream_model`) switches the streamed layers' config to the attention
implementation :data:`ATTENTION` registered through transformers' documented seams, ``AttentionMaskInterface``
(:func:`streambp_attention_mask`: no 4-D mask, the 2-D padding mask or None passes through) and
``AttentionInterface`` (:func:`streambp_attention`: :func:`ds_ext.ops.attention.packed_attention`, one causal
SDPA call per document). Both derive the documents as HF does: ``find_packed_sequence_indices(position_ids)``,
only when no 2-D attention mask is given and no KV cache is used (:func:`mask_and_segments`), so a streamed
model computes what the unstreamed HF model computes on every input. Calls this path does not cover (a KV cache
with queries shorter than keys, a caller's 4-D mask) go to transformers' own SDPA mask and attention. The
backward chunks get the same ``segment_ids`` (:class:`~ds_ext.ops.stream.StreamCall`).

The LM head: :func:`causal_lm_loss` runs ``model.model`` for hidden states and the final norm, head + token
cross-entropy in chunks, shifted as HF's ``ForCausalLMLoss`` does (position t predicts token t + 1, mean over
labels != -100).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ds_ext.config import DsExtConfigError
from ds_ext.ops.attention import packed_attention
from ds_ext.ops.losses import shift_labels
from ds_ext.ops.rope import apply_rope
from ds_ext.ops.stream import LayerAdapter, StreamCall
from ds_ext.ops.chunked_loss import TokenCrossEntropy, chunked_lm_loss

ATTENTION = "ds_ext_streambp"
"""The name StreamBP's attention (and mask) function is registered under in transformers."""

def is_hf_decoder_layer(module: nn.Module) -> bool:
    attn = getattr(module, "self_attn", None)
    return (all(hasattr(module, a) for a in ("input_layernorm", "post_attention_layernorm"))
            and (hasattr(module, "mlp") or hasattr(module, "block_sparse_moe"))
            and attn is not None
            and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")))


def streambp_refusal(config) -> Optional[str]:
    """Why StreamBP cannot stream a model with this HF ``config`` (sliding-window attention, MoE layers), or None.
    Entry points may call it on a ``config.json`` before building the model."""
    model = getattr(config, "model_type", None) or type(config).__name__
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is not None and any(t != "full_attention" for t in types):
        sliding = sorted({t for t in types if t != "full_attention"})
        return (f"{model} model with layer_types {sliding} (sliding_window={window}): StreamBP streams full causal "
                f"attention only")
    if types is None and window:
        return (f"{model} model with sliding-window attention (config.json \"sliding_window\": {window}): StreamBP "
                f"streams full causal attention only; set \"sliding_window\": null if the model is meant without it")
    experts = [(k, getattr(config, k, None)) for k in ("num_local_experts", "num_experts", "n_routed_experts")]
    experts = [(k, n) for k, n in experts if n]
    if experts:
        return (f"{model} model with MoE layers ({experts[0][0]}={experts[0][1]}): StreamBP streams dense decoder "
                f"layers only (routing and its auxiliary loss are whole-batch)")
    return None


def _layer_refusal(layer: nn.Module) -> Optional[str]:
    attn = layer.self_attn
    config = getattr(attn, "config", None)
    found = streambp_refusal(config) if config is not None else None
    if found is not None:
        return found
    name = type(layer).__name__
    if getattr(attn, "sliding_window", None):
        return (f"{name} uses sliding-window attention (window {attn.sliding_window}); StreamBP streams full causal "
                f"attention only")
    if hasattr(layer, "block_sparse_moe") or getattr(getattr(layer, "mlp", None), "experts", None) is not None:
        return f"{name} has MoE layers (experts in its MLP); StreamBP streams dense decoder layers only"
    if any(hasattr(layer, a) for a in ("pre_feedforward_layernorm", "post_feedforward_layernorm")):
        return (f"{name} has sandwich norms (pre/post_feedforward_layernorm); StreamBP streams pre-norm "
                f"Llama-style layers only")
    if getattr(attn, "attention_dropout", 0.0):
        return (f"{name} has attention_dropout={attn.attention_dropout}; StreamBP recomputes attention in backward "
                f"and needs attention_dropout=0")
    return None


class HFLayerAdapter(LayerAdapter):
    """``positions`` is HF's ``position_embeddings`` tuple ``(cos, sin)``, each ``[B, T, D]``. Refuses a layer
    StreamBP cannot stream (:func:`streambp_refusal` and the layer's own structure) with a
    :class:`~ds_ext.config.DsExtConfigError` on ``ds_ext.streambp.enabled``."""

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        problem = _layer_refusal(layer)
        if problem is not None:
            raise DsExtConfigError([("ds_ext.streambp.enabled", f"got true for a {problem}")])
        attn = layer.self_attn
        self.attn, self.head_dim = attn, attn.head_dim
        self.scale = getattr(attn, "scaling", self.head_dim ** -0.5)

    def streamed_call(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                      use_cache=False, position_embeddings=None, cache=None, **kwargs) -> Optional[StreamCall]:
        """Streamed without a KV cache and with the model's ``position_embeddings``. Masks: None or 2-D (what
        :func:`streambp_attention_mask` passes on; documents from ``position_ids`` by :func:`mask_and_segments`),
        or a 4-D causal + key padding mask (:func:`key_padding_from_mask`)."""
        if use_cache or past_key_values is not None or cache is not None or position_embeddings is None:
            return None
        b, t = hidden_states.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 4:
            padding, segments = key_padding_from_mask(attention_mask, t), None
        else:
            padding, segments = mask_and_segments(attention_mask, position_ids, b)

        def full(x, positions, _padding):
            return self.own_forward(x, attention_mask=attention_mask, position_ids=position_ids,
                                    position_embeddings=positions, **kwargs)
        return StreamCall(hidden_states, position_embeddings, padding, full, segment_ids=segments)

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


def mask_and_segments(attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor], batch: int,
                      use_cache: bool = False) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(key_padding [B, T] bool or None, segment_ids [B, T] or None)`` from a 2-D mask (1/True = real token) or
    None and ``position_ids`` (``[B or 1, T]``), with transformers' rule: documents (``find_packed_sequence_indices``:
    a new one wherever the position does not grow by 1) only when no mask is given and no KV cache is used; an
    all-real mask is no padding."""
    if attention_mask is not None:
        padding = attention_mask.bool()
        return (None if bool(padding.all()) else padding), None
    if position_ids is None or use_cache:
        return None, None
    from transformers.masking_utils import find_packed_sequence_indices
    return None, find_packed_sequence_indices(position_ids.expand(batch, -1))


def streambp_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                            attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """transformers ``AttentionMaskInterface`` function of :data:`ATTENTION`: without a KV cache offset (queries =
    keys) no mask is built, the 2-D padding mask ``[B, T]`` (or None) goes on to the layers; otherwise
    transformers' own ``sdpa_mask``."""
    if q_length == kv_length and int(q_offset) == 0 and int(kv_offset) == 0 and (
            attention_mask is None or attention_mask.shape[-1] == kv_length):
        return attention_mask
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def streambp_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                       **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers ``AttentionInterface`` function of :data:`ATTENTION`: ``query [B, H, T, D]``, ``key, value
    [B, Hkv, T, D]`` -> ``([B, T, H, D], None)``, causal within the documents of :func:`mask_and_segments` by
    :func:`ds_ext.ops.attention.packed_attention` (no ``T x T`` tensor). A 4-D mask or a KV cache (queries shorter
    than keys) goes to transformers' SDPA attention."""
    if (attention_mask is not None and attention_mask.dim() != 2) or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError(f"{ATTENTION} attention has no dropout (got {dropout}); set attention_dropout=0")
    padding, segments = mask_and_segments(attention_mask, kwargs.get("position_ids"), query.shape[0],
                                          bool(kwargs.get("use_cache")))
    out = packed_attention(query, key, value, segments, padding, scaling)
    return out.transpose(1, 2).contiguous(), None


def route_attention(adapters: Iterable[LayerAdapter]) -> List[Callable[[], None]]:
    """Register :data:`ATTENTION` with transformers (idempotent) and switch the config of every streamed HF layer
    to it (``config._attn_implementation``, what ``PreTrainedModel.set_attn_implementation`` sets; it also holds
    for pipeline stages that hold bare layers). Returns what restores each config's implementation."""
    configs = {}
    for adapter in adapters:
        if isinstance(adapter, HFLayerAdapter) and getattr(adapter.attn, "config", None) is not None:
            configs[id(adapter.attn.config)] = adapter.attn.config
    if not configs:
        return []
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(ATTENTION, streambp_attention)
    AttentionMaskInterface.register(ATTENTION, streambp_attention_mask)
    undo = []
    for config in configs.values():
        own = config._attn_implementation
        config._attn_implementation = ATTENTION
        undo.append(lambda config=config, own=own: setattr(config, "_attn_implementation", own))
    return undo


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
        raise ValueError("StreamBP streams causal attention with key padding only from a 4-D attention mask (packed "
                         "documents come from position_ids with attention_mask=None); this attention mask is another")
    return padding


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None, logits_chunk_size: int = 256,
                   position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HF causal-LM loss with the final norm, head and cross-entropy in chunks: ``model.model`` gives the hidden
    states ``[B, T, C]`` before its final norm (without a KV cache, which would keep every layer's keys and values),
    and :func:`ds_ext.ops.chunked_loss.chunked_lm_loss` applies that norm, the head and the loss chunk by chunk (no
    full-length normed copy or norm activations are kept); labels are shifted like HF (``labels[:, 1:]``, -100
    ignored). Packed rows: ``position_ids`` restarting per document, no ``attention_mask``, and -100 at each
    document's first label (as ``DataCollatorWithFlattening`` does), so no position is scored on the next
    document's first token."""
    with _without_final_norm(model.model) as norm:
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
    return chunked_lm_loss(hidden, model.lm_head.weight, TokenCrossEntropy(shift_labels(labels)), logits_chunk_size,
                           norm=norm)


@contextmanager
def _without_final_norm(backbone: nn.Module):
    """Run the HF backbone with its final ``norm`` set aside (an identity in its place); yields the norm."""
    norm = backbone.norm
    backbone.norm = nn.Identity()
    try:
        yield norm
    finally:
        backbone.norm = norm
