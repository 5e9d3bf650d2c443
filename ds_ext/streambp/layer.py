"""StreamBP for a pre-norm decoder layer: exact backward, chunked along the sequence (arXiv 2506.03077).

Forward runs under ``no_grad`` and keeps only the layer's input ``x: [B, T, C]`` (what activation checkpointing
keeps); it computes the output chunk by chunk as the backward does (:func:`streamed_forward`: keys/values of all
positions, then each chunk's queries, attention, projection and MLP), or with the layer's own forward when the
sequence fits in one chunk. Backward receives ``G = dL/dY: [B, T, C]``, computes the roped keys/values of all
positions once without a graph (chunk by chunk), then walks the sequence in chunks ``[s, e)`` of ``chunk_size``
tokens (the last may be shorter), **last to first**; for each chunk, with gradients on, from the leaf
``x[:, s:e]``:

* ``h = norm1(x[:, s:e])`` (row-wise: no full-length ``h``), the chunk's queries, keys and values;
* attention of the ``c = e - s`` queries over the ``e`` keys ``< e``, causal aligned bottom-right (query ``s + i``
  sees keys ``<= s + i``; never a ``T x T`` mask): :func:`ds_ext.ops.attention.chunk_attention` over the detached
  prefix keys ``[0, s)`` and the chunk's own keys (the unmasked prefix and the causal diagonal block merged by
  log-sum-exp; with packed documents, ``segment_ids``, the same per document overlapping the chunk; or a ``[c, e]``
  mask with key padding or the per-call attention's :meth:`ChunkMasked.chunk_mask`);
* ``y = x[:, s:e] + o_proj(attn)``, ``y = y + mlp(norm2(y))`` on the chunk only;

then backpropagates ``G[:, s:e]`` into ``y`` and the key/value gradients of rows ``[s, e)`` (finished: later chunks
ran first) into the chunk's keys/values. The prefix keys' gradients accumulate in buffers ``dK, dV``; the input
gradient of rows ``[s, e)`` is final after its chunk; parameter gradients accumulate over chunks, so the result is
the full-sequence gradient (a sum of the same terms).

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
import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from ds_ext._deepspeed import set_grad_ready
from ds_ext.ops.attention import chunk_attention
from ds_ext.ops.stream import LayerAdapter

_STREAMED = "_ds_ext_streamed"
_CALLS = "_ds_ext_streamed_calls"


def chunk_output(adapter: LayerAdapter, xc, q, k, v, s: int, e: int, key_padding_mask: Optional[torch.Tensor],
                 chunk_mask=None, block=None, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer's output rows ``[s, e)``: ``[B, e - s, C]``, from the input rows ``xc = x[:, s:e]``, their roped
    queries ``q`` and the keys/values of positions ``< e`` (``k, v: [B, Hkv, e, D]``; or, with ``block = (k_block,
    v_block)`` for the chunk's own rows, ``k, v`` hold positions ``< s``:
    :func:`ds_ext.ops.attention.chunk_attention`), within the packed documents ``segment_ids: [B, T]`` (None: one
    per row)."""
    mask = chunk_mask(s, e) if chunk_mask is not None else None
    attn = chunk_attention(q, k, v, s, key_padding_mask, adapter.scale, mask, segment_ids, block=block)
    return adapter.mlp_block(xc + adapter.attention_out(attn))


def keys_values(adapter: LayerAdapter, x, positions, bounds) -> Tuple[torch.Tensor, torch.Tensor]:
    """Roped keys/values of every position, ``[B, Hkv, T, D]`` each, without a graph, computed chunk by chunk into
    the two buffers (no full-length normed input or projection temporaries). The buffers are sequence-major, so a
    prefix view is dense and its gradient buffer (``zeros_like``, same strides) obeys autograd's layout contract."""
    k = v = None
    with torch.no_grad():
        for s, e in bounds:
            kc, vc = adapter.keys_values(adapter.norm1(x[:, s:e]), adapter.slice_positions(positions, s, e))
            if k is None:  # [B, T, Hkv, D] storage seen as [B, Hkv, T, D]: a prefix k[:, :, :s] is one dense block
                k = kc.new_empty((kc.shape[0], x.shape[1]) + kc.shape[1:2] + kc.shape[3:]).transpose(1, 2)
                v = vc.new_empty((vc.shape[0], x.shape[1]) + vc.shape[1:2] + vc.shape[3:]).transpose(1, 2)
            k[:, :, s:e], v[:, :, s:e] = kc, vc
    return k, v


