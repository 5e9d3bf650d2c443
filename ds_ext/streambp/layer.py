"""StreamBP for a pre-norm decoder layer: exact backward, chunked along the sequence (arXiv 2506.03077).

Forward runs the layer on the whole sequence under ``no_grad`` and keeps only its input ``x: [B, T, C]`` (what
activation checkpointing keeps). Backward receives ``G = dL/dY: [B, T, C]``, recomputes ``h = norm1(x)`` and the
keys/values of all positions once, then walks the sequence in chunks ``[s, e)`` of ``chunk_size`` tokens (the last
may be shorter); for each chunk, with gradients on:

* queries from ``h[:, s:e]`` only;
* attention of the ``c = e - s`` queries over the ``e`` keys ``< e``, causal aligned bottom-right (query ``s + i``
  sees keys ``<= s + i``; never a ``T x T`` mask): the unmasked prefix part and the causal diagonal block merged
  by log-sum-exp, or a ``[c, e]`` mask with key padding (:mod:`ds_ext.streambp.attention`);
* ``y = x[:, s:e] + o_proj(attn)``, ``y = y + mlp(norm2(y))`` on the chunk only;

then backpropagates ``G[:, s:e]``. Input, key/value and parameter gradients accumulate over chunks, so the
result is the full-sequence gradient (a sum of the same terms). The layer's structure is reached through a
:class:`LayerAdapter` (one per layer family; the reference model's is here).

Gradient reduction: until the final backward call the layer's parameters carry ``ds_grad_is_ready = False``, which
DeepSpeed ZeRO-1/2 honour: each parameter's gradient is reduced once per backward, not once per chunk.
"""
from __future__ import annotations

import types
from abc import ABC, abstractmethod
from typing import Optional, Tuple

import torch
from torch import nn

from ds_ext.streambp.attention import chunk_attention


class LayerAdapter(ABC):
    """How StreamBP reaches a decoder layer's parts. Subclasses bind one layer family.

    Shapes: ``x: [B, t, C]``, ``positions: [B, t]``, ``q: [B, H, t, D]``, ``k, v: [B, Hkv, t, D]``.
    """

    scale: Optional[float] = None  # softmax scale; None = 1/sqrt(D)

    def __init__(self, layer: nn.Module):
        self.layer = layer

    @abstractmethod
    def full_forward(self, x, positions, key_padding_mask):
        """The layer's own forward on the whole sequence ``[B, T, C] -> [B, T, C]``."""

    def default_positions(self, x):
        return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], x.shape[1])

    def slice_positions(self, positions, s: int, e: int):
        """The position information of rows ``[s, e)`` (a ``[B, T]`` tensor here; adapters may carry more)."""
        return positions[:, s:e]

    @abstractmethod
    def norm1(self, x):
        """The pre-attention norm."""

    @abstractmethod
    def queries(self, h, positions):
        """Roped queries of the normed rows ``h``."""

    @abstractmethod
    def keys_values(self, h, positions):
        """Roped keys and values of the normed rows ``h``."""

    @abstractmethod
    def attention_out(self, attn):
        """``attn: [B, H, c, D]`` -> ``[B, c, C]`` (output projection)."""

    @abstractmethod
    def mlp_block(self, y):
        """``y + mlp(norm2(y))``."""


