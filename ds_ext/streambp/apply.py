"""Attach StreamBP to a model (plain or ``PipelineModule``) or a ds_ext engine.

Decoder layers are found by :func:`layer_adapter`: a module with a ``stream_adapter()`` method (the reference
model's layers, :class:`ds_ext.models.llama.DecoderLayer`) or an HF Llama/Qwen2-family layer recognised by its
structure; each is given the streamed backward in place (:func:`ds_ext.streambp.layer.stream_layer`); HF layers'
config is switched to StreamBP's packed-document attention (:func:`ds_ext.streambp.hf.route_attention`: no
``T x T`` mask). The LM head
and loss go through :func:`ds_ext.ops.chunked_loss.chunked_lm_loss` via the model's own seam: ``set_lm_loss(fn)`` (the
reference model); for a ``PipelineModule`` whose last stage has a head with an ``emit_hidden`` flag (the reference
pipeline's ``HeadPipe``, the HF pipeline's heads), the head emits hidden states and the module's ``loss_fn`` applies
the head in chunks (on ``head.loss_labels(labels)`` when the head defines it); HF
models call :func:`ds_ext.streambp.hf.causal_lm_loss`. A ``PipelineModule`` that also checkpoints activations is
refused: StreamBP replaces it. :meth:`StreamBPFeature.close` undoes every change.
"""
from __future__ import annotations

from typing import Callable, List, Optional

from deepspeed.pipe import PipelineModule
from torch import nn

from ds_ext.config import DsExtConfigError
from ds_ext.contract import FeatureBase, Phase
from ds_ext.streambp.config import StreamBPConfig
from ds_ext.streambp.hf import HFLayerAdapter, is_hf_decoder_layer, route_attention
from ds_ext.ops.stream import LayerAdapter
from ds_ext.streambp.layer import stream_layer, unstream_layer
from ds_ext.streambp.offload import LayerInputStore, input_store
from ds_ext.ops.chunked_loss import TokenCrossEntropy, chunked_lm_loss


def layer_adapter(module: nn.Module) -> Optional[LayerAdapter]:
    """StreamBP's adapter for a decoder layer it knows (see the module docstring), else None."""
    make = getattr(module, "stream_adapter", None)
    if make is not None:
        return make()
    return HFLayerAdapter(module) if is_hf_decoder_layer(module) else None


def chunked_cross_entropy(logits_chunk_size: int):
    """``fn(hidden, weight, labels) -> mean token CE`` over chunks of ``logits_chunk_size`` positions."""
    def loss(hidden, weight, labels):
        return chunked_lm_loss(hidden, weight, TokenCrossEntropy(labels), logits_chunk_size)
    return loss


class StreamBPFeature(FeatureBase):
    """What StreamBP changed in a model: the streamed layers and the head seam, reported and undone by
    :meth:`close` (then the model computes as without StreamBP). No step hooks, no state."""

    name = "streambp"
    phase = Phase.MODEL

    def __init__(self, cfg: StreamBPConfig, layers: List[nn.Module], undo: List[Callable[[], None]]):
        self.cfg, self.layers, self._undo = cfg, layers, undo

    def metrics(self) -> dict:
        return {"streamed_layers": len(self.layers), "chunk_size": self.cfg.chunk_size,
                "logits_chunk_size": self.cfg.logits_chunk_size, "sequence_parallel": self.cfg.sequence_parallel}

    def close(self) -> None:
        for layer in self.layers:
            unstream_layer(layer)
        while self._undo:
            self._undo.pop()()


def _chunk_head(model: nn.Module, loss) -> List[Callable[[], None]]:
    """Route the head + loss through ``loss`` by the model's seam; returns what undoes it."""
    if hasattr(model, "set_lm_loss"):
        model.set_lm_loss(loss)
        return [lambda: model.set_lm_loss(None)]
    heads = [m for m in model.modules() if hasattr(m, "emit_hidden")] if isinstance(model, PipelineModule) else []
    if not heads:  # HF models (ds_ext.streambp.hf.causal_lm_loss), or a pipeline stage without the head
        return []
    head, own_loss_fn = heads[0], model.loss_fn
    head.emit_hidden = True
    # A head may take labels in another alignment (the HF pipeline's are unshifted): its loss_labels maps them to
    # one label per hidden row.
    align = getattr(head, "loss_labels", lambda labels: labels)
    model.loss_fn = lambda hidden, labels: loss(hidden, head.lm_head.weight, align(labels))

    def undo():
        head.emit_hidden, model.loss_fn = False, own_loss_fn
    return [undo]


