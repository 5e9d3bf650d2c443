"""The recovery journal for megatron-core's distributed optimizer: bit-exact resume of its fp32 shards + Adam state.

Same files, frames and protocol as the DeepSpeed path (:mod:`ds_ext.recovery.journal`: ``JournalWriter``, ``scan``,
checksummed frames, atomic manifest, background writers), with megatron's state in place of ZeRO's:

* per optimizer step, one gradient frame with the reduced, clipped fp32 gradient of this rank's main-param shards
  (captured by a step pre-hook on the ``DistributedOptimizer``'s inner torch optimizer: exactly what the update
  reads; cloned, because megatron's ``main_param.grad`` views the DDP grad buffer that the next
  ``zero_grad_buffer`` clears while the writer may still be writing), then a commit frame with the inner
  optimizer's hyperparameters of that step, the RNG states, the LR scheduler's state and what a NoLoCo outer step
  received (:meth:`ds_ext.noloco.feature.NoLoCoFeature.journal_payload`);
* every ``base_interval`` steps a base: the fp32 shards, the inner optimizer's per-shard state (``exp_avg``,
  ``exp_avg_sq``, ``step``), the NoLoCo state and the commit fields.

Resume (:meth:`MegatronJournal.resume`, collective over the world): every rank scans its journal, the ranks agree on
the newest step all of them reach (:func:`ds_ext.recovery.feature.agree_on_step`), each loads its newest base at or
before it and replays the records through the same inner optimizer (and NoLoCo's outer step from its payload), then
the model params are refreshed from the main params and all-gathered inside the data-parallel group. The result is
bit-identical to a run that never stopped (tested with kill -9 on 2 processes).

Call order per step (the example does this)::

    journal.before_forward()                     # the previous step's frames are in the OS (a kill loses nothing)
    loss.backward(); finalize_model_grads(...); optimizer.step()   # pre-hook queues the gradient frame
    noloco.after_step()                          # optional
    journal.commit(step)                         # commit frame, base every base_interval steps
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from ds_ext.megatron.noloco import MegatronShards
from ds_ext.recovery import journal
from ds_ext.recovery.config import RecoveryConfig
from ds_ext.recovery.feature import RecoveryError, agree_on_step, rank_dir
from ds_ext.recovery.zero_state import _hyper, rng_state, set_rng_state

log = logging.getLogger("ds_ext.megatron")


def _clone(tree):
    if torch.is_tensor(tree):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_clone(v) for v in tree]
    return tree


class MegatronJournal:
    """One rank's journal of a megatron ``DistributedOptimizer`` (or ``ChainedOptimizer`` of them).

    Args:
        optimizer: megatron's optimizer from ``get_megatron_optimizer``.
        model_chunks: the DDP-wrapped model chunks (their ``start_param_sync`` gathers params after a resume).
        cfg: the ``ds_ext.recovery`` section (``journal_dir`` set).
        rank: this rank (default: ``dist.get_rank()``); the journal lives in ``<journal_dir>/rank<R>/``.
        scheduler: optional LR scheduler with ``state_dict``/``load_state_dict`` (megatron's
            ``OptimizerParamScheduler``), journaled with every step.
        noloco: optional :class:`ds_ext.megatron.noloco.MegatronNoLoCo` whose outer steps are journaled.
    """

    def __init__(self, optimizer, model_chunks: List[torch.nn.Module], cfg: RecoveryConfig,
                 rank: Optional[int] = None, scheduler=None, noloco=None):
        if not cfg.active:
            raise ValueError("ds_ext.recovery is off: set ds_ext.recovery.journal_dir")
        self.cfg, self.scheduler, self.noloco = cfg, scheduler, noloco
        self.rank = dist.get_rank() if rank is None else rank
        self.dir = rank_dir(cfg.journal_dir, self.rank)
        self.shards = MegatronShards(optimizer, model_chunks)
        self.inner = [o.optimizer for o in self.shards.optimizers]
        self.layout = {"kind": "megatron_distributed_optimizer", "shard_numel": [t.numel() for t in self.shards.tensors],
                       "optimizer": [type(o).__name__ for o in self.inner],
                       "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        self.writer: Optional[journal.JournalWriter] = None
        self.step = 0
        self.resumed_step: Optional[int] = None
        self._grads: Dict[int, torch.Tensor] = {}
        self._hyper: List[Dict[str, Any]] = []
        self._capturing = True
        self._index = {id(t): i for i, t in enumerate(self.shards.tensors)}
        self._hooks = [o.register_step_pre_hook(self._capture) for o in self.inner]

    # -- capture ----------------------------------------------------------------------------------------------
    def _capture(self, optimizer, args, kwargs) -> None:
        if not self._capturing:
            return
        self._hyper.extend(_hyper(g) for g in optimizer.param_groups)
        for group in optimizer.param_groups:
            for p in group["params"]:
                i = self._index.get(id(p))
                if i is not None and p.grad is not None:
                    self._grads[i] = p.grad.detach().clone()

    def before_forward(self) -> None:
        """Wait until every queued frame is in the OS (so a process killed after this point loses no step)."""
        self.writer.wait_written()

    def commit(self, step: int) -> None:
        """Journal optimizer step ``step`` (1-based; call after ``optimizer.step()`` and NoLoCo's ``after_step``)."""
        grads, hyper = self._grads, self._hyper
        self._grads, self._hyper = {}, []
        applied = len(grads) == len(self.shards.tensors)
        if applied:
            self.writer.append(step, {"group": 0, "grad": [grads[i] for i in range(len(grads))]}, journal.KIND_GRAD)
        payload = self.noloco.feature.journal_payload() if self.noloco is not None else None
        self.writer.append(step, {"groups": [0] if applied else [], "applied": applied, "noloco": payload,
                                  **self._step_state(hyper)})
        self.step = step
        if step % self.cfg.base_interval == 0:
            self._submit_base(step)

    def _step_state(self, hyper: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {"hyper": hyper, "rng": rng_state(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def _submit_base(self, step: int) -> None:
        base = {"fp32": [t.detach().clone() for t in self.shards.tensors],
                "optim": [_clone(self._state_of(t)) for t in self.shards.tensors],
                "noloco_state": _clone(self.noloco.state_dict()) if self.noloco is not None else None,
                **self._step_state([_hyper(g) for o in self.inner for g in o.param_groups])}
        self.writer.submit_base(step, base)
        self.writer.start_segment(step + 1)

    def _state_of(self, t: torch.Tensor) -> Dict[str, Any]:
        for o in self.inner:
            if t in o.state:
                return dict(o.state[t])
        return {}

    # -- resume -----------------------------------------------------------------------------------------------
    def resume(self) -> int:
        """Resume from the journal if every rank has one, else start a new one (collective). Returns the number
        of optimizer steps already done (0 on a fresh start): continue training at step ``resume() + 1``."""
        scanned = journal.scan(self.dir)
        if scanned.layout is not None and scanned.layout != self.layout:
            raise RecoveryError(f"the journal in {self.dir} was written by another layout {scanned.layout}; this "
                                f"run has {self.layout}. Use another ds_ext.recovery.journal_dir")
        if scanned.layout is not None and not self.cfg.resume:
            raise RecoveryError(f"ds_ext.recovery.resume is false but {self.dir} holds a journal")
        for damage in scanned.damage:
            log.warning("ds_ext::recovery (megatron) rank %d: %s; not used", self.rank, damage)
        target, _ = agree_on_step(scanned.newest_reachable())
        self.writer = journal.JournalWriter(self.dir, self.layout, self.cfg.fsync, self.cfg.fsync_interval,
                                            self.cfg.keep_bases)
        if target is None:
            self._submit_base(0)
            return 0
        self._replay(scanned, target)
        self.writer.truncate_after(target, scanned)
        self.step = self.resumed_step = target
        log.warning("ds_ext::recovery (megatron) rank %d resumed at step %d from %s", self.rank, target, self.dir)
        return target

    def _replay(self, scanned: journal.JournalScan, target: int) -> None:
        base_step, steps = scanned.plan(target)
        state = scanned.load_base(base_step).state
        for t, saved, optim in zip(self.shards.tensors, state["fp32"], state["optim"]):
            t.data.copy_(saved)
            for o in self.inner:
                o.state.pop(t, None)
            if optim:
                owner = next(o for o in self.inner if any(t is p for g in o.param_groups for p in g["params"]))
                owner.state[t] = _clone(optim)
        if self.noloco is not None and state["noloco_state"] is not None:
            self.noloco.load_state_dict(state["noloco_state"])
        last = state
        self._capturing = False
        try:
            for step in steps:
                last = scanned.load_record(step).state
                if last["applied"]:
                    self._replay_update(last["hyper"], last["grads"]["0"])
                if self.noloco is not None:
                    self.noloco.steps = step
                    if last["noloco"] is not None:
                        self.noloco.feature.journal_replay(last["noloco"])
        finally:
            self._capturing = True
        set_rng_state(last["rng"])
        if self.scheduler is not None and last["scheduler"] is not None:
            self.scheduler.load_state_dict(last["scheduler"])
        self.shards.write(self.shards.read())  # model params from the main params, gathered in the DP group

    def _replay_update(self, hyper: List[Dict[str, Any]], grads: List[torch.Tensor]) -> None:
        groups = [g for o in self.inner for g in o.param_groups]
        for group, h in zip(groups, hyper):
            group.update({k: (tuple(v) if isinstance(group.get(k), tuple) else v) for k, v in h.items()})
        for t, g in zip(self.shards.tensors, grads):
            t.grad = g
        for o in self.inner:
            o.step()
        for t in self.shards.tensors:
            t.grad = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for h in self._hooks:
            h.remove()


def journal_for(optimizer, model_chunks: List[torch.nn.Module], cfg: RecoveryConfig, rank: Optional[int] = None,
                scheduler=None, noloco=None) -> Optional[MegatronJournal]:
    """A :class:`MegatronJournal` resumed (or started) for ``cfg`` (collective), or ``None`` when the journal is
    off. After it returns, ``journal.step`` is the number of steps already done."""
    if not cfg.active:
        return None
    j = MegatronJournal(optimizer, model_chunks, cfg, rank, scheduler, noloco)
    j.resume()
    return j
