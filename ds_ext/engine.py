"""The ds_ext engine mode: thin subclasses of DeepSpeed's ``DeepSpeedEngine`` and ``PipelineEngine``.

The engines add exactly three things, each marked ``# ds_ext addition:``:

* they carry the parsed ``"ds_ext"`` block (:class:`ds_ext.config.DsExtConfig`), the :class:`Topology` and its
  ``mpu``;
* after every applied optimizer step (both engines reach it through ``_take_model_step``) they call
  ``after_optimizer_step(engine)`` on each attached feature, in attach order (``after_skipped_step(engine)`` for a
  step skipped on fp16 overflow, ``after_load_checkpoint(engine)`` after a checkpoint was loaded); while those
  step hooks run, ``engine.ds_ext_in_step`` is True (DeepSpeedEngine.step() has not yet counted the micro-step);
* ``save_checkpoint`` / ``load_checkpoint`` write each rank's feature ``state_dict()`` (NoLoCo outer weights, ...)
  beside DeepSpeed's files, ``<dir>/<tag>/ds_ext_state_rank<R>.pt``, and give each replica its own directory
  ``<dir>/replica_<r>`` when there are several (their weights differ; DeepSpeed's file names do not say replica).

A feature is any object with a ``name`` and any of those hooks, ``state_dict()`` and ``load_state_dict(sd)``. With no feature attached nothing else changes: training is bit-identical to stock
DeepSpeed (tested for ZeRO-1 and ZeRO-2).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import torch

from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine

from ds_ext.config import DsExtConfig
from ds_ext.topology import Topology


class DsExtEngineMixin:
    """What both ds_ext engines add on top of DeepSpeed. Constructed by :func:`ds_ext.initialize` only."""

    def __init__(self, *args, ds_ext_config: DsExtConfig, topology: Topology, **kwargs):
        # ds_ext addition: state the features read, set before DeepSpeed's __init__ so its hooks can see it.
        self.ds_ext_config = ds_ext_config
        self.topology = topology
        self.ds_ext_features: List[Any] = []
        super().__init__(*args, **kwargs)

    def attach_feature(self, feature) -> None:
        """Attach a feature object; its hooks run after the ones attached before it."""
        if any(f.name == feature.name for f in self.ds_ext_features):
            raise ValueError(f"feature {feature.name!r} is already attached")
        self.ds_ext_features.append(feature)

    def _take_model_step(self, lr_kwargs, *args, **kwargs):
        super()._take_model_step(lr_kwargs, *args, **kwargs)
        # ds_ext addition: the one per-optimizer-step seam, shared by DeepSpeedEngine and PipelineEngine. While it
        # runs, DeepSpeedEngine.step() has not yet counted this micro-step (features that save counters read this).
        self.ds_ext_in_step = True
        try:
            self._call_features("after_optimizer_step" if self._step_applied else "after_skipped_step")
        finally:
            self.ds_ext_in_step = False

    def ds_ext_notify(self, hook_name: str) -> None:
        """Run hook ``hook_name`` (e.g. ``"after_state_lost"``) on every attached feature, in attach order."""
        self._call_features(hook_name)

    def _call_features(self, hook_name: str) -> None:
        for feature in self.ds_ext_features:
            hook = getattr(feature, hook_name, None)
            if hook is not None:
                hook(self)

    def ds_ext_state_dict(self) -> Dict[str, Any]:
        return {f.name: f.state_dict() for f in self.ds_ext_features if hasattr(f, "state_dict")}

    def ds_ext_load_state_dict(self, state: Dict[str, Any]) -> None:
        for feature in self.ds_ext_features:
            if feature.name in state and hasattr(feature, "load_state_dict"):
                feature.load_state_dict(state[feature.name])

    def ds_ext_metrics(self) -> Dict[str, float]:
        """Every attached feature's ``metrics()``, keys prefixed by the feature name."""
        out = {}
        for feature in self.ds_ext_features:
            if hasattr(feature, "metrics"):
                out.update({f"{feature.name}/{k}": v for k, v in feature.metrics().items()})
        return out

    def ds_ext_close(self) -> None:
        """Finish every feature's background work (the journal's pending writes) and remove its hooks."""
        for feature in self.ds_ext_features:
            if hasattr(feature, "close"):
                feature.close()

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
            self._call_features("after_load_checkpoint")
        return load_path, client_state


class DsExtEngine(DsExtEngineMixin, DeepSpeedEngine):
    """``DeepSpeedEngine`` with the ds_ext seams (see the module docstring)."""


class DsExtPipelineEngine(DsExtEngineMixin, PipelineEngine):
    """``PipelineEngine`` with the ds_ext seams. Its instruction map stays the stock one: the ``OptimizerStep``
    instruction calls ``self._take_model_step``, which resolves to :meth:`DsExtEngineMixin._take_model_step`."""
