"""``"ds_ext": {"streambp": {...}}``: StreamBP (arXiv 2506.03077) in place of activation checkpointing."""
from pydantic import Field

from ds_ext.config.base import ExtSection


class StreamBPConfig(ExtSection):
    """Decoder layers keep only their input and backpropagate in sequence chunks; the LM head and loss run in
    chunks of ``logits_chunk_size`` positions. Gradients equal plain backprop's (fp32 rel err <= 1e-5)."""

    enabled: bool = False
    """Stream the backward of every decoder layer and chunk the LM head and loss."""

    chunk_size: int = Field(512, ge=1)
    """Tokens per backward chunk of a decoder layer; need not divide the sequence length."""

    logits_chunk_size: int = Field(256, ge=1)
    """Positions per chunk of the LM head + loss (logits memory B x chunk x vocab instead of B x T x vocab); capped
    so that one chunk's fp32 logits stay within 16 MiB (``ds_ext.ops.chunked_loss.MAX_LOGITS_CHUNK_BYTES``)."""

    offload_layer_inputs: bool = False
    """Keep each streamed layer's stored input in pinned host memory and prefetch it during backward
    (:mod:`ds_ext.streambp.offload`): device memory no longer grows with depth. CUDA only (refused on CPU)."""
