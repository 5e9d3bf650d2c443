"""Checkpoint-free recovery: the CheckFree weighting rule, the rebuild plan, injected failures on real DeepSpeed
engines (peer copy on plain data parallel and NoLoCo replicas, neighbour rebuild on a 4-stage PipelineEngine), and
a kill -9 whose journal is deleted, rebuilt from a live replica at relaunch."""
import os
import signal

import pytest
import torch

from dist import run_distributed

TINY = dict(hidden_size=64, intermediate_size=176, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=32)


# -- pure rules ---------------------------------------------------------------------------------------------------
def test_neighbour_average_is_the_checkfree_gradient_norm_weighting():
    from ds_ext.checkfree.rules import neighbour_average
    prev = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([0.0])}
    nxt = {"w": torch.tensor([3.0, 2.0]), "b": torch.tensor([4.0])}
    out = neighbour_average(prev, nxt, gnorm_prev=0.5, gnorm_next=0.25, eps=1e-4)
    a, b = 0.25 + 1e-4, 0.5 + 1e-4  # a weights the NEXT stage by its own norm, b the previous (reference code)
    expected_w = [(a * 3.0 + b * 1.0) / (a + b), (a * 2.0 + b * -2.0) / (a + b)]
    # tolerance: the rule is computed in float64 and rounded once to float32
    assert torch.allclose(out["w"], torch.tensor(expected_w), rtol=1e-7, atol=0)
    assert torch.allclose(out["b"], torch.tensor([a * 4.0 / (a + b)]), rtol=1e-7, atol=0)
    assert out["w"].dtype == torch.float32
    equal = neighbour_average(prev, nxt, 0.0, 0.0)  # equal norms: the plain mean
    assert torch.equal(equal["w"], torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="differ at 'w'"):
        neighbour_average(prev, {"w": torch.zeros(3), "b": torch.zeros(1)}, 1.0, 1.0)


def test_rebuild_plan_prefers_a_live_replica_then_neighbours_then_refuses():
    from ds_ext.checkfree.rules import NEIGHBOURS, PARTNER, PEER, plan_rebuilds
    from ds_ext.topology import Topology
    two_replicas = Topology(world_size=8, ranks_per_replica=4, pipeline_stages=4)  # rank = replica * 4 + stage
    assert plan_rebuilds(two_replicas, {2}, False)[0].kind == PEER
    assert plan_rebuilds(two_replicas, {2}, False)[0].sources == (6,)
    both = {p.rank: p for p in plan_rebuilds(two_replicas, {2, 6}, False)}
    assert both[2].kind == NEIGHBOURS and both[2].sources == (1, 3)
    assert both[6].sources == (5, 7)
    ends = {p.rank: p for p in plan_rebuilds(Topology(4, 4, 4), {0, 3}, False)}
    assert (ends[0].kind, ends[0].sources, ends[3].kind, ends[3].sources) == (PARTNER, (1,), PARTNER, (2,))
    plain_dp = Topology(world_size=2, ranks_per_replica=2)
    assert plan_rebuilds(plain_dp, {1}, shards_identical_in_replica=True)[0].sources == (0,)
    with pytest.raises(ValueError, match=r"rank 1 .* no live replica holds its shard and no pipeline neighbours"):
        plan_rebuilds(plain_dp, {1}, shards_identical_in_replica=False)  # ZeRO shards: nobody else holds it
    with pytest.raises(ValueError, match=r"rank 1 .* neighbour rank\(s\) \[2\] are lost too"):
        plan_rebuilds(Topology(4, 4, 4), {1, 2}, False)


def test_failure_schedule_is_reproducible_and_follows_the_hourly_rate():
    from ds_ext.checkfree.config import FailureEvent
    from ds_ext.checkfree.rules import failures_at, per_step_probability
    from ds_ext.topology import Topology
    topo = Topology(world_size=8, ranks_per_replica=4, pipeline_stages=2)  # 2 replicas x 2 stages x 2 data
    listed = [FailureEvent(step=3, stage=1, replica=1), FailureEvent(step=3, rank=0)]
    assert failures_at(3, listed, 0.0, 10.0, 0, topo) == {0, 6, 7}
    assert failures_at(4, listed, 0.0, 10.0, 0, topo) == set()
    p = per_step_probability(0.5, 360.0)  # 10 steps per hour: 1 - 0.5 ** 0.1
    assert abs(p - (1 - 0.5 ** 0.1)) < 1e-15
    draws = [failures_at(s, [], 0.5, 360.0, 7, topo) for s in range(1, 4001)]
    assert draws == [failures_at(s, [], 0.5, 360.0, 7, topo) for s in range(1, 4001)]  # same seed, same ranks
    stage_failures = sum(len(v) // 2 for v in draws)  # a stage failure takes both data ranks
    expected = 4000 * 4 * p
    # tolerance: binomial count, 16000 trials; 5 standard deviations
    assert abs(stage_failures - expected) < 5 * (expected * (1 - p)) ** 0.5


def test_bad_failure_event_names_the_json_path():
    from ds_ext.config import DsExtConfigError, parse_ext_config
    bad = {"ds_ext": {"recovery": {"checkpoint_free": {"enabled": True, "inject": {"at": [{"step": 2, "rank": 0,
                                                                                          "stage": 1}]}}}}}
    with pytest.raises(DsExtConfigError, match=r"ds_ext\.recovery\.checkpoint_free\.inject\.at\[0\].*exactly one"):
        parse_ext_config(bad)


# -- replica rebuild (peer copy) ------------------------------------------------------------------------------------
def ds_config(stage: int, ext: dict, gas: int = 1) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "gradient_clipping": 1.0,
            "steps_per_print": 10 ** 9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                         "warmup_num_steps": 5}},
            "zero_optimization": {"stage": stage}, "ds_ext": ext}


