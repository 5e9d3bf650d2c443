"""GRPO pieces for the async trainer: group-relative advantages and exact *global* loss normalisation.

Advantages (GRPO, arXiv 2402.03300): ``A_i = (r_i - mean_g r) / (std_g r + eps)`` over the G responses of a prompt
(unbiased std, eps 1e-6 as in verl); ``scale="none"`` drops the division (Dr.GRPO), ``"batch"`` divides by the batch
std (LitePPO). A zero-variance group gets advantage 0.

Normalisation of the token loss ``l_{i,t}`` (:class:`ds_ext.streambp.loss.GRPOTokenLoss` computes it: clipped ratio
with clip-higher, k3 KL to a reference) over the whole optimizer step, all micro-batches of all data-parallel ranks:

* ``grpo``:    (1/N) sum_i (1/|o_i|) sum_t l_{i,t}       N = responses in the step
* ``dapo``:    sum_{i,t} l_{i,t} / sum_i |o_i|           token mean over the step
* ``dr_grpo``: sum_{i,t} l_{i,t} / (N * L_max)           L_max = the rollout's maximum response length

DeepSpeed divides each micro-batch loss by the gradient-accumulation steps and averages gradients over data-parallel
ranks, so :func:`step_token_weights` multiplies by ``gas * dp``: the summed gradient is then exactly the gradient of
the global formula (verl's ``agg_loss(dp_size, batch_num_tokens)`` does the same).
"""
from __future__ import annotations

from typing import Literal

import torch

Norm = Literal["grpo", "dapo", "dr_grpo"]


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
    m = mask.float()
    if norm == "grpo":
        w = m / (m.sum(1, keepdim=True).clamp(min=1) * step_responses)
    elif norm == "dapo":
        w = m / max(1, step_tokens)
    elif norm == "dr_grpo":
        w = m / (step_responses * max_len)
    else:
        raise ValueError(f"norm={norm!r}: allowed grpo, dapo, dr_grpo")
    return w * (gas * dp)