def chunk_bounds(t: int, chunk: int):
    return [(s, min(s + chunk, t)) for s in range(0, t, chunk)]


def streamed_forward(adapter: LayerAdapter, x, positions, key_padding_mask, chunk: int, chunk_mask=None,
                     segment_ids: Optional[torch.Tensor] = None):
    """The layer's output ``[B, T, C]`` computed chunk by chunk, no graph: keys/values of all positions once
    (:func:`keys_values`), then per chunk its queries, attention over keys ``< e``, projection and MLP
    (:func:`chunk_output`, the function the backward differentiates). Beside ``x`` and ``y`` it holds ``K, V`` and
    one chunk's activations, not the layer's full-length ones (the SwiGLU alone is ``3 F`` floats per token)."""
    bounds = chunk_bounds(x.shape[1], chunk)
    k, v = keys_values(adapter, x, positions, bounds)
    y = torch.empty_like(x)
    for s, e in bounds:
        xc = x[:, s:e]
        q = adapter.queries(adapter.norm1(xc), adapter.slice_positions(positions, s, e))
        y[:, s:e] = chunk_output(adapter, xc, q, k[:, :, :e], v[:, :, :e], s, e, key_padding_mask, chunk_mask,
                                 segment_ids=segment_ids)
    return y


class StreamedLayerFunction(torch.autograd.Function):
    """``y = layer(x)`` with StreamBP's backward. Parameters are reached through the adapter (like reentrant
    checkpointing), so their gradients are accumulated in ``param.grad`` by the inner ``autograd.backward``.

    Saved for backward: ``x`` (or, with a ``store``, its host copy: :mod:`ds_ext.streambp.offload`) and the key
    padding mask when given; positions, segment ids, the adapter and the
    chunk-mask function ride on ``ctx`` (shared by every layer of the call, not per layer).

    Backward, for ``G = dL/dY``: the roped keys/values ``K, V`` of all ``T`` positions are computed once without a
    graph (:func:`keys_values`); gradient buffers ``dK, dV`` (like ``K, V``) and ``dx`` (like ``x``). Chunks run
    **last to first**; chunk ``[s, e)`` recomputes, with a graph from the leaf ``x[:, s:e]``, the normed rows, its
    queries and its own keys/values, attends over the detached prefix ``K[:, :, :s]`` (a leaf whose ``.grad`` is
    the view ``dK[:, :, :s]``, so autograd adds into the buffer in place) and the chunk's own keys (the causal
    block), and backpropagates ``G[:, s:e]`` together with ``dK[:, :, s:e], dV[:, :, s:e]`` into its keys/values.
    Those rows are complete by then: only queries at or after them see them, and later chunks ran first. So each
    call finishes ``dx[:, s:e]``, and every parameter (queries, keys/values, projections, MLP, norms) receives a
    gradient in every call: the last call (chunk 0) is the only one with the parameters marked ready.

    Working set beside the stored inputs: ``G``, ``dx``, ``K, V`` and ``dK, dV`` (``2 (C + 2 Hkv D)`` floats per
    token), plus one chunk's activations and the attention kernel's prefix gradients (``2 Hkv D`` per prefix
    token): no full-length normed input, projections or their gradients.
    """

    @staticmethod
    def forward(ctx, x, positions, key_padding_mask, adapter, full_forward, chunk_size, chunk_mask=None,
                segment_ids=None, store=None, layer_index=0):
        # with a LayerInputStore (offload_layer_inputs) x goes to host memory; the copy overlaps this forward
        ctx.entry = store.put(x, layer_index) if store is not None else None
        ctx.store = store
        ctx.save_for_backward(x if store is None else None, key_padding_mask)
        ctx.positions, ctx.adapter, ctx.chunk_size, ctx.chunk_mask = positions, adapter, chunk_size, chunk_mask
        ctx.segment_ids = segment_ids
        with torch.no_grad():
            if x.shape[1] <= chunk_size:  # one chunk: the layer's own forward holds no more than a chunk would
                return full_forward(x, positions, key_padding_mask)
            return streamed_forward(adapter, x, positions, key_padding_mask, chunk_size, chunk_mask, segment_ids)

    @staticmethod
    def backward(ctx, grad_out):
        x, key_padding_mask = ctx.saved_tensors
        adapter, positions, chunk, mask = ctx.adapter, ctx.positions, ctx.chunk_size, ctx.chunk_mask
        # offloaded: fetched back (prefetched while the layer after it ran its backward); prefetches the one before
        x = ctx.store.get(ctx.entry) if ctx.entry is not None else x.detach()
        params = [p for p in adapter.layer.parameters() if p.requires_grad]
        bounds = chunk_bounds(x.shape[1], chunk)
        k, v = keys_values(adapter, x, positions, bounds)
        state = _BackwardState(adapter, x, k, v, positions, key_padding_mask, mask, ctx.segment_ids)
        set_grad_ready(params, False)
        for s, e in reversed(bounds[1:]):
            _chunk_backward(state, s, e, grad_out[:, s:e])
        set_grad_ready(params, True)
        state.backward_chunk(*bounds[0], grad_out[:, bounds[0][0]:bounds[0][1]])
        return state.dx, None, None, None, None, None, None, None, None, None


