"""NoLoCo (arXiv 2506.10911) / DiLoCo for megatron-core: inner steps inside a replica, outer steps on the shards.

Layout: ``world = num_replicas x ranks_per_replica``, consecutive ranks form a replica (:class:`ds_ext.topology.
Topology` with one pipeline stage; tensor and pipeline parallel sizes must be 1 for now). A replica is what megatron
calls one *distributed-optimizer instance*: megatron's ``DistributedDataParallel`` reduce-scatters gradients and its
``DistributedOptimizer`` shards fp32 main params + Adam state over the replica's ranks. megatron's own
``num_distributed_optimizer_instances > 1`` would add an all-reduce of gradients across instances in every step;
NoLoCo replaces exactly that, so the groups are built here and handed to megatron explicitly
(:attr:`ReplicaGroups.pg_collection`: ``dp``, ``dp_cp``, ``intra_dp_cp``, ``intra_dist_opt`` = this replica) and
no gradient collective leaves the replica. The gradient-norm all-reduce of clipping runs over ``intra_dist_opt``,
the replica, too.

:meth:`MegatronNoLoCo.after_step` counts the optimizer step in :class:`ds_ext.noloco.feature.NoLoCoFeature` (the same
code and step counter as the DeepSpeed path), which every ``inner_steps`` steps runs the outer step on
:class:`MegatronShards`,
this rank's fp32 main-param shard: NoLoCo swaps it with rank k of one random partner replica (``isend``/``irecv``
on the shard-peer group, no collective), DiLoCo all-reduces pseudo-gradients over the peers. The model params are
then refreshed from the main params and all-gathered inside the replica (what megatron's own step does).

Call order (every rank, same order: group creation is collective)::

    groups = replica_groups(ranks_per_replica)             # after parallel_state.initialize_model_parallel
    ddp = DistributedDataParallel(config, ddp_config, gpt, pg_collection=groups.pg_collection)
    opt = get_megatron_optimizer(opt_config, [ddp], pg_collection=groups.pg_collection,
                                 use_gloo_process_groups=False)
    noloco = noloco_setup([ddp], opt, ext.noloco, groups)  # sets config.finalize_model_grads_func
    for step: ddp.zero_grad_buffer(); opt.zero_grad(); loss.backward();
              noloco.finalize_model_grads_func([ddp]); opt.step(); noloco.after_step()
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ds_ext.contract import FeatureBase, Phase
from ds_ext.noloco.accounting import CommAccounting
from ds_ext.noloco.config import NoLoCoConfig
from ds_ext.noloco.feature import NoLoCoFeature, sync_replicas
from ds_ext.state.megatron import MegatronPartitionState
from ds_ext.topology import Topology

log = logging.getLogger("ds_ext.megatron")


@dataclass
class ReplicaGroups:
    """This rank's groups: ``replica`` (megatron's data-parallel group), ``peers`` (rank k of every replica) and
    the ``pg_collection`` to build megatron's DDP and optimizer with."""

    topology: Topology
    rank: int
    replica: dist.ProcessGroup
    peers: dist.ProcessGroup
    pg_collection: object

    def replica_of(self, rank: int) -> int:
        return self.topology.coords(rank)[0]


