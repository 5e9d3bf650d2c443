"""Topology: layout arithmetic, errors from the config, and the real process groups on 4 gloo ranks."""
import pytest
import torch

from dist import run_distributed
from ds_ext.config import DsExtConfig, DsExtConfigError
from ds_ext.topology import Topology


def test_layout_matches_deepspeed_process_topology():
    topo = Topology(world_size=8, ranks_per_replica=4, pipeline_stages=2)
    assert (topo.num_replicas, topo.data_parallel_size) == (2, 2)
    pt = topo.process_topology()
    for rank in range(8):
        c = pt.get_coord(rank)
        assert topo.coords(rank) == (c.replica, c.pipe, c.data)
        assert topo.rank_of(*topo.coords(rank)) == rank
    assert topo.data_parallel_ranks(5) == [4, 5]          # replica 1, stage 0
    assert topo.shard_peer_ranks(6) == [2, 6]             # stage 1, data 0 in both replicas
    assert topo.replica_ranks(1) == [4, 5, 6, 7]
    assert topo.pipeline_model_ranks(5) == [5, 7]         # replica 1, data 1, both stages
    assert topo.data_shard(6) == (2, 4) and topo.data_shard(2) == topo.data_shard(0)


def test_trivial_layout_and_defaults():
    topo = Topology.from_config(DsExtConfig(), world_size=4)
    assert topo.is_trivial and topo.ranks_per_replica == 4 and topo.data_shard(3) == (3, 4)


@pytest.mark.parametrize("block, world, path", [
    ({"ranks_per_replica": 3}, 4, "ds_ext.topology.ranks_per_replica"),
    ({"pipeline_stages": 3}, 4, "ds_ext.topology.pipeline_stages"),
    ({"ranks_per_replica": 2}, 4, "ds_ext.topology.ranks_per_replica"),  # 2 replicas, nothing syncs them
])
def test_from_config_errors_name_the_path(block, world, path):
    with pytest.raises(DsExtConfigError) as info:
        Topology.from_config(DsExtConfig(topology=block), world_size=world)
    assert info.value.problems[0][0] == path


def test_direct_construction_checks_divisibility():
    with pytest.raises(ValueError, match="does not divide"):
        Topology(world_size=6, ranks_per_replica=4)


def _groups_body():
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    topo = Topology(world_size=4, ranks_per_replica=2)
    mpu = topo.build_mpu()
    peer_group = topo.build_shard_peer_group()
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, group=mpu.get_data_parallel_group())
    peers = torch.tensor([float(rank + 1)])
    dist.all_reduce(peers, group=peer_group)
    own = torch.tensor([float(rank + 1)])
    dist.all_reduce(own, group=mpu.get_model_parallel_group())
    replica = torch.tensor([float(rank + 1)])
    dist.all_reduce(replica, group=topo.build_replica_group())
    return {"replica_sum": replica.item(), "dp_sum": t.item(), "peer_sum": peers.item(), "mp_sum": own.item(),
            "dp_rank": mpu.get_data_parallel_rank(), "dp_world": mpu.get_data_parallel_world_size(),
            "dp_ranks": mpu.get_data_parallel_group_ranks(), "mp_world": mpu.get_model_parallel_world_size()}


@pytest.mark.slow
def test_mpu_groups_on_four_processes():
    r = run_distributed(_groups_body, world_size=4)
    assert [x["dp_sum"] for x in r] == [3, 3, 7, 7]        # {1,2} and {3,4}: within each replica only
    assert [x["peer_sum"] for x in r] == [4, 6, 4, 6]      # {1,3} and {2,4}: same shard across replicas
    assert [x["mp_sum"] for x in r] == [1, 2, 3, 4]        # tensor parallel 1: each rank alone
    assert [x["replica_sum"] for x in r] == [3, 3, 7, 7]   # build_replica_group: the ranks of one replica
    assert [x["dp_rank"] for x in r] == [0, 1, 0, 1]
    assert [x["dp_ranks"] for x in r] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(x["dp_world"] == 2 and x["mp_world"] == 1 for x in r)