class _BackwardState:
    """The buffers of one streamed layer's backward (see :class:`StreamedLayerFunction`)."""

    def __init__(self, adapter, x, k, v, positions, key_padding_mask, chunk_mask, segment_ids=None):
        self.adapter, self.x, self.k, self.v = adapter, x, k, v
        self.positions, self.key_padding_mask, self.chunk_mask = positions, key_padding_mask, chunk_mask
        self.segment_ids = segment_ids
        # bf16/fp16 K/V: dK, dV accumulate in fp32 (a low-precision buffer rounds at each chunk's add: measured
        # 3.5e-3 / 4.4e-3 relative after 32 / 64 chunks vs 1.7e-3 for one rounding of the fp32 sum)
        acc = torch.float32 if k.dtype in (torch.bfloat16, torch.float16) else k.dtype
        self.dk, self.dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
        self.dx = torch.empty_like(x)

    def backward_chunk(self, s: int, e: int, grad_chunk) -> None:
        """Rows ``[s, e)``: recompute with a graph, backpropagate ``grad_chunk`` and the finished ``dK, dV`` rows;
        writes ``dx[:, s:e]``, adds into ``dK, dV[:, :, :s]`` and the parameters' ``.grad``."""
        adapter = self.adapter
        xc = self.x[:, s:e].detach().requires_grad_(True)
        kp, vp = (_accumulating_leaf(z[:, :, :s], dz[:, :, :s]) for z, dz in ((self.k, self.dk), (self.v, self.dv)))
        with torch.enable_grad(), warnings.catch_warnings():
            # with B > 1 a prefix view has gaps between rows; autograd then notes (once) that its .grad is not
            # contiguous: intended, the buffer is the accumulator
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            q, kc, vc = adapter.queries_keys_values(adapter.norm1(xc), adapter.slice_positions(self.positions, s, e))
            y = chunk_output(adapter, xc, q, kp, vp, s, e, self.key_padding_mask, self.chunk_mask, (kc, vc),
                             self.segment_ids)
            torch.autograd.backward([y, kc, vc], [grad_chunk, self.dk[:, :, s:e].to(kc.dtype),
                                                  self.dv[:, :, s:e].to(vc.dtype)])
        for leaf, buffer in ((kp, self.dk), (vp, self.dv)):
            if leaf.grad is not None and leaf.grad.dtype != buffer.dtype:  # low precision: add into the fp32 sum
                buffer[:, :, :s] += leaf.grad
        self.dx[:, s:e] = xc.grad


