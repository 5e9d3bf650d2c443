"""The ``"ds_ext"`` block of a DeepSpeed JSON config.

A DeepSpeed user adds one top-level key to the config they already have::

    {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1},
     "ds_ext": {"topology": {"ranks_per_replica": 2}}}

DeepSpeed ignores unknown top-level keys, so the same file still works with stock DeepSpeed. Inside ``"ds_ext"``
every key is checked: each section is a ``DeepSpeedConfigModel`` (pydantic, ``extra="forbid"``) with a docstring
per field, values must have their JSON type (no string-to-number coercion), and every error names the JSON path,
the offending value and what is allowed.

Rules that span sections, or the ``"ds_ext"`` block and the rest of the DeepSpeed config, live in one function,
:func:`validate_compat`. Rules that need the world size (how ranks split into replicas) are checked when the
:class:`ds_ext.topology.Topology` is built. A megatron-core config (a ``"megatron"`` section next to the block, no
DeepSpeed keys) is checked by :func:`parse_megatron_config` with the rules of :mod:`ds_ext.config.megatron`.

Command line: ``python -m ds_ext.config check FILE`` validates DeepSpeed and megatron config files and exits 2 on
error (``__main__.py``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Union

from pydantic import Field, ValidationError

from ds_ext.config import megatron as megatron_rules
from ds_ext.config.base import DsExtConfigError, ExtSection
from ds_ext.config.monitors import monitor_problems
from ds_ext.asyncflow.config import AsyncFlowConfig
from ds_ext.noloco.config import NoLoCoConfig
from ds_ext.prefix_grouper.config import PrefixGrouperConfig
from ds_ext.recovery.config import RecoveryConfig
from ds_ext.streambp.config import StreamBPConfig

EXT_KEY = "ds_ext"

__all__ = ["EXT_KEY", "DsExtConfig", "DsExtConfigError", "ExtSection", "TopologyConfig", "check_file",
           "load_config_file", "parse_ext_config", "parse_megatron_config", "validate_compat"]

# Keys that existed once and were removed: a config still holding one gets this message instead of a bare
# "unknown key" (JSON path under "ds_ext" -> why it went and what to do instead).
REMOVED_KEYS: dict = {}


class TopologyConfig(ExtSection):
    """How the world splits into replicas x ranks-per-replica (x pipeline stages).

    ZeRO shards optimizer state (and gradients at stage 2) over the ranks of one replica. With one replica (the
    default) this is stock DeepSpeed data parallelism.
    """

    ranks_per_replica: Optional[int] = Field(None, ge=1)
    """Ranks in one replica (pipeline stages x ZeRO data-parallel ranks). ``null``: all ranks form one replica.
    Must divide the world size. More than one replica needs a feature that synchronises replicas (``noloco``)."""

    pipeline_stages: int = Field(1, ge=1)
    """Pipeline stages inside a replica, used by the reference model's ``PipelineModule`` form. 1: no pipeline.
    Must divide ``ranks_per_replica`` (or the world size)."""


class DsExtConfig(ExtSection):
    """The whole ``"ds_ext"`` block. Every feature section defaults to off."""

    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    """Replica / pipeline layout of the world (see :class:`TopologyConfig`)."""

    noloco: NoLoCoConfig = Field(default_factory=NoLoCoConfig)
    """NoLoCo / DiLoCo outer steps between replicas (see :class:`ds_ext.noloco.config.NoLoCoConfig`)."""

    streambp: StreamBPConfig = Field(default_factory=StreamBPConfig)
    """StreamBP chunked backward (see :class:`ds_ext.streambp.config.StreamBPConfig`)."""

    prefix_grouper: PrefixGrouperConfig = Field(default_factory=PrefixGrouperConfig)
    """Prefix Grouper for GRPO groups (see :class:`ds_ext.prefix_grouper.config.PrefixGrouperConfig`)."""

    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    """Journal of ZeRO partitions for bit-exact resume (see :class:`ds_ext.recovery.config.RecoveryConfig`)."""

    asyncflow: AsyncFlowConfig = Field(default_factory=AsyncFlowConfig)
    """Async GRPO through the transfer queue (see :class:`ds_ext.asyncflow.config.AsyncFlowConfig`)."""

    @property
    def replica_sync_enabled(self) -> bool:
        """Whether an enabled feature synchronises replicas; without one, several replicas are refused
        (:meth:`ds_ext.topology.Topology.from_config`)."""
        return self.noloco.enabled

    @property
    def any_feature_enabled(self) -> bool:
        """Whether any feature section is on; with none, the engine is stock DeepSpeed bit for bit."""
        return (self.noloco.enabled or self.streambp.enabled or self.prefix_grouper.enabled or self.recovery.active
                or self.recovery.checkpoint_free.enabled or self.asyncflow.enabled)

    def ranks_per_replica(self, world_size: int) -> int:
        """Ranks per replica: the topology's or NoLoCo's value; NoLoCo with neither makes every rank a replica."""
        value = self.topology.ranks_per_replica or self.noloco.ranks_per_replica
        if value is None and self.noloco.enabled:
            return self.topology.pipeline_stages
        return value or world_size


def _json_path(loc: tuple) -> str:
    path = EXT_KEY
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _model_at(loc: tuple):
    """The pydantic model class that owns the field at ``loc`` (for listing allowed keys)."""
    model = DsExtConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, ExtSection)):
            return None
        model = ann
    return model


def _describe(err: dict) -> str:
    loc, value = tuple(err["loc"]), err.get("input")
    if err["type"] == "extra_forbidden":
        if tuple(loc) in REMOVED_KEYS:
            return REMOVED_KEYS[tuple(loc)]
        model = _model_at(loc)
        allowed = sorted(model.model_fields) if model else []
        return f"unknown key {loc[-1]!r}; allowed keys: {', '.join(allowed) or '(none)'}"
    return f"got {json.dumps(value, default=str)}: {err['msg']}"


def _section_problems(block: Any) -> List[tuple]:
    if not isinstance(block, dict):
        return [(EXT_KEY, f"got {json.dumps(block, default=str)}: must be a JSON object")]
    try:
        DsExtConfig(**block)
    except ValidationError as exc:
        return [(_json_path(tuple(e["loc"])), _describe(e)) for e in exc.errors()]
    return []


def _zero_stage(ds_config: Dict[str, Any]) -> int:
    zero = ds_config.get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, dict) else 0


def validate_compat(ds_config: Dict[str, Any], ext: DsExtConfig) -> List[tuple]:
    """Rules that cross sections or reach into the DeepSpeed part of the config.

    Returns a list of ``(json_path, message)``; empty when the combination is allowed. Feature issues add their
    rules here so that every cross-feature rule is in one tested place.
    """
    problems = []
    topo = ext.topology
    if topo.pipeline_stages > 1 and _zero_stage(ds_config) > 1:
        problems.append((f"{EXT_KEY}.topology.pipeline_stages",
                         f"got {topo.pipeline_stages} with zero_optimization.stage={_zero_stage(ds_config)}: "
                         "DeepSpeed's PipelineEngine supports ZeRO stage 0 or 1 only; use stage 1 or "
                         "pipeline_stages=1"))
    if topo.ranks_per_replica and topo.ranks_per_replica % topo.pipeline_stages:
        problems.append((f"{EXT_KEY}.topology.ranks_per_replica",
                         f"got {topo.ranks_per_replica}: must be a multiple of "
                         f"topology.pipeline_stages={topo.pipeline_stages}"))
    problems += _noloco_compat(ds_config, ext)
    problems += _streambp_compat(ds_config, ext)
    problems += _prefix_grouper_compat(ext)
    problems += _recovery_compat(ds_config, ext)
    problems += _checkfree_compat(ds_config, ext)
    return problems


def _prefix_grouper_compat(ext: DsExtConfig) -> List[tuple]:
    stages = ext.topology.pipeline_stages
    if ext.prefix_grouper.enabled and stages > 1:
        return [(f"{EXT_KEY}.prefix_grouper.enabled",
                 f"got true with topology.pipeline_stages={stages}: a grouped batch reaches attention through the "
                 "model forward's per-call attention_fn, which DeepSpeed's PipelineModule does not pass between "
                 "stages; use pipeline_stages=1")]
    return []


def _checkfree_compat(ds_config: Dict[str, Any], ext: DsExtConfig) -> List[tuple]:
    if ext.recovery.checkpoint_free.enabled and _zero_stage(ds_config) > 2:
        return [(f"{EXT_KEY}.recovery.checkpoint_free.enabled",
                 f"got true with zero_optimization.stage={_zero_stage(ds_config)}: checkpoint-free rebuilds copy "
                 "ZeRO-0/1/2 partitions (ZeRO-3 also shards the parameters, which no rebuild rule covers); use "
                 "stage 0, 1 or 2")]
    return []


def _recovery_compat(ds_config: Dict[str, Any], ext: DsExtConfig) -> List[tuple]:
    rec, problems = ext.recovery, []
    if rec.enabled and rec.journal_dir is None:
        problems.append((f"{EXT_KEY}.recovery.journal_dir", "got null with recovery.enabled true: give a directory "
                                                             "on local disk for the journal"))
    if rec.active and _zero_stage(ds_config) not in (1, 2):
        problems.append((f"{EXT_KEY}.recovery", f"journal_dir set with zero_optimization.stage="
                                                f"{_zero_stage(ds_config)}: the journal records ZeRO-1/2 partitions; "
                                                "use stage 1 or 2"))
    offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    if rec.active and offload not in ("none", None):
        problems.append((f"{EXT_KEY}.recovery", f"journal_dir set with zero_optimization.offload_optimizer.device="
                                                f"{offload!r}: not supported yet; use \"none\""))
    return problems


def _streambp_compat(ds_config: Dict[str, Any], ext: DsExtConfig) -> List[tuple]:
    if not ext.streambp.enabled:
        return []
    problems = []
    if ds_config.get("activation_checkpointing"):
        problems.append((f"{EXT_KEY}.streambp.enabled",
                         "got true together with DeepSpeed's activation_checkpointing block: StreamBP replaces "
                         "activation checkpointing on the same layers; remove one of them"))
    if _zero_stage(ds_config) > 2:
        problems.append((f"{EXT_KEY}.streambp.enabled",
                         f"got true with zero_optimization.stage={_zero_stage(ds_config)}: StreamBP supports ZeRO "
                         "stage 0, 1 or 2"))
    sp = ext.streambp.sequence_parallel
    unsupported = [what for what, on in (
        (f"topology.pipeline_stages={ext.topology.pipeline_stages}", ext.topology.pipeline_stages > 1),
        ("noloco.enabled (several replicas)", ext.noloco.enabled),
        ("prefix_grouper.enabled (per-call chunk masks)", ext.prefix_grouper.enabled)) if on]
    if sp > 1 and unsupported:
        problems.append((f"{EXT_KEY}.streambp.sequence_parallel",
                         f"got {sp} with {', '.join(unsupported)}: sequence parallelism shards one model's "
                         "sequence over consecutive ranks of one replica, without pipeline stages or chunk masks; "
                         "use sequence_parallel 1 or drop the other"))
    return problems


def _noloco_compat(ds_config: Dict[str, Any], ext: DsExtConfig) -> List[tuple]:
    noloco, topo, problems = ext.noloco, ext.topology, []
    if not noloco.enabled:
        return problems
    if noloco.ranks_per_replica and topo.ranks_per_replica and noloco.ranks_per_replica != topo.ranks_per_replica:
        problems.append((f"{EXT_KEY}.noloco.ranks_per_replica",
                         f"got {noloco.ranks_per_replica} but ds_ext.topology.ranks_per_replica is "
                         f"{topo.ranks_per_replica}: give one of them, or the same value"))
    if noloco.ranks_per_replica and noloco.ranks_per_replica % topo.pipeline_stages:
        problems.append((f"{EXT_KEY}.noloco.ranks_per_replica",
                         f"got {noloco.ranks_per_replica}: must be a multiple of "
                         f"topology.pipeline_stages={topo.pipeline_stages}"))
    if _zero_stage(ds_config) > 2:
        problems.append((f"{EXT_KEY}.noloco.enabled",
                         f"got true with zero_optimization.stage={_zero_stage(ds_config)}: NoLoCo averages ZeRO-1/2 "
                         "fp32 shards; use stage 0, 1 or 2"))
    low_precision = [k for k in ("fp16", "bf16") if (ds_config.get(k) or {}).get("enabled")]
    if low_precision and _zero_stage(ds_config) == 0:
        problems.append((f"{EXT_KEY}.noloco.enabled",
                         f"got true with {low_precision[0]}.enabled and ZeRO stage 0: the outer step needs fp32 "
                         "master weights; use ZeRO stage 1 or 2"))
    return problems


def parse_ext_config(ds_config: Dict[str, Any], source: str = "config") -> DsExtConfig:
    """Parse and validate the ``"ds_ext"`` block of a DeepSpeed config dict.

    A config without the block gives the all-off default. Raises :class:`DsExtConfigError` naming every problem.
    """
    if not isinstance(ds_config, dict):
        raise DsExtConfigError([("$", "a DeepSpeed config must be a JSON object")], source)
    block = ds_config.get(EXT_KEY, {})
    problems = _section_problems(block)
    if problems:
        raise DsExtConfigError(problems, source)
    ext = DsExtConfig(**block)
    problems = validate_compat(ds_config, ext)
    if problems:
        raise DsExtConfigError(problems, source)
    return ext


def load_config_file(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a DeepSpeed JSON config; a missing file or malformed JSON becomes a :class:`DsExtConfigError`."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        raise DsExtConfigError([("$", f"cannot read file: {exc.strerror}")], path) from None
    except json.JSONDecodeError as exc:
        raise DsExtConfigError([("$", f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")],
                               path) from None


def parse_megatron_config(config: Dict[str, Any], source: str = "config") -> DsExtConfig:
    """Parse the ``"ds_ext"`` block of a megatron config (a ``"megatron"`` section, no DeepSpeed keys): the same
    models and cross-feature rules as :func:`parse_ext_config`, against megatron's ZeRO-1-like layout, then the
    refusals of :func:`ds_ext.config.megatron.megatron_unsupported`. Raises :class:`DsExtConfigError` naming every
    problem."""
    if not megatron_rules.is_megatron_config(config):
        raise DsExtConfigError([("$", "a megatron config must be a JSON object with a "
                                      f"\"{megatron_rules.MEGATRON_KEY}\" section")], source)
    problems = megatron_rules.layout_problems(config)
    if problems:
        raise DsExtConfigError(problems, source)
    ext = parse_ext_config({**megatron_rules.DEEPSPEED_EQUIVALENT, EXT_KEY: config.get(EXT_KEY, {})}, source)
    problems = megatron_rules.megatron_unsupported(ext)
    if problems:
        raise DsExtConfigError(problems, source)
    return ext


def check_file(path: Union[str, os.PathLike]) -> DsExtConfig:
    """Load and validate a config file: a DeepSpeed config, or a megatron config (a top-level ``"megatron"``
    section) by the megatron rules, and DeepSpeed's enabled monitors against the installed packages
    (:func:`ds_ext.config.monitors.monitor_problems`). The ``ds-ext`` launcher runs this before any worker starts."""
    config, source = load_config_file(path), os.fspath(path)
    if megatron_rules.is_megatron_config(config):
        return parse_megatron_config(config, source)
    problems = monitor_problems(config)
    if problems:
        raise DsExtConfigError(problems, source)
    return parse_ext_config(config, source)
