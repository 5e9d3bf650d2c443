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

    sequence_parallel: int = Field(1, ge=1)
    """Ulysses sequence parallelism over this many consecutive ranks (DeepSpeed's ``parallel_state_sp`` groups):
    each rank holds a contiguous shard of the sequence (global ``position_ids``) and streams it; heads and rows are
    exchanged around attention with DeepSpeed's Ulysses all-to-all (:mod:`ds_ext.streambp.ulysses`). Exact (fp32
    gradients equal sp=1's). In a ds_ext engine (HF models, ``examples/train.py --model DIR``) the ranks of a group
    read the same micro-batch (``world / N`` data shards, DeepSpeed's Ulysses ``mpu``), each runs its shard and the
    step equals sp=1's on the same batch; must divide the world size. Causal attention over one document per row
    only (no key padding, packed documents or Prefix Grouper masks; ``--no_packing``); no pipeline stages or NoLoCo
    replicas; must divide the attention heads and the sequence length. 1: off."""
