"""The reference model as a DeepSpeed ``PipelineModule``: embedding | decoder layers | final norm + LM head.

Stages exchange one tensor, the hidden states ``[B, T, C]``; positions are ``0..T-1`` (packed pretraining windows,
no padding). The layers are the plain model's classes, so a plain state dict maps onto the pipeline one by
:func:`plain_to_pipeline_key`. Decoder layers are balanced across stages (``partition_method="type:DecoderLayerPipe"``).
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import ProcessTopology
from torch import nn

from ds_ext.models.llama import (DecoderLayer, ModelConfig, RMSNorm, causal_lm_loss, default_position_ids,
                                 init_weights)


class EmbeddingPipe(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        init_weights(self, cfg.init_std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


class DecoderLayerPipe(DecoderLayer):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        init_weights(self, cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x, default_position_ids(x))


class HeadPipe(nn.Module):
    """Final norm + LM head. With ``emit_hidden`` (set by StreamBP) it returns the normed hidden states and the
    module's ``loss_fn`` applies the head chunk by chunk."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.emit_hidden = False
        init_weights(self, cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return h if self.emit_hidden else self.lm_head(h)


def llama_pipeline(cfg: ModelConfig, num_stages: Optional[int] = None, topology: Optional[ProcessTopology] = None,
                   **pipeline_kwargs) -> PipelineModule:
    """Build the pipeline form. Give ``topology`` (``Topology.process_topology()``) for a ds_ext layout, or
    ``num_stages`` for DeepSpeed's default pipe x data layout. Extra keyword arguments go to ``PipelineModule``
    (e.g. ``activation_checkpoint_interval``)."""
    layers = [LayerSpec(EmbeddingPipe, cfg)]
    layers += [LayerSpec(DecoderLayerPipe, cfg) for _ in range(cfg.num_layers)]
    layers += [LayerSpec(HeadPipe, cfg)]
    pipeline_kwargs.setdefault("partition_method", "type:DecoderLayerPipe")
    return PipelineModule(layers=layers, num_stages=None if topology is not None else num_stages,
                          topology=topology, loss_fn=causal_lm_loss, **pipeline_kwargs)


def plain_to_pipeline_key(name: str, num_layers: int) -> str:
    """Map a :class:`LlamaForCausalLM` parameter name to its ``PipelineModule`` name (layer index prefix)."""
    if name.startswith("embed."):
        return "0." + name
    match = re.match(r"layers\.(\d+)\.(.*)", name)
    if match:
        return f"{int(match.group(1)) + 1}.{match.group(2)}"
    return f"{num_layers + 1}.{name}"
