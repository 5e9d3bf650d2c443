"""The recovery engine feature: journal every optimizer step, snapshot a base every ``base_interval`` steps, and
resume from the journal when the engine starts.

Call order (per optimizer step, from :meth:`ds_ext.engine.DsExtEngineMixin._take_model_step`; recovery is attached
last so it sees the step's final state): ZeRO step (the inner optimizer's pre-hook queues each group's fp32 partition gradient frame, so writing
starts while the update runs) ->
other features (NoLoCo's outer step) -> :meth:`RecoveryFeature.after_optimizer_step` queues the step's commit
frame (gradient groups, counters, next hyperparameters, loss scale, scheduler, RNG, feature payloads) to the background writer, and every
``base_interval`` steps a base. The next forward waits until the record is written (microseconds to milliseconds:
a copy into the OS page cache), so a step whose forward has begun is never lost to a killed process.

Resume (collective, at attach): each rank scans its journal (:func:`journal.scan`), the ranks agree on the newest
step all can reach (``all_reduce(MIN)`` of each rank's newest reachable step), and each rank loads its newest base
at or before that step and replays its records through ZeRO's own optimizer step. Records past the agreed step are
cut off, so the journal goes on from exactly where training resumes.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Optional, Set, Tuple

import torch
import torch.distributed as dist

from ds_ext.recovery import journal
from ds_ext.recovery.config import RecoveryConfig
from ds_ext.recovery.export import export_meta, write_export_meta
from ds_ext.recovery.zero_state import ZeroPartitionState

log = logging.getLogger("ds_ext.recovery")


class RecoveryError(RuntimeError):
    """The journal cannot be used as it is; the message names the directory and what to do. Nothing is deleted."""


def rank_dir(journal_dir: str, rank: int) -> str:
    return os.path.join(journal_dir, f"rank{rank:05d}")


class RecoveryFeature:
    """Journal writer and resume logic for one rank (see the module docstring)."""

    name = "recovery"

    def __init__(self, cfg: RecoveryConfig, engine, rank: int):
        self.cfg, self.engine, self.rank = cfg, engine, rank
        self.dir = rank_dir(cfg.journal_dir, rank)
        self.state = ZeroPartitionState(engine)
        self.layout = self.state.layout()
        self.writer: Optional[journal.JournalWriter] = None
        self.resumed_step: Optional[int] = None
        self.damage: list = []  # what the resume scan found torn or corrupt (messages), for logs and callers
        self.resume_s = 0.0
        self._base_due = False  # after a rebuild: the next commit is a base of the rebuilt state
        self._hook = engine.module.register_forward_pre_hook(self._before_forward)
        self.state.on_grad = self._write_grad

    def _write_grad(self, group: int, grad: torch.Tensor) -> None:
        # called inside ZeRO's optimizer step, before global_steps counts it: the frame belongs to the next step
        self.writer.append(self.engine.global_steps + 1, {"group": group, "grad": grad}, journal.KIND_GRAD)

    # -- per step ---------------------------------------------------------------------------------------------
    def after_optimizer_step(self, engine) -> None:
        self._record(engine, applied=True)

    def after_skipped_step(self, engine) -> None:
        self._record(engine, applied=False)

    def _record(self, engine, applied: bool) -> None:
        step = engine.global_steps
        if self._base_due:
            self.state.take_captured()
            self._journaled_payloads()
            self._base_due = False
            self._submit_base(step)
            return
        payloads = self._journaled_payloads()
        self.writer.append(step, {"applied": applied, "groups": self.state.take_captured(),
                                  "state": self.state.step_state(), "features": payloads})
        if step % self.cfg.base_interval == 0:
            self._submit_base(step)

    def _journaled_payloads(self) -> Dict[str, Any]:
        payloads = {f.name: f.journal_payload() for f in self._journaled_features()}
        return {k: v for k, v in payloads.items() if v is not None}

    def _before_forward(self, module, args) -> None:
        self.writer.wait_written()

    def _journaled_features(self):
        return [f for f in self.engine.ds_ext_features if f is not self and hasattr(f, "journal_payload")]

    def _submit_base(self, step: int) -> None:
        base = self.state.snapshot()
        # cloned: the base is written in the background while the features keep updating their tensors
        base["features"] = _clone_tensors({k: v for k, v in self.engine.ds_ext_state_dict().items() if k != self.name})
        self.writer.submit_base(step, base)
        self.writer.start_segment(step + 1)

    # -- start ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Resume from the journal or begin a new one (collective over the world)."""
        t = time.perf_counter()
        scanned = journal.scan(self.dir)
        self._check_layout(scanned)
        self.damage = [str(d) for d in scanned.damage]
        for damage in scanned.damage:
            log.warning("ds_ext::recovery rank %d: %s; that record and those after it in its segment are not used",
                        self.rank, damage)
        rebuilder = self._rebuilder()
        target, lost = agree_on_step(scanned.newest_reachable(), allow_lost=rebuilder is not None)
        self.writer = journal.JournalWriter(self.dir, self.layout, self.cfg.fsync, self.cfg.fsync_interval,
                                            self.cfg.keep_bases)
        write_export_meta(self.dir, export_meta(self.engine))
        if target is None:
            self._submit_base(self.engine.global_steps)
            return
        if self.rank not in lost:
            self._replay_to(scanned, target, refresh=not lost)
            self.writer.truncate_after(target, scanned)
        if lost:
            log.warning("ds_ext::recovery rank %d: ranks %s have no journal; survivors resume at step %d and "
                        "rebuild them without a checkpoint", self.rank, sorted(lost), target)
            rebuilder.rebuild(lost)
            if self.rank in lost:
                self._submit_base(self.engine.global_steps)
        self.resumed_step, self.resume_s = target, time.perf_counter() - t
        log.warning("ds_ext::recovery rank %d resumed at step %d from %s (%.2f s)", self.rank, target,
                    "a live rank" if self.rank in lost else self.dir, self.resume_s)

    def _rebuilder(self):
        return next((f for f in self.engine.ds_ext_features if f.name == "checkpoint_free"), None)

    def _check_layout(self, scanned: journal.JournalScan) -> None:
        if scanned.layout is None:
            return
        if not self.cfg.resume:
            raise RecoveryError(f"ds_ext.recovery.resume is false but {self.dir} holds a journal: move it away or "
                                "set resume to true")
        if scanned.layout != self.layout:
            raise RecoveryError(f"the journal in {self.dir} was written by a different layout {scanned.layout}; "
                                f"this run has {self.layout}. Use another ds_ext.recovery.journal_dir, or export "
                                "it first with python -m ds_ext.recovery export")

    def _replay_to(self, scanned: journal.JournalScan, target: int, refresh: bool = True) -> None:
        features = {f.name: f for f in self._journaled_features()}
        replay_journal(self.state, scanned, target, features, self.engine.ds_ext_load_state_dict, refresh)

    # -- other engine events ------------------------------------------------------------------------------------
    def after_load_checkpoint(self, engine) -> None:
        """A DeepSpeed checkpoint replaced the state: the old journal is moved aside and a new one begins."""
        self._set_journal_aside("replaced", "load_checkpoint")
        self._submit_base(engine.global_steps)

    def after_state_lost(self, engine) -> None:
        """An injected failure took this rank's state and disk (checkpoint-free recovery): the journal is moved
        aside as if gone, and the commit of this step is a base of the rebuilt state."""
        self._set_journal_aside("lost", "injected failure")
        self._base_due = True

    def _set_journal_aside(self, suffix: str, why: str) -> None:
        self.writer.close()
        aside = f"{self.dir}.{suffix}.{time.time_ns()}"
        os.replace(self.dir, aside)
        log.warning("ds_ext::recovery rank %d: %s: journal moved to %s", self.rank, why, aside)
        self.writer = journal.JournalWriter(self.dir, self.layout, self.cfg.fsync, self.cfg.fsync_interval,
                                            self.cfg.keep_bases)

    def metrics(self) -> Dict[str, float]:
        s = self.writer.stats
        steps = max(1, s.records)
        return {"records": s.records, "bytes_per_step": s.record_bytes / steps, "record_write_s": s.record_write_s,
                "fsync_s": s.fsync_s, "bases": s.bases, "base_bytes": s.base_bytes, "base_write_s": s.base_write_s,
                "wait_s": s.wait_s, "resumed_step": -1 if self.resumed_step is None else self.resumed_step,
                "resume_s": self.resume_s}

    def close(self) -> None:
        self.writer.close()
        self._hook.remove()
        self.state.close()


