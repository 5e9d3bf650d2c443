"""GRPO pieces for the async trainer: group-relative advantages, the GRPO token loss and exact *global* normalisation.

Advantages (GRPO, arXiv 2402.03300): ``A_i = (r_i - mean_g r) / (std_g r + eps)`` over the G responses of a prompt
(unbiased std, eps 1e-6 as in verl); ``scale="none"`` drops the division (Dr.GRPO), ``"batch"`` divides by the batch
std (LitePPO). A zero-variance group gets advantage 0.

The token loss ``l_{i,t}`` (:class:`GRPOTokenLoss`): the clipped ratio with clip-higher (``eps_low``, ``eps_high``;
defaults those of :class:`ds_ext.asyncflow.config.AsyncFlowConfig`) and the k3 KL to a reference policy. It is an
objective of StreamBP's chunked head (``loss(logits, s, e)``) or takes per-token log-probs already computed
(:meth:`GRPOTokenLoss.from_logprobs`, e.g. Prefix Grouper's).

Off-policy correction (``off_policy``; ``rho_b = pi_theta / pi_behav`` per token, ``pi_behav`` = the rollout's
behaviour log-prob of that token, possibly of an older policy version than the neighbouring tokens'):

* ``none``:      ``l = -min(rho_b A, clip(rho_b, 1 - eps_low, 1 + eps_high) A)`` (PPO / GRPO);
* ``tis``:       ``l = -min(rho_b, C) A`` with ``min(rho_b, C) / rho_b`` held constant, so the gradient is
  ``-min(rho_b, C) A grad log pi_theta``: truncated importance sampling (IMPALA; ROLL's ``pg_variant: tis``), no
  ratio clip;
* ``decoupled``: ``l = -w min(rho_p A, clip(rho_p, 1 - eps_low, 1 + eps_high) A)``, ``rho_p = pi_theta / pi_prox``,
  ``w = min(pi_prox / pi_behav, C)`` held constant (decoupled PPO, AReaL arXiv 2505.24298, with the weight
  truncated rather than masked). ``pi_prox`` is the trainer's policy at the start of the step. The trainer takes one
  optimizer step per batch, so every micro-batch's forward runs with exactly those weights: ``pi_prox`` is then the
  forward's own log-prob, detached (``prox_logprobs=None``), no extra forward. ``prox_logprobs`` may be given
  (several updates per batch).

``C`` is ``is_cap``; the k3 KL term is added unweighted in every mode. :meth:`GRPOTokenLoss.is_weights` returns the
per-token importance weights a mode applies (1 for ``none``).

Normalisation (:func:`ds_ext.ops.losses.token_weights`, one function for both scopes): over the loss's own batch by
default, or over the whole optimizer step, all micro-batches of all data-parallel ranks (:func:`step_token_weights`):

* ``grpo``:    (1/N) sum_i (1/|o_i|) sum_t l_{i,t}       N = responses in the step
* ``dapo``:    sum_{i,t} l_{i,t} / sum_i |o_i|           token mean over the step
* ``dr_grpo``: sum_{i,t} l_{i,t} / (N * L_max)           L_max = the rollout's maximum response length

DeepSpeed divides each micro-batch loss by the gradient-accumulation steps and averages gradients over data-parallel
ranks, so :func:`step_token_weights` multiplies by ``gas * dp``: the summed gradient is then exactly the gradient of
the global formula (verl's ``agg_loss(dp_size, batch_num_tokens)`` does the same).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

OffPolicy = Literal["none", "tis", "decoupled"]

import torch

from ds_ext.asyncflow.config import AsyncFlowConfig
from ds_ext.ops.losses import Norm, token_logprobs, token_weights


def group_advantages(rewards: torch.Tensor, group_size: int, scale: Literal["group", "batch", "none"] = "group",
                     eps: float = 1e-6) -> torch.Tensor:
    """``rewards: [N]`` (groups contiguous, ``N = groups * group_size``) -> advantages ``[N]`` (fp32)."""
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    if scale == "group":
        std = r.std(1, unbiased=True, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        return (centred / (std + eps)).view(-1)
    if scale == "batch":
        return (centred / (r.std(unbiased=True) + eps)).view(-1)
    if scale == "none":
        return centred.view(-1)
    raise ValueError(f"scale={scale!r}: allowed group, batch, none")


def step_token_weights(mask: torch.Tensor, norm: Norm, step_responses: int, step_tokens: int, max_len: int,
                       gas: int, dp: int) -> torch.Tensor:
    """Per-token weights ``[B, T]`` of one micro-batch so that ``sum(weights * l)`` backpropagated through a
    DeepSpeed engine (``gas`` micro-batches per step, ``dp`` data-parallel ranks) gives the gradient of the global
    normalised loss. ``step_responses``/``step_tokens``: responses / response tokens in the whole step."""
    return token_weights(mask, norm, step_responses, step_tokens, max_len) * (gas * dp)


def _default(field: str) -> float:
    return AsyncFlowConfig.model_fields[field].default


@dataclass
class GRPOTokenLoss:
    """GRPO / PPO token loss. ``old_logprobs`` are the behaviour policy's, ``ref_logprobs`` the frozen reference's
    (needed when ``kl_coef > 0``); ``mask`` marks response tokens. Without ``weights`` the tokens are weighted by
    ``norm`` over this batch (``max_len`` = dr_grpo's constant, default ``T``)."""

    targets: torch.Tensor                 # [B, T] int64
    mask: torch.Tensor                    # [B, T] bool / 0-1
    advantages: torch.Tensor              # [B]
    old_logprobs: torch.Tensor            # [B, T]
    ref_logprobs: Optional[torch.Tensor] = None
    eps_low: float = _default("eps_low")
    eps_high: float = _default("eps_high")
    kl_coef: float = 0.0
    norm: Norm = "grpo"
    max_len: Optional[int] = None
    weights: Optional[torch.Tensor] = None  # [B, T] per-token weights given by the caller (global normalisation)
    off_policy: OffPolicy = "none"
    is_cap: float = _default("is_cap")
    prox_logprobs: Optional[torch.Tensor] = None  # [B, T]; None: the forward's own log-probs, detached

    def __post_init__(self):
        if self.kl_coef > 0 and self.ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        if self.off_policy not in ("none", "tis", "decoupled"):
            raise ValueError(f"off_policy={self.off_policy!r}: allowed none, tis, decoupled")
        if self.weights is None:
            b, t = self.mask.shape
            self.weights = token_weights(self.mask, self.norm, b, self.mask.float().sum(), self.max_len or t)

    def _prox(self, logprobs: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return logprobs.detach() if self.prox_logprobs is None else self.prox_logprobs[:, s:e]

    def is_weights(self, logprobs: torch.Tensor, s: int = 0, e: Optional[int] = None) -> torch.Tensor:
        """The per-token importance weights ``[B, c]`` this mode applies (detached; see the module docstring)."""
        e = logprobs.shape[1] + s if e is None else e
        old = self.old_logprobs[:, s:e]
        if self.off_policy == "tis":
            return torch.exp(logprobs.detach() - old).clamp(max=self.is_cap)
        if self.off_policy == "decoupled":
            return torch.exp(self._prox(logprobs, s, e) - old).clamp(max=self.is_cap)
        return torch.ones_like(old)

    def per_token(self, logprobs: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """Per-token loss ``[B, c]`` of positions ``[s, e)`` before weighting."""
        adv = self.advantages[:, None].float()
        if self.off_policy == "tis":
            ratio = torch.exp(logprobs - self.old_logprobs[:, s:e])
            held = ratio.detach()
            # min(rho, C) / rho, held constant; written so that no division by an underflowed rho happens
            scale = torch.where(held > self.is_cap, self.is_cap / held.clamp(min=self.is_cap), torch.ones_like(held))
            loss = -(scale * ratio) * adv
        else:
            anchor = self._prox(logprobs, s, e) if self.off_policy == "decoupled" else self.old_logprobs[:, s:e]
            ratio = torch.exp(logprobs - anchor)
            surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - self.eps_low, 1 + self.eps_high) * adv)
            loss = -surrogate
            if self.off_policy == "decoupled":
                loss = self.is_weights(logprobs, s, e) * loss
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
