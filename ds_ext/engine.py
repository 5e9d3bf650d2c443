"""The ds_ext engine mode: thin subclasses of DeepSpeed's ``DeepSpeedEngine`` and ``PipelineEngine``.

The engines add exactly three things, each marked ``# ds_ext addition:``:

* they carry the parsed ``"ds_ext"`` block (:class:`ds_ext.config.DsExtConfig`), the :class:`Topology` and its
  ``mpu``;
* they hold the attached features (:mod:`ds_ext.contract`) in phase order and run their hooks:
  :meth:`DsExtEngineMixin.attach_feature` inserts a feature by its ``phase`` (attach order inside a phase), so a
  feature a user attaches after ``ds_ext.initialize`` still runs before the journal, which therefore records every
  step's final state; :meth:`~DsExtEngineMixin.ds_ext_start` starts them once; after every applied optimizer step
  (both engines reach it through DeepSpeed's per-step method, overridden by ``_deepspeed.install_step_seam``) each
  feature's ``after_optimizer_step(engine)`` runs, ``after_skipped_step(engine)`` for a step skipped on overflow;
  while those run ``engine.ds_ext_in_step`` is True (DeepSpeedEngine.step() has not yet counted the micro-step);
  any other hook is sent with the public event bus :meth:`~DsExtEngineMixin.ds_ext_notify`; the same seam applies a
  one-step gradient factor set by :meth:`~DsExtEngineMixin.ds_ext_scale_step_gradients` (ZeRO-1/2);
  :meth:`~DsExtEngineMixin.ds_ext_close` closes and detaches every feature;
* ``save_checkpoint`` / ``load_checkpoint`` write each rank's feature ``state_dict()`` (NoLoCo outer weights, ...)
  beside DeepSpeed's files, ``<dir>/<tag>/ds_ext_state_rank<R>.pt``, and give each replica its own directory
  ``<dir>/replica_<r>`` when there are several (their weights differ; DeepSpeed's file names do not say replica),
  then send ``after_load_checkpoint``.

With no feature attached nothing else changes: training is bit-identical to stock DeepSpeed (tested for ZeRO-1 and 2).

A feature must satisfy the whole :class:`ds_ext.contract.Feature` Protocol (every hook, ``name``, ``phase``,
``state_from_peer``): hooks are called directly, never looked up with ``getattr``. Subclass
:class:`ds_ext.contract.FeatureBase` and override what you use; ``attach_feature`` refuses anything else with a
message that names the missing members.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import torch

from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine

from ds_ext._deepspeed import (can_scale_step_gradients, check_step_gradient_factor, install_schedule_seam,
                               install_step_seam, pipeline_check_schedulable)
from ds_ext.config import DsExtConfig
from ds_ext.contract import HOOKS, Feature, FeatureBase, Phase
from ds_ext.topology import Topology

# Hooks ds_ext_notify may send (start runs once, through ds_ext_start / attach_feature).
EVENTS = tuple(h for h in HOOKS if h != "start")


def _missing_members(feature) -> List[str]:
    members = [m for m in dir(FeatureBase) if not m.startswith("_")] + list(Feature.__annotations__)
    return sorted({m for m in members if not hasattr(feature, m)})


@install_step_seam
class DsExtEngineMixin:
    """What both ds_ext engines add on top of DeepSpeed. Constructed by :func:`ds_ext.initialize` only."""

    def __init__(self, *args, ds_ext_config: DsExtConfig, topology: Topology, **kwargs):
        # ds_ext addition: state the features read, set before DeepSpeed's __init__ so its hooks can see it.
        self.ds_ext_config = ds_ext_config
        self.topology = topology
        self.ds_ext_features: List[Feature] = []  # phase order; read it, change it only through attach/close
        self.ds_ext_in_step = False
        self.ds_ext_step_gradient_factor = None  # read and reset by the step seam (ds_ext_scale_step_gradients)
        self._ds_ext_started = False
        super().__init__(*args, **kwargs)

    def attach_feature(self, feature: Feature) -> None:
        """Attach ``feature``: its hooks run after those of every attached feature of a lower or equal ``phase``,
        before those of a higher one. If the engine's features were already started (any feature attached after
        ``ds_ext.initialize``), ``feature.start(engine)`` runs at once; attach on every rank, in the same order,
        when that start is collective.

        Raises TypeError for an object that does not satisfy :class:`ds_ext.contract.Feature` and ValueError for a
        second feature of the same name.
        """
        if not isinstance(feature, Feature):
            raise TypeError(f"{type(feature).__name__} is not a ds_ext feature: it lacks {_missing_members(feature)} "
                            "of ds_ext.contract.Feature (subclass ds_ext.contract.FeatureBase for no-op defaults)")
        try:
            phase = Phase(feature.phase)
        except ValueError:
            raise ValueError(f"feature {feature.name!r}: phase {feature.phase!r} is not one of "
                             f"{[p.name for p in Phase]}") from None
        if any(f.name == feature.name for f in self.ds_ext_features):
            raise ValueError(f"feature {feature.name!r} is already attached")
        at = sum(1 for f in self.ds_ext_features if Phase(f.phase) <= phase)
        self.ds_ext_features.insert(at, feature)
        if self._ds_ext_started:
            try:
                feature.start(self)
            except BaseException:
                self.ds_ext_features.remove(feature)  # a feature that failed to start is not attached
                raise

    def ds_ext_feature(self, cls: type):
        """The attached feature that is a ``cls`` (e.g. ``PrefixGrouperFeature``), or None: features are found by
        type, never by name."""
        return next((f for f in self.ds_ext_features if isinstance(f, cls)), None)

    def ds_ext_start(self) -> None:
        """Start every attached feature once, in phase order (collective: ``ds_ext.features`` calls it on every rank
        after attaching the built-in features). Features attached later start in :meth:`attach_feature`."""
        if self._ds_ext_started:
            raise RuntimeError("ds_ext_start: the features were already started")
        self._ds_ext_started = True
        for feature in tuple(self.ds_ext_features):
            feature.start(self)

    def ds_ext_after_model_step(self) -> None:
        # ds_ext addition: the one per-optimizer-step seam (installed by install_step_seam), shared by DeepSpeedEngine
        # and PipelineEngine. While it runs, DeepSpeedEngine.step() has not yet counted this micro-step (features
        # that save counters read this).
        self.ds_ext_in_step = True
        try:
            self.ds_ext_notify("after_optimizer_step" if self.was_step_applied() else "after_skipped_step")
        finally:
            self.ds_ext_in_step = False

    def ds_ext_can_scale_step_gradients(self) -> bool:
        """Whether :meth:`ds_ext_scale_step_gradients` works on this engine (ZeRO-1/2 in fp32 or bf16; see
        ``ds_ext._deepspeed.can_scale_step_gradients`` for what is excluded)."""
        return can_scale_step_gradients(self.optimizer)

    def ds_ext_scale_step_gradients(self, factor: float) -> None:
        """Multiply the gradients of the next optimizer step by ``factor`` (> 0) before its norm, clipping and
        update: for a normaliser known only once the step's micro-batches were all backpropagated (the async
        trainer streams DAPO micro-batches with an estimated token total, then corrects by estimate / total).
        Call after the step's last ``backward`` and before its ``step()``; applies to that one step. Where
        :meth:`ds_ext_can_scale_step_gradients` is false, ``ValueError`` (here rather than inside the step)."""
        # ds_ext addition: the step seam (``_deepspeed.install_step_seam``) applies and resets it
        self.ds_ext_step_gradient_factor = check_step_gradient_factor(self.optimizer, factor)

    def ds_ext_notify(self, hook_name: str) -> None:
        """Call ``hook_name(engine)`` on every attached feature, in phase order: the engine's event bus (e.g. the
        checkpoint-free rebuilder sends ``"after_state_lost"``). ``hook_name`` is one of :data:`EVENTS`."""
        if hook_name not in EVENTS:
            raise ValueError(f"ds_ext_notify: unknown hook {hook_name!r}; the hooks are {list(EVENTS)}")
        for feature in tuple(self.ds_ext_features):  # a hook may attach a feature; it runs from the next event on
            getattr(feature, hook_name)(self)

    def ds_ext_state_dict(self) -> Dict[str, Any]:
        return {f.name: f.state_dict() for f in self.ds_ext_features}

    def ds_ext_load_state_dict(self, state: Dict[str, Any]) -> None:
        for feature in self.ds_ext_features:
            if feature.name in state:
                feature.load_state_dict(state[feature.name])

    def ds_ext_metrics(self) -> Dict[str, float]:
        """Every attached feature's ``metrics()``, keys prefixed by the feature name."""
        return {f"{f.name}/{k}": v for f in self.ds_ext_features for k, v in f.metrics().items()}

    def ds_ext_close(self) -> None:
        """Close every feature, in reverse phase order (the journal first finishes its pending writes; patches come
        off in the reverse order they went on), and detach it: each removes every hook and patch it installed, and
        the engine then trains as stock DeepSpeed. Idempotent. If a close raises, the others still run and the
        first error is raised at the end."""
        features, self.ds_ext_features = self.ds_ext_features, []
        errors = []
        for feature in reversed(features):
            try:
                feature.close()
            except Exception as exc:  # noqa: BLE001  (re-raised below, after every feature had its close)
                errors.append(exc)
        if errors:
            raise errors[0]

    def _replica_dir(self, save_dir: str) -> str:
        # Replicas hold different weights, and DeepSpeed names its files by data/model-parallel rank only, so
        # each replica gets its own directory.
        if self.topology.num_replicas == 1:
            return save_dir
        return os.path.join(save_dir, f"replica_{self.topology.coords(self.global_rank)[0]}")

    def _feature_state_path(self, ckpt_dir: str, tag) -> str:
        if tag is None:
            with open(os.path.join(ckpt_dir, "latest")) as f:
                tag = f.read().strip()
        return os.path.join(ckpt_dir, str(tag), f"ds_ext_state_rank{self.global_rank:05d}.pt")

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, *args, **kwargs):
        # ds_ext addition: a directory per replica, and each rank's feature state in a file of its own (shards
        # differ per rank, while DeepSpeed's client_state is written by one rank).
        ckpt_dir = self._replica_dir(save_dir)
        tag = tag if tag is not None else f"global_step{self.global_steps}"
        result = super().save_checkpoint(ckpt_dir, tag, client_state or {}, save_latest, *args, **kwargs)
        if save_latest and ckpt_dir != save_dir and self.global_rank != 0 and self.topology.coords(
                self.global_rank)[1:] == (0, 0):
            with open(os.path.join(ckpt_dir, "latest"), "w") as f:
                f.write(str(tag))
        if self.ds_ext_features:
            torch.save(self.ds_ext_state_dict(), self._feature_state_path(ckpt_dir, tag))
        return result

    def load_checkpoint(self, load_dir, tag=None, *args, **kwargs):
        ckpt_dir = self._replica_dir(load_dir)
        load_path, client_state = super().load_checkpoint(ckpt_dir, tag, *args, **kwargs)
        # ds_ext addition: restore this rank's feature state (tensors and plain values only: weights_only).
        state_path = self._feature_state_path(ckpt_dir, tag) if load_path is not None else None
        if state_path and self.ds_ext_features and os.path.exists(state_path):
            self.ds_ext_load_state_dict(torch.load(state_path, weights_only=True))
        if load_path is not None:
            self.ds_ext_notify("after_load_checkpoint")
        return load_path, client_state


