"""The NoLoCo engine feature: the outer step after every ``inner_steps`` optimizer steps, on this rank's fp32 shard.

Call order (per optimizer step, from the engine's per-step seam, :mod:`ds_ext.engine`): DeepSpeed's inner step (ZeRO
reduce inside the replica, optimizer step, lp params gathered inside the replica) -> ``global_steps`` is incremented
-> :meth:`NoLoCoFeature.after_optimizer_step` -> :meth:`NoLoCoFeature.count_step`; when the step count is a multiple
of ``inner_steps`` it reads the fp32 shard, mixes it with the partner replica's (or all replicas' in DiLoCo mode),
applies the outer update, writes the shard back and refreshes the low-precision params (an all-gather inside the
replica). The megatron path (:mod:`ds_ext.megatron.noloco`) runs the same feature through ``count_step()``.

Phase STEP: it changes the step's result, so it runs after the model features and before the journal, which records
its :meth:`~NoLoCoFeature.journal_payload` with the step.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
import torch.distributed as dist

from ds_ext import _deepspeed as ds
from ds_ext.config.base import DsExtConfigError
from ds_ext.contract import ExportRule, FeatureBase, Phase
from ds_ext.noloco.accounting import CommAccounting, deepspeed_accounting
from ds_ext.noloco.config import NoLoCoConfig
from ds_ext.noloco.gossip import ShardExchange, partner_of
from ds_ext.noloco.outer import OuterState, diloco_pseudo_gradient, diloco_update, noloco_update
from ds_ext.pipeline.schedule import RandomRoutingSchedule, build_group
from ds_ext.state.partition import EngineShards
from ds_ext.topology import Topology

log = logging.getLogger("ds_ext.noloco")


class FP32Shards(EngineShards):
    """This rank's fp32 master weights: ZeRO-1/2's flat partitions, or the parameters themselves without ZeRO
    (:class:`ds_ext.state.partition.EngineShards`; ``read()`` a flat copy, ``write(flat)`` back + refresh)."""


class NoLoCoFeature(FeatureBase):
    """Outer steps between replicas; state (outer step, anchor theta_0, momentum) travels in checkpoints.

    Args:
        cfg: the ``ds_ext.noloco`` block.
        topology: the replica layout; the partner of a rank is the rank with the same stage and data index in the
            partner replica.
        rank: this process's global rank.
        shards: this rank's fp32 master weights (``read() -> [n]``, ``write([n])``): :class:`FP32Shards` or
            megatron's ``MegatronShards``.
        peer_group: the shard-peer group (:meth:`Topology.build_shard_peer_group`), the only group it talks in.
        accounting: an installed :class:`CommAccounting` whose counters join :meth:`metrics`; closed with the
            feature. None: no accounting (the default, ``count_collectives`` false).
    """

    name = "noloco"
    phase = Phase.STEP
    # Replayed at export: an outer step changes the weights; its payload holds what came from the peers.
    journal_export = ExportRule.REPLAY

    def __init__(self, cfg: NoLoCoConfig, topology: Topology, rank: int, shards, peer_group,
                 accounting: Optional[CommAccounting] = None):
        self.cfg, self.topology, self.rank, self.shards = cfg, topology, rank, shards
        self.peer_group, self.accounting = peer_group, accounting
        self.exchange = ShardExchange(peer_group, cfg.exchange_timeout_s)
        self.replica, self.stage, self.data = topology.coords(rank)
        self.state = OuterState.start(shards.read())
        self.steps = 0  # optimizer steps done (DeepSpeed: global_steps; megatron: counted here)
        self.outer_step = 0
        self.counters = {"mixed": 0, "sat_out": 0, "skipped": 0, "bytes_sent": 0}
        self._step_payload = None  # what the last outer step received, for the journal
        self.schedule: Optional[RandomRoutingSchedule] = None  # random_routing: set by apply_noloco
        self.engine = None

    def after_optimizer_step(self, engine) -> None:
        if self.count_step(engine.global_steps):
            engine.monitor.write_events([(f"NoLoCo/{k}", float(v), engine.global_samples)
                                         for k, v in self.metrics().items()])

    def count_step(self, step: Optional[int] = None) -> bool:
        """Record that optimizer step ``step`` finished (None: the one after the last counted) and run the outer
        step when the count is a multiple of ``inner_steps``. Returns whether an outer step ran."""
        self.steps = self.steps + 1 if step is None else int(step)
        if self.steps % self.cfg.inner_steps:
            return False
        with torch.no_grad():
            self.run_outer_step()
        return True

    def restore_steps(self, step: int) -> None:
        """Set the count of optimizer steps done: a resume restored the state after optimizer step ``step``."""
        self.steps = int(step)

    def run_outer_step(self, replay: dict = None) -> None:
        """One outer step. ``replay``: a :meth:`journal_payload` recorded earlier; the peer data comes from it
        instead of the network (recovery replays the step bit for bit)."""
        weights = self.shards.read()
        if self.cfg.mode == "noloco":
            noloco_update(weights, self._pair_mean(weights, replay), self.state, self.cfg.lr, self.cfg.momentum)
        else:
            delta = diloco_pseudo_gradient(weights, self.state)
            if replay is None:
                dist.all_reduce(delta, group=self.peer_group)
                self.counters["bytes_sent"] += delta.numel() * delta.element_size()
            else:
                delta = replay["reduced"]
            self._step_payload = {"outer_step": self.outer_step, "reduced": delta}
            diloco_update(weights, delta / self.topology.num_replicas, self.state, self.cfg.lr, self.cfg.momentum)
        self.shards.write(weights)
        self.outer_step += 1

    @classmethod
    def export_replayer(cls, meta: dict, engine, global_rank: int) -> Optional["NoLoCoFeature"]:
        """The feature on the exporter's engine with no peer group: its outer steps run from the journaled payloads
        (:meth:`journal_replay`); ``None`` when the run had NoLoCo off."""
        section = (meta.get("ds_ext") or {}).get("noloco") or {}
        if not section.get("enabled"):
            return None
        return cls(NoLoCoConfig.model_validate(section), Topology(**meta["topology"]), global_rank,
                   FP32Shards(engine), peer_group=None)

    def journal_payload(self):
        """What the outer step of this optimizer step received (the partner's shard, or DiLoCo's all-reduced
        pseudo-gradient), or ``None`` when there was no outer step; read once by the recovery journal."""
        payload, self._step_payload = self._step_payload, None
        return payload

    def journal_replay(self, payload: dict) -> None:
        with torch.no_grad():
            self.run_outer_step(replay=payload)
        self._step_payload = None

    def _pair_mean(self, weights: torch.Tensor, replay: dict = None) -> torch.Tensor:
        partner = partner_of(self.replica, self.topology.num_replicas, self.outer_step, self.cfg.seed)
        if partner is None:
            self.counters["sat_out"] += 1
            self._step_payload = {"outer_step": self.outer_step, "received": None}
            return weights
        peer = self.topology.rank_of(partner, self.stage, self.data)
        if replay is None:
            received = self.exchange.swap(weights.clone(), peer, tag=self.outer_step)
            self.counters["bytes_sent"] += weights.numel() * weights.element_size()
        else:
            received = replay["received"]
        self._step_payload = {"outer_step": self.outer_step, "received": received}
        if received is None:
            self.counters["skipped"] += 1
            log.warning("ds_ext::noloco outer step %d: rank %d skipped mixing with rank %d", self.outer_step,
                        self.rank, peer)
            return weights
        self.counters["mixed"] += 1
        return (weights + received) / 2

    def metrics(self) -> Dict[str, float]:
        out = {"outer_step": self.outer_step, **self.counters}
        if self.schedule is not None:
            out.update(self.schedule.metrics())
        if self.accounting is not None:
            out.update(self.accounting.summary())
        return out

    def state_dict(self) -> dict:
        return {"outer_step": self.outer_step, **self.state.state_dict(),
                "counters": dict(self.counters)}

    def load_state_dict(self, sd: dict) -> None:
        self.outer_step = int(sd["outer_step"])
        self.state.load_state_dict(sd)
        self.counters.update(sd.get("counters", {}))

    def close(self) -> None:
        """Remove the collective accounting's wrappers and the routing schedule (NoLoCo's only patches).
        Idempotent."""
        if self.accounting is not None:
            self.accounting.uninstall()
        if self.schedule is not None and self.engine is not None and \
                self.engine.ds_ext_pipeline_schedule is self.schedule:
            self.engine.ds_ext_set_pipeline_schedule(None)
        self.schedule = None


def sync_replicas(shards, topology: Topology, rank: int, peer_group) -> None:
    """Start every replica from replica 0's weights (a broadcast over the shard-peer group, once, at build)."""
    _, stage, data = topology.coords(rank)
    flat = shards.read()
    dist.broadcast(flat, src=topology.rank_of(0, stage, data), group=peer_group)
    shards.write(flat)


