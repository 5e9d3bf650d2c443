"""StreamBP for a pre-norm decoder layer: exact backward, chunked along the sequence (arXiv 2506.03077).

Forward runs the layer on the whole sequence under ``no_grad`` and keeps only its input ``x: [B, T, C]`` (what
activation checkpointing keeps). Backward receives ``G = dL/dY: [B, T, C]``, recomputes ``h = norm1(x)`` and the
keys/values of all positions once, then walks the sequence in chunks ``[s, e)`` of ``chunk_size`` tokens (the last
may be shorter); for each chunk, with gradients on:

* queries from ``h[:, s:e]`` only;
* attention of the ``c = e - s`` queries over the ``e`` keys ``< e``, causal aligned bottom-right (query ``s + i``
  sees keys ``<= s + i``; never a ``T x T`` mask): :func:`ds_ext.ops.attention.chunk_attention` (the unmasked
  prefix and the causal diagonal block merged by log-sum-exp; with packed documents, ``segment_ids``, the same per
  document overlapping the chunk; or a ``[c, e]`` mask with key padding or the per-call attention's
  :meth:`ChunkMasked.chunk_mask`);
* ``y = x[:, s:e] + o_proj(attn)``, ``y = y + mlp(norm2(y))`` on the chunk only;

then backpropagates ``G[:, s:e]``. Input, key/value and parameter gradients accumulate over chunks, so the
result is the full-sequence gradient (a sum of the same terms).

**One streaming mechanism** for every layer family: :func:`stream_layer` replaces the instance's ``forward`` with
one that, when gradients are wanted, asks the family's :class:`LayerAdapter` to map the call's arguments to a
:class:`StreamCall` and runs :class:`StreamedLayerFunction`; otherwise (no gradients, or the adapter declines: a KV
cache, megatron's ``packed_seq_params``) the layer's own forward runs. :func:`unstream_layer` undoes it. Adapters:
the reference model's (:class:`ds_ext.models.llama.ReferenceLayerAdapter`), HF Llama/Qwen2 (:mod:`ds_ext.streambp.hf`;
packed documents ride on :attr:`StreamCall.segment_ids`), megatron (:mod:`ds_ext.megatron.streambp`).

Gradient reduction: until the final backward call the layer's parameters are marked not ready for ZeRO-1/2
(:func:`ds_ext._deepspeed.set_grad_ready`): each parameter's gradient is reduced once per backward, not once per
chunk.
"""
from __future__ import annotations

import types
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from ds_ext._deepspeed import set_grad_ready
from ds_ext.ops.attention import chunk_attention

_STREAMED = "_ds_ext_streamed"


@runtime_checkable
class ChunkMasked(Protocol):
    """A per-call attention function StreamBP can stream: it gives the boolean mask of query rows ``[start, end)``
    over keys ``[0, end)``, ``[B or 1, 1, end - start, end]`` (Prefix Grouper's grouped attention does)."""

    def chunk_mask(self, start: int, end: int) -> torch.Tensor: ...


@dataclass
class StreamCall:
    """One streamed call of a layer, in StreamBP's terms: ``x: [B, T, C]`` (a view of the layer's input), the
    position information, the key padding ``[B, T]`` (True = real) or None, ``full(x, positions, padding) -> y``
    (the layer's own forward on the whole sequence, run once under no_grad), the chunk mask of a per-call attention
    (None: causal), ``output(y)``, the layer's return value built from ``y: [B, T, C]``, and the packed documents'
    ``segment_ids: [B, T]`` (None: one document per row; ``full`` must apply the same documents)."""

    x: torch.Tensor
    positions: object
    key_padding_mask: Optional[torch.Tensor]
    full: Callable
    chunk_mask: Optional[Callable[[int, int], torch.Tensor]] = None
    output: Callable = lambda y: y
    segment_ids: Optional[torch.Tensor] = None


