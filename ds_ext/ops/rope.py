"""Rotary position embedding's rotation (Llama layout: the two halves of the head dimension rotate together).

``apply_rope(x, cos, sin)``: ``x: [..., T, D]``, ``cos, sin`` broadcastable to it (e.g. ``[B, 1, T, D]`` with the
``D/2`` frequencies repeated once); the result is ``x * cos + rotate_half(x) * sin``. The reference model, its KV
cache sampler and StreamBP's HF adapter all rotate through here.
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension (split in halves)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin
