"""GRPO pieces for the async trainer: group-relative advantages, the GRPO token loss and exact *global* normalisation.

Advantages (GRPO, arXiv 2402.03300): ``A_i = (r_i - mean_g r) / (std_g r + eps)`` over the G responses of a prompt
(unbiased std, eps 1e-6 as in verl); ``scale="none"`` drops the division (Dr.GRPO), ``"batch"`` divides by the batch
std (LitePPO). A zero-variance group gets advantage 0.

The token loss ``l_{i,t}`` (:class:`GRPOTokenLoss`): the clipped ratio with clip-higher (``eps_low``, ``eps_high``;
defaults those of :class:`ds_ext.asyncflow.config.AsyncFlowConfig`) and the k3 KL to a reference policy. It is an
objective of StreamBP's chunked head (``loss(logits, s, e)``) or takes per-token log-probs already computed
(:meth:`GRPOTokenLoss.from_logprobs`, e.g. Prefix Grouper's).

Off-policy correction (``off_policy``). Per token, ``rho_b = pi_theta / pi_behav`` (``pi_behav`` = the rollout's
behaviour log-prob of that token, possibly of an older policy version than its neighbours') and, for ``decoupled``,
``pi_prox`` = the trainer's policy before this batch's first update. ``w`` is an importance weight held constant
(detached); ``is_level="sequence"`` replaces a token's ratio by its response's product of ratios
(``exp(sum_t log-ratio)`` over the response's tokens), the same for every token of the response:

* ``none``:      ``l = -min(rho_b A, clip(rho_b, 1 - eps_low, 1 + eps_high) A)`` (PPO / GRPO);
* ``tis``:       gradient ``-w A grad log pi_theta`` with ``w = min(rho_b, C)`` (truncated importance sampling,
  IMPALA / ROLL ``tis``; value ``-w A``), no ratio clip;
* ``mask``:      as ``tis`` with ``w = rho_b`` where ``rho_b <= C`` and 0 above (the token -- or, sequence level, the
  response -- is dropped; IcePop / TRL's masked IS);
* ``decoupled``: ``l = -w min(rho_p A, clip(rho_p, 1 - eps_low, 1 + eps_high) A)``, ``rho_p = pi_theta / pi_prox``,
  ``w = pi_prox / pi_behav`` and 0 where that exceeds ``C`` (decoupled PPO, AReaL arXiv 2505.24298: tokens above
  ``behav_imp_weight_cap`` are masked). With one update per batch ``pi_prox`` is the forward's own log-prob,
  detached (``prox_logprobs=None``, ``rho_p == 1``: then it is ``mask`` with a clip that cannot bind); with several
  (``ppo_epochs``, ``mini_batches``) the trainer computes ``prox_logprobs`` once before the first update.

The k3 KL term ``beta (e^{ref - lp} - (ref - lp) - 1)`` is added unweighted in every mode. :meth:`GRPOTokenLoss.is_weights`
returns the per-token weights ``w`` a mode applies (1 for ``none``).

Log-probs of the sampling distribution (:func:`sampling_logprobs`): the rollout draws from
``softmax(logits / temperature)`` restricted to the nucleus of mass ``top_p`` (:func:`ds_ext.models.generate.sample`),
so the trainer's log-probs are those of the same transformation of its own logits: divide by the temperature, and
for ``top_p < 1`` renormalise over the nucleus that the sampler's rule gives on the trainer's logits (the drawn
token always kept, so its log-prob is finite when the trainer's nucleus differs from the sampler's). With the
sampler's weights the two are the same computation on the same logits.

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
from typing import Dict, Literal, Optional

import torch

from ds_ext.asyncflow.config import AsyncFlowConfig
from ds_ext.ops.losses import Norm, token_logprobs, token_weights

OffPolicy = Literal["none", "tis", "mask", "decoupled"]
ISLevel = Literal["token", "sequence"]


def sampling_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                      top_p: float = 1.0) -> torch.Tensor:
    """``logits [..., V]``, ``targets [...]`` -> log-probs ``[...]`` (fp32) of ``targets`` under the rollout's sampling
    distribution (see the module docstring): ``log_softmax(logits / temperature)``, for ``top_p < 1`` restricted
    to the nucleus (the sampler's rule, :func:`ds_ext.models.generate.sample`: keep a token if the mass strictly
    before it in descending order is below ``top_p``) plus the target, and renormalised. The nucleus is a constant
    of the gradient (as the sampler's choice of it is). Negative targets read token 0."""
    targets = targets.clamp(min=0)[..., None]
    logprobs = torch.log_softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        with torch.no_grad():
            probs, order = logprobs.exp().sort(-1, descending=True)
            drop_sorted = probs.cumsum(-1) - probs >= top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            drop.scatter_(-1, targets, False)
        logprobs = torch.log_softmax(logprobs.masked_fill(drop, float("-inf")), -1)
    return logprobs.gather(-1, targets).squeeze(-1)


def mismatch_metrics(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    """Sampler-trainer mismatch over the response tokens: ``logprob_abs_diff`` = mean ``|log pi_theta -
    log pi_behav|``, ``mismatch_kl`` = the k3 estimate of ``KL(pi_behav || pi_theta)`` (tokens drawn from
    ``pi_behav``: mean of ``r - 1 - log r``, ``r = pi_theta / pi_behav``; >= 0, unbiased)."""
    d = (logprobs.detach().float() - old_logprobs.float())[mask.bool()]
    if d.numel() == 0:
        return {"logprob_abs_diff": 0.0, "mismatch_kl": 0.0, "tokens": 0}
    return {"logprob_abs_diff": d.abs().mean().item(), "mismatch_kl": (torch.exp(d) - 1 - d).mean().item(),
            "tokens": int(d.numel())}


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
    is_level: ISLevel = "token"

    def __post_init__(self):
        if self.kl_coef > 0 and self.ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        if self.off_policy not in ("none", "tis", "mask", "decoupled"):
            raise ValueError(f"off_policy={self.off_policy!r}: allowed none, tis, mask, decoupled")
        if self.is_level not in ("token", "sequence"):
            raise ValueError(f"is_level={self.is_level!r}: allowed token, sequence")
        if self.weights is None:
            b, t = self.mask.shape
            self.weights = token_weights(self.mask, self.norm, b, self.mask.float().sum(), self.max_len or t)

    def _prox(self, logprobs: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return logprobs.detach() if self.prox_logprobs is None else self.prox_logprobs[:, s:e]

    def _log_ratio(self, log_ratio: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """Token log-ratios ``[B, c]`` -> those the weight uses: the response's sum at sequence level."""
        if self.is_level == "token":
            return log_ratio
        if (s, e) != (0, self.mask.shape[1]):
            raise ValueError("is_level='sequence' needs the whole response at once (from_logprobs), not a chunk")
        return (log_ratio * self.mask.float()).sum(1, keepdim=True).expand_as(log_ratio)

    def is_weights(self, logprobs: torch.Tensor, s: int = 0, e: Optional[int] = None) -> torch.Tensor:
        """The per-token importance weights ``w [B, c]`` this mode applies (detached; see the module docstring)."""
        e = logprobs.shape[1] + s if e is None else e
        old = self.old_logprobs[:, s:e]
        if self.off_policy == "none":
            return torch.ones_like(old)
        anchor = self._prox(logprobs, s, e) if self.off_policy == "decoupled" else logprobs.detach()
        w = torch.exp(self._log_ratio(anchor - old, s, e))
        if self.off_policy == "tis":
            return w.clamp(max=self.is_cap)
        return torch.where(w <= self.is_cap, w, torch.zeros_like(w))  # mask, decoupled: drop above the cap

    def per_token(self, logprobs: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """Per-token loss ``[B, c]`` of positions ``[s, e)`` before weighting."""
        adv = self.advantages[:, None].float()
        if self.off_policy in ("tis", "mask"):
            # value -w A, gradient -w A grad log pi (exp(lp - lp.detach()) is 1 with the gradient of lp)
            loss = -self.is_weights(logprobs, s, e) * torch.exp(logprobs - logprobs.detach()) * adv
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
