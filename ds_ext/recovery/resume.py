"""The journal's lifecycle, the same for the DeepSpeed engine feature (:mod:`ds_ext.recovery.feature`) and for
megatron-core (:mod:`ds_ext.megatron.journal`): resume, record, base, replay.

A :class:`JournalLifecycle` drives one rank's journal over a :class:`~ds_ext.state.partition.JournaledState` (the
rank's master tensors, their optimizer state and the step state) and the journaled features (each with
``journal_payload()`` / ``journal_replay(p)`` and ``state_dict()`` / ``load_state_dict(sd)``).

Frames of one step (format :data:`ds_ext.recovery.records.VERSION` 2), written by the background writer:

* one gradient frame per stepped master tensor, ``KIND_GRAD``: ``{"group": index, "grad": tensor}``, queued from
  inside the optimizer step by the state's capture hook;
* the commit frame, ``KIND_STEP``: ``{"applied": bool, "groups": [indices of the gradient frames],
  "state": step_state() = {"counters", "hyper", "scaler", "lr_scheduler", "rng"}, "features": {name: payload}}``;
* every ``base_interval`` steps a base, ``KIND_BASE``: ``snapshot() = {"fp32", "optim", <step state>}`` plus
  ``"features": {name: state_dict()}``.

Resume (:meth:`JournalLifecycle.resume`, collective over ``group``): scan this rank's journal (refusing another
format version), refuse it if ``resume`` is off or its layout differs, log its damage, agree with every rank of the
group on the newest step all can reach (:func:`agree_on_step`), start a new writer, then either write a base of the
current state (no journal anywhere) or load the newest base at or before that step and replay the records after it
(:func:`replay_journal`), and cut off what lies past it (``truncate_after``). With a ``rebuilder`` (checkpoint-free
recovery) ranks without a journal are rebuilt from live ranks instead of being an error.

Per step (:meth:`JournalLifecycle.record`, after every other feature's step hook): the commit frame, and every
``base_interval`` steps a base. The next forward waits (:meth:`JournalLifecycle.wait_written`) until the step's
frames are in the OS, so a step whose forward has begun is never lost to a killed process.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, Optional, Set, Tuple

import torch
import torch.distributed as dist

from ds_ext.recovery import journal
from ds_ext.recovery.config import RecoveryConfig
from ds_ext.recovery.journal import RecoveryError, rank_dir
from ds_ext.state.partition import JournaledState
from ds_ext.state.tree import clone_tree

log = logging.getLogger("ds_ext.recovery")

__all__ = ["JournalLifecycle", "RecoveryError", "agree_on_step", "rank_dir", "replay_journal"]


def replay_journal(state: JournaledState, scanned: journal.JournalScan, target: int,
                   features: Optional[Dict[str, Any]] = None, refresh: bool = True,
                   cannot_replay: str = "is that feature on?") -> None:
    """Load the newest base at or before ``target`` into ``state`` (and the base's feature states into
    ``features[name].load_state_dict``), then replay the records up to ``target`` in step order: the gradients
    through ``state.replay``, each feature payload through ``features[name].journal_replay``, then the step state.
    ``refresh``: refresh the model's params from the master tensors at the end (collective); else the caller does,
    together with ranks that are rebuilt. ``cannot_replay``: what the error for a payload of a feature not in
    ``features`` tells the user to do."""
    features = features or {}
    base_step, steps = scanned.plan(target)
    base = scanned.load_base(base_step).state
    state.restore(base)
    for name, sd in base.get("features", {}).items():
        if name in features:
            features[name].load_state_dict(sd)
    for step in steps:
        rec = scanned.load_record(step).state
        if rec["applied"]:
            state.replay(rec["grads"])
        for name, payload in rec["features"].items():
            if name not in features:
                raise RecoveryError(f"{scanned.rank_dir}: step {step} holds {name!r} data, which this run cannot "
                                    f"replay ({cannot_replay})")
            features[name].journal_replay(payload)
        state.restore_step_state(rec["state"])
    if refresh:
        state.refresh()
    log.info("ds_ext::recovery %s: base %d + %d records", scanned.rank_dir, base_step, len(steps))


def agree_on_step(newest: int, group, allow_lost: bool = False) -> Tuple[Optional[int], Set[int]]:
    """The newest step every rank of ``group`` with a journal can reach (``None``: no rank has one) and the global
    ranks without a journal (collective over ``group``: an all-gather of each rank's ``newest``, -1 for none).
    Ranks without a journal are an error unless ``allow_lost`` (checkpoint-free recovery rebuilds them)."""
    ranks = dist.get_process_group_ranks(group)
    steps = [torch.zeros(1, dtype=torch.int64) for _ in ranks]
    dist.all_gather(steps, torch.tensor([newest], dtype=torch.int64), group=group)
    steps = [int(s) for s in steps]
    reached = [s for s in steps if s >= 0]
    if not reached:
        return None, set()
    lost = {r for r, s in zip(ranks, steps) if s < 0}
    if lost and not allow_lost:
        raise RecoveryError(f"rank {dist.get_rank()}: ranks {sorted(lost)} have no usable journal while others "
                            f"reach step {max(reached)}; a rank's partition cannot be rebuilt from its own disk "
                            "(was a node replaced?). Restore those ranks' journal directories, start from a "
                            "checkpoint, or turn on ds_ext.recovery.checkpoint_free")
    return min(reached), lost


class JournalLifecycle:
    """One rank's journal (see the module docstring).

    Args:
        cfg: the ``ds_ext.recovery`` section.
        state: this rank's journaled state; its gradient capture is started here.
        rank: this rank's global rank (the journal lives in ``<journal_dir>/rank<R>/``).
        group: the process group whose ranks agree on the resume step (every rank that journals).
        steps_done: optimizer steps done so far (the engine's ``global_steps``); a step's gradient frames belong
            to step ``steps_done() + 1``.
        features: the journaled features by name, asked at each use (features may be attached later).
        label: names the journal in log lines.
    """

    def __init__(self, cfg: RecoveryConfig, state: JournaledState, rank: int, group, steps_done: Callable[[], int],
                 features: Callable[[], Dict[str, Any]], label: str = "recovery"):
        self.cfg, self.state, self.rank, self.group = cfg, state, rank, group
        self.steps_done, self.features, self.label = steps_done, features, label
        self.dir = rank_dir(cfg.journal_dir, rank)
        self.layout = state.layout()
        self.writer: Optional[journal.JournalWriter] = None
        self.resumed_step: Optional[int] = None
        self.damage: list = []  # what the resume scan found torn or corrupt (messages), for logs and callers
        self.resume_s = 0.0
        self._base_due = False  # after a rebuild: the next commit is a base of the rebuilt state
        self._closed = False
        state.capture(self._write_grad)

    def _write_grad(self, group: int, grad: torch.Tensor) -> None:
        # called inside the optimizer step, before the step is counted: the frame belongs to the next step
        self.writer.append(self.steps_done() + 1, {"group": group, "grad": grad}, journal.KIND_GRAD)

    def _new_writer(self) -> journal.JournalWriter:
        return journal.JournalWriter(self.dir, self.layout, self.cfg.fsync, self.cfg.fsync_interval,
                                     self.cfg.keep_bases)

    # -- resume -----------------------------------------------------------------------------------------------
    def resume(self, rebuilder=None) -> Optional[int]:
        """Resume from the journal or begin a new one (collective over ``group``; see the module docstring).
        ``rebuilder``: an object with ``rebuild(lost_ranks)`` (collective) for ranks without a journal. Returns
        the step resumed at, ``None`` on a fresh start."""
        t = time.perf_counter()
        scanned = journal.scan(self.dir)
        self._check(scanned)
        self.damage = [str(d) for d in scanned.damage]
        for damage in scanned.damage:
            log.warning("ds_ext::%s rank %d: %s; that record and those after it in its segment are not used",
                        self.label, self.rank, damage)
        target, lost = agree_on_step(scanned.newest_reachable(), self.group, allow_lost=rebuilder is not None)
        self.writer = self._new_writer()
        if target is None:
            self.submit_base(self.steps_done())
            return None
        if self.rank not in lost:
            replay_journal(self.state, scanned, target, self.features(), refresh=not lost)
            self.writer.truncate_after(target, scanned)
        if lost:
            log.warning("ds_ext::%s rank %d: ranks %s have no journal; survivors resume at step %d and rebuild "
                        "them without a checkpoint", self.label, self.rank, sorted(lost), target)
            rebuilder.rebuild(lost)
            if self.rank in lost:
                self.submit_base(self.steps_done())
        self.resumed_step, self.resume_s = target, time.perf_counter() - t
        log.warning("ds_ext::%s rank %d resumed at step %d from %s (%.2f s)", self.label, self.rank, target,
                    "a live rank" if self.rank in lost else self.dir, self.resume_s)
        return target

    def _check(self, scanned: journal.JournalScan) -> None:
        if scanned.layout is None:
            return
        if not self.cfg.resume:
            raise RecoveryError(f"ds_ext.recovery.resume is false but {self.dir} holds a journal: move it away or "
                                "set resume to true")
        if scanned.layout != self.layout:
            raise RecoveryError(f"the journal in {self.dir} was written by a different layout {scanned.layout}; "
                                f"this run has {self.layout}. Use another ds_ext.recovery.journal_dir (a DeepSpeed "
                                "ZeRO journal can be exported first with python -m ds_ext.recovery export)")

    # -- per step ---------------------------------------------------------------------------------------------
    def wait_written(self) -> None:
        """Block until every queued frame is in the OS (before a forward: a kill after it loses no step)."""
        if self.writer is not None:
            self.writer.wait_written()

    def record(self, step: int, applied: bool) -> None:
        """Queue step ``step``'s commit frame (after the step's gradient frames), and a base when one is due."""
        if self._base_due:
            self.state.take_captured()
            self._payloads()
            self._base_due = False
            self.submit_base(step)
            return
        payloads = self._payloads()
        self.writer.append(step, {"applied": applied, "groups": self.state.take_captured(),
                                  "state": self.state.step_state(), "features": payloads})
        if step % self.cfg.base_interval == 0:
            self.submit_base(step)

    def _payloads(self) -> Dict[str, Any]:
        payloads = {name: f.journal_payload() for name, f in self.features().items()}
        return {k: v for k, v in payloads.items() if v is not None}

    def submit_base(self, step: int) -> None:
        """A base of the current state at ``step``, written in the background; records after it start a segment."""
        base = self.state.snapshot()
        # cloned: the base is written in the background while the features keep updating their tensors
        base["features"] = clone_tree({name: f.state_dict() for name, f in self.features().items()})
        self.writer.submit_base(step, base)
        self.writer.start_segment(step + 1)

    # -- other events -----------------------------------------------------------------------------------------
    def set_aside(self, suffix: str, why: str) -> None:
        """Move this rank's journal to ``<dir>.<suffix>.<ns>`` and begin a new, empty one (the state it journaled
        was replaced: a checkpoint was loaded, or the rank lost its state and disk)."""
        self.writer.close()
        aside = f"{self.dir}.{suffix}.{time.time_ns()}"
        os.replace(self.dir, aside)
        log.warning("ds_ext::%s rank %d: %s: journal moved to %s", self.label, self.rank, why, aside)
        self.writer = self._new_writer()

    def base_at_next_record(self) -> None:
        """The next :meth:`record` writes a base of the (rebuilt) state instead of a step."""
        self._base_due = True

    def metrics(self) -> Dict[str, float]:
        s = self.writer.stats if self.writer is not None else journal.WriterStats()
        steps = max(1, s.records)
        return {"records": s.records, "bytes_per_step": s.record_bytes / steps, "record_write_s": s.record_write_s,
                "fsync_s": s.fsync_s, "bases": s.bases, "base_bytes": s.base_bytes, "base_write_s": s.base_write_s,
                "wait_s": s.wait_s, "resumed_step": -1 if self.resumed_step is None else self.resumed_step,
                "resume_s": self.resume_s}

    def close(self) -> None:
        """Write everything queued, stop the writer and the gradient capture. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.writer is not None:
            self.writer.close()
        self.state.close()