def stream_model(model: nn.Module, cfg: StreamBPConfig, store: Optional[LayerInputStore] = None,
                 sequence_group=None) -> StreamBPFeature:
    """Stream every known decoder layer of ``model`` and chunk its LM head + loss (plain models, HF models and
    ``PipelineModule`` stages alike); returns the feature whose ``close()`` undoes it. ``store``: the layers' input
    store (default: :func:`input_store`'s; tests pass a CPU-mode store). With ``cfg.sequence_parallel > 1`` the
    layers run sharded (:mod:`ds_ext.streambp.ulysses`) over ``sequence_group`` (default: DeepSpeed's Ulysses
    group of that size, :func:`ds_ext._deepspeed.ulysses_sequence_group`)."""
    if isinstance(model, PipelineModule) and model.activation_checkpoint_interval > 0:
        raise DsExtConfigError([("ds_ext.streambp.enabled", "got true for a PipelineModule built with "
                                 f"activation_checkpoint_interval={model.activation_checkpoint_interval}: StreamBP "
                                 "replaces activation checkpointing; build it with activation_checkpoint_interval=0")])
    found = [(m, layer_adapter(m)) for m in model.modules()]
    found = [(m, a) for m, a in found if a is not None]
    if not found and not isinstance(model, PipelineModule):  # a pipeline stage may hold no decoder layer
        raise ValueError(f"StreamBP found no decoder layer it knows in {type(model).__name__}")
    store = store if store is not None else input_store(model, cfg)
    runner = _sequence_runner(cfg, sequence_group)
    for index, (layer, adapter) in enumerate(found):
        stream_layer(layer, adapter, cfg.chunk_size, store, index, runner)
    undo = route_attention(a for _, a in found) + _chunk_head(model, chunked_cross_entropy(cfg.logits_chunk_size))
    return StreamBPFeature(cfg, [m for m, _ in found], undo)


def _sequence_runner(cfg: StreamBPConfig, group):
    """The sharded-layer runner of ``cfg.sequence_parallel`` (None at 1); the group's size must equal it."""
    if cfg.sequence_parallel == 1:
        return None
    import torch.distributed as dist
    from ds_ext.streambp.ulysses import UlyssesStreaming
    if group is None:
        from ds_ext._deepspeed import ulysses_sequence_group
        group = ulysses_sequence_group(cfg.sequence_parallel)
    if dist.get_world_size(group) != cfg.sequence_parallel:
        raise DsExtConfigError([("ds_ext.streambp.sequence_parallel", f"got {cfg.sequence_parallel} with a "
                                 f"sequence group of {dist.get_world_size(group)} ranks; they must be equal")])
    return UlyssesStreaming(group)


def apply_streambp(engine, cfg: StreamBPConfig, topology=None) -> StreamBPFeature:
    """The feature for a ds_ext engine (``engine.module`` streamed; not attached: ``ds_ext.features`` attaches it).
    ``topology`` is unused: every stage streams its own layers. With ``cfg.sequence_parallel > 1`` the engine was
    built with DeepSpeed's Ulysses ``mpu`` (``ds_ext.initialize``: the group reads one data shard, ZeRO reduces
    over the groups) and the model's forward runs this rank's shard of the rows (:func:`_shard_forward`)."""
    if cfg.sequence_parallel == 1:
        return stream_model(engine.module, cfg)
    from ds_ext._deepspeed import ulysses_sequence_group
    group = ulysses_sequence_group(cfg.sequence_parallel)
    undo_forward = _shard_forward(engine.module, group, cfg)
    try:
        feature = stream_model(engine.module, cfg, sequence_group=group)
    except BaseException:
        undo_forward()
        raise
    feature._undo.insert(0, undo_forward)  # undone last, after the layers and head are restored
    return feature


def _shard_forward(model: nn.Module, group, cfg: StreamBPConfig) -> Callable[[], None]:
    """Install :class:`ds_ext.streambp.ulysses.ShardedCausalLMForward` through the model's ``set_forward`` seam (an
    :class:`ds_ext.models.hf.HFCausalLM`, what ``examples/train.py --model DIR`` trains; another model is refused
    before anything changes); returns what undoes it."""
    from ds_ext.models.hf import HFCausalLM
    from ds_ext.streambp.ulysses import ShardedCausalLMForward
    if not isinstance(model, HFCausalLM):
        raise DsExtConfigError([("ds_ext.streambp.sequence_parallel", f"got {cfg.sequence_parallel} for a "
                                 f"{type(model).__name__}: a DeepSpeed engine shards the rows of an HF causal LM "
                                 "wrapped as ds_ext.models.hf.HFCausalLM (examples/train.py --model DIR); for "
                                 "another model call ds_ext.streambp.ulysses.causal_lm_shard_loss in your loop")])
    model.set_forward(ShardedCausalLMForward(model, group, cfg.logits_chunk_size))
    return lambda: model.set_forward(None)
