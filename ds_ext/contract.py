"""The feature contract: what a ds_ext feature is, when each of its hooks runs, and in which order features run.

A feature is the object an ``apply_<feature>(engine, cfg, topology, ...)`` function returns. The apply function
prepares the feature (patches layers, registers optimizer hooks) but never attaches it: :mod:`ds_ext.features`
attaches every enabled feature with :meth:`DsExtEngineMixin.attach_feature`, which orders them by
:class:`Phase` (attach order inside a phase), and then calls each one's :meth:`Feature.start` once, in that order
(:meth:`DsExtEngineMixin.ds_ext_start`). ``attach_feature`` accepts only objects that satisfy the whole
:class:`Feature` Protocol (the engine calls every hook directly): subclass :class:`FeatureBase`.

Call order of the hooks (the engine runs them, in phase order, for every attached feature):

* ``start(engine)``: once, after every built-in feature is attached (collective: all ranks call it; the journal
  resumes here and may replay every other feature's ``journal_replay``). A feature a user attaches later is started
  by ``attach_feature`` at once.
* ``after_optimizer_step(engine)``: after every applied optimizer step, before DeepSpeed counts the micro-step
  (``engine.ds_ext_in_step`` is True); ``after_skipped_step(engine)`` instead for a step skipped on fp16 overflow.
* ``after_load_checkpoint(engine)``: after ``engine.load_checkpoint`` restored DeepSpeed's state and every feature's
  ``load_state_dict``.
* ``after_state_lost(engine)``: after a rank's training state was rebuilt from live peers (checkpoint-free
  recovery); sent by the rebuilder through :meth:`DsExtEngineMixin.ds_ext_notify`.
* ``journal_payload() -> dict | None``: the feature's state change of the step that just ended (called by the
  journal during ``after_optimizer_step``, so the journal's phase is last and the payload is the step's final
  state); ``journal_replay(payload)`` re-applies one such payload on resume, in step order.
* ``journal_export`` (an :class:`ExportRule`) and ``export_replayer(meta, engine, global_rank)``: how the journal
  exporter (``python -m ds_ext.recovery export``, which has no live job: no peers, no model code) treats the
  feature's payloads. ``REPLAY``: the classmethod ``export_replayer`` builds a replay-only object (``journal_replay``,
  ``load_state_dict``, ``close``) on the exporter's engine; ``SKIP``: the payloads do not change the weights, or
  their effect is already in the journaled partitions; ``REFUSE`` (the default): a journal holding the feature's
  payload cannot be exported.
* ``state_dict()`` / ``load_state_dict(sd)``: per-rank state saved beside DeepSpeed's checkpoint.
* ``metrics() -> dict[str, float]``: reported as ``<name>/<key>``.
* ``close()``: finish background work and remove **every** hook and patch the feature installed; the model then
  behaves as without the feature. Idempotent. ``engine.ds_ext_close()`` closes every feature in reverse phase order
  and detaches it.

:class:`FeatureBase` gives every hook a no-op default, so a feature overrides only what it uses.
"""
from __future__ import annotations

import enum
from typing import Any, Dict, Optional, Protocol, runtime_checkable


class Phase(enum.IntEnum):
    """When a feature's step hooks run relative to the others (lower first)."""

    MODEL = 0     # changes the model's forward/backward (StreamBP, Prefix Grouper); no step hooks of substance
    STEP = 1      # changes or reads the step's result (NoLoCo's outer step, the sample ledger); user features
    REBUILD = 2   # may rebuild the step's state from peers (checkpoint-free recovery)
    JOURNAL = 3   # records the step's final state (the recovery journal): always last


class ExportRule(str, enum.Enum):
    """How the journal exporter treats a feature's journal payloads (see the module docstring)."""

    REPLAY = "replay"   # rebuilt for export by the feature's export_replayer and replayed in step order
    SKIP = "skip"       # the payload does not change the weights, or its effect is already in the partitions
    REFUSE = "refuse"   # needs the live job: a journal holding such a payload cannot be exported


HOOKS = ("start", "after_optimizer_step", "after_skipped_step", "after_load_checkpoint", "after_state_lost")


@runtime_checkable
class Feature(Protocol):
    """The contract every feature object satisfies (see the module docstring for the call order)."""

    name: str
    phase: Phase
    state_from_peer: bool
    journal_export: ExportRule

    def start(self, engine) -> None: ...

    def after_optimizer_step(self, engine) -> None: ...

    def after_skipped_step(self, engine) -> None: ...

    def after_load_checkpoint(self, engine) -> None: ...

    def after_state_lost(self, engine) -> None: ...

    def journal_payload(self) -> Optional[Dict[str, Any]]: ...

    def journal_replay(self, payload: Dict[str, Any]) -> None: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...

    def metrics(self) -> Dict[str, float]: ...

    def close(self) -> None: ...


class FeatureBase:
    """No-op defaults for every hook of :class:`Feature`; subclasses set ``name`` and ``phase``."""

    name: str = ""
    phase: Phase = Phase.STEP
    # Whether state_dict() may be copied from a live peer that holds the same shard (checkpoint-free recovery
    # copies these when it rebuilds a rank); False for state that belongs to this rank alone (its journal).
    state_from_peer: bool = True
    # How the journal exporter treats this feature's journal payloads (a feature without payloads never meets it).
    journal_export: ExportRule = ExportRule.REFUSE

    @classmethod
    def export_replayer(cls, meta: Dict[str, Any], engine, global_rank: int):
        """For ``journal_export = REPLAY``: a replay-only object (``journal_replay(payload)``,
        ``load_state_dict(sd)``, ``close()``) working on the exporter's ``engine`` (a stock DeepSpeed engine of a
        parameters-only module with the run's config; no peers), for global rank ``global_rank`` of the run whose
        ``EXPORT.bin`` is ``meta`` (:mod:`ds_ext.recovery.meta`); ``None`` when the run had the feature off. A class
        declaring REPLAY must override it (checked when the class is defined, :meth:`__init_subclass__`)."""
        return None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.journal_export == ExportRule.REPLAY and cls.export_replayer.__func__ is \
                FeatureBase.export_replayer.__func__:
            raise TypeError(f"{cls.__name__} declares journal_export=REPLAY but does not define export_replayer")

    def start(self, engine) -> None:
        pass

    def after_optimizer_step(self, engine) -> None:
        pass

    def after_skipped_step(self, engine) -> None:
        pass

    def after_load_checkpoint(self, engine) -> None:
        pass

    def after_state_lost(self, engine) -> None:
        pass

    def journal_payload(self) -> Optional[Dict[str, Any]]:
        return None

    def journal_replay(self, payload: Dict[str, Any]) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def metrics(self) -> Dict[str, float]:
        return {}

    def close(self) -> None:
        pass
