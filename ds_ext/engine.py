"""The ds_ext engine mode: thin subclasses of DeepSpeed's ``DeepSpeedEngine`` and ``PipelineEngine``.

The engines add exactly three things, each marked ``# ds_ext addition:``:

* they carry the parsed ``"ds_ext"`` block (:class:`ds_ext.config.DsExtConfig`), the :class:`Topology` and its
  ``mpu``;
* after every applied optimizer step (both engines reach it through ``_take_model_step``) they call
  ``after_optimizer_step(engine)`` on each attached feature, in attach order;
* ``save_checkpoint`` / ``load_checkpoint`` carry each feature's ``state_dict()`` in DeepSpeed's ``client_state``
  under the key ``"ds_ext"``, so feature state (NoLoCo outer weights, ...) rides in the ordinary checkpoint.

A feature is any object with a ``name`` and any of ``after_optimizer_step(engine)``, ``state_dict()`` and
``load_state_dict(sd)``. With no feature attached nothing else changes: training is bit-identical to stock
DeepSpeed (tested for ZeRO-1 and ZeRO-2).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine

from ds_ext.config import DsExtConfig
from ds_ext.topology import Topology

CLIENT_STATE_KEY = "ds_ext"


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
        # ds_ext addition: the one per-optimizer-step seam, shared by DeepSpeedEngine and PipelineEngine.
        if self._step_applied:
            for feature in self.ds_ext_features:
                hook = getattr(feature, "after_optimizer_step", None)
                if hook is not None:
                    hook(self)

    def ds_ext_state_dict(self) -> Dict[str, Any]:
        return {f.name: f.state_dict() for f in self.ds_ext_features if hasattr(f, "state_dict")}

    def ds_ext_load_state_dict(self, state: Dict[str, Any]) -> None:
        for feature in self.ds_ext_features:
            if feature.name in state and hasattr(feature, "load_state_dict"):
                feature.load_state_dict(state[feature.name])

    def save_checkpoint(self, save_dir, tag=None, client_state: Optional[dict] = None, *args, **kwargs):
        client_state = dict(client_state or {})
        # ds_ext addition: feature state rides in the client state of the ordinary checkpoint.
        if self.ds_ext_features:
            client_state[CLIENT_STATE_KEY] = self.ds_ext_state_dict()
        return super().save_checkpoint(save_dir, tag, client_state, *args, **kwargs)

    def load_checkpoint(self, *args, **kwargs):
        load_path, client_state = super().load_checkpoint(*args, **kwargs)
        # ds_ext addition: restore feature state and hide it from the caller's client state.
        if client_state is not None and CLIENT_STATE_KEY in client_state:
            self.ds_ext_load_state_dict(client_state.pop(CLIENT_STATE_KEY))
        return load_path, client_state


class DsExtEngine(DsExtEngineMixin, DeepSpeedEngine):
    """``DeepSpeedEngine`` with the ds_ext seams (see the module docstring)."""


class DsExtPipelineEngine(DsExtEngineMixin, PipelineEngine):
    """``PipelineEngine`` with the ds_ext seams. Its instruction map stays the stock one: the ``OptimizerStep``
    instruction calls ``self._take_model_step``, which resolves to :meth:`DsExtEngineMixin._take_model_step`."""