def _accumulating_leaf(z: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """A leaf with ``z``'s values whose gradient autograd adds into ``buffer`` (a view) in place: a leaf's existing
    ``.grad`` is accumulated into (``AccumulateGrad`` with grad mode off), so no ``z``-sized copy is made."""
    leaf = z.detach().requires_grad_(True)
    if z.shape[2] > 0 and buffer.dtype == z.dtype:  # else (fp32 sum of bf16 K/V) the caller adds leaf.grad
        leaf.grad = buffer
    return leaf


def _chunk_backward(state: _BackwardState, s: int, e: int, grad_chunk) -> None:
    """One chunk's backward before the last call (the parameters are marked not ready)."""
    state.backward_chunk(s, e, grad_chunk)


def _needs_grad(layer: nn.Module, args, kwargs) -> bool:
    """Whether this call builds a graph: gradients on, and a tensor input or a parameter that wants one."""
    if not torch.is_grad_enabled():
        return False
    inputs = [*args, *kwargs.values()]
    return (any(isinstance(a, torch.Tensor) and a.requires_grad for a in inputs)
            or any(p.requires_grad for p in layer.parameters()))


def stream_layer(layer: nn.Module, adapter: LayerAdapter, chunk_size: int, store=None, layer_index: int = 0,
                 runner=None) -> None:
    """Give ``layer`` StreamBP's backward; it keeps its own call signature (the adapter reads it).

    ``store``: a :class:`ds_ext.streambp.offload.LayerInputStore` keeping the layer's input in host memory
    (``layer_index``: the layer's position among the model's streamed layers, which orders the prefetches).
    ``runner``: ``runner(call, adapter, chunk_size, store, layer_index) -> y`` in place of
    :class:`StreamedLayerFunction`, run with and without gradients (a layer whose input is a sequence shard cannot
    run its own forward: :class:`ds_ext.streambp.ulysses.UlyssesStreaming`); a call the adapter declines is then
    refused.

    The instance's ``forward`` is replaced, the module stays where it is, so parameter names, state dicts and
    hooks are unchanged; :func:`unstream_layer` undoes it. Without gradients, or when the adapter declines the call
    (:meth:`LayerAdapter.streamed_call` returns None), the layer's own forward runs.
    """
    if is_streamed(layer):
        raise ValueError(f"{type(layer).__name__} is already streamed")

    def forward(self, *args, **kwargs):
        wanted = runner is not None or _needs_grad(self, args, kwargs)
        call = adapter.streamed_call(*args, **kwargs) if wanted else None
        if call is None and runner is not None:
            raise ValueError(f"{type(self).__name__}: StreamBP with sequence parallelism runs every call sharded; this "
                             "call (a KV cache, or arguments the layer's adapter does not stream) cannot be")
        if call is None:
            return adapter.own_forward(*args, **kwargs)
        if runner is not None:
            y = runner(call, adapter, chunk_size, store, layer_index)
        else:
            y = StreamedLayerFunction.apply(call.x, call.positions, call.key_padding_mask, adapter, call.full,
                                            chunk_size, call.chunk_mask, call.segment_ids, store, layer_index)
        self.__dict__[_CALLS] = self.__dict__.get(_CALLS, 0) + 1
        return call.output(y)

    layer.forward = types.MethodType(forward, layer)
    setattr(layer, _STREAMED, True)


def is_streamed(layer: nn.Module) -> bool:
    return layer.__dict__.get(_STREAMED, False)


def streamed_calls(layer: nn.Module) -> int:
    """How many forward calls of ``layer`` ran StreamBP's streamed function (not the layer's own forward): what a
    test checks so that a silent fallback (the adapter declining every call) cannot pass as streaming."""
    return layer.__dict__.get(_CALLS, 0)


def unstream_layer(layer: nn.Module) -> None:
    """Restore the layer's own forward (a no-op on a layer that is not streamed)."""
    if not is_streamed(layer):
        return
    layer.__dict__.pop("forward", None)
    layer.__dict__.pop(_STREAMED, None)
    layer.__dict__.pop(_CALLS, None)
