"""Chunked LM head and token losses: full-sequence logits ``[B, T, V]`` are never materialised.

:class:`ChunkedLMHeadLoss` computes ``sum_chunks objective(hidden[:, s:e] @ W^T, s, e)`` one chunk of logits at a
time and, when gradients are wanted, backpropagates each chunk's loss into ``dhidden[:, s:e]`` and ``dW`` at once
(the logits are made once and freed). An objective is ``objective(logits [B, c, V], s, e) -> scalar`` for the
positions ``[s, e)``; it weights every token with a denominator taken over the *whole* batch, so the chunk losses
sum exactly to the unchunked loss:

* :class:`TokenCrossEntropy`: mean token cross-entropy over labels != ignore_index (SFT, pretraining);
* :class:`ds_ext.asyncflow.grpo.GRPOTokenLoss`: the GRPO / PPO clipped-ratio loss (it lives with the GRPO trainer).

Shapes: ``hidden: [B, T, C]``, ``weight: [V, C]``, per-token tensors ``[B, T]`` aligned with ``hidden`` (position t
scores the token at t + 1, i.e. labels/targets already shifted).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    """``loss = sum over chunks objective(hidden[:, s:e] @ weight^T, s, e)``, logits live one chunk at a time.

    When a gradient is needed the chunk's gradients are computed right away in forward (as StreamBP does), so the
    logits are made once, not once in forward and again in backward; ``dhidden: [B, T, C]`` and ``dW: [V, C]`` wait
    for backward, which only scales them by the incoming gradient (no copy when it is 1, as for ``loss.backward()``).
    An objective with ``value_and_grad_`` (:class:`TokenCrossEntropy`) turns the chunk's logits into their gradient
    in place and the two products are written straight into the buffers (``dW += dlogits^T h`` by ``addmm_``); any
    other objective goes through autograd on the chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, objective, chunk_size):
        total = hidden.new_zeros((), dtype=torch.float32)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        d_hidden = torch.empty_like(hidden) if want_grad else None  # every row is written
        d_weight = torch.zeros_like(weight) if want_grad else None
        fused = hasattr(objective, "value_and_grad_")
        w = weight.detach().requires_grad_(want_grad and not fused)
        for s in range(0, hidden.shape[1], chunk_size):
            e = min(s + chunk_size, hidden.shape[1])
            if not want_grad:
                total += objective(hidden[:, s:e] @ weight.t(), s, e)
            elif fused:
                total += _fused_chunk(objective, hidden[:, s:e].detach(), w, d_hidden[:, s:e], d_weight, s, e)
            else:
                with torch.enable_grad():
                    h = hidden[:, s:e].detach().requires_grad_(True)
                    loss = objective(h @ w.t(), s, e)
                    dh, dw = torch.autograd.grad(loss, (h, w))
                total += loss.detach()
                d_hidden[:, s:e] = dh
                d_weight += dw
        ctx.save_for_backward(d_hidden, d_weight)
        return total

    @staticmethod
    def backward(ctx, grad):
        d_hidden, d_weight = ctx.saved_tensors
        if bool(grad == 1):  # loss.backward(): hand the buffers over instead of copying two [B, T, C] / [V, C]
            return d_hidden, d_weight, None, None
        return d_hidden * grad, d_weight * grad, None, None


def _fused_chunk(objective, h, weight, d_hidden, d_weight, s: int, e: int) -> torch.Tensor:
    """One chunk of :class:`ChunkedLMHeadLoss` through ``objective.value_and_grad_``: logits ``h @ W^T`` in fp32,
    turned into their gradient in place, then ``dh = g @ W`` into ``d_hidden`` and ``dW += g^T h``."""
    logits = (h @ weight.t()).float()
    loss = objective.value_and_grad_(logits, s, e)
    g = logits.to(weight.dtype).reshape(-1, logits.shape[-1])
    d_hidden.copy_((g @ weight).view_as(d_hidden))
    d_weight.addmm_(g.t(), h.reshape(-1, h.shape[-1]))
    return loss


def logits_chunk_tokens(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> int:
    """Positions per logits chunk: ``chunk_size``, capped so that one chunk's fp32 logits ``[B, c, V]`` stay within
    :data:`MAX_LOGITS_CHUNK_BYTES`."""
    return max(1, min(chunk_size, MAX_LOGITS_CHUNK_BYTES // (4 * hidden.shape[0] * weight.shape[0])))


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, objective, chunk_size: int) -> torch.Tensor:
    """The loss of ``objective`` on ``hidden @ weight^T`` computed at most ``chunk_size`` positions at a time
    (:func:`logits_chunk_tokens`)."""
    chunk_size = logits_chunk_tokens(hidden, weight, chunk_size)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedLMHeadLoss.apply(hidden, weight, objective, chunk_size)
    with torch.no_grad():  # evaluation: no gradient work in the chunks
        return sum(objective(hidden[:, s:s + chunk_size] @ weight.t(), s, min(s + chunk_size, hidden.shape[1]))
                   for s in range(0, hidden.shape[1], chunk_size))