def text_batch(index: int, step: int, micro: int = 0, batch: int = 2):
    """A learnable batch: windows of the shipped corpus, chosen by (index, step, micro) only."""
    from ds_ext.models.data import load_corpus
    tokens = load_corpus(max_bytes=1 << 16)
    g = torch.Generator().manual_seed(index * 100003 + step * 101 + micro)
    starts = torch.randint(0, tokens.numel() - 17, (batch,), generator=g)
    x = torch.stack([tokens[s:s + 17] for s in starts.tolist()]).long()
    return x[:, :-1], x[:, 1:]


def _full_state(engine) -> dict:
    opt = engine.optimizer
    inner = opt.optimizer if hasattr(opt, "single_partition_of_fp32_groups") else opt
    out = {"weights": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
           "optim": {i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                     for i, s in enumerate(inner.state.values())},
           "global_steps": engine.global_steps, "lr": engine.get_lr()}
    if hasattr(opt, "single_partition_of_fp32_groups"):
        out["fp32"] = [t.detach().clone() for t in opt.single_partition_of_fp32_groups]
    return out


def _peer_body(zero_stage, ext, fail, steps):
    import ds_ext
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    rank = int(os.environ["RANK"])
    torch.manual_seed(rank)  # replicas start different on purpose: a copy must make them equal, not the seed
    model = LlamaForCausalLM(ModelConfig(**{**TINY, "num_layers": 2}))
    ext = {**ext, "recovery": {"checkpoint_free": {"enabled": True, "inject": {"at": [fail]}}}}
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=ds_config(zero_stage, ext))
    cf = next(f for f in engine.ds_ext_features if f.name == "checkpoint_free")
    after_rebuild = {}
    original = cf.fail_and_rebuild

    def recording(victims):
        original(victims)
        after_rebuild.update(_full_state(engine))
    cf.fail_and_rebuild = recording
    for step in range(1, steps + 1):
        engine.backward(engine(*text_batch(rank, step)))  # replicas see different data
        engine.step()
    out = {"after_rebuild": after_rebuild, "end": _full_state(engine), "metrics": cf.metrics()}
    engine.ds_ext_close()
    return out


def test_plain_data_parallel_rank_is_rebuilt_bit_for_bit_from_its_peer():
    """ZeRO-0 data parallel on 2 processes: rank 1's state is wiped (NaN) after step 3 and copied from rank 0;
    weights, Adam moments, step and LR are then bit-identical, and stay so while training goes on."""
    results = run_distributed(_peer_body, 2, args=(0, {}, {"step": 3, "rank": 1}, 5), timeout=300)
    survivor, rebuilt = results
    for key in ("after_rebuild", "end"):
        for name, w in survivor[key]["weights"].items():
            assert torch.equal(w, rebuilt[key]["weights"][name]), f"{key}: {name}"
        assert survivor[key]["optim"].keys() == rebuilt[key]["optim"].keys() and survivor[key]["optim"]
        for i, s in survivor[key]["optim"].items():
            assert all(torch.equal(v, rebuilt[key]["optim"][i][k]) for k, v in s.items()), f"{key}: moments {i}"
        assert survivor[key]["global_steps"] == rebuilt[key]["global_steps"]
        assert survivor[key]["lr"] == rebuilt[key]["lr"]
    assert rebuilt["after_rebuild"]["global_steps"] == 3
    assert rebuilt["metrics"]["peer"] == 1 and survivor["metrics"]["peer"] == 0


def test_noloco_replica_shard_is_copied_from_the_other_replica_bit_for_bit():
    """2 NoLoCo replicas x 2 ZeRO-1 shards (4 processes): rank 3 (replica 1, shard 1) is wiped after step 2 and
    gets shard 1 of replica 0 (rank 1): fp32 partition and moments bit-identical; its ZeRO partner (rank 2) then
    sees the copied shard in the gathered weights."""
    ext = {"noloco": {"enabled": True, "inner_steps": 50, "ranks_per_replica": 2}}
    results = run_distributed(_peer_body, 4, args=(1, ext, {"step": 2, "rank": 3}, 2), timeout=400)
    src, dst = results[1]["after_rebuild"], results[3]["after_rebuild"]
    assert torch.equal(src["fp32"][0], dst["fp32"][0])
    assert all(torch.equal(v, dst["optim"][0][k]) for k, v in src["optim"][0].items())
    assert not torch.equal(results[0]["after_rebuild"]["fp32"][0], results[2]["after_rebuild"]["fp32"][0]), \
        "replica 1's untouched shard 0 must still be its own (replicas differ), or this test proves nothing"
    for name, w in results[2]["after_rebuild"]["weights"].items():
        assert torch.equal(w, dst["weights"][name]), f"ZeRO partner does not see the rebuilt shard: {name}"
        assert torch.isfinite(w).all()
