"""The ``"ds_ext"`` block's rules for a megatron-core run (``examples/megatron_train.py``, :mod:`ds_ext.megatron`).

A megatron config file holds a ``"megatron"`` section (model size, batch, optimizer) next to the ``"ds_ext"`` block
and no DeepSpeed keys. Its block is checked with the same pydantic models and cross-feature rules as a DeepSpeed
config, against :data:`DEEPSPEED_EQUIVALENT`: megatron's distributed optimizer shards optimizer state and fp32 main
params over the data-parallel ranks like ZeRO-1, so the rules see ZeRO stage 1. Then the keys the megatron path
does not implement are refused instead of being ignored silently (:func:`megatron_unsupported`).

This module imports neither megatron-core nor the aggregate :mod:`ds_ext.config` (which calls it), so
``python -m ds_ext.config check`` validates megatron configs on a machine without megatron-core.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List

MEGATRON_KEY = "megatron"
EXT_KEY = "ds_ext"

# What the cross-feature rules see in place of a DeepSpeed config: the distributed optimizer is ZeRO-1's layout.
DEEPSPEED_EQUIVALENT: Dict[str, Any] = {"zero_optimization": {"stage": 1}}


def is_megatron_config(config: Any) -> bool:
    """Whether ``config`` (a parsed JSON file) is a megatron config: it has a top-level ``"megatron"`` section."""
    return isinstance(config, dict) and MEGATRON_KEY in config


def layout_problems(config: Dict[str, Any]) -> List[tuple]:
    """A megatron config holds only ``"megatron"`` and ``"ds_ext"``: a DeepSpeed key next to them would have no
    effect on the megatron path, so it is refused (``(json_path, message)`` per key)."""
    problems = [(key, f"a DeepSpeed key next to the \"{MEGATRON_KEY}\" section: a megatron config holds only "
                      f"\"{MEGATRON_KEY}\" and \"{EXT_KEY}\" (megatron reads its settings from \"{MEGATRON_KEY}\"); "
                      "remove it, or remove \"megatron\" to use the file with DeepSpeed")
                for key in config if key not in (MEGATRON_KEY, EXT_KEY)]
    if not isinstance(config[MEGATRON_KEY], dict):
        problems.append((MEGATRON_KEY, f"got {config[MEGATRON_KEY]!r}: must be a JSON object"))
    return problems


# Keys the megatron path accepts in the block but does not implement: refused, not ignored. Each entry is
# (JSON path under "ds_ext", its value in the parsed block, the only value allowed, why). Remove an entry when
# ds_ext.megatron implements the feature.
MEGATRON_UNSUPPORTED = (
    ("recovery.checkpoint_free.enabled", lambda ext: ext.recovery.checkpoint_free.enabled, False,
     "checkpoint-free rebuilds attach to a DeepSpeed engine; ds_ext.megatron's journal_for does not read this "
     "section, so a rank whose journal is lost could not be rebuilt; remove it or use ds_ext.initialize"),
    ("asyncflow.enabled", lambda ext: ext.asyncflow.enabled, False,
     "the sample ledger attaches to a DeepSpeed engine and the megatron path has no GRPO loop; remove it or run "
     "examples/grpo.py with a DeepSpeed config"),
    ("topology.pipeline_stages", lambda ext: ext.topology.pipeline_stages, 1,
     "ds_ext.megatron needs megatron's pipeline (and tensor) parallel size 1, and topology.pipeline_stages lays "
     "out DeepSpeed's PipelineModule; use 1"),
)


def megatron_unsupported(ext) -> List[tuple]:
    """``(json_path, message)`` for every key of the parsed block (a :class:`ds_ext.config.DsExtConfig`) that the
    megatron path would ignore; see :data:`MEGATRON_UNSUPPORTED`."""
    problems = []
    for path, value_of, allowed, why in MEGATRON_UNSUPPORTED:
        value = value_of(ext)
        if value != allowed:
            problems.append((f"{EXT_KEY}.{path}", f"got {json.dumps(value)}: not supported on megatron-core: {why}"))
    return problems
