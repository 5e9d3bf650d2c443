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
    from ds_ext.data.corpus import load_corpus
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


@pytest.mark.slow
def test_noloco_replica_shard_is_copied_from_the_other_replica_bit_for_bit():
    """2 NoLoCo replicas x 2 ZeRO-1 shards (4 processes): rank 3 (replica 1, shard 1) is wiped after step 3 and
    gets shard 1 of replica 0 (rank 1): fp32 partition and moments bit-identical; its ZeRO partner (rank 2) then
    sees the copied shard in the gathered weights."""
    ext = {"noloco": {"enabled": True, "inner_steps": 50, "ranks_per_replica": 2}}
    results = run_distributed(_peer_body, 4, args=(1, ext, {"step": 3, "rank": 3}, 3), timeout=400)
    src, dst = results[1]["after_rebuild"], results[3]["after_rebuild"]
    assert torch.equal(src["fp32"][0], dst["fp32"][0])
    assert all(torch.equal(v, dst["optim"][0][k]) for k, v in src["optim"][0].items())
    assert not torch.equal(results[0]["after_rebuild"]["fp32"][0], results[2]["after_rebuild"]["fp32"][0]), \
        "replica 1's untouched shard 0 must still be its own (replicas differ), or this test proves nothing"
    for name, w in results[2]["after_rebuild"]["weights"].items():
        assert torch.equal(w, dst["weights"][name]), f"ZeRO partner does not see the rebuilt shard: {name}"
        assert torch.isfinite(w).all()


# -- stage rebuild on a 4-stage PipelineEngine ----------------------------------------------------------------------
def _pipeline_body(events, steps, interval=2):
    """The reference model (4 layers) as 4 pipeline stages on 4 processes, ZeRO-1; ``events`` are injected."""
    import deepspeed
    import ds_ext
    from ds_ext.models import ModelConfig, llama_pipeline
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = ds_config(1, {"topology": {"pipeline_stages": 4},
                        "recovery": {"checkpoint_free": {"enabled": True, "replicate_ends_interval": interval,
                                                         "inject": {"at": events}}}}, gas=2)
    cfg["optimizer"]["params"].update(lr=3e-3, weight_decay=0.0)
    cfg["scheduler"]["params"].update(warmup_max_lr=3e-3)
    topo = ds_ext.build_topology(cfg)
    torch.manual_seed(0)
    model = llama_pipeline(ModelConfig(**TINY), topology=topo.process_topology())
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=cfg, topology=topo)
    cf = next(f for f in engine.ds_ext_features if f.name == "checkpoint_free")
    seen = {}
    original = cf.fail_and_rebuild

    def recording(victims):
        seen[engine.global_steps] = now = {}
        now["before"] = {"body": cf.state.body_state(), "ends": cf.state.end_state(), "norm": cf.grad_norm,
                         "replicas": dict(cf.end_replicas)}
        original(victims)
        now["after"] = {"body": cf.state.body_state(), "ends": cf.state.end_state(),
                         "moments": len(cf.state.inner.state), "lr_scaled": cf.lr_scaled,
                         "steps": engine.global_steps}
    cf.fail_and_rebuild = recording
    losses = []
    for step in range(1, steps + 1):
        losses.append(float(engine.train_batch(iter([text_batch(0, step, m, batch=4) for m in range(2)]))))
    out = {"seen": seen, "losses": losses, "metrics": cf.metrics()}
    engine.ds_ext_close()
    return out


