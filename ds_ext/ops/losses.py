"""Token-loss pieces shared by the chunked LM head (StreamBP), the GRPO loss and the async trainer.

:func:`token_weights` gives the per-token weights ``w: [B, T]`` that turn a per-token loss ``l: [B, T]`` into the
normalised loss ``sum(w * l)`` (``m`` = response-token mask, ``|o_i|`` = tokens of response ``i``):

* ``grpo``:    ``m / (|o_i| * responses)``   mean over each response's tokens, then over responses;
* ``dapo``:    ``m / tokens``                 mean over every response token;
* ``dr_grpo``: ``m / (responses * max_len)``  a constant denominator (Dr. GRPO).

``responses``, ``tokens`` and ``max_len`` are those of the whole normalisation scope: the batch for a local loss,
the optimizer step over all micro-batches and ranks for the async trainer's global normalisation.
"""
from __future__ import annotations

from typing import Literal, Union

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of a position without loss (PyTorch's cross_entropy default)

Norm = Literal["grpo", "dapo", "dr_grpo"]
NORMS = ("grpo", "dapo", "dr_grpo")


def token_weights(mask: torch.Tensor, norm: Norm, responses: int, tokens: Union[int, torch.Tensor],
                  max_len: int) -> torch.Tensor:
    """Per-token weights ``[B, T]`` (fp32) of ``mask: [B, T]`` under ``norm`` (see the module docstring).
    Counts below 1 count as 1 (an empty scope gives zero weights, not a division by zero)."""
    m = mask.float()
    if norm == "grpo":
        return m / (m.sum(1, keepdim=True).clamp(min=1) * max(1, responses))
    if norm == "dapo":
        return m / (tokens.clamp(min=1) if isinstance(tokens, torch.Tensor) else max(1, tokens))
    if norm == "dr_grpo":
        return m / (max(1, responses) * max(1, max_len))
    raise ValueError(f"norm={norm!r}: allowed {', '.join(NORMS)}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]``: ``[B, c, V], [B, c] -> [B, c]`` (fp32; negative targets read token 0)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, targets.clamp(min=0)[..., None])[..., 0]


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Unshifted labels ``[B, T]`` (HF convention) -> labels aligned with the positions that predict them: row t
    holds ``labels[t + 1]``, the last position gets ``ignore_index`` (as HF's ``ForCausalLMLoss`` pads and shifts)."""
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)
