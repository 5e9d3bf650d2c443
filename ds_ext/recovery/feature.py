"""The recovery engine feature: journal every optimizer step of a DeepSpeed ZeRO-1/2 engine, snapshot a base every
``base_interval`` steps, and resume from the journal when the engine starts.

The lifecycle (resume, record, base, replay) and the frame layout are :mod:`ds_ext.recovery.resume`'s, shared with
megatron-core; this module wires it to the engine.

Call order (per optimizer step, from :meth:`ds_ext.engine.DsExtEngineMixin.ds_ext_after_model_step`; recovery's phase is
``JOURNAL``, the last, so it sees the step's final state): ZeRO step (the inner optimizer's pre-hook queues each
group's fp32 partition gradient frame, so writing starts while the update runs) -> other features (NoLoCo's outer
step, checkpoint-free recovery) -> :meth:`RecoveryFeature.after_optimizer_step` queues the step's commit frame and
every ``base_interval`` steps a base. A forward pre-hook makes the next forward wait until the record is written
(microseconds to milliseconds: a copy into the OS page cache), so a step whose forward has begun is never lost to a
killed process.

Resume: :meth:`RecoveryFeature.start` (collective over every rank, after all features are attached): see
:meth:`ds_ext.recovery.resume.JournalLifecycle.resume`. Ranks without a journal are rebuilt by the injected
``rebuilder`` (checkpoint-free recovery) if there is one.
"""
from __future__ import annotations

from typing import Any, Dict

import torch.distributed as dist

from ds_ext.contract import FeatureBase, Phase
from ds_ext.recovery.config import RecoveryConfig
from ds_ext.recovery.meta import export_meta, write_export_meta
from ds_ext.recovery.resume import JournalLifecycle, RecoveryError, rank_dir
from ds_ext.state.partition import ZeroPartitionState

__all__ = ["RecoveryFeature", "RecoveryError", "apply_recovery", "rank_dir"]


class RecoveryFeature(FeatureBase):
    """Journal writer and resume of one rank (see the module docstring).

    Args:
        cfg: the ``ds_ext.recovery`` section.
        engine: a ds_ext engine with a ZeRO-1/2 optimizer.
        rank: this rank's global rank.
        group: the ranks that agree on the resume step (all ranks: any of them may be rebuilt).
        rebuilder: checkpoint-free recovery (``rebuild(lost_ranks)``), or ``None``: a rank without a journal is
            then an error.
    """

    name = "recovery"
    phase = Phase.JOURNAL
    state_from_peer = False  # the journal is this rank's own disk, never a peer's

    def __init__(self, cfg: RecoveryConfig, engine, rank: int, group, rebuilder=None):
        self.cfg, self.engine, self.rank, self.rebuilder = cfg, engine, rank, rebuilder
        self.state = ZeroPartitionState(engine)
        self.journal = JournalLifecycle(cfg, self.state, rank, group, lambda: engine.global_steps,
                                        self._journaled_features)
        self.dir, self.layout = self.journal.dir, self.journal.layout
        self._hook = engine.module.register_forward_pre_hook(self._before_forward)

    @property
    def writer(self):
        return self.journal.writer

    @property
    def resumed_step(self):
        return self.journal.resumed_step

    @property
    def damage(self) -> list:
        return self.journal.damage

    def _journaled_features(self) -> Dict[str, Any]:
        return {f.name: f for f in self.engine.ds_ext_features if f is not self}

    def _before_forward(self, module, args) -> None:
        self.journal.wait_written()

    # -- contract hooks ---------------------------------------------------------------------------------------
    def start(self, engine=None) -> None:
        """Resume from the journal or begin a new one (collective over every rank)."""
        self.journal.resume(self.rebuilder)
        self._write_export_meta()

    def _write_export_meta(self) -> None:
        """``EXPORT.bin`` in the current journal directory (a journal begun anew needs its own: the exporter reads
        it from every rank's directory)."""
        write_export_meta(self.dir, export_meta(self.engine))

    def after_optimizer_step(self, engine) -> None:
        self.journal.record(engine.global_steps, applied=True)

    def after_skipped_step(self, engine) -> None:
        self.journal.record(engine.global_steps, applied=False)

    def after_load_checkpoint(self, engine) -> None:
        """A DeepSpeed checkpoint replaced the state: the old journal is moved aside and a new one begins."""
        self.journal.set_aside("replaced", "load_checkpoint")
        self._write_export_meta()
        self.journal.submit_base(engine.global_steps)

    def after_state_lost(self, engine) -> None:
        """An injected failure took this rank's state and disk (checkpoint-free recovery): the journal is moved
        aside as if gone, and the commit of this step is a base of the rebuilt state."""
        self.journal.set_aside("lost", "injected failure")
        self._write_export_meta()
        self.journal.base_at_next_record()

    def metrics(self) -> Dict[str, float]:
        return self.journal.metrics()

    def close(self) -> None:
        """Write what is queued, stop the writer, remove the forward pre-hook and the capture hook. Idempotent."""
        self.journal.close()
        self._hook.remove()


def apply_recovery(engine, cfg: RecoveryConfig, topology=None, rebuilder=None) -> RecoveryFeature:
    """The journal of a ds_ext engine, prepared but not attached; it resumes in :meth:`RecoveryFeature.start`
    (collective: all ranks, after every other feature is attached). ``rebuilder``: the checkpoint-free recovery
    feature, if on. The journal spans every rank (``topology`` is not needed)."""
    return RecoveryFeature(cfg, engine, dist.get_rank(), dist.group.WORLD, rebuilder)
