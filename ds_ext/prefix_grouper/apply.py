"""Attach Prefix Grouper to a model: ``model(grouped_batch)`` runs the grouped forward.

A forward pre-hook (with kwargs) turns a :class:`GroupedBatch` first argument into the model's own keywords:
``input_ids``, ``position_ids`` restarting per suffix and the per-call ``attention_fn``. Any other input passes
through unchanged, so ungrouped batches (evaluation, SFT) still work. :meth:`PrefixGrouperFeature.close` removes
the hook. A ``PipelineModule`` is refused: its stages exchange one tensor, there is no per-call ``attention_fn``.
"""
from __future__ import annotations

import inspect
from typing import Optional

from deepspeed.pipe import PipelineModule
from torch import nn

from ds_ext.config import DsExtConfigError
from ds_ext.contract import FeatureBase, Phase
from ds_ext.prefix_grouper.attention import GroupedAttention
from ds_ext.prefix_grouper.config import PrefixGrouperConfig
from ds_ext.prefix_grouper.layout import GroupedBatch


class PrefixGrouperFeature(FeatureBase):
    """The input hook of a model that takes grouped batches; no step hooks, no state."""

    name = "prefix_grouper"
    phase = Phase.MODEL

    def __init__(self, cfg: PrefixGrouperConfig, handle):
        self.cfg, self._handle = cfg, handle

    def metrics(self) -> dict:
        return {"enabled": int(self._handle is not None)}

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _grouped_inputs(module, args, kwargs):
    if not args or not isinstance(args[0], GroupedBatch):
        return None
    batch = args[0]
    kwargs = dict(kwargs, position_ids=batch.position_ids, attention_fn=GroupedAttention(batch))
    return (batch.input_ids, *args[1:]), kwargs


def prefix_group_model(model: nn.Module, cfg: Optional[PrefixGrouperConfig] = None) -> PrefixGrouperFeature:
    """Let ``model`` take grouped batches; returns the feature whose ``close()`` removes the hook. The model's
    forward must accept ``position_ids`` and a per-call ``attention_fn`` (the ds_ext reference model does)."""
    cfg = cfg if cfg is not None else PrefixGrouperConfig(enabled=True)
    if isinstance(model, PipelineModule):
        raise DsExtConfigError([("ds_ext.prefix_grouper.enabled", "got true for a PipelineModule: its stages "
                                 "exchange one hidden-state tensor and take no per-call attention_fn; use a plain "
                                 "model (ds_ext.topology.pipeline_stages = 1) or the megatron path "
                                 "(ds_ext.megatron.attention.grouped_forward)")])
    params = inspect.signature(model.forward).parameters
    if not {"position_ids", "attention_fn"} <= set(params):
        raise ValueError(f"Prefix Grouper needs a model whose forward takes position_ids and attention_fn; "
                         f"{type(model).__name__}.forward takes {list(params)}")
    return PrefixGrouperFeature(cfg, model.register_forward_pre_hook(_grouped_inputs, with_kwargs=True))


def apply_prefix_grouper(engine, cfg: PrefixGrouperConfig, topology=None) -> PrefixGrouperFeature:
    """The feature for a ds_ext engine (hook on ``engine.module``; not attached: ``ds_ext.features`` attaches it).
    ``topology`` is unused."""
    return prefix_group_model(engine.module, cfg)