def _clone_tensors(tree):
    if torch.is_tensor(tree):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone_tensors(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_clone_tensors(v) for v in tree]
    return tree


def replay_journal(state: ZeroPartitionState, scanned: journal.JournalScan, target: int,
                   features: Optional[Dict[str, Any]] = None, load_feature_states=None, refresh: bool = True) -> None:
    """Load the newest base at or before ``target`` into ``state`` (and the features' states of that base through
    ``load_feature_states``), then replay the records up to ``target`` (collective inside the ZeRO group: the
    low-precision params are gathered at the end). Feature payloads go to ``features[name].journal_replay``."""
    base_step, steps = scanned.plan(target)
    base = scanned.load_base(base_step).state
    state.restore(base)
    if load_feature_states is not None:
        load_feature_states(base["features"])
    for step in steps:
        rec = scanned.load_record(step).state
        if rec["applied"]:
            state.replay(rec["grads"])
        for name, payload in rec["features"].items():
            if features is None or name not in features:
                raise RecoveryError(f"{scanned.rank_dir}: step {step} holds {name!r} data, which this run cannot "
                                    "replay (is that feature on?)")
            features[name].journal_replay(payload)
        state.restore_step_state(rec["state"])
    if refresh:  # else the caller refreshes later, together with ranks that are rebuilt
        state.refresh_low_precision()
    log.info("ds_ext::recovery %s: base %d + %d records", scanned.rank_dir, base_step, len(steps))


def agree_on_step(newest: int, allow_lost: bool = False) -> Tuple[Optional[int], Set[int]]:
    """The newest step every rank with a journal can reach (``None``: no rank has one) and the ranks without a
    journal. Those are an error unless ``allow_lost`` (checkpoint-free recovery rebuilds them from live ranks)."""
    steps = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(steps, torch.tensor([newest], dtype=torch.int64))
    steps = [int(s) for s in steps]
    reached = [s for s in steps if s >= 0]
    if not reached:
        return None, set()
    lost = {r for r, s in enumerate(steps) if s < 0}
    if lost and not allow_lost:
        raise RecoveryError(f"rank {dist.get_rank()}: ranks {sorted(lost)} have no usable journal while others "
                            f"reach step {max(reached)}; a rank's partition cannot be rebuilt from its own disk "
                            "(was a node replaced?). Restore those ranks' journal directories, start from a "
                            "checkpoint, or turn on ds_ext.recovery.checkpoint_free")
    return min(reached), lost


def apply_recovery(engine, cfg: RecoveryConfig) -> RecoveryFeature:
    """Attach the journal to a ds_ext engine and resume from it if present (collective: all ranks, after every
    other feature is attached)."""
    feature = RecoveryFeature(cfg, engine, dist.get_rank())
    engine.attach_feature(feature)
    feature.start()
    return feature