class LayerAdapter(ABC):
    """How StreamBP reaches a decoder layer's parts and reads its call. Subclasses bind one layer family.

    Shapes: ``x: [B, t, C]``, ``positions: [B, t]`` (or what the family carries), ``q: [B, H, t, D]``,
    ``k, v: [B, Hkv, t, D]``.
    """

    scale: Optional[float] = None  # softmax scale; None = 1/sqrt(D)

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def own_forward(self, *args, **kwargs):
        """The layer's unstreamed forward (the class's; the streamed one lives on the instance)."""
        return type(self.layer).forward(self.layer, *args, **kwargs)

    @abstractmethod
    def streamed_call(self, *args, **kwargs) -> Optional[StreamCall]:
        """Map the layer's forward arguments to a :class:`StreamCall`, or None to run the layer's own forward.
        Raise on a call StreamBP cannot reproduce exactly (say which argument)."""

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


def chunk_mask_of(attention_fn) -> Optional[Callable[[int, int], torch.Tensor]]:
    """The chunk-mask method of a per-call attention function (None for None); refuses one without it."""
    if attention_fn is None:
        return None
    if not isinstance(attention_fn, ChunkMasked):
        raise ValueError(f"StreamBP streams the default causal attention or a per-call attention that gives chunk "
                         f"masks (chunk_mask(start, end), e.g. Prefix Grouper's), not {attention_fn!r}")
    return attention_fn.chunk_mask


