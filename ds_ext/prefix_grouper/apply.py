"""Attach Prefix Grouper to a model: ``model(grouped_batch)`` runs the grouped forward.

A forward pre-hook (with kwargs) turns a :class:`GroupedBatch` first argument into the model's own keywords:
``input_ids``, ``position_ids`` restarting per suffix and the per-call ``attention_fn``. Any other input passes
through unchanged, so ungrouped batches (evaluation, SFT) still work.
"""
from __future__ import annotations

from torch import nn

from ds_ext.prefix_grouper.attention import GroupedAttention
from ds_ext.prefix_grouper.layout import GroupedBatch


class PrefixGrouperFeature:
    name = "prefix_grouper"

    def __init__(self, handle):
        self.handle = handle

    def remove(self) -> None:
        self.handle.remove()

    def metrics(self) -> dict:
        return {"enabled": 1}


def _grouped_inputs(module, args, kwargs):
    if not args or not isinstance(args[0], GroupedBatch):
        return None
    batch = args[0]
    kwargs = dict(kwargs, position_ids=batch.position_ids, attention_fn=GroupedAttention(batch))
    return (batch.input_ids, *args[1:]), kwargs


def apply_prefix_grouper(model: nn.Module) -> PrefixGrouperFeature:
    """Let ``model`` take grouped batches. The model's forward must accept ``position_ids`` and a per-call
    ``attention_fn`` (the ds_ext reference model does)."""
    import inspect
    params = inspect.signature(model.forward).parameters
    if not {"position_ids", "attention_fn"} <= set(params):
        raise ValueError(f"Prefix Grouper needs a model whose forward takes position_ids and attention_fn; "
                         f"{type(model).__name__}.forward takes {list(params)}")
    return PrefixGrouperFeature(model.register_forward_pre_hook(_grouped_inputs, with_kwargs=True))