def replica_groups(ranks_per_replica: Optional[int]) -> ReplicaGroups:
    """Create the replica and shard-peer groups (collective) and megatron's ``ProcessGroupCollection`` whose
    data-parallel groups are this replica. ``ranks_per_replica=None``: every rank is a replica (NoLoCo's default).
    Needs ``parallel_state.initialize_model_parallel`` with tensor and pipeline parallel size 1."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    mp = parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_pipeline_model_parallel_world_size()
    if mp != 1:
        raise ValueError(f"ds_ext NoLoCo for megatron-core supports tensor x pipeline parallel size 1, got {mp}")
    world, rank = dist.get_world_size(), dist.get_rank()
    topo = Topology(world, ranks_per_replica or 1)
    replica = topo.build_replica_group(rank)
    peers = topo.build_shard_peer_group(rank)
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    for name in ("dp", "dp_cp", "intra_dp_cp", "intra_dist_opt", "expt_dp", "intra_expt_dp"):
        setattr(pgc, name, replica)
    pgc.inter_dist_opt = None
    return ReplicaGroups(topo, rank, replica, peers, pgc)


class MegatronShards(MegatronPartitionState):
    """This rank's fp32 master weights as NoLoCo reads and writes them (:class:`ds_ext.state.partition.FlatShards`):
    the main-param shards of megatron's ``DistributedOptimizer`` (the params its inner torch optimizer steps), for
    every optimizer of a ``ChainedOptimizer``. ``write`` copies main params into the model params and all-gathers
    them inside the replica (as megatron's ``step_with_ready_grads`` does after the inner update)."""

    def __init__(self, optimizer, model_chunks: List[torch.nn.Module]):
        super().__init__(optimizer, model_chunks)
        if any(t.dtype != torch.float32 for t in self.tensors):
            raise ValueError("NoLoCo needs fp32 main params: use megatron's distributed optimizer (or fp32 params)")


def install_megatron_accounting(accounting: CommAccounting) -> CommAccounting:
    """Count torch.distributed calls, plus the two functions megatron's grad buffers bind at import time
    (``param_and_grad_buffer.dist_all_gather_func`` / ``dist_reduce_scatter_func``), which the plain install
    would miss."""
    from megatron.core.distributed import param_and_grad_buffer as pgb
    return accounting.install([(pgb, "dist_all_gather_func", "all_gather_into_tensor"),
                               (pgb, "dist_reduce_scatter_func", "reduce_scatter_tensor")])


class MegatronNoLoCo(FeatureBase):
    """What :func:`noloco_setup` returns: the grad-sync function for megatron and the outer-step hook, a
    :class:`ds_ext.contract.Feature` (phase ``STEP``) that :class:`ds_ext.megatron.runner.MegatronRunner` drives.

    Contract: :meth:`finalize_model_grads_func` after the backward of the last micro-batch and before
    ``optimizer.step()`` (megatron's schedules call it through ``config.finalize_model_grads_func``);
    :meth:`after_step` right after every ``optimizer.step()``. The optimizer-step count is the feature's
    (:attr:`steps`); a journal resume sets it with :meth:`restore_steps`.
    """

    name, phase = "noloco", Phase.STEP

    def __init__(self, feature: NoLoCoFeature, groups: ReplicaGroups, accounting: Optional[CommAccounting]):
        self.feature, self.groups, self.accounting = feature, groups, accounting

    def after_optimizer_step(self, engine) -> None:
        """The contract's step hook: :meth:`after_step`."""
        self.after_step()

    @property
    def steps(self) -> int:
        """Optimizer steps done (the feature's counter)."""
        return self.feature.steps

    def restore_steps(self, step: int) -> None:
        """A resume restored the state after optimizer step ``step``: count on from there."""
        self.feature.restore_steps(step)

    def count_collectives(self) -> CommAccounting:
        """Start counting collectives now (for a ``noloco_setup(..., count_collectives=False)`` whose caller had
        start-up collectives to make first, e.g. the journal's resume)."""
        if self.accounting is None:
            self.accounting = install_megatron_accounting(CommAccounting(self.groups.rank, self.groups.replica_of))
            self.feature.accounting = self.accounting
        return self.accounting

    def finalize_model_grads_func(self, model_chunks, num_tokens=None, pg_collection=None, force_all_reduce=False):
        """megatron's ``finalize_model_grads`` with this replica's groups: the DDP buckets reduce(-scatter)
        inside the replica only (``pg_collection`` from the caller is ignored on purpose)."""
        from megatron.core.distributed import finalize_model_grads
        return finalize_model_grads(model_chunks, num_tokens, pg_collection=self.groups.pg_collection,
                                    force_all_reduce=force_all_reduce)

    def after_step(self) -> bool:
        """Count one optimizer step; every ``inner_steps`` run the outer step. Returns whether one ran."""
        return self.feature.count_step()

    def journal_payload(self) -> dict:
        """For the journal's commit frame of this step: the step count and what an outer step received."""
        return {"steps": self.steps, "outer": self.feature.journal_payload()}

    def journal_replay(self, payload: dict) -> None:
        """Re-apply one :meth:`journal_payload` on resume (the outer step from the recorded data)."""
        self.restore_steps(int(payload["steps"]))
        if payload["outer"] is not None:
            self.feature.journal_replay(payload["outer"])

    def metrics(self) -> Dict[str, float]:
        return {"inner_steps_done": self.steps, **self.feature.metrics()}

    def state_dict(self) -> dict:
        return {"steps": self.steps, **self.feature.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.restore_steps(sd["steps"])
        self.feature.load_state_dict(sd)

    def close(self) -> None:
        self.feature.close()


def noloco_setup(model_chunks: List[torch.nn.Module], optimizer, cfg: NoLoCoConfig, groups: ReplicaGroups,
                 count_collectives: Optional[bool] = None) -> MegatronNoLoCo:
    """Attach NoLoCo/DiLoCo to megatron DDP chunks + optimizer built with ``groups.pg_collection`` (collective).

    Starts every replica from replica 0's weights (one broadcast over the shard peers), installs collective
    accounting (``metrics()['cross_replica_collectives']``) when ``count_collectives`` (None: ``cfg.count_collectives``,
    off by default) is true, and sets ``config.finalize_model_grads_func`` of every chunk to the replica-only grad
    sync.
    """
    if not cfg.enabled:
        raise ValueError("noloco_setup called with ds_ext.noloco.enabled false")
    for chunk in model_chunks:
        dp = getattr(chunk, "dp_cp_group", None)
        if dp is not None and dist.get_process_group_ranks(dp) != dist.get_process_group_ranks(groups.replica):
            raise ValueError("build megatron's DistributedDataParallel with pg_collection=groups.pg_collection: its "
                             "data-parallel group spans more than one replica")
    shards = MegatronShards(optimizer, model_chunks)
    topo, rank = groups.topology, groups.rank
    sync_replicas(shards, topo, rank, groups.peers)
    accounting = None
    if cfg.count_collectives if count_collectives is None else count_collectives:
        accounting = install_megatron_accounting(CommAccounting(rank, groups.replica_of))
    feature = NoLoCoFeature(cfg, topo, rank, shards, groups.peers, accounting)
    hook = MegatronNoLoCo(feature, groups, accounting)
    for chunk in model_chunks:
        chunk.config.finalize_model_grads_func = hook.finalize_model_grads_func
    log.info("ds_ext::noloco (megatron) attached: mode=%s H=%d replicas=%d", cfg.mode, cfg.inner_steps,
             topo.num_replicas)
    return hook