def chunk_output(adapter: LayerAdapter, xc, hc, ke, ve, positions, s: int, e: int,
                 key_padding_mask: Optional[torch.Tensor], chunk_mask=None,
                 segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's output rows ``[s, e)``: ``[B, e - s, C]``, from the input rows ``xc = x[:, s:e]``, the normed
    rows ``hc = h[:, s:e]`` and the keys/values of positions ``< e``, ``ke, ve: [B, Hkv, e, D]``."""
    q = adapter.queries(hc, adapter.slice_positions(positions, s, e))
    mask = chunk_mask(s, e) if chunk_mask is not None else None
    attn = chunk_attention(q, ke, ve, s, key_padding_mask, adapter.scale, mask, segment_ids)
    return adapter.mlp_block(xc + adapter.attention_out(attn))


class StreamedLayerFunction(torch.autograd.Function):
    """``y = layer(x)`` with StreamBP's backward. Parameters are reached through the adapter (like reentrant
    checkpointing), so their gradients are accumulated in ``param.grad`` by the inner ``autograd.backward``.

    Saved for backward: ``x`` (and the key padding mask when given); positions, segment ids, the adapter and the
    chunk-mask function ride on ``ctx`` (shared by every layer of the call, not per layer).

    Backward order: ``h = norm1(x)`` and the keys/values of all ``T`` positions are recomputed once (``O(T)``
    memory for one layer at a time, instead of recomputing the prefix's keys/values for every chunk); chunks
    ``0 .. D-2`` backpropagate into detached slices of ``x, h, k, v`` whose gradients are summed into buffers
    ``dx, dh, dk, dv``; the last chunk backpropagates together with ``dh, dk, dv`` through the real graph, so every
    parameter receives its gradient in that one final call (the only one with the parameters marked ready).
    """

    @staticmethod
    def forward(ctx, x, positions, key_padding_mask, adapter, full_forward, chunk_size, chunk_mask=None,
                segment_ids=None):
        ctx.save_for_backward(x, key_padding_mask)
        ctx.positions, ctx.adapter, ctx.chunk_size, ctx.chunk_mask = positions, adapter, chunk_size, chunk_mask
        ctx.segment_ids = segment_ids
        with torch.no_grad():
            return full_forward(x, positions, key_padding_mask)

    @staticmethod
    def backward(ctx, grad_out):
        x, key_padding_mask = ctx.saved_tensors
        adapter, positions, chunk, mask, segments = ctx.adapter, ctx.positions, ctx.chunk_size, ctx.chunk_mask, \
            ctx.segment_ids
        x = x.detach().requires_grad_(True)
        params = [p for p in adapter.layer.parameters() if p.requires_grad]
        t = x.shape[1]
        bounds = [(s, min(s + chunk, t)) for s in range(0, t, chunk)]
        with torch.enable_grad():
            h = adapter.norm1(x)
            k, v = adapter.keys_values(h, positions)
            dx, dh, dk, dv = (torch.zeros_like(z) for z in (x, h, k, v))
            set_grad_ready(params, False)
            for s, e in bounds[:-1]:
                _chunk_backward(adapter, x, h, k, v, (dx, dh, dk, dv), positions, s, e, key_padding_mask,
                                grad_out[:, s:e], mask, segments)
            set_grad_ready(params, True)
            s, e = bounds[-1]
            y = chunk_output(adapter, x[:, s:e], h[:, s:e], k[:, :, :e], v[:, :, :e], positions, s, e,
                             key_padding_mask, mask, segments)
            torch.autograd.backward([y, h, k, v], [grad_out[:, s:e], dh, dk, dv])
        return x.grad + dx, None, None, None, None, None, None, None


def _chunk_backward(adapter, x, h, k, v, buffers, positions, s, e, key_padding_mask, grad_chunk,
                    chunk_mask=None, segment_ids=None) -> None:
    """Backpropagate rows ``[s, e)`` into per-chunk leaves (only the slices the chunk reads) and add their
    gradients into the full-size buffers; parameter gradients accumulate in ``param.grad``."""
    dx, dh, dk, dv = buffers
    xc, hc = x[:, s:e].detach().requires_grad_(True), h[:, s:e].detach().requires_grad_(True)
    ke, ve = k[:, :, :e].detach().requires_grad_(True), v[:, :, :e].detach().requires_grad_(True)
    y = chunk_output(adapter, xc, hc, ke, ve, positions, s, e, key_padding_mask, chunk_mask, segment_ids)
    torch.autograd.backward(y, grad_chunk)
    dx[:, s:e] += xc.grad
    dh[:, s:e] += hc.grad
    dk[:, :, :e] += ke.grad
    dv[:, :, :e] += ve.grad


def _needs_grad(layer: nn.Module, args, kwargs) -> bool:
    """Whether this call builds a graph: gradients on, and a tensor input or a parameter that wants one."""
    if not torch.is_grad_enabled():
        return False
    inputs = [*args, *kwargs.values()]
    return (any(isinstance(a, torch.Tensor) and a.requires_grad for a in inputs)
            or any(p.requires_grad for p in layer.parameters()))


def stream_layer(layer: nn.Module, adapter: LayerAdapter, chunk_size: int) -> None:
    """Give ``layer`` StreamBP's backward; it keeps its own call signature (the adapter reads it).

    The instance's ``forward`` is replaced, the module stays where it is, so parameter names, state dicts and
    hooks are unchanged; :func:`unstream_layer` undoes it. Without gradients, or when the adapter declines the call
    (:meth:`LayerAdapter.streamed_call` returns None), the layer's own forward runs.
    """
    if is_streamed(layer):
        raise ValueError(f"{type(layer).__name__} is already streamed")

    def forward(self, *args, **kwargs):
        call = adapter.streamed_call(*args, **kwargs) if _needs_grad(self, args, kwargs) else None
        if call is None:
            return adapter.own_forward(*args, **kwargs)
        y = StreamedLayerFunction.apply(call.x, call.positions, call.key_padding_mask, adapter, call.full,
                                        chunk_size, call.chunk_mask, call.segment_ids)
        return call.output(y)

    layer.forward = types.MethodType(forward, layer)
    setattr(layer, _STREAMED, True)


def is_streamed(layer: nn.Module) -> bool:
    return layer.__dict__.get(_STREAMED, False)


def unstream_layer(layer: nn.Module) -> None:
    """Restore the layer's own forward (a no-op on a layer that is not streamed)."""
    if not is_streamed(layer):
        return
    layer.__dict__.pop("forward", None)
    layer.__dict__.pop(_STREAMED, None)
