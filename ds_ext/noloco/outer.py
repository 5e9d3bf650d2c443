"""Outer-step update rules on one rank's flat fp32 shard (all tensors ``[n]``, fp32, updated in place).

NoLoCo (arXiv 2506.10911; reference code ``jkolehm/noloco``, ``SparseOptimizerC.outer_step``), for replica i in
outer group G (a pair), with theta_0 the outer weights after the previous outer step and theta_H the weights now::

    m       <- beta * m + alpha * [ mean_G(theta_H - theta_0) + (mean_G theta_0 - theta_{i,0}) ]
            =  beta * m + alpha * (mean_G theta_H - theta_{i,0})
    theta_0 <- theta_{i,0} + m ;  theta <- theta_0

The bracket only needs the partner's theta_H, so one shard-sized message goes each way. The update is heavy-ball
(no look-ahead), as in the reference code. With alpha = 1 and beta = 0 the new weights are the exact pair mean.

DiLoCo (arXiv 2311.08105): Delta = mean_all(theta_0 - theta_H); Nesterov SGD on theta_0 with Delta as gradient::

    b <- mu * b + Delta ;  theta_0 <- theta_0 - lr * (Delta + mu * b) ;  theta <- theta_0
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OuterState:
    """Per-rank outer state: ``anchor`` = theta_0 (outer weights), ``momentum`` = m (NoLoCo) or b (DiLoCo)."""

    anchor: torch.Tensor    # [n] fp32
    momentum: torch.Tensor  # [n] fp32

    @classmethod
    def start(cls, weights: torch.Tensor) -> "OuterState":
        return cls(anchor=weights.detach().clone().float(), momentum=torch.zeros_like(weights, dtype=torch.float32))

    def state_dict(self) -> dict:
        return {"anchor": self.anchor, "momentum": self.momentum}

    def load_state_dict(self, sd: dict) -> None:
        self.anchor.copy_(sd["anchor"])
        self.momentum.copy_(sd["momentum"])


def noloco_update(weights: torch.Tensor, group_mean: torch.Tensor, state: OuterState, lr: float,
                  momentum: float) -> None:
    """NoLoCo outer step. ``group_mean`` = mean of theta_H over the outer group (this rank included); a replica
    without a partner this round passes its own ``weights`` (its own pseudo-gradient only)."""
    state.momentum.mul_(momentum).add_(group_mean - state.anchor, alpha=lr)
    state.anchor.add_(state.momentum)
    weights.copy_(state.anchor)


def diloco_pseudo_gradient(weights: torch.Tensor, state: OuterState) -> torch.Tensor:
    """This replica's Delta_i = theta_0 - theta_H (all-reduce-averaged across replicas by the caller)."""
    return state.anchor - weights


def diloco_update(weights: torch.Tensor, mean_delta: torch.Tensor, state: OuterState, lr: float,
                  momentum: float) -> None:
    """DiLoCo outer step (Nesterov SGD) with the replica-averaged pseudo-gradient ``mean_delta``."""
    state.momentum.mul_(momentum).add_(mean_delta)
    state.anchor.sub_(mean_delta + momentum * state.momentum, alpha=lr)
    weights.copy_(state.anchor)
