"""Attach StreamBP to a model (plain or ``PipelineModule``) or a ds_ext engine.

Decoder layers are found by structure (:func:`layer_kind`: the reference model's, or HF Llama/Qwen2-family) and
given the streamed backward in place; the LM head and loss go through :func:`ds_ext.streambp.loss.chunked_lm_loss`
via the model's own seam (the reference model's ``set_lm_loss``; for its pipeline form the last stage emits hidden
states and the module's ``loss_fn`` applies the head in chunks; for HF models :func:`ds_ext.streambp.hf.causal_lm_loss`). A ``PipelineModule`` that also checkpoints activations is refused: StreamBP replaces it.
"""
from __future__ import annotations

from typing import List, Optional

from torch import nn

from ds_ext.config import DsExtConfigError
from ds_ext.streambp.config import StreamBPConfig
from ds_ext.streambp.layer import ReferenceLayerAdapter, stream_layer, unstream_layer
from ds_ext.streambp.loss import TokenCrossEntropy, chunked_lm_loss


def layer_kind(module: nn.Module) -> Optional[str]:
    """``"reference"`` (ds_ext's decoder layer), ``"hf"`` (HF Llama/Qwen2-family structure) or None."""
    from ds_ext.models.llama import DecoderLayer
    from ds_ext.streambp.hf import is_hf_decoder_layer
    if isinstance(module, DecoderLayer):
        return "reference"
    return "hf" if is_hf_decoder_layer(module) else None


def _stream(layer: nn.Module, kind: str, chunk_size: int) -> None:
    if kind == "reference":
        stream_layer(layer, ReferenceLayerAdapter(layer), chunk_size)
    else:
        from ds_ext.streambp.hf import stream_hf_layer
        stream_hf_layer(layer, chunk_size)


def chunked_cross_entropy(logits_chunk_size: int):
    """``fn(hidden, weight, labels) -> mean token CE`` over chunks of ``logits_chunk_size`` positions."""
    def loss(hidden, weight, labels):
        return chunked_lm_loss(hidden, weight, TokenCrossEntropy(labels), logits_chunk_size)
    return loss


class StreamBPFeature:
    """What :func:`apply_streambp` changed, so it can be reported and undone."""

    name = "streambp"

    def __init__(self, cfg: StreamBPConfig, layers: List[nn.Module], model: nn.Module):
        self.cfg, self.layers, self.model = cfg, layers, model

    def metrics(self) -> dict:
        return {"streamed_layers": len(self.layers), "chunk_size": self.cfg.chunk_size,
                "logits_chunk_size": self.cfg.logits_chunk_size}

    def remove(self) -> None:
        for layer in self.layers:
            unstream_layer(layer)
        if hasattr(self.model, "set_lm_loss"):
            self.model.set_lm_loss(None)


def _chunk_pipeline_head(model, loss) -> None:
    from ds_ext.models.pipeline import HeadPipe
    heads = [m for m in model.modules() if isinstance(m, HeadPipe)]
    if heads:  # only the last stage builds the head
        head = heads[0]
        head.emit_hidden = True
        model.loss_fn = lambda hidden, labels: loss(hidden, head.lm_head.weight, labels)


def apply_streambp(model: nn.Module, cfg: StreamBPConfig) -> StreamBPFeature:
    """Stream every known decoder layer of ``model`` and chunk its LM head + loss."""
    from deepspeed.pipe import PipelineModule
    if isinstance(model, PipelineModule) and model.activation_checkpoint_interval > 0:
        raise DsExtConfigError([("ds_ext.streambp.enabled", "got true for a PipelineModule built with "
                                 f"activation_checkpoint_interval={model.activation_checkpoint_interval}: StreamBP "
                                 "replaces activation checkpointing; build it with activation_checkpoint_interval=0")])
    layers = [m for m in model.modules() if layer_kind(m) is not None]
    if not layers and not isinstance(model, PipelineModule):
        raise ValueError(f"StreamBP found no decoder layer it knows in {type(model).__name__}")
    for layer in layers:
        _stream(layer, layer_kind(layer), cfg.chunk_size)
    loss = chunked_cross_entropy(cfg.logits_chunk_size)
    if hasattr(model, "set_lm_loss"):
        model.set_lm_loss(loss)
    elif isinstance(model, PipelineModule):
        _chunk_pipeline_head(model, loss)
    return StreamBPFeature(cfg, layers, model)
