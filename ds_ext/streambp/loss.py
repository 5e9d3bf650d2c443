"""Chunked LM head and token losses: full-sequence logits ``[B, T, V]`` are never materialised.

:class:`ChunkedLMHeadLoss` computes ``sum_chunks objective(hidden[:, s:e] @ W^T, s, e)`` one chunk of logits at a
time and, when gradients are wanted, backpropagates each chunk's loss into ``dhidden[:, s:e]`` and ``dW`` at once
(the logits are made once and freed). Objectives weight every token with a denominator taken over the *whole* batch, so the
chunk losses sum exactly to the unchunked loss:

* :class:`TokenCrossEntropy`: mean token cross-entropy over labels != ignore_index (SFT, pretraining);
* :class:`GRPOTokenLoss`: the clipped-ratio policy loss with clip-higher (``eps_low``, ``eps_high``) and the k3 KL
  to a reference policy, normalised as ``grpo`` (mean over each sequence's tokens, then over sequences), ``dapo``
  (over all tokens of the batch) or ``dr_grpo`` (by ``B * max_len``, a constant).

Shapes: ``hidden: [B, T, C]``, ``weight: [V, C]``, per-token tensors ``[B, T]`` aligned with ``hidden`` (position t
scores the token at t + 1, i.e. labels/targets already shifted), ``advantages: [B]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


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


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]``: ``[B, c, V], [B, c] -> [B, c]`` (fp32)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets.clamp(min=0)[..., None])[..., 0]


@dataclass
class GRPOTokenLoss:
    """GRPO / PPO token loss. ``old_logprobs`` are the behaviour policy's, ``ref_logprobs`` the frozen reference's
    (needed when ``kl_coef > 0``); ``mask`` marks response tokens."""

    targets: torch.Tensor                 # [B, T] int64
    mask: torch.Tensor                    # [B, T] bool / 0-1
    advantages: torch.Tensor              # [B]
    old_logprobs: torch.Tensor            # [B, T]
    ref_logprobs: Optional[torch.Tensor] = None
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.0
    norm: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    max_len: Optional[int] = None         # dr_grpo's constant; default T
    weights: Optional[torch.Tensor] = None  # [B, T] per-token weights given by the caller (global normalisation)

    def __post_init__(self):
        mask = self.mask.float()
        if self.kl_coef > 0 and self.ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        if self.weights is not None:
            return
        b, t = mask.shape
        if self.norm == "grpo":
            self.weights = mask / (b * mask.sum(1, keepdim=True).clamp(min=1))
        elif self.norm == "dapo":
            self.weights = mask / mask.sum().clamp(min=1)
        elif self.norm == "dr_grpo":
            self.weights = mask / (b * (self.max_len or t))
        else:
            raise ValueError(f"norm={self.norm!r}: allowed grpo, dapo, dr_grpo")

    def per_token(self, logprobs: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """Per-token loss ``[B, c]`` before weighting."""
        ratio = torch.exp(logprobs - self.old_logprobs[:, s:e])
        adv = self.advantages[:, None].float()
        surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - self.eps_low, 1 + self.eps_high) * adv)
        loss = -surrogate
        if self.kl_coef > 0:
            delta = self.ref_logprobs[:, s:e] - logprobs
            loss = loss + self.kl_coef * (torch.exp(delta) - delta - 1)
        return loss

    def __call__(self, logits: torch.Tensor, s: int, e: int) -> torch.Tensor:
        logprobs = token_logprobs(logits, self.targets[:, s:e])
        return (self.per_token(logprobs, s, e) * self.weights[:, s:e]).sum()

    def from_logprobs(self, logprobs: torch.Tensor) -> torch.Tensor:
        """The loss from per-token log-probs ``[B, T]`` already computed (e.g. Prefix Grouper's
        ``GroupedBatch.completion_logprobs``); ``targets`` is then not read."""
        return (self.per_token(logprobs, 0, logprobs.shape[1]) * self.weights).sum()


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