def chunk_output(adapter: LayerAdapter, xc, hc, ke, ve, positions, s: int, e: int,
                 key_padding_mask: Optional[torch.Tensor], segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's output rows ``[s, e)``: ``[B, e - s, C]``, from the input rows ``xc = x[:, s:e]``, the normed
    rows ``hc = h[:, s:e]`` and the keys/values of positions ``< e``, ``ke, ve: [B, Hkv, e, D]``."""
    q = adapter.queries(hc, adapter.slice_positions(positions, s, e))
    attn = chunk_attention(q, ke, ve, s, key_padding_mask, adapter.scale, segment_ids)
    return adapter.mlp_block(xc + adapter.attention_out(attn))


def _set_grad_ready(params, ready: bool) -> None:
    for p in params:
        p.ds_grad_is_ready = ready


class StreamedLayerFunction(torch.autograd.Function):
    """``y = layer(x)`` with StreamBP's backward. Parameters are reached through the adapter (like reentrant
    checkpointing), so their gradients are accumulated in ``param.grad`` by the inner ``autograd.backward``.

    Backward order: ``h = norm1(x)`` and the keys/values of all ``T`` positions are recomputed once (``O(T)``
    memory for one layer at a time, instead of recomputing the prefix's keys/values for every chunk); chunks
    ``0 .. D-2`` backpropagate into detached slices of ``x, h, k, v`` whose gradients are summed into buffers
    ``dx, dh, dk, dv``; the last chunk backpropagates together with ``dh, dk, dv`` through the real graph, so every
    parameter receives its gradient in that one final call (the only one with ``ds_grad_is_ready = True``).
    """

    @staticmethod
    def forward(ctx, x, positions, key_padding_mask, adapter, full_forward, chunk_size, segment_ids=None):
        ctx.save_for_backward(x, key_padding_mask, segment_ids)
        ctx.positions, ctx.adapter, ctx.chunk_size = positions, adapter, chunk_size
        with torch.no_grad():
            return full_forward(x, positions, key_padding_mask)

    @staticmethod
    def backward(ctx, grad_out):
        x, key_padding_mask, segment_ids = ctx.saved_tensors
        adapter, positions, chunk = ctx.adapter, ctx.positions, ctx.chunk_size
        x = x.detach().requires_grad_(True)
        params = [p for p in adapter.layer.parameters() if p.requires_grad]
        t = x.shape[1]
        bounds = [(s, min(s + chunk, t)) for s in range(0, t, chunk)]
        with torch.enable_grad():
            h = adapter.norm1(x)
            k, v = adapter.keys_values(h, positions)
            dx, dh, dk, dv = (torch.zeros_like(z) for z in (x, h, k, v))
            _set_grad_ready(params, False)
            for s, e in bounds[:-1]:
                _chunk_backward(adapter, x, h, k, v, (dx, dh, dk, dv), positions, s, e, key_padding_mask,
                                grad_out[:, s:e], segment_ids)
            _set_grad_ready(params, True)
            s, e = bounds[-1]
            y = chunk_output(adapter, x[:, s:e], h[:, s:e], k[:, :, :e], v[:, :, :e], positions, s, e,
                             key_padding_mask, segment_ids)
            torch.autograd.backward([y, h, k, v], [grad_out[:, s:e], dh, dk, dv])
        return x.grad + dx, None, None, None, None, None, None


def _chunk_backward(adapter, x, h, k, v, buffers, positions, s, e, key_padding_mask, grad_chunk,
                    segment_ids=None) -> None:
    """Backpropagate rows ``[s, e)`` into per-chunk leaves (only the slices the chunk reads) and add their
    gradients into the full-size buffers; parameter gradients accumulate in ``param.grad``."""
    dx, dh, dk, dv = buffers
    xc, hc = x[:, s:e].detach().requires_grad_(True), h[:, s:e].detach().requires_grad_(True)
    ke, ve = k[:, :, :e].detach().requires_grad_(True), v[:, :, :e].detach().requires_grad_(True)
    y = chunk_output(adapter, xc, hc, ke, ve, positions, s, e, key_padding_mask, segment_ids)
    torch.autograd.backward(y, grad_chunk)
    dx[:, s:e] += xc.grad
    dh[:, s:e] += hc.grad
    dk[:, :, :e] += ke.grad
    dv[:, :, :e] += ve.grad


def stream_layer(layer: nn.Module, adapter: LayerAdapter, chunk_size: int) -> None:
    """Give ``layer`` StreamBP's backward; it is then called as ``layer(x, position_ids=None,
    key_padding_mask=None)`` (positions default to ``0..T-1``).

    The instance's ``forward`` is replaced, the module stays where it is, so parameter names, state dicts and
    hooks are unchanged; :func:`unstream_layer` undoes it. Without gradients the layer's own forward runs.
    """
    if getattr(layer, "_ds_ext_streamed", False):
        raise ValueError(f"{type(layer).__name__} is already streamed")

    def forward(self, x, position_ids=None, key_padding_mask=None, attention_fn=None):
        segment_ids = _segments_of(attention_fn)
        position_ids = adapter.default_positions(x) if position_ids is None else position_ids
        full = adapter.full_forward if attention_fn is None else (
            lambda x_, pos, kpm: adapter.full_forward(x_, pos, kpm, attention_fn=attention_fn))
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not needs_grad:
            return full(x, position_ids, key_padding_mask)
        return StreamedLayerFunction.apply(x, position_ids, key_padding_mask, adapter, full, chunk_size, segment_ids)

    layer.forward = types.MethodType(forward, layer)
    layer._ds_ext_streamed = True


def _segments_of(attention_fn) -> Optional[torch.Tensor]:
    """The packed-row segment ids of Prefix Grouper's per-call attention (the only per-call attention StreamBP
    streams: its chunk attention then uses the grouped mask's rows)."""
    if attention_fn is None:
        return None
    batch = getattr(attention_fn, "batch", None)
    if batch is None or not hasattr(batch, "segment_ids"):
        raise ValueError(f"StreamBP streams the default causal attention or Prefix Grouper's, not {attention_fn!r}")
    return batch.segment_ids


def unstream_layer(layer: nn.Module) -> None:
    layer.__dict__.pop("forward", None)
    layer.__dict__.pop("_ds_ext_streamed", None)


class ReferenceLayerAdapter(LayerAdapter):
    """:class:`ds_ext.models.llama.DecoderLayer` (and its pipeline form)."""

    def full_forward(self, x, positions, key_padding_mask, attention_fn=None):
        from ds_ext.models.llama import DecoderLayer
        return DecoderLayer.forward(self.layer, x, positions, key_padding_mask, attention_fn)

    def norm1(self, x):
        return self.layer.input_norm(x)

    def _heads(self, proj, h):
        b, t, _ = h.shape
        return proj(h).view(b, t, -1, self.layer.attn.cfg.head_dim).transpose(1, 2)

    def _rope(self, z, positions):
        from ds_ext.models.llama import apply_rope, rope_cos_sin
        cfg = self.layer.attn.cfg
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, z.dtype)
        return apply_rope(z, cos, sin)

    def queries(self, h, positions):
        return self._rope(self._heads(self.layer.attn.q_proj, h), positions)

    def keys_values(self, h, positions) -> Tuple[torch.Tensor, torch.Tensor]:
        attn = self.layer.attn
        return self._rope(self._heads(attn.k_proj, h), positions), self._heads(attn.v_proj, h)

    def attention_out(self, attn):
        b, _, c, _ = attn.shape
        return self.layer.attn.o_proj(attn.transpose(1, 2).reshape(b, c, -1))

    def mlp_block(self, y):
        return y + self.layer.mlp(self.layer.post_attn_norm(y))