class DsExtEngine(DsExtEngineMixin, DeepSpeedEngine):
    """``DeepSpeedEngine`` with the ds_ext seams (see the module docstring)."""


@install_schedule_seam
class DsExtPipelineEngine(DsExtEngineMixin, PipelineEngine):
    """``PipelineEngine`` with the ds_ext seams. The ``OptimizerStep`` instruction calls DeepSpeed's per-step method
    on ``self``, which resolves to the mixin's override. ds_ext addition: with a pipeline schedule set
    (:meth:`ds_ext_set_pipeline_schedule`, by CheckFree+ or NoLoCo routing) ``train_batch`` runs the step's
    micro-batches through that schedule, then DeepSpeed's own gradient reduction and optimizer step
    (``_deepspeed.install_schedule_seam``); ``eval_batch`` always keeps DeepSpeed's fixed path."""

    ds_ext_pipeline_schedule = None

    def ds_ext_set_pipeline_schedule(self, schedule) -> None:
        """Run training steps through ``schedule`` (an object with ``run_step(engine)``; ``None``: DeepSpeed's own
        schedule again). One schedule at a time: ``ValueError`` if another is set."""
        if schedule is not None:
            current = self.ds_ext_pipeline_schedule
            if current is not None and current is not schedule:
                raise ValueError(f"a pipeline schedule is already set ({type(current).__name__}); "
                                 f"{type(schedule).__name__} cannot be combined with it")
            pipeline_check_schedulable(self)
        self.ds_ext_pipeline_schedule = schedule
