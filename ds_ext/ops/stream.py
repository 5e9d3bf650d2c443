"""What a model needs to be streamable by StreamBP, below every feature: :class:`LayerAdapter` (how StreamBP reaches a
decoder layer's parts), :class:`StreamCall` (one streamed call), :class:`ChunkMasked` and :func:`chunk_mask_of` (a
per-call attention that gives chunk masks). Models implement an adapter (the reference model's
:class:`ds_ext.models.llama.ReferenceLayerAdapter`) without importing the StreamBP feature; the mechanism that
streams a layer through its adapter is :mod:`ds_ext.streambp.layer`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ChunkMasked(Protocol):
    """A per-call attention function StreamBP can stream: it gives the boolean mask of query rows ``[start, end)``
    over keys ``[0, end)``, ``[B or 1, 1, end - start, end]`` (Prefix Grouper's grouped attention does)."""

    def chunk_mask(self, start: int, end: int) -> torch.Tensor: ...


@dataclass
class StreamCall:
    """One streamed call of a layer, in StreamBP's terms: ``x: [B, T, C]`` (a view of the layer's input), the
    position information, the key padding ``[B, T]`` (True = real) or None, ``full(x, positions, padding) -> y``
    (the layer's own forward on the whole sequence, run under no_grad when the sequence fits in one chunk), the
    chunk mask of a per-call attention (None: causal), ``output(y)``, the layer's return value built from
    ``y: [B, T, C]``, and the packed documents' ``segment_ids: [B, T]`` (None: one document per row; ``full`` must
    apply the same documents)."""

    x: torch.Tensor
    positions: object
    key_padding_mask: Optional[torch.Tensor]
    full: Callable
    chunk_mask: Optional[Callable[[int, int], torch.Tensor]] = None
    output: Callable = lambda y: y
    segment_ids: Optional[torch.Tensor] = None


class LayerAdapter(ABC):
    """How StreamBP reaches a decoder layer's parts and reads its call. Subclasses bind one layer family.

    Shapes: ``x: [B, t, C]``, ``positions: [B, t]`` (or what the family carries), ``q: [B, H, t, D]``,
    ``k, v: [B, Hkv, t, D]``.
    """

    scale: Optional[float] = None  # softmax scale; None = 1/sqrt(D)

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def own_forward(self, *args, **kwargs):
        """The layer's unstreamed forward (the class's; the streamed one lives on the instance)."""
        return type(self.layer).forward(self.layer, *args, **kwargs)

    @abstractmethod
    def streamed_call(self, *args, **kwargs) -> Optional[StreamCall]:
        """Map the layer's forward arguments to a :class:`StreamCall`, or None to run the layer's own forward.
        Raise on a call StreamBP cannot reproduce exactly (say which argument)."""

    def default_positions(self, x):
        return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], x.shape[1])

    def slice_positions(self, positions, s: int, e: int):
        """The position information of rows ``[s, e)`` (a ``[B, T]`` tensor here; adapters may carry more)."""
        return positions[:, s:e]

    @abstractmethod
    def norm1(self, x):
        """The pre-attention norm."""

    @abstractmethod
    def queries(self, h, positions):
        """Roped queries of the normed rows ``h``."""

    @abstractmethod
    def keys_values(self, h, positions):
        """Roped keys and values of the normed rows ``h``."""

    def queries_keys_values(self, h, positions):
        """``(q, k, v)`` of the normed rows ``h`` (one fused projection where the family has one)."""
        return (self.queries(h, positions), *self.keys_values(h, positions))

    @abstractmethod
    def attention_out(self, attn):
        """``attn: [B, H, c, D]`` -> ``[B, c, C]`` (output projection)."""

    @abstractmethod
    def mlp_block(self, y):
        """``y + mlp(norm2(y))``."""


def chunk_mask_of(attention_fn) -> Optional[Callable[[int, int], torch.Tensor]]:
    """The chunk-mask method of a per-call attention function (None for None); refuses one without it."""
    if attention_fn is None:
        return None
    if not isinstance(attention_fn, ChunkMasked):
        raise ValueError(f"StreamBP streams the default causal attention or a per-call attention that gives chunk "
                         f"masks (chunk_mask(start, end), e.g. Prefix Grouper's), not {attention_fn!r}")
    return attention_fn.chunk_mask