@pytest.mark.slow
def test_middle_stage_is_rebuilt_from_its_neighbours_and_the_loss_recovers():
    """Stage 2 of 4 loses everything after step 14: its layers become the gradient-norm-weighted average of stages 1
    and 3 (exactly the rule, with the norms those stages measured at step 14), its Adam moments start from zero, its
    LR is scaled; training goes on and the loss comes back below its pre-failure value."""
    from ds_ext.checkfree.rules import neighbour_average
    fail_step, steps = 14, 40
    res = run_distributed(_pipeline_body, 4, args=([{"step": fail_step, "stage": 2}], steps), timeout=500)
    prev, lost, nxt = (res[r]["seen"][fail_step] for r in (1, 2, 3))
    expected = neighbour_average(prev["before"]["body"], nxt["before"]["body"], prev["before"]["norm"],
                                 nxt["before"]["norm"])
    assert prev["before"]["norm"] > 0 and nxt["before"]["norm"] > 0
    assert lost["after"]["body"].keys() == expected.keys()
    for key, w in expected.items():
        assert torch.equal(lost["after"]["body"][key], w), key
        assert not torch.equal(w, prev["before"]["body"][key])  # a real mix, not a copy
    assert lost["after"]["moments"] == 0 and lost["after"]["lr_scaled"] and lost["after"]["steps"] == fail_step
    assert res[2]["metrics"]["neighbours"] == 1 and res[1]["metrics"]["failures"] == 1
    losses = res[3]["losses"]
    before = sum(losses[fail_step - 4:fail_step]) / 4
    # The wipe is NaN, so a rebuild that missed anything would make every later loss NaN. At this scale the
    # averaged layer costs almost nothing (step 15: 3.575 vs 3.573 without the failure, measured); the loss must
    # have fallen before the failure and keep falling after it.
    assert before < losses[0] - 0.5, losses
    assert all(torch.isfinite(torch.tensor(losses[fail_step:]))), losses
    assert sum(losses[-4:]) / 4 < before, losses


@pytest.mark.slow
def test_end_stages_are_rebuilt_from_their_partner_and_its_replica_of_the_embedding():
    """CheckFree+ rule for the ends: stage 0 fails after step 5 (replicas every 2 steps: the embedding replica is
    from step 4) and gets stage 1's layers plus that replica; the last stage fails after step 7 likewise."""
    res = run_distributed(_pipeline_body, 4, args=([{"step": 5, "stage": 0}, {"step": 7, "stage": 3}], 8), timeout=500)
    first, second = (res[r]["seen"][5] for r in (0, 1))
    third, last = (res[r]["seen"][7] for r in (2, 3))
    assert first["after"]["body"].keys() == second["before"]["body"].keys()
    for key, w in second["before"]["body"].items():
        assert torch.equal(first["after"]["body"][key], w), key
    assert set(first["after"]["ends"]) == {"0.embed.weight"}
    assert torch.equal(first["after"]["ends"]["0.embed.weight"], second["before"]["replicas"]["0.embed.weight"])
    assert not torch.equal(first["after"]["ends"]["0.embed.weight"], first["before"]["ends"]["0.embed.weight"]), \
        "the replica is from step 4, the lost weights from step 5: they must differ, or this test proves nothing"
    for key, w in third["before"]["body"].items():
        assert torch.equal(last["after"]["body"][key], w), key
    for name, w in last["after"]["ends"].items():
        assert torch.equal(w, third["before"]["replicas"][name]), name
    assert res[0]["metrics"]["partner"] == 1 and res[3]["metrics"]["partner"] == 1
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in res)


# -- kill -9 with the disk gone: relaunch rebuilds from live ranks -----------------------------------------------------
def _journaled_body(layout, journal_dir, steps, kill=None):
    """``layout="noloco"``: 2 NoLoCo replicas x 1 rank (plain model); ``"pipeline"``: 4 stages (PipelineEngine);
    ``"pipeline_swap"``: the same with CheckFree+'s swapped end stages.
    Both ZeRO-1, journaled, checkpoint-free on. The victim dies with SIGKILL at the start of step ``kill[1]``."""
    import deepspeed
    import ds_ext
    from ds_ext.models import LlamaForCausalLM, ModelConfig, llama_pipeline
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    ext = {"recovery": {"journal_dir": journal_dir, "base_interval": 3,
                        "checkpoint_free": {"enabled": True, "replicate_ends_interval": 1,
                                            "swap_end_stages": layout == "pipeline_swap"}}}
    ext.update({"noloco": {"enabled": True, "inner_steps": 4, "ranks_per_replica": 1}} if layout == "noloco"
               else {"topology": {"pipeline_stages": 4}})
    cfg = ds_config(1, ext, gas=2)
    topo = ds_ext.build_topology(cfg)
    torch.manual_seed(0)
    model = (LlamaForCausalLM(ModelConfig(**TINY)) if layout == "noloco"
             else llama_pipeline(ModelConfig(**TINY), topology=topo.process_topology()))
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=cfg, topology=topo)
    start = engine.global_steps
    at_start = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    features = {f.name: f for f in engine.ds_ext_features}
    for step in range(start + 1, steps + 1):
        if kill and kill[0] == rank and kill[1] == step:
            features["recovery"].writer.wait_written()
            os.kill(os.getpid(), signal.SIGKILL)
        if layout == "noloco":
            for micro in range(2):
                engine.backward(engine(*text_batch(rank, step, micro)))
                engine.step()
        else:
            engine.train_batch(iter([text_batch(0, step, m) for m in range(2)]))
    out = {"start": start, "at_start": at_start, "metrics": engine.ds_ext_metrics(),
           "weights": {n: p.detach().clone() for n, p in engine.module.named_parameters()}}
    engine.ds_ext_close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout,victim,kind", [("noloco", 1, "peer"), ("pipeline", 2, "neighbours"),
                                                 ("pipeline_swap", 0, "partner"), ("pipeline_swap", 3, "partner")])
