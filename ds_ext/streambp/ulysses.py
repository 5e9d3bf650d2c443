"""StreamBP with Ulysses sequence parallelism (``streambp.sequence_parallel: N``): the sequence is sharded over the
``N`` ranks of a group, and each rank streams its own shard (exact: the gradients are the full sequence's).

**Layout** (DeepSpeed's Ulysses, ``deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF``): rank
``r`` holds the contiguous rows ``[r L, (r + 1) L)`` of a sequence of ``T = N L`` tokens (``x: [B, L, C]``, with
global ``position_ids``). Attention needs every position, so around it heads and rows are exchanged with DeepSpeed's
differentiable all-to-all (:func:`ds_ext._deepspeed.ulysses_all_to_all`): :meth:`UlyssesExchange.to_heads` turns
``[B, h, c, D]`` (this rank's rows, all heads) into ``[B, h / N, N c, D]`` (its ``h / N`` heads, block ``r`` = rank
``r``'s rows), :meth:`UlyssesExchange.to_rows` is the inverse. KV heads fewer than ``N`` are repeated first, as
DeepSpeed does. Everything else (norms, projections, MLP) is row-wise and runs on the shard.

**Forward** (no graph): the roped keys/values of the shard, chunk by chunk, exchanged once into ``K, V: [B,
Hkv / N, T, D]`` (this rank's KV heads at every position); then per chunk ``[s, e)`` of the shard: queries,
:meth:`~UlyssesExchange.to_heads`, attention of block ``r`` (global rows ``[r L + s, r L + e)``) over the keys
``< r L + e`` (:func:`ds_ext.ops.attention.chunk_attention`), :meth:`~UlyssesExchange.to_rows`, output projection
and MLP. Every rank runs the same chunks in the same order (the shards have equal length), so the exchanges pair.

**Backward**, two passes. With the sequence sharded, a key row's gradient is not complete after its own chunk (the
queries of later ranks' *earlier* chunks see it too), so unlike sp=1 (:mod:`ds_ext.streambp.layer`) the keys/values
take no gradient through the chunk's graph: (1) chunks last to first recompute, from the leaf ``x[:, s:e]``, the
queries, the exchange, the attention over the detached ``K, V`` (accumulating leaves whose gradients add in place
into ``dK, dV: [B, Hkv / N, T, D]``), the exchange back, projection and MLP, and backpropagate ``G[:, s:e]``: this
gives ``dx`` through queries, residuals and MLP, and the parameters' gradients except the key/value projections';
(2) ``dK, dV`` are exchanged back to this rank's rows (all KV heads, ``[B, Hkv, L, D]``) and, chunk by chunk, the
keys/values are recomputed from ``x[:, s:e]`` with a graph and backpropagated: the rest of ``dx`` and the key/value
projections' (and the first norm's) gradients. The sum is the full-sequence gradient term by term.

Cost over sp=1 StreamBP: the first norm and the key/value projections run once more per backward (pass 2), and
four all-to-alls per chunk (q and attention output, forward and backward) plus two per layer (``K, V``; ``dK,
dV``). Memory per rank: the stored shard ``L x C`` per layer, ``K, V, dK, dV`` of ``T x Hkv / N`` heads (the same
bytes as sp=1's at ``T / N`` rows), one chunk's activations and ``N`` chunks' attention rows.

Limits: one document per row, no key padding, no per-call chunk mask (refused, naming what was given); equal shard
lengths on every rank; the group's size divides the query heads, and the KV heads divide it or it them.
Gradients: each rank's parameter gradients are its shard's share; sum them over the group (with the loss of
:func:`shard_loss`, the sum is the full sequence's mean-loss gradient). In a DeepSpeed engine
(:class:`ShardedCausalLMForward`, installed by :func:`ds_ext.streambp.apply.apply_streambp`) the group reads one
data shard and DeepSpeed's Ulysses ZeRO reduction does that sum (:func:`ds_ext._deepspeed.ulysses_mpu`).

ZeRO-1/2: parameters are marked ready (:func:`ds_ext._deepspeed.set_grad_ready`) for the last inner backward that
reaches them: pass 1's last chunk for every parameter outside the key/value path, pass 2's last for the rest.
"""
from __future__ import annotations

