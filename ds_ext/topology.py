"""Topology: the world as replicas x pipeline stages x ZeRO data-parallel ranks, and the ``mpu`` DeepSpeed reads.

Rank layout (row-major, the same as DeepSpeed's ``ProcessTopology`` with axes ``["replica", "pipe", "data"]``)::

    rank = (replica * pipeline_stages + stage) * data_parallel_size + data

DeepSpeed learns the layout through its public ``mpu`` argument (``deepspeed.initialize(mpu=...)``) for a plain
model, or through ``PipelineModule(topology=...)`` for a pipeline; either way its data-parallel group, and so the
group ZeRO-1/2 shard over, is the ranks of one replica that hold the same stage. This module patches nothing; for a
pipeline with several replicas ``ds_ext.initialize`` also narrows the grid's model-parallel group to one replica
(:meth:`Topology.build_pipeline_model_group`, set through ``ds_ext._deepspeed``, which lists every DeepSpeed patch).

Groups are created explicitly by :meth:`Topology.build_mpu` (a collective: every rank calls it, in the same order)
and handed to whoever needs them; nothing is kept in module globals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import ProcessTopology

from ds_ext.config import DsExtConfig, DsExtConfigError

AXES = ("replica", "pipe", "data")


@dataclass(frozen=True)
class Topology:
    """Pure layout arithmetic; no process groups (see :meth:`build_mpu`)."""

    world_size: int
    ranks_per_replica: int
    pipeline_stages: int = 1
    sequence_parallel: int = 1
    """Ulysses sequence-parallel ranks per group (``ds_ext.streambp.sequence_parallel``): ``N`` consecutive ranks
    share one data shard and each streams a shard of its sequence (one replica, no pipeline)."""

    def __post_init__(self):
        if self.world_size < 1 or self.ranks_per_replica < 1 or self.pipeline_stages < 1:
            raise ValueError(f"sizes must be >= 1: {self}")
        if self.world_size % self.ranks_per_replica:
            raise ValueError(f"ranks_per_replica={self.ranks_per_replica} does not divide world size "
                             f"{self.world_size}")
        if self.ranks_per_replica % self.pipeline_stages:
            raise ValueError(f"pipeline_stages={self.pipeline_stages} does not divide ranks_per_replica="
                             f"{self.ranks_per_replica}")
        if self.sequence_parallel < 1 or self.world_size % self.sequence_parallel:
            raise ValueError(f"sequence_parallel={self.sequence_parallel} does not divide world size "
                             f"{self.world_size}")
        if self.sequence_parallel > 1 and (self.num_replicas > 1 or self.pipeline_stages > 1):
            raise ValueError(f"sequence_parallel={self.sequence_parallel} needs one replica and no pipeline: {self}")

    @classmethod
    def from_config(cls, ext: DsExtConfig, world_size: int) -> "Topology":
        """Build from the ``ds_ext.topology`` section; errors name the JSON path."""
        cfg = ext.topology
        rpr = ext.ranks_per_replica(world_size)
        path = "ds_ext.topology.ranks_per_replica" if cfg.ranks_per_replica else "ds_ext.noloco.ranks_per_replica"
        if world_size % rpr:
            raise DsExtConfigError([(path, f"got {rpr}: must divide the world size {world_size}")])
        if rpr % cfg.pipeline_stages:
            raise DsExtConfigError([("ds_ext.topology.pipeline_stages",
                                     f"got {cfg.pipeline_stages}: must divide ranks per replica {rpr}")])
        sp = ext.streambp.sequence_parallel if ext.streambp.enabled else 1
        if world_size % sp:
            raise DsExtConfigError([("ds_ext.streambp.sequence_parallel",
                                     f"got {sp} with world size {world_size}: must divide it (each group of {sp} "
                                     "consecutive ranks shards one sequence)")])
        if sp > 1 and (rpr != world_size or cfg.pipeline_stages > 1):
            raise DsExtConfigError([("ds_ext.streambp.sequence_parallel",
                                     f"got {sp} with {world_size // rpr} replicas x {cfg.pipeline_stages} pipeline "
                                     "stages: sequence parallelism needs one replica and no pipeline")])
        topo = cls(world_size, rpr, cfg.pipeline_stages, sp)
        if topo.num_replicas > 1 and not ext.replica_sync_enabled:
            raise DsExtConfigError([(path, f"got {rpr} with world size {world_size}: that makes "
                                           f"{topo.num_replicas} replicas, but no enabled ds_ext feature "
                                           "synchronises replicas, so they would train independently; "
                                           "enable ds_ext.noloco or use ranks_per_replica=null (one replica)")])
        return topo

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.ranks_per_replica

    @property
    def data_parallel_size(self) -> int:
        """ZeRO data-parallel ranks per stage inside one replica."""
        return self.ranks_per_replica // self.pipeline_stages

    @property
    def is_trivial(self) -> bool:
        """One replica, no pipeline, no sequence parallelism: stock DeepSpeed needs no ``mpu`` at all."""
        return self.num_replicas == 1 and self.pipeline_stages == 1 and self.sequence_parallel == 1

    def process_topology(self) -> ProcessTopology:
        """DeepSpeed's ``ProcessTopology`` for this layout (pass it to ``PipelineModule(topology=...)``)."""
        return ProcessTopology(axes=list(AXES), dims=[self.num_replicas, self.pipeline_stages,
                                                      self.data_parallel_size])

    def coords(self, rank: int) -> Tuple[int, int, int]:
        """``(replica, stage, data)`` of a global rank."""
        replica, rest = divmod(rank, self.ranks_per_replica)
        stage, data = divmod(rest, self.data_parallel_size)
        return replica, stage, data

    def rank_of(self, replica: int, stage: int, data: int) -> int:
        return (replica * self.pipeline_stages + stage) * self.data_parallel_size + data

    def replica_ranks(self, replica: int) -> List[int]:
        return list(range(replica * self.ranks_per_replica, (replica + 1) * self.ranks_per_replica))

    def data_parallel_ranks(self, rank: int) -> List[int]:
        """The ZeRO group of ``rank``: same replica, same stage."""
        replica, stage, _ = self.coords(rank)
        return [self.rank_of(replica, stage, d) for d in range(self.data_parallel_size)]

    def shard_peer_ranks(self, rank: int) -> List[int]:
        """Ranks holding the same ZeRO shard in every replica (same stage and data index), ordered by replica."""
        _, stage, data = self.coords(rank)
        return [self.rank_of(r, stage, data) for r in range(self.num_replicas)]

    @property
    def data_shards(self) -> int:
        """How many data shards the world reads per micro-step (distinct micro-batches)."""
        return self.num_replicas * self.data_parallel_size // self.sequence_parallel

    def data_shard(self, rank: int) -> Tuple[int, int]:
        """``(index, count)`` of the data shard ``rank`` reads: every replica and every ZeRO rank reads its own,
        all stages of one pipeline read the same, and so do the ``sequence_parallel`` ranks of one sequence group
        (consecutive ranks: each streams its shard of the same rows)."""
        replica, _, data = self.coords(rank)
        return (replica * self.data_parallel_size + data) // self.sequence_parallel, self.data_shards

    def build_shard_peer_group(self, rank: Optional[int] = None):
        """Create the shard-peer groups (collective over the default group: every rank calls it, in the same order)
        and return the one of ``rank``: the only group a cross-replica feature may communicate in."""
        rank = dist.get_rank() if rank is None else rank
        heads = [self.rank_of(0, s, d) for s in range(self.pipeline_stages) for d in range(self.data_parallel_size)]
        return _new_groups([self.shard_peer_ranks(h) for h in heads], rank)

    def build_replica_group(self, rank: Optional[int] = None):
        """Create one group per replica (collective, as :meth:`build_shard_peer_group`) and return ``rank``'s."""
        rank = dist.get_rank() if rank is None else rank
        return _new_groups([self.replica_ranks(r) for r in range(self.num_replicas)], rank)

    def pipeline_model_ranks(self, rank: int) -> List[int]:
        """The stages of ``rank``'s pipeline: same replica, same data index, every stage."""
        replica, _, data = self.coords(rank)
        return [self.rank_of(replica, s, data) for s in range(self.pipeline_stages)]

    def build_pipeline_model_group(self, rank: Optional[int] = None):
        """Create the group of every pipeline's stages (collective, as :meth:`build_shard_peer_group`) and return
        ``rank``'s. DeepSpeed's pipeline grid builds its model-parallel group from every rank with the same ``data``
        coordinate, which with a ``replica`` axis spans replicas; ZeRO all-reduces the gradient norm over it every
        step. This group is the replica's own, so no per-step collective leaves the replica."""
        rank = dist.get_rank() if rank is None else rank
        heads = [self.rank_of(r, 0, d) for r in range(self.num_replicas) for d in range(self.data_parallel_size)]
        return _new_groups([self.pipeline_model_ranks(h) for h in heads], rank)

    def build_mpu(self, rank: Optional[int] = None) -> "ReplicaMPU":
        """Create the process groups (collective over the default group) and return the ``mpu`` for ``rank``."""
        return ReplicaMPU(self, dist.get_rank() if rank is None else rank)


