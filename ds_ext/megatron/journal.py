"""The recovery journal for megatron-core's distributed optimizer: bit-exact resume of its fp32 shards + Adam state.

The same lifecycle, files and frames as the DeepSpeed path (:class:`ds_ext.recovery.resume.JournalLifecycle`:
resume, record, base, replay; :mod:`ds_ext.recovery.journal`'s writer and scan), over megatron's state
(:class:`ds_ext.state.megatron.MegatronPartitionState`):

* per optimizer step, one gradient frame per main-param shard with its reduced, clipped fp32 gradient (captured by
  a step pre-hook on the ``DistributedOptimizer``'s inner torch optimizer: exactly what the update reads; cloned,
  because megatron's ``main_param.grad`` views the DDP grad buffer that the next ``zero_grad_buffer`` clears while
  the writer may still be writing), then the commit frame: the step state (step counter, the inner optimizer's
  hyperparameters for the next step, LR scheduler, RNG) and NoLoCo's payload (what an outer step received);
* every ``base_interval`` steps a base: the fp32 shards, the inner optimizer's per-shard state (``exp_avg``,
  ``exp_avg_sq``, ``step``), the step state and NoLoCo's ``state_dict``.

Resume (:meth:`MegatronJournal.resume`, collective over ``group``, default every rank): see
:meth:`JournalLifecycle.resume`; the replay refreshes the model params from the main params and all-gathers them
inside the data-parallel group. The result is bit-identical to a run that never stopped (tested with kill -9 on 2
processes). Checkpoint-free recovery (``ds_ext.recovery.checkpoint_free``) is not supported here and refused.

The journal is a :class:`ds_ext.contract.Feature` (phase ``JOURNAL``, last):
:class:`ds_ext.megatron.runner.MegatronRunner` starts it (resume, then a forward pre-hook that waits for the frames)
and commits every step through ``after_optimizer_step``, journaling every other feature the runner holds.
Driven by hand (:func:`journal_for`), the call order per step is::

    journal.before_forward()                     # the previous step's frames are in the OS (a kill loses nothing)
    loss.backward(); finalize_model_grads(...); optimizer.step()   # pre-hook queues the gradient frames
    scheduler.step()                             # optional; before commit (the commit reads the next step's LR)
    noloco.after_step()                          # optional
    journal.commit(step)                         # commit frame, base every base_interval steps
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ds_ext.contract import FeatureBase, Phase
from ds_ext.recovery.config import RecoveryConfig
from ds_ext.recovery.resume import JournalLifecycle
from ds_ext.state.megatron import MegatronPartitionState

log = logging.getLogger("ds_ext.megatron")


def refuse_checkpoint_free(cfg: RecoveryConfig) -> None:
    if cfg.checkpoint_free.enabled:
        raise ValueError("ds_ext.recovery.checkpoint_free.enabled is true, but checkpoint-free recovery runs on the "
                         "DeepSpeed engine only (ds_ext.initialize); megatron-core runs resume from the journal "
                         "alone. Set ds_ext.recovery.checkpoint_free.enabled to false")


class MegatronJournal(FeatureBase):
    """One rank's journal of a megatron ``DistributedOptimizer`` (or ``ChainedOptimizer`` of them).

    Args:
        optimizer: megatron's optimizer from ``get_megatron_optimizer``.
        model_chunks: the DDP-wrapped model chunks (their ``start_param_sync`` gathers params after a resume).
        cfg: the ``ds_ext.recovery`` section (``journal_dir`` set, ``checkpoint_free`` off).
        rank: this rank (default: ``dist.get_rank()``); the journal lives in ``<journal_dir>/rank<R>/``.
        scheduler: optional LR scheduler with ``state_dict``/``load_state_dict`` (megatron's
            ``OptimizerParamScheduler``), journaled with every step.
        noloco: optional :class:`ds_ext.megatron.noloco.MegatronNoLoCo` whose outer steps are journaled (through
            its ``journal_payload``/``journal_replay`` and ``state_dict``/``load_state_dict``); under a runner,
            every other feature the runner holds is journaled instead.
        group: the ranks that agree on the resume step (default: every rank).
    """

    name, phase, state_from_peer = "recovery", Phase.JOURNAL, False

    def __init__(self, optimizer, model_chunks: List[torch.nn.Module], cfg: RecoveryConfig,
                 rank: Optional[int] = None, scheduler=None, noloco=None, group=None):
        if not cfg.active:
            raise ValueError("ds_ext.recovery is off: set ds_ext.recovery.journal_dir")
        refuse_checkpoint_free(cfg)
        self.cfg, self.scheduler, self.noloco = cfg, scheduler, noloco
        self.model_chunks, self._others, self._hook = model_chunks, None, None
        self.rank = dist.get_rank() if rank is None else rank
        self.state = MegatronPartitionState(optimizer, model_chunks, scheduler)
        self.journal = JournalLifecycle(cfg, self.state, self.rank, group if group is not None else dist.group.WORLD,
                                        lambda: self.state.steps, self._features, label="recovery (megatron)")
        self.dir, self.layout = self.journal.dir, self.journal.layout

    def _features(self) -> Dict[str, Any]:
        if self._others is not None:
            return self._others
        return {"noloco": self.noloco} if self.noloco is not None else {}

    # -- the Feature contract (MegatronRunner) ---------------------------------------------------------------
    def start(self, engine) -> None:
        """Journal every other feature of ``engine`` (a runner), resume (collective), and wait for the previous
        step's frames before each forward of the first model chunk."""
        self._others = {f.name: f for f in engine.ds_ext_features if f is not self}
        self.resume()
        self._hook = self.model_chunks[0].register_forward_pre_hook(lambda module, args: self.before_forward())

    def after_optimizer_step(self, engine) -> None:
        """The contract's step hook: commit the next step (phase JOURNAL: after every other feature's hook)."""
        self.commit(self.state.steps + 1)

    @property
    def step(self) -> int:
        """Optimizer steps done (journaled or resumed)."""
        return self.state.steps

    @property
    def resumed_step(self) -> Optional[int]:
        return self.journal.resumed_step

    @property
    def writer(self):
        return self.journal.writer

    def resume(self) -> int:
        """Resume from the journal if every rank has one, else start a new one (collective). Returns the number
        of optimizer steps already done (0 on a fresh start): continue training at step ``resume() + 1``."""
        target = self.journal.resume()
        return 0 if target is None else target

    def before_forward(self) -> None:
        """Wait until every queued frame is in the OS (so a process killed after this point loses no step)."""
        self.journal.wait_written()

    def commit(self, step: int) -> None:
        """Journal optimizer step ``step`` (1-based and consecutive: ``resume() + 1`` first; call after
        ``optimizer.step()``, the LR scheduler's step and NoLoCo's ``after_step``)."""
        if step != self.state.steps + 1:
            raise ValueError(f"MegatronJournal.commit({step}): the next step to commit is {self.state.steps + 1} "
                             "(steps are 1-based and consecutive; resume() returns the steps already done)")
        self.state.steps = step
        captured = bool(self.state.captured)
        self.journal.record(step, applied=captured)

    def metrics(self) -> Dict[str, float]:
        return self.journal.metrics()

    def close(self) -> None:
        """Write everything queued, stop the writer and remove the capture and forward hooks. Idempotent."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.journal.close()


def journal_for(optimizer, model_chunks: List[torch.nn.Module], cfg: RecoveryConfig, rank: Optional[int] = None,
                scheduler=None, noloco=None, group=None) -> Optional[MegatronJournal]:
    """A :class:`MegatronJournal` resumed (or started) for ``cfg`` (collective over ``group``, default every rank),
    or ``None`` when the journal is off. After it returns, ``journal.step`` is the number of steps already done.
    Raises ``ValueError`` if ``cfg.checkpoint_free`` is on (not supported on megatron-core)."""
    refuse_checkpoint_free(cfg)
    if not cfg.active:
        return None
    j = MegatronJournal(optimizer, model_chunks, cfg, rank, scheduler, noloco, group)
    j.resume()
    return j