import warnings
from typing import Optional, Set

import torch
import torch.distributed as dist

from ds_ext._deepspeed import set_grad_ready, ulysses_all_to_all, ulysses_register_group
from ds_ext.ops.attention import chunk_attention
from ds_ext.ops.chunked_loss import TokenCrossEntropy, chunked_lm_loss
from ds_ext.ops.losses import IGNORE_INDEX, shift_labels
from ds_ext.ops.stream import LayerAdapter, StreamCall
from ds_ext.streambp.layer import _accumulating_leaf, chunk_bounds, keys_values


class UlyssesExchange:
    """DeepSpeed Ulysses' head/row exchange over ``group`` (see the module docstring for the layout)."""

    def __init__(self, group):
        self.group = group
        self.n = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        ulysses_register_group(group)

    def _check(self, heads: int, what: str) -> None:
        if heads % self.n:
            raise ValueError(f"sequence_parallel={self.n} must divide the {what} heads ({heads})")

    def to_heads(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, h, c, D]`` (this rank's rows, all heads) -> ``[B, h / N, N c, D]`` (head group ``rank``, block
        ``r`` of the rows = rank ``r``'s)."""
        b, h, c, d = z.shape
        self._check(h, "query/key")
        z = z.reshape(b, self.n, h // self.n, c, d).permute(1, 0, 2, 3, 4)
        z = ulysses_all_to_all(self.group, z)
        return z.permute(1, 2, 0, 3, 4).reshape(b, h // self.n, self.n * c, d)

    def to_rows(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_heads`: ``[B, h / N, N c, D]`` -> ``[B, h, c, D]``."""
        b, hl, nc, d = z.shape
        c = nc // self.n
        z = z.reshape(b, hl, self.n, c, d).permute(2, 0, 1, 3, 4)
        z = ulysses_all_to_all(self.group, z)
        return z.permute(1, 0, 2, 3, 4).reshape(b, self.n * hl, c, d)

    def kv_repeat(self, kv_heads: int) -> int:
        """How often each KV head is repeated before the exchange (DeepSpeed's ``kv_replication_factor``)."""
        if kv_heads % self.n == 0:
            return 1
        if self.n % kv_heads:
            raise ValueError(f"sequence_parallel={self.n} and the KV heads ({kv_heads}) must divide one another")
        return self.n // kv_heads

    def kv_to_heads(self, z: torch.Tensor) -> torch.Tensor:
        rep = self.kv_repeat(z.shape[1])
        return self.to_heads(z.repeat_interleave(rep, dim=1) if rep > 1 else z)

    def kv_grad_to_rows(self, dz: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """The gradient of :meth:`kv_to_heads` (``[B, h / N, T, D]`` -> ``[B, Hkv, L, D]``), repeats summed."""
        rows = self.to_rows(dz)
        rep = self.kv_repeat(kv_heads)
        return rows if rep == 1 else rows.reshape(rows.shape[0], kv_heads, rep, *rows.shape[2:]).sum(2)


def _blocks_attention(ex: UlyssesExchange, qh, k, v, s: int, e: int, shard: int, scale, dk=None, dv=None):
    """Attention of the exchanged queries ``qh: [B, h / N, N c, D]`` (block ``r``: global rows ``[r L + s, r L +
    e)``) over ``k, v: [B, Hkv', T, D]``, causal. With ``dk, dv`` (backward) the keys/values are read through
    accumulating leaves whose gradients land in ``dk, dv``; returns ``(out, leaves)``."""
    c, outs, leaves = e - s, [], []
    for r in range(ex.n):
        a, z = r * shard + s, r * shard + e
        q = qh[:, :, r * c:(r + 1) * c]
        if dk is None:
            outs.append(chunk_attention(q, k[:, :, :z], v[:, :, :z], a, scale=scale))
            continue
        kp, vp, kb, vb = (_accumulating_leaf(t[:, :, lo:hi], g[:, :, lo:hi])
                          for t, g, lo, hi in ((k, dk, 0, a), (v, dv, 0, a), (k, dk, a, z), (v, dv, a, z)))
        leaves += [(kp, dk, 0, a), (vp, dv, 0, a), (kb, dk, a, z), (vb, dv, a, z)]
        outs.append(chunk_attention(q, kp, vp, a, scale=scale, block=(kb, vb)))
    return torch.cat(outs, dim=2), leaves


def _gathered_keys_values(ex: UlyssesExchange, adapter: LayerAdapter, x, positions, bounds):
    """``K, V: [B, Hkv', T, D]``: this rank's KV heads at every position, and the KV head count before the
    exchange."""
    k, v = keys_values(adapter, x, positions, bounds)
    kv_heads = k.shape[1]
    with torch.no_grad():
        k = ex.kv_to_heads(k)
        v = ex.kv_to_heads(v)
    return k, v, kv_heads


def _params_reached(outputs) -> Set[int]:
    """Ids of the leaf tensors (parameters) the graph of ``outputs`` reaches."""
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen, found = set(), set()
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return found


class UlyssesStreamedLayerFunction(torch.autograd.Function):
    """``y = layer(x)`` for this rank's shard ``x: [B, L, C]``, the forward and two-pass backward of the module
    docstring. Saved: ``x`` (or its host copy with a ``store``); positions and the adapter ride on ``ctx``."""

    @staticmethod
    def forward(ctx, x, positions, adapter, chunk_size, exchange, store=None, layer_index=0):
        ctx.entry = store.put(x, layer_index) if store is not None else None
        ctx.store = store
        ctx.save_for_backward(x if store is None else None)
        ctx.positions, ctx.adapter, ctx.chunk_size, ctx.exchange = positions, adapter, chunk_size, exchange
        with torch.no_grad():
            bounds = chunk_bounds(x.shape[1], chunk_size)
            k, v, _ = _gathered_keys_values(exchange, adapter, x, positions, bounds)
            y = torch.empty_like(x)
            for s, e in bounds:
                xc = x[:, s:e]
                q = adapter.queries(adapter.norm1(xc), adapter.slice_positions(positions, s, e))
                attn, _ = _blocks_attention(exchange, exchange.to_heads(q), k, v, s, e, x.shape[1], adapter.scale)
                y[:, s:e] = adapter.mlp_block(xc + adapter.attention_out(exchange.to_rows(attn)))
            return y

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        x = ctx.store.get(ctx.entry) if ctx.entry is not None else x.detach()
        adapter, positions, ex = ctx.adapter, ctx.positions, ctx.exchange
        shard = x.shape[1]
        bounds = chunk_bounds(shard, ctx.chunk_size)
        k, v, kv_heads = _gathered_keys_values(ex, adapter, x, positions, bounds)
        acc = torch.float32 if k.dtype in (torch.bfloat16, torch.float16) else k.dtype  # as sp=1: fp32 sums
        dk, dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
        dx = torch.zeros_like(x)
        params = [p for p in adapter.layer.parameters() if p.requires_grad]
        with torch.enable_grad():  # which parameters pass 2 reaches (the key/value path): ready only there
            kv_ids = _params_reached(adapter.keys_values(adapter.norm1(x[:, :1]),
                                                         adapter.slice_positions(positions, 0, 1)))
        set_grad_ready(params, False)
        for i, (s, e) in enumerate(reversed(bounds)):  # pass 1: queries, attention, projection, MLP
            if i == len(bounds) - 1:
                set_grad_ready([p for p in params if id(p) not in kv_ids], True)
            xc = x[:, s:e].detach().requires_grad_(True)
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
                q = adapter.queries(adapter.norm1(xc), adapter.slice_positions(positions, s, e))
                attn, leaves = _blocks_attention(ex, ex.to_heads(q), k, v, s, e, shard, adapter.scale, dk, dv)
                y = adapter.mlp_block(xc + adapter.attention_out(ex.to_rows(attn)))
                torch.autograd.backward(y, grad_out[:, s:e])
            for leaf, buffer, lo, hi in leaves:
                if leaf.grad is not None and leaf.grad.dtype != buffer.dtype:  # low precision: add into the fp32 sum
                    buffer[:, :, lo:hi] += leaf.grad
            dx[:, s:e] += xc.grad
        del k, v
        with torch.no_grad():  # this rank's rows, all KV heads
            dk_rows, dv_rows = ex.kv_grad_to_rows(dk, kv_heads), ex.kv_grad_to_rows(dv, kv_heads)
        del dk, dv
        for i, (s, e) in enumerate(reversed(bounds)):  # pass 2: keys/values from the finished dK, dV
            if i == len(bounds) - 1:
                set_grad_ready([p for p in params if id(p) in kv_ids], True)
            xc = x[:, s:e].detach().requires_grad_(True)
            with torch.enable_grad():
                kc, vc = adapter.keys_values(adapter.norm1(xc), adapter.slice_positions(positions, s, e))
                torch.autograd.backward([kc, vc], [dk_rows[:, :, s:e].to(kc.dtype), dv_rows[:, :, s:e].to(vc.dtype)])
            dx[:, s:e] += xc.grad
        return dx, None, None, None, None, None, None


class UlyssesStreaming:
    """The runner :func:`ds_ext.streambp.layer.stream_layer` calls for a layer under ``sequence_parallel``: it
    refuses what the sharded path does not reproduce (see the module docstring) and applies
    :class:`UlyssesStreamedLayerFunction`."""

    def __init__(self, group):
        self.exchange = UlyssesExchange(group)

    def __call__(self, call: StreamCall, adapter: LayerAdapter, chunk_size: int, store, layer_index: int):
        given = [name for name, value in (("a key padding mask", call.key_padding_mask),
                                          ("packed documents (segment ids)", call.segment_ids),
                                          ("a per-call attention with chunk masks", call.chunk_mask))
                 if value is not None]
        if given:
            raise ValueError(f"StreamBP with sequence_parallel={self.exchange.n} streams causal attention over one "
                             f"document per row; this call has {', '.join(given)}")
        return UlyssesStreamedLayerFunction.apply(call.x, call.positions, adapter, chunk_size, self.exchange, store,
                                                  layer_index)


def shard_positions(length: int, group, batch: int = 1, device=None) -> torch.Tensor:
    """Global ``position_ids [batch, L]`` of this rank's shard of a ``length``-token sequence (``length`` divisible
    by the group's size)."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    if length % n:
        raise ValueError(f"sequence length {length} is not divisible by sequence_parallel={n}")
    shard = length // n
    return torch.arange(rank * shard, (rank + 1) * shard, device=device).expand(batch, shard)


def shard_loss(hidden: torch.Tensor, weight: torch.Tensor, shifted_labels: torch.Tensor, group,
               logits_chunk_size: int = 256, norm=None) -> torch.Tensor:
    """This rank's share of the mean token cross-entropy of the whole sequence: the chunked head + loss
    (:func:`ds_ext.ops.chunked_loss.chunked_lm_loss`) over the shard's ``hidden: [B, L, C]`` and its labels,
    already shifted over the whole sequence (``shifted_labels: [B, L]``, row t holds token t + 1's label, -100
    none), divided by the number of labels on all ranks (one all-reduce). The sum over the group's ranks of the
    returned values, and of their gradients, is the full sequence's."""
    objective = TokenCrossEntropy(shifted_labels)
    count = (shifted_labels != objective.ignore_index).sum()
    dist.all_reduce(count, group=group)
    objective.denominator = count.clamp(min=1)
    return chunked_lm_loss(hidden, weight, objective, logits_chunk_size, norm=norm)


def shard_rows(input_ids: torch.Tensor, labels: torch.Tensor, group):
    """This rank's shard of whole-sequence rows (``input_ids, labels: [B, T]``, unshifted labels, the same on every
    rank of ``group``): ``(input_ids [B, L], shifted labels [B, L], global position_ids [B, L])`` for the rows
    ``[r L, (r + 1) L)``; labels are shifted over the whole sequence (so the label at a shard boundary is kept)."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    positions = shard_positions(input_ids.shape[1], group, input_ids.shape[0], input_ids.device)
    rows = slice(rank * (input_ids.shape[1] // n), (rank + 1) * (input_ids.shape[1] // n))
    return input_ids[:, rows], shift_labels(labels)[:, rows], positions


def causal_lm_shard_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, group,
                         logits_chunk_size: int = 256) -> torch.Tensor:
    """HF causal-LM loss of this rank's shard under ``sequence_parallel``: ``input_ids, labels: [B, T]`` are the
    whole sequence (unshifted labels, HF convention; every rank passes the same); the rank runs ``model.model`` on
    its rows (:func:`shard_rows`) and :func:`shard_loss`. Sum the gradients over the group."""
    from ds_ext.streambp.hf import _without_final_norm
    ids, shifted, positions = shard_rows(input_ids, labels, group)
    with _without_final_norm(model.model) as norm:
        hidden = model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    return shard_loss(hidden, model.lm_head.weight, shifted, group, logits_chunk_size, norm)


def one_document_problem(position_ids: Optional[torch.Tensor], labels: torch.Tensor) -> Optional[str]:
    """Why rows with these ``position_ids`` (``[B or 1, T]``, None: ``0 .. T-1``) and unshifted ``labels [B, T]``
    cannot be sharded, or None. Allowed: each row one document from position 0, optionally followed by a tail
    without labels (the padding of ``--no_packing`` rows, whose positions restart: causal attention over the whole
    row gives the document's tokens the same outputs, and the tail is not scored). Refused: a row whose positions
    restart before a labelled token (packed documents: the sharded attention is causal over the whole row)."""
    if position_ids is None:
        return None
    arange = torch.arange(position_ids.shape[-1], device=position_ids.device)
    tail = (position_ids.expand_as(labels) != arange).cumsum(dim=1) > 0
    scored = tail & (labels != IGNORE_INDEX)
    if not bool(scored.any()):
        return None
    row, col = (int(i) for i in scored.nonzero()[0])
    return (f"row {row} holds packed documents (position_ids restart before the labelled token {col}); sharded "
            "rows must be one document each (examples/train.py: --no_packing)")


class _WholeSequenceValue(torch.autograd.Function):
    """Value ``total`` (the group's summed loss), gradient straight to ``share`` (this rank's part): the loss every
    rank reports is the whole sequence's, while each rank backpropagates only its own share."""

    @staticmethod
    def forward(ctx, share, total):
        return total.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ShardedCausalLMForward:
    """The forward of an :class:`ds_ext.models.hf.HFCausalLM` under ``sequence_parallel`` in a DeepSpeed engine
    (installed by :func:`ds_ext.streambp.apply.apply_streambp` through the model's ``set_forward`` seam).

    ``(input_ids, labels, position_ids) -> loss``: every rank of the group gets the same rows ``[B, T]`` (the
    group reads one data shard); the rank runs its shard (:func:`shard_rows`) through the streamed layers, and the
    head + loss of :func:`shard_loss`. The returned loss has the whole sequence's value (the group's sum, equal on
    every rank) and the gradient of this rank's share only: DeepSpeed's Ulysses ZeRO reduction then sums the
    shares of a group and averages over the groups (:func:`ds_ext._deepspeed.ulysses_mpu`), the sp=1 step.
    ``calls`` counts the sharded forwards. Refused (ValueError, naming the key): ``labels=None`` (full logits
    would need every rank's rows), rows of several documents (:func:`one_document_problem`), ``T`` not divisible
    by ``N`` (:func:`shard_positions`)."""

    def __init__(self, model, group, logits_chunk_size: int):
        self.model, self.group, self.logits_chunk_size = model, group, logits_chunk_size
        self.calls = 0

    def __call__(self, input_ids, labels=None, position_ids=None):
        n = dist.get_world_size(self.group)
        key = f"ds_ext.streambp.sequence_parallel={n}"
        if labels is None:
            raise ValueError(f"{key}: the sharded forward computes the training loss; it needs labels (logits of "
                             "the whole sequence need sequence_parallel 1)")
        problem = one_document_problem(position_ids, labels)
        if problem is not None:
            raise ValueError(f"{key}: {problem}")
        ids, shifted, positions = shard_rows(input_ids, labels, self.group)
        hidden = self.model.hidden_states(ids, positions)
        share = shard_loss(hidden, self.model.hf.lm_head.weight, shifted, self.group, self.logits_chunk_size)
        total = share.detach().clone()
        dist.all_reduce(total, group=self.group)
        self.calls += 1
        return _WholeSequenceValue.apply(share, total)
