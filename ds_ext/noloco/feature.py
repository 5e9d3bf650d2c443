"""The NoLoCo engine feature: the outer step after every ``inner_steps`` optimizer steps, on this rank's fp32 shard.

Call order (per optimizer step, from :meth:`ds_ext.engine.DsExtEngineMixin._take_model_step`): DeepSpeed's inner
step (ZeRO reduce inside the replica, optimizer step, lp params gathered inside the replica) -> ``global_steps`` is
incremented -> :meth:`NoLoCoFeature.after_optimizer_step`; when ``global_steps % inner_steps == 0`` it reads the
fp32 shard, mixes it with the partner replica's (or all replicas' in DiLoCo mode), applies the outer update,
writes the shard back and refreshes the low-precision params (an all-gather inside the replica).
"""
from __future__ import annotations

import logging
from typing import Dict

import torch
import torch.distributed as dist

from ds_ext.noloco.accounting import CommAccounting
from ds_ext.noloco.config import NoLoCoConfig
from ds_ext.noloco.gossip import ShardExchange, partner_of
from ds_ext.noloco.outer import OuterState, diloco_pseudo_gradient, diloco_update, noloco_update
from ds_ext.state.partition import EngineShards
from ds_ext.topology import Topology

log = logging.getLogger("ds_ext.noloco")


class FP32Shards(EngineShards):
    """This rank's fp32 master weights: ZeRO-1/2's flat partitions, or the parameters themselves without ZeRO
    (:class:`ds_ext.state.partition.EngineShards`; ``read()`` a flat copy, ``write(flat)`` back + refresh)."""


class NoLoCoFeature:
    """Outer steps between replicas; state (outer step, anchor theta_0, momentum) travels in checkpoints."""

    name = "noloco"

    def __init__(self, cfg: NoLoCoConfig, topology: Topology, rank: int, shards: FP32Shards, peer_group,
                 accounting: CommAccounting = None):
        self.cfg, self.topology, self.rank, self.shards = cfg, topology, rank, shards
        self.peer_group, self.accounting = peer_group, accounting
        self.exchange = ShardExchange(peer_group, cfg.exchange_timeout_s)
        self.replica, self.stage, self.data = topology.coords(rank)
        self.state = OuterState.start(shards.read())
        self.outer_step = 0
        self.counters = {"mixed": 0, "sat_out": 0, "skipped": 0, "bytes_sent": 0}
        self._journal = None  # what the last outer step received, for the recovery journal

    def after_optimizer_step(self, engine) -> None:
        if engine.global_steps % self.cfg.inner_steps:
            return
        with torch.no_grad():
            self.run_outer_step()
        engine.monitor.write_events([(f"NoLoCo/{k}", float(v), engine.global_samples)
                                     for k, v in self.metrics().items()])

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
            self._journal = {"outer_step": self.outer_step, "reduced": delta}
            diloco_update(weights, delta / self.topology.num_replicas, self.state, self.cfg.lr, self.cfg.momentum)
        self.shards.write(weights)
        self.outer_step += 1

    def journal_payload(self):
        """What the outer step of this optimizer step received (the partner's shard, or DiLoCo's all-reduced
        pseudo-gradient), or ``None`` when there was no outer step; read once by the recovery journal."""
        payload, self._journal = self._journal, None
        return payload

    def journal_replay(self, payload: dict) -> None:
        with torch.no_grad():
            self.run_outer_step(replay=payload)
        self._journal = None

    def _pair_mean(self, weights: torch.Tensor, replay: dict = None) -> torch.Tensor:
        partner = partner_of(self.replica, self.topology.num_replicas, self.outer_step, self.cfg.seed)
        if partner is None:
            self.counters["sat_out"] += 1
            self._journal = {"outer_step": self.outer_step, "received": None}
            return weights
        peer = self.topology.rank_of(partner, self.stage, self.data)
        if replay is None:
            received = self.exchange.swap(weights.clone(), peer, tag=self.outer_step)
            self.counters["bytes_sent"] += weights.numel() * weights.element_size()
        else:
            received = replay["received"]
        self._journal = {"outer_step": self.outer_step, "received": received}
        if received is None:
            self.counters["skipped"] += 1
            log.warning("ds_ext::noloco outer step %d: rank %d skipped mixing with rank %d", self.outer_step,
                        self.rank, peer)
            return weights
        self.counters["mixed"] += 1
        return (weights + received) / 2

    def metrics(self) -> Dict[str, float]:
        out = {"outer_step": self.outer_step, **self.counters}
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
        if self.accounting is not None:
            self.accounting.uninstall()


def sync_replicas(shards: FP32Shards, topology: Topology, rank: int, peer_group) -> None:
    """Start every replica from replica 0's weights (a broadcast over the shard-peer group, once, at attach)."""
    _, stage, data = topology.coords(rank)
    flat = shards.read()
    dist.broadcast(flat, src=topology.rank_of(0, stage, data), group=peer_group)
    shards.write(flat)


def apply_noloco(engine, cfg: NoLoCoConfig, topology: Topology) -> NoLoCoFeature:
    """Attach NoLoCo to a ds_ext engine (collective: every rank calls it once, after the engine is built)."""
    import deepspeed.comm.comm as ds_comm
    rank = dist.get_rank()
    if topology.num_replicas == 1:
        log.warning("ds_ext::noloco: one replica (ranks_per_replica = world size): outer steps have no partner "
                    "and apply this replica's own pseudo-gradient only")
    peer_group = topology.build_shard_peer_group(rank)
    shards = FP32Shards(engine)
    sync_replicas(shards, topology, rank, peer_group)
    accounting = CommAccounting(rank, lambda r: topology.coords(r)[0]).install(getattr(ds_comm, "cdb", None))
    feature = NoLoCoFeature(cfg, topology, rank, shards, peer_group, accounting)
    engine.attach_feature(feature)
    log.info("ds_ext::noloco attached: mode=%s H=%d lr=%.3g momentum=%.3g replicas=%d", cfg.mode, cfg.inner_steps,
             cfg.lr, cfg.momentum, topology.num_replicas)
    return feature
