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


class ChunkedLMHeadLoss(torch.autograd.Function):
    """``loss = sum over chunks objective(hidden[:, s:e] @ weight^T, s, e)``, logits live one chunk at a time.

    When a gradient is needed the chunk's gradients are computed right away in forward (as StreamBP does), so the
    logits are made once, not once in forward and again in backward; ``dhidden: [B, T, C]`` and ``dW: [V, C]`` wait
    for backward, which only scales them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, objective, chunk_size):
        total = hidden.new_zeros((), dtype=torch.float32)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        d_hidden = torch.zeros_like(hidden) if want_grad else None
        d_weight = torch.zeros_like(weight) if want_grad else None
        w = weight.detach().requires_grad_(want_grad)
        for s in range(0, hidden.shape[1], chunk_size):
            e = min(s + chunk_size, hidden.shape[1])
            if not want_grad:
                total += objective(hidden[:, s:e] @ weight.t(), s, e)
                continue
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
        return d_hidden * grad, d_weight * grad, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, objective, chunk_size: int) -> torch.Tensor:
    """The loss of ``objective`` on ``hidden @ weight^T`` computed ``chunk_size`` positions at a time."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedLMHeadLoss.apply(hidden, weight, objective, chunk_size)
    with torch.no_grad():  # evaluation: no gradient work in the chunks
        return sum(objective(hidden[:, s:s + chunk_size] @ weight.t(), s, min(s + chunk_size, hidden.shape[1]))
                   for s in range(0, hidden.shape[1], chunk_size))