def apply_noloco(engine, cfg: NoLoCoConfig, topology: Topology) -> NoLoCoFeature:
    """Build NoLoCo for a ds_ext engine (collective: every rank calls it once, after the engine is built): create the
    shard-peer groups, start every replica from replica 0's weights and, with ``cfg.count_collectives``, install the
    collective accounting. Does not attach the feature (:mod:`ds_ext.features` does)."""
    rank = dist.get_rank()
    if topology.num_replicas == 1:
        log.warning("ds_ext::noloco: one replica (ranks_per_replica = world size): outer steps have no partner "
                    "and apply this replica's own pseudo-gradient only")
    peer_group = topology.build_shard_peer_group(rank)
    shards = FP32Shards(engine)
    sync_replicas(shards, topology, rank, peer_group)
    accounting = deepspeed_accounting(rank, lambda r: topology.coords(r)[0]) if cfg.count_collectives else None
    feature = NoLoCoFeature(cfg, topology, rank, shards, peer_group, accounting)
    if cfg.random_routing:
        _route(feature, engine, cfg, topology, rank)
    log.info("ds_ext::noloco built: mode=%s H=%d lr=%.3g momentum=%.3g replicas=%d count_collectives=%s",
             cfg.mode, cfg.inner_steps, cfg.lr, cfg.momentum, topology.num_replicas, cfg.count_collectives)
    return feature


def _route(feature: NoLoCoFeature, engine, cfg: NoLoCoConfig, topology: Topology, rank: int) -> None:
    """Set the random-routing schedule on the pipeline engine (its p2p group is built here, collectively)."""
    key = "ds_ext.noloco.random_routing"
    if not ds.is_pipeline(engine) or topology.pipeline_stages < 2 or topology.num_replicas < 2:
        feature.close()
        raise DsExtConfigError([(key, "true needs a PipelineModule of >= 2 stages and >= 2 replicas; this run has "
                                      f"{topology.pipeline_stages} stage(s) x {topology.num_replicas} replica(s)")])
    feature.engine = engine
    feature.schedule = RandomRoutingSchedule(topology, rank, build_group(topology), cfg.seed)
    try:
        engine.ds_ext_set_pipeline_schedule(feature.schedule)
    except ValueError as exc:
        feature.close()
        raise DsExtConfigError([(key, str(exc))]) from None
