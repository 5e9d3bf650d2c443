"""Chunked LM head and token losses: full-sequence logits ``[B, T, V]`` are never materialised.

:class:`ChunkedLMHeadLoss` computes ``sum_chunks objective(hidden[:, s:e] @ W^T, s, e)`` one chunk of logits at a
time and, when gradients are wanted, backpropagates each chunk's loss into ``dhidden[:, s:e]`` and ``dW`` at once
(the logits are made once and freed). An objective is ``objective(logits [B, c, V], s, e) -> scalar`` for the
positions ``[s, e)``; it weights every token with a denominator taken over the *whole* batch, so the chunk losses
sum exactly to the unchunked loss:

* :class:`TokenCrossEntropy`: mean token cross-entropy over labels != ignore_index (SFT, pretraining);
* :class:`ds_ext.grpo.loss.GRPOTokenLoss`: the GRPO / PPO clipped-ratio loss (it lives with the GRPO trainer).

Shapes: ``hidden: [B, T, C]``, ``weight: [V, C]``, per-token tensors ``[B, T]`` aligned with ``hidden`` (position t
scores the token at t + 1, i.e. labels/targets already shifted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ds_ext.ops.losses import IGNORE_INDEX


# The logits of one chunk are capped at this many bytes (fp32): with a large vocabulary a chunk of a fixed number of
# tokens would be large (256 tokens x 152k vocabulary = 149 MiB), and beyond a few MiB a longer chunk is no faster.
MAX_LOGITS_CHUNK_BYTES = 16 << 20


@dataclass
class TokenCrossEntropy:
    labels: torch.Tensor  # [B, T] int64, IGNORE_INDEX where no loss
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self):
        self.denominator = (self.labels != self.ignore_index).sum().clamp(min=1)

    def __call__(self, logits: torch.Tensor, s: int, e: int) -> torch.Tensor:
        labels = self.labels[:, s:e]
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=self.ignore_index, reduction="sum")
        return ce / self.denominator

    def value_and_grad_(self, logits: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """The loss of positions ``[s, e)`` (as :meth:`__call__`); ``logits: [B, c, V]`` fp32 is overwritten with
        its gradient ``(softmax - onehot(label)) / denominator`` (0 on ignored rows). In place: the chunk holds one
        ``[B, c, V]`` buffer where autograd through ``cross_entropy`` holds three (logits, log-softmax, gradient)."""
        labels = self.labels[:, s:e]
        valid = labels != self.ignore_index
        index = torch.where(valid, labels, 0)[..., None]
        picked = logits.gather(-1, index)[..., 0]
        top = logits.amax(-1, keepdim=True)
        probs = logits.sub_(top).exp_()
        total = probs.sum(-1, keepdim=True)
        loss = ((total.log() + top)[..., 0] - picked)[valid].sum() / self.denominator
        probs.div_(total).scatter_add_(-1, index, -valid[..., None].to(probs.dtype))
        probs.mul_((valid / self.denominator)[..., None].to(probs.dtype))
        return loss


class ChunkedLMHeadLoss(torch.autograd.Function):
    """``loss = sum over chunks objective(norm(hidden[:, s:e]) @ weight^T, s, e)``, logits live one chunk at a time.

    When a gradient is needed the chunk's gradients are computed right away in forward (as StreamBP does), so the
    logits are made once, not once in forward and again in backward; ``dhidden: [B, T, C]``, ``dW: [V, C]`` and the
    norm's parameter gradients wait for backward, which only scales them by the incoming gradient (no copy when it
    is 1, as for ``loss.backward()``). An objective with ``value_and_grad_`` (:class:`TokenCrossEntropy`) turns the
    chunk's logits into their gradient in place and the two products are written straight into the buffers
    (``dW += dlogits^T h`` by ``addmm_``); any other objective goes through autograd on the chunk.

    ``norm`` (optional, row-wise: the model's final norm) is applied chunk by chunk and backpropagated at once, so
    only the un-normed hidden states are kept: no full-length normed copy, nor the norm's saved activations.
    """

    @staticmethod
    def forward(ctx, hidden, weight, objective, chunk_size, norm, *norm_params):
        total = hidden.new_zeros((), dtype=torch.float32)
        want_grad = any(ctx.needs_input_grad[:2]) or any(ctx.needs_input_grad[5:])
        grads = ([torch.empty_like(hidden), torch.zeros_like(weight)] + [torch.zeros_like(p) for p in norm_params]
                 if want_grad else None)  # every row of d_hidden is written
        fused = hasattr(objective, "value_and_grad_")
        w = weight.detach().requires_grad_(want_grad and not fused)
        for s in range(0, hidden.shape[1], chunk_size):
            e = min(s + chunk_size, hidden.shape[1])
            h = hidden[:, s:e].detach()
            with torch.enable_grad():
                h.requires_grad_(True)
                hn = norm(h) if norm is not None else h
                if fused:
                    total += _fused_chunk(objective, h, hn, w, grads, norm_params, s, e)
                    continue
                loss = objective(hn @ w.t(), s, e)
                dh, dw, *dn = torch.autograd.grad(loss, (h, w, *norm_params))
            total += loss.detach()
            grads[0][:, s:e] = dh
            for buffer, d in zip(grads[1:], [dw, *dn]):
                buffer += d
        ctx.save_for_backward(*(grads or []))
        ctx.n_params = len(norm_params)
        return total

    @staticmethod
    def backward(ctx, grad):
        grads = ctx.saved_tensors
        if not grads:
            return (None,) * (5 + ctx.n_params)
        if not bool(grad == 1):  # loss.backward() hands the buffers over instead of copying them
            grads = [g * grad for g in grads]
        return (grads[0], grads[1], None, None, None, *grads[2:])


def _fused_chunk(objective, h, hn, weight, grads, norm_params, s: int, e: int) -> torch.Tensor:
    """One chunk of :class:`ChunkedLMHeadLoss` through ``objective.value_and_grad_``: logits ``hn @ W^T`` in fp32,
    turned into their gradient ``g`` in place, ``dW += g^T hn``, then ``g @ W`` backpropagated through the norm (or
    written as is) into ``d_hidden``; ``hn`` is the chunk's leaf ``h`` or the norm's graph from it."""
    d_hidden, d_weight = grads[0][:, s:e], grads[1]
    logits = (hn.detach() @ weight.t()).float()
    loss = objective.value_and_grad_(logits, s, e)
    g = logits.to(weight.dtype).reshape(-1, logits.shape[-1])
    d_weight.addmm_(g.t(), hn.detach().reshape(-1, hn.shape[-1]))
    dhn = (g @ weight).view_as(hn)
    del logits, g
    if hn is h:  # no norm
        d_hidden.copy_(dhn)
        return loss
    dh, *dn = torch.autograd.grad(hn, (h, *norm_params), dhn)
    d_hidden.copy_(dh)
    for buffer, d in zip(grads[2:], dn):
        buffer += d
    return loss


def logits_chunk_tokens(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> int:
    """Positions per logits chunk: ``chunk_size``, capped so that one chunk's fp32 logits ``[B, c, V]`` stay within
    :data:`MAX_LOGITS_CHUNK_BYTES`."""
    return max(1, min(chunk_size, MAX_LOGITS_CHUNK_BYTES // (4 * hidden.shape[0] * weight.shape[0])))


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, objective, chunk_size: int,
                    norm: Optional[nn.Module] = None) -> torch.Tensor:
    """The loss of ``objective`` on ``norm(hidden) @ weight^T`` (``norm`` optional, row-wise) computed at most
    ``chunk_size`` positions at a time (:func:`logits_chunk_tokens`)."""
    chunk_size = logits_chunk_tokens(hidden, weight, chunk_size)
    params = [p for p in norm.parameters() if p.requires_grad] if norm is not None else []
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or params):
        return ChunkedLMHeadLoss.apply(hidden, weight, objective, chunk_size, norm, *params)
    with torch.no_grad():  # evaluation: no gradient work in the chunks
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, hidden.shape[1], chunk_size):
            e = min(s + chunk_size, hidden.shape[1])
            h = hidden[:, s:e] if norm is None else norm(hidden[:, s:e])
            total += objective(h @ weight.t(), s, e)
        return total
