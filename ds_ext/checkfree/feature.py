"""The checkpoint-free recovery engine feature: per-stage gradient norms, (de)embedding replicas, failure injection,
and the collective rebuild of lost ranks.

Call order per optimizer step (phase ``REBUILD``: after NoLoCo, before the journal): the inner optimizer's step
pre-hook adds this rank's squared gradient partition to the stage's norm and, on a rebuilt stage, scales the
learning rate by ``lr_scale`` for that step (post-hook restores it) -> :meth:`CheckFreeFeature.after_optimizer_step`:
the stage norm is reduced over the stage's data-parallel group, every ``replicate_ends_interval`` steps the end
stages send their non-layer parameters to their neighbour, then injected failures happen and are rebuilt -> the
journal records the step (a rebuilt rank's journal starts over from a base of its new state).

:meth:`rebuild` is collective over ``group`` (every rank: a lost rank may be anywhere): every rank computes the
same plan (:func:`ds_ext.checkfree.rules.plan_rebuilds`), sources send point to point on ``group``, lost ranks
apply, then every ZeRO group refreshes its low-precision params. It is also the journal's ``rebuilder`` when some
ranks' journals are gone at resume (:func:`ds_ext.recovery.feature.apply_recovery` gets it injected). A rank that
lost its state tells the other features through ``engine.ds_ext_notify("after_state_lost")`` (the journal then
starts over from a base of the rebuilt state).

Contract: :func:`apply_checkfree` prepares the feature (optimizer hooks) without attaching it; :meth:`start`
(collective, after all features are attached) sends the first end-stage replicas; :meth:`close` removes the hooks.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Optional, Set

import torch
import torch.distributed as dist

from ds_ext import _deepspeed as ds
from ds_ext.checkfree.config import CheckpointFreeConfig
from ds_ext.checkfree.rank_state import RankState, recv_obj, repeated_layer_class, send_obj, wait_all
from ds_ext.checkfree.rules import NEIGHBOURS, PARTNER, PEER, Rebuild, failures_at, neighbour_average, plan_rebuilds
from ds_ext.config.base import DsExtConfigError
from ds_ext.contract import ExportRule, FeatureBase, Phase
from ds_ext.pipeline.paths import MIN_SWAP_STAGES
from ds_ext.pipeline.schedule import SwapEndStagesSchedule, build_group

log = logging.getLogger("ds_ext.checkfree")


class LrScaling:
    """``lr_scale`` x the scheduled learning rate for the steps of a stage rebuilt from its neighbours (``scaled``),
    applied by a step pre-hook on the inner optimizer and undone by its post-hook. The live feature and the
    exporter's replay (:meth:`CheckFreeFeature.export_replayer`) use the same hooks, so a replayed step of a rebuilt
    stage uses exactly the learning rate the training step used."""

    def __init__(self, inner, lr_scale: float):
        self.lr_scale, self.scaled = lr_scale, False
        self._saved_lr: list = []
        self._hooks = [inner.register_step_pre_hook(self._pre_step), inner.register_step_post_hook(self._post_step)]

    def _pre_step(self, optimizer, args, kwargs) -> None:
        self._saved_lr = [g["lr"] for g in optimizer.param_groups]
        if self.scaled:
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * self.lr_scale

    def _post_step(self, optimizer, args, kwargs) -> None:
        for g, lr in zip(optimizer.param_groups, self._saved_lr):
            g["lr"] = lr

    # the replay-only interface of the exporter: a journal base's state_dict and each step's payload
    def journal_replay(self, payload: dict) -> None:
        self.scaled = bool(payload["lr_scaled"])

    def load_state_dict(self, sd: dict) -> None:
        self.scaled = bool(sd["lr_scaled"])

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class CheckFreeFeature(FeatureBase):
    """One rank's part of checkpoint-free recovery (see the module docstring). ``group``: the process group the
    rebuilds and replicas travel on (every rank)."""

    name = "checkpoint_free"
    phase = Phase.REBUILD
    state_from_peer = False  # a peer copy carries this feature's state in its own payload ("checkpoint_free")
    # Replayed at export: a stage rebuilt from its neighbours trains at lr_scale x the learning rate (lr_scaled in
    # the payload), which the replayed steps must apply too. The rest (stage gradient norm, end-stage replicas)
    # does not change the weights: the rebuilt weights themselves are in the rebuilt rank's new journal base.
    journal_export = ExportRule.REPLAY

    def __init__(self, cfg: CheckpointFreeConfig, engine, topology, rank: int, group):
        self.cfg, self.engine, self.topology, self.rank, self.group = cfg, engine, topology, rank, group
        self.replica, self.stage, self.data = topology.coords(rank)
        self.pipelined = topology.pipeline_stages > 1
        self.state = RankState(engine, cfg.layer_class if self.pipelined else None)
        self.grad_norm, self._sq = 0.0, 0.0
        self.lr = LrScaling(self.state.inner, cfg.lr_scale)
        self.end_replicas: Dict[str, torch.Tensor] = {}  # neighbouring end stages' non-layer params (CheckFree+)
        self.counters = {"failures": 0, PEER: 0, NEIGHBOURS: 0, PARTNER: 0, "rebuild_s": 0.0}
        self._journal: Optional[dict] = None
        self._hooks = [self.state.inner.register_step_pre_hook(self._pre_step)]
        self.schedule: Optional[SwapEndStagesSchedule] = None  # CheckFree+ (swap_end_stages), set by apply_checkfree

    @property
    def lr_scaled(self) -> bool:
        return self.lr.scaled

    @lr_scaled.setter
    def lr_scaled(self, value: bool) -> None:
        self.lr.scaled = value

    # -- optimizer hooks ---------------------------------------------------------------------------------------
    def _pre_step(self, optimizer, args, kwargs) -> None:
        if self.pipelined:  # only a neighbour rebuild reads the stage norm
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self._sq += float(sum(g.double().pow(2).sum() for g in grads)) if grads else 0.0

    # -- per step ----------------------------------------------------------------------------------------------
    def after_optimizer_step(self, engine) -> None:
        step = engine.global_steps
        replicated = None
        if self.pipelined:
            self._reduce_grad_norm(engine)
            if step % self.cfg.replicate_ends_interval == 0:
                replicated = self.replicate_ends()
        self._journal = {"grad_norm": self.grad_norm, "lr_scaled": self.lr_scaled, "end_replicas": replicated}
        inject = self.cfg.inject
        victims = failures_at(step, inject.at, inject.stage_failure_rate_per_hour, inject.nominal_step_time_s,
                              inject.seed, self.topology)
        if victims:
            self.fail_and_rebuild(victims)

    def after_skipped_step(self, engine) -> None:
        self._sq = 0.0

    def _reduce_grad_norm(self, engine) -> None:
        sq = torch.tensor([self._sq], dtype=torch.float64)
        group = ds.engine_data_parallel_group(engine)
        if self.topology.data_parallel_size > 1:
            dist.all_reduce(sq, group=group)
        self.grad_norm, self._sq = float(sq.sqrt()), 0.0

    def replicate_ends(self) -> Dict[str, torch.Tensor]:
        """CheckFree+: the first and last stage send their non-layer params to their one neighbour (p2p inside
        the replica). Returns what this rank received (empty if nothing)."""
        last = self.topology.pipeline_stages - 1
        targets = {0: 1, last: last - 1}
        handles = []
        if self.stage in targets:
            handles += send_obj(self.state.end_state(), self._rank_at(targets[self.stage]), self.group)
        received = {}
        for src_stage, dst_stage in targets.items():
            if dst_stage == self.stage:
                received.update(recv_obj(self._rank_at(src_stage), self.group))
        wait_all(handles)
        self.end_replicas.update(received)
        return received

    def _rank_at(self, stage: int) -> int:
        return self.topology.rank_of(self.replica, stage, self.data)

    # -- failures and rebuilds ---------------------------------------------------------------------------------
    def fail_and_rebuild(self, victims: Set[int]) -> None:
        """Injected failure (collective): the victims lose their memory and disk, then everyone rebuilds them."""
        self.counters["failures"] += 1
        log.warning("ds_ext::checkpoint_free step %d: ranks %s fail (state and local disk lost)",
                    self.engine.global_steps, sorted(victims))
        if self.rank in victims:
            self.state.wipe()
            self.grad_norm, self.lr_scaled, self.end_replicas = 0.0, False, {}
            self.engine.ds_ext_notify("after_state_lost")
        self.rebuild(victims)

    def rebuild(self, lost: Set[int]) -> Rebuild:
        """Rebuild the ``lost`` ranks from live ones (collective over ``group``; see the module docstring)."""
        t = time.perf_counter()
        # A survivor resuming from its journal has replayed into its master partitions only (the journal leaves the
        # refresh to this rebuild): bring the module's params up to date before they are sent (collective per
        # ZeRO group, like the refresh below).
        self.state.refresh()
        plans = plan_rebuilds(self.topology, set(lost), shards_identical_in_replica=self.state.zero is None,
                              swap_end_stages=self.cfg.swap_end_stages)
        handles = []
        for plan in plans:
            if self.rank in plan.sources:
                handles += send_obj(self._payload(plan), plan.rank, self.group)
        mine = next((p for p in plans if p.rank == self.rank), None)
        if mine is not None:
            self._apply(mine, [recv_obj(src, self.group) for src in mine.sources])
        wait_all(handles)
        self.state.refresh()
        elapsed = time.perf_counter() - t
        self.counters["rebuild_s"] += elapsed
        for plan in plans:
            log.warning("ds_ext::checkpoint_free rank %d rebuilt by %s from rank(s) %s in %.2f s", plan.rank,
                        plan.kind, list(plan.sources), elapsed)
        return mine

    def _payload(self, plan: Rebuild) -> dict:
        if plan.kind == PEER:
            return {**self.state.snapshot(), "checkpoint_free": self.state_dict()}
        payload = {"body": self.state.body_state(), "grad_norm": self.grad_norm, "step": self.state.step_state(),
                   "own_ends": self.state.end_state() if self._is_end_stage() else {}}
        if plan.kind == PARTNER:
            payload["ends"] = self.end_replicas
        return payload

    def _is_end_stage(self) -> bool:
        return self.pipelined and self.stage in (0, self.topology.pipeline_stages - 1)

    def _apply(self, plan: Rebuild, payloads: list) -> None:
        self.counters[plan.kind] += 1
        if plan.kind == PEER:
            counters = dict(self.counters)
            self.state.restore(payloads[0])
            self.load_state_dict(payloads[0]["checkpoint_free"])
            self.counters = counters
            return
        if plan.kind == NEIGHBOURS:
            prev, nxt = payloads
            body = neighbour_average(prev["body"], nxt["body"], prev["grad_norm"], nxt["grad_norm"],
                                     self.cfg.norm_eps)
            self.state.load_stage(body, {})
            self.grad_norm = 0.5 * (prev["grad_norm"] + nxt["grad_norm"])
        else:
            self.state.load_stage(payloads[0]["body"], payloads[0]["ends"])
            self.grad_norm = payloads[0]["grad_norm"]
        self.state.restore_step_state(payloads[0]["step"])
        self.lr_scaled = True
        for p in payloads:  # a rebuilt neighbour of an end stage holds that stage's replica again at once
            self.end_replicas.update(p["own_ends"])

    # -- state -------------------------------------------------------------------------------------------------
    @classmethod
    def export_replayer(cls, meta: dict, engine, global_rank: int) -> Optional[LrScaling]:
        """The lr scaling of rebuilt stages at export (:class:`LrScaling` on the exporter's inner optimizer);
        ``None`` when the run had checkpoint-free recovery off."""
        section = ((meta.get("ds_ext") or {}).get("recovery") or {}).get("checkpoint_free") or {}
        if not section.get("enabled"):
            return None
        lr_scale = CheckpointFreeConfig.model_validate(section).lr_scale
        return LrScaling(ds.zero_inner_optimizer(engine.optimizer), lr_scale)

    def journal_payload(self) -> Optional[dict]:
        payload, self._journal = self._journal, None
        return payload

    def journal_replay(self, payload: dict) -> None:
        self._sq = 0.0  # the replayed optimizer steps passed through the pre-hook
        self.grad_norm, self.lr_scaled = float(payload["grad_norm"]), bool(payload["lr_scaled"])
        self.end_replicas.update(payload.get("end_replicas") or {})

    def state_dict(self) -> dict:
        return {"grad_norm": self.grad_norm, "lr_scaled": self.lr_scaled,
                "end_replicas": {k: v.clone() for k, v in self.end_replicas.items()},
                "counters": dict(self.counters)}

    def load_state_dict(self, sd: dict) -> None:
        self._sq = 0.0
        self.grad_norm, self.lr_scaled = float(sd["grad_norm"]), bool(sd["lr_scaled"])
        self.end_replicas = dict(sd["end_replicas"])
        self.counters.update(sd.get("counters", {}))

    def metrics(self) -> Dict[str, float]:
        out = {**{k: float(v) for k, v in self.counters.items()}, "grad_norm": self.grad_norm,
               "lr_scaled": float(self.lr_scaled)}
        return {**out, **(self.schedule.metrics() if self.schedule is not None else {})}

    def start(self, engine=None) -> None:
        """Collective, before the journal's resume: the end stages send their first replicas, so an end stage
        can be rebuilt from the first step on."""
        if self.pipelined:
            self.replicate_ends()

    def close(self) -> None:
        """Remove the optimizer hooks and the swap schedule. Idempotent."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.lr.close()
        if self.schedule is not None and self.engine.ds_ext_pipeline_schedule is self.schedule:
            self.engine.ds_ext_set_pipeline_schedule(None)
        self.schedule = None
        self.state.close()


def apply_checkfree(engine, cfg: CheckpointFreeConfig, topology) -> CheckFreeFeature:
    """Checkpoint-free recovery for a ds_ext engine, prepared but not attached (all ranks). Its rebuilds and
    replicas travel on the world group: a lost rank may be any rank. With ``swap_end_stages`` the engine's training
    steps run through :class:`SwapEndStagesSchedule` (its p2p group is built here, collectively)."""
    feature = CheckFreeFeature(cfg, engine, topology, dist.get_rank(), dist.group.WORLD)
    if cfg.swap_end_stages:
        key = "ds_ext.recovery.checkpoint_free.swap_end_stages"
        if not ds.is_pipeline(engine) or topology.pipeline_stages < MIN_SWAP_STAGES:
            feature.close()
            raise DsExtConfigError([(key, f"true needs a PipelineModule of >= {MIN_SWAP_STAGES} stages (the two "
                                          "stages at each end swap; fewer would overlap); this run has "
                                          f"{topology.pipeline_stages} (ds_ext.topology.pipeline_stages)")])
        layer_class = cfg.layer_class or repeated_layer_class(engine.module)
        feature.schedule = SwapEndStagesSchedule(topology, feature.rank, build_group(topology), layer_class)
        try:
            engine.ds_ext_set_pipeline_schedule(feature.schedule)
        except ValueError as exc:
            feature.close()
            raise DsExtConfigError([(key, str(exc))]) from None
    return feature