def test_kill_9_with_its_journal_deleted_is_rebuilt_from_live_ranks_at_relaunch(layout, victim, kind, tmp_path):
    """The victim is killed at step 6 and its journal directory deleted (the node's disk is gone). The relaunch
    resumes every other rank from its journal at step 5 (no lost step) and rebuilds the victim without any
    checkpoint: a copy of the other NoLoCo replica, the CheckFree average of pipeline stages 1 and 3, or (CheckFree+,
    swapped end stages) the first or last stage copied from its partner stage and the partner's replica of its
    embedding or head; every swapped step after the rebuild trains on."""
    import shutil
    from ds_ext.recovery.journal import rank_dir
    world, steps, kill_step = (2, 8, 6) if layout == "noloco" else (4, 8, 6)
    swap = layout == "pipeline_swap"
    journal_dir = str(tmp_path / "journal")
    run_distributed(_journaled_body, world, args=(layout, journal_dir, steps, (victim, kill_step)), timeout=400,
                    may_die=tuple(range(world)), group_dies_with=True)
    shutil.rmtree(rank_dir(journal_dir, victim))
    resumed = run_distributed(_journaled_body, world, args=(layout, journal_dir, steps + 3), timeout=400)
    # A pipeline runs in lockstep: everyone stopped at step 5. A NoLoCo replica does not wait for a dead partner
    # (its exchange times out), so the survivor may have gone further; the rebuilt replica joins it there.
    survivor_step = resumed[0]["start"]
    assert survivor_step == kill_step - 1 if layout != "noloco" else survivor_step >= kill_step - 1
    for rank in range(world):
        assert resumed[rank]["start"] == survivor_step, f"rank {rank} resumed at {resumed[rank]['start']}"
        assert resumed[rank]["metrics"]["recovery/resumed_step"] == survivor_step
        assert all(torch.isfinite(w).all() for w in resumed[rank]["weights"].values())
    assert resumed[victim]["metrics"][f"checkpoint_free/{kind}"] == 1
    if swap:  # the relaunch trained 6 more steps through the swapped schedule (2 micro-batches, one swapped, each)
        assert resumed[victim]["metrics"]["checkpoint_free/schedule_steps"] == steps + 3 - survivor_step
        assert resumed[victim]["metrics"]["checkpoint_free/swapped_micro_batches"] == steps + 3 - survivor_step
        partner = 1 if victim == 0 else 2
        shared = [n for n in resumed[partner]["at_start"] if n.split(".", 1)[1] in
                  {k.split(".", 1)[1] for k in resumed[victim]["at_start"]} and "embed" not in n and "head" not in n
                  and "norm.weight" != n.split(".", 1)[1]]
        assert shared, "the partner must share the victim's layer structure"
        for name in shared:  # a plain copy of the partner's layer, by local layer position (one layer per stage)
            mine = next(k for k in resumed[victim]["at_start"] if k.split(".", 1)[1] == name.split(".", 1)[1])
            assert torch.equal(resumed[victim]["at_start"][mine], resumed[partner]["at_start"][name]), name
    if layout == "noloco":  # the copy is bit-exact: both replicas start the resumed run from rank 0's state
        for name, w in resumed[0]["at_start"].items():
            assert torch.equal(w, resumed[victim]["at_start"][name]), name
    assert os.path.isdir(rank_dir(journal_dir, victim)), "the rebuilt rank must journal again"