def _new_groups(rank_lists: List[List[int]], rank: int):
    """``dist.new_group`` for every list (all ranks must call it in the same order); return the one with ``rank``."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            mine = group
    return mine


class ReplicaMPU:
    """The model-parallel-unit interface DeepSpeed reads (``get_{data,model}_parallel_{group,rank,world_size}``).

    Data parallel = the ranks of this rank's replica and stage, so ZeRO shards inside a replica. Tensor model
    parallelism is 1 (each rank its own group).
    """

    def __init__(self, topology: Topology, rank: int):
        if topology.pipeline_stages != 1:
            raise ValueError("a pipeline gets its layout from PipelineModule(topology=topology.process_topology())")
        self.topology, self.rank = topology, rank
        world = topology.world_size
        self.dp_ranks = topology.data_parallel_ranks(rank)
        self.dp_group = _new_groups([topology.data_parallel_ranks(r * topology.ranks_per_replica)
                                     for r in range(topology.num_replicas)], rank)
        self.self_group = _new_groups([[r] for r in range(world)], rank)

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_ranks.index(self.rank)

    def get_data_parallel_world_size(self) -> int:
        return len(self.dp_ranks)

    def get_data_parallel_group_ranks(self) -> List[int]:
        return list(self.dp_ranks)

    def get_model_parallel_group(self):
        return self.self_group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.rank

    def get_pipe_parallel_world_size(self) -> int:
        return 1
