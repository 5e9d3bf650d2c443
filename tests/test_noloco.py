"""NoLoCo: update rules, pairing, and real 2-4 process DeepSpeed runs (exact pair mean, collective spans, faults)."""
import os
import signal
import time

import pytest
import torch

from dist import run_distributed
from ds_ext.contract import FeatureBase, Phase
from ds_ext.noloco.gossip import pairing, partner_of
from ds_ext.noloco.outer import OuterState, diloco_update, noloco_update
from test_engine import TINY, batches

# anchor + (mean - anchor) and anchor - (anchor - mean) differ from mean by rounding: at most a few fp32 ulps of the
# largest weight (weights here are < 4 in magnitude, ulp(4) = 4.8e-7).
ULP_ATOL = 2e-6


def test_noloco_rule_matches_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    theta0_i, theta0_j, theta_i, theta_j = (torch.randn(50, generator=g) for _ in range(4))
    state = OuterState(anchor=theta0_i.clone(), momentum=torch.randn(50, generator=g))
    m_prev = state.momentum.clone()
    weights = theta_i.clone()
    noloco_update(weights, (theta_i + theta_j) / 2, state, lr=0.7, momentum=0.5)
    # the reference's two-term bracket: pair-mean pseudo-gradient + pull toward the pair's mean outer weights
    bracket = ((theta_i - theta0_i) + (theta_j - theta0_j)) / 2 + ((theta0_i + theta0_j) / 2 - theta0_i)
    m = 0.5 * m_prev + 0.7 * bracket
    assert torch.allclose(state.momentum, m, atol=1e-6) and torch.allclose(weights, theta0_i + m, atol=1e-6)
    assert torch.equal(weights, state.anchor)


def test_diloco_rule_is_nesterov_sgd_on_the_mean_pseudo_gradient():
    anchor, w = torch.ones(4), torch.full((4,), 0.5)
    state = OuterState.start(anchor)
    diloco_update(w, anchor - w, state, lr=0.7, momentum=0.9)
    # b = delta = 0.5; step = lr * (delta + mu * b) = 0.7 * 0.95
    assert torch.allclose(w, torch.full((4,), 1 - 0.7 * 0.95))
    ref = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    ref.grad = torch.full((4,), 0.5)
    opt.step()
    assert torch.allclose(w, ref.detach())


@pytest.mark.parametrize("replicas", [2, 3, 4, 7])
def test_pairing_is_shared_random_and_covers_every_replica(replicas):
    for step in range(5):
        groups = pairing(replicas, step, seed=3)
        assert groups == pairing(replicas, step, seed=3)
        assert sorted(r for g in groups for r in g) == list(range(replicas))
        assert sum(len(g) == 1 for g in groups) == replicas % 2  # odd counts: one replica sits out
        for g in groups:
            assert all(partner_of(r, replicas, step, 3) == next((x for x in g if x != r), None) for r in g)
    if replicas >= 4:
        assert len({tuple(map(tuple, pairing(replicas, s))) for s in range(10)}) > 1  # pairs change over time


def noloco_config(stage: int, mode="noloco", inner_steps=2, **noloco) -> dict:
    from test_engine import ds_config
    cfg = ds_config(stage)
    cfg["ds_ext"] = {"noloco": {"enabled": True, "mode": mode, "inner_steps": inner_steps, **noloco}}
    return cfg


class WeightProbe(FeatureBase):
    """Records the full model weights at start and every ``every`` optimizer steps. Phase MODEL (the default): its
    hook runs before NoLoCo's (STEP), so it sees the weights before the outer step; phase JOURNAL: after it."""

    def __init__(self, every: int, phase: Phase = Phase.MODEL):
        self.name, self.phase = f"probe_{phase.name.lower()}", phase
        self.every, self.before, self.start_weights = every, {}, None

    def start(self, engine):
        self.start_weights = flat_weights(engine)

    def after_optimizer_step(self, engine):
        if engine.global_steps % self.every == 0:
            self.before[engine.global_steps] = flat_weights(engine)


def feature(engine, name: str):
    return next(f for f in engine.ds_ext_features if f.name == name)


def comm_functions() -> dict:
    """The communication functions NoLoCo's accounting wraps, as they are now: torch.distributed's and the two
    DeepSpeed's backend bound (call after deepspeed.init_distributed)."""
    import torch.distributed as dist
    from ds_ext._deepspeed import comm_backend_collectives
    from ds_ext.noloco.accounting import KINDS
    out = {n: getattr(dist, n) for n in KINDS if hasattr(dist, n)}
    out.update({f"backend.{name}": getattr(obj, attr) for obj, attr, name in comm_backend_collectives()})
    return out


def patched(originals: dict) -> dict:
    """Which of ``originals`` (a :func:`comm_functions`) has been replaced since."""
    return {name: fn is not originals[name] for name, fn in comm_functions().items()}


def flat_weights(engine) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().clone() for p in engine.module.parameters()])


def build(config, **kw):
    import ds_ext
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**TINY))
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=config, **kw)
    return engine


def train_steps(engine, steps: int, seed: int):
    for x, y in batches(steps * engine.gradient_accumulation_steps(), seed=seed):
        engine.backward(engine(x, y))
        engine.step()


def _noloco_run_body(stage: int):
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    originals = comm_functions()
    results = {}
    for mode in ("noloco", "diloco"):
        engine = build(noloco_config(stage, mode, inner_steps=2, outer_lr=1.0, outer_momentum=0.0,
                                     ranks_per_replica=2, count_collectives=True))
        probe = WeightProbe(2)
        engine.attach_feature(probe)  # phase MODEL: runs before NoLoCo's outer step
        rank = deepspeed.comm.get_rank()
        train_steps(engine, 2, seed=rank)  # step 2: outer step
        after_first = flat_weights(engine)
        train_steps(engine, 2, seed=100 + rank)  # step 4: second outer step
        noloco = feature(engine, "noloco")
        during = patched(originals)
        results[mode] = {"before": probe.before[2], "after": after_first, "metrics": noloco.metrics(),
                         "cross": list(noloco.accounting.cross_replica_ops), "dp_world": engine.dp_world_size,
                         "order": [f.name for f in engine.ds_ext_features]}
        engine.ds_ext_close()
        engine.ds_ext_close()  # idempotent
        results[mode]["patched"] = (during, patched(originals), list(engine.ds_ext_features))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_two_replicas_of_two_zero_shards(stage):
    """4 processes = 2 replicas x 2 ZeRO shards. With outer_lr 1 and momentum 0, the weights after an outer step are
    the exact mean of the pair's weights, and equal DiLoCo's with the same settings; NoLoCo makes no collective that
    spans replicas, only point-to-point exchanges, while DiLoCo all-reduces across them."""
    r = run_distributed(_noloco_run_body, world_size=4, args=(stage,), timeout=500)
    pair_mean = (r[0]["noloco"]["before"] + r[2]["noloco"]["before"]) / 2
    assert not torch.equal(r[0]["noloco"]["before"], r[2]["noloco"]["before"])  # replicas had diverged
    for x in r:
        assert x["noloco"]["dp_world"] == 2 and x["noloco"]["order"] == ["probe_model", "noloco"]
        for mode in ("noloco", "diloco"):  # count_collectives wraps every function; ds_ext_close unwraps them all
            during, after, attached = x[mode]["patched"]
            assert all(during.values()) and "backend.all_gather_into_tensor" in during and not any(after.values())
            assert attached == []
        assert (x["noloco"]["after"] - pair_mean).abs().max().item() <= ULP_ATOL
        assert (x["diloco"]["after"] - x["noloco"]["after"]).abs().max().item() <= ULP_ATOL
        m = x["noloco"]["metrics"]
        assert x["noloco"]["cross"] == [] and m["cross_replica_collectives"] == 0
        assert m["mixed"] == 2 and m["skipped"] == 0 and m["outer_step"] == 2
        assert m["calls/p2p/cross_replica"] == 4  # isend + irecv per outer step
        assert m["bytes/p2p/cross_replica"] == 2 * m["bytes_sent"]  # counted on send and on receive
        inner = "calls/reduce_scatter/replica" if stage == 2 else "calls/all_reduce/replica"
        assert m.get(inner, 0) + m.get("calls/all_reduce/replica", 0) > 0  # ZeRO did reduce, inside the replica
        assert m.get("calls/all_gather/replica", 0) > 0
        assert x["diloco"]["cross"].count("all_reduce") == 2  # the baseline does use a global collective
    for a, b in ((0, 1), (2, 3)):  # shards of one replica stay one model
        assert torch.equal(r[a]["noloco"]["after"], r[b]["noloco"]["after"])


def _dead_partner_body(out_dir: str):
    import deepspeed
    engine = build(noloco_config(1, inner_steps=3, exchange_timeout_s=5.0))
    rank = deepspeed.comm.get_rank()
    if rank == 1:
        train_steps(engine, 2, seed=rank)
        os.kill(os.getpid(), signal.SIGKILL)  # dies before the outer step at step 3
    t0 = time.monotonic()
    train_steps(engine, 6, seed=rank)  # outer steps at 3 and 6, both with a dead partner
    return {"seconds": time.monotonic() - t0, "metrics": feature(engine, "noloco").metrics(),
            "steps": engine.global_steps}


@pytest.mark.slow
def test_dead_partner_is_skipped_without_hanging(tmp_path):
    """2 replicas x 1 rank; rank 1 is killed (SIGKILL) before the first outer step. The survivor times out or sees
    the broken link, skips the mixing, counts it and finishes its steps; the whole test is bounded."""
    r = run_distributed(_dead_partner_body, world_size=2, args=(str(tmp_path),), timeout=200, may_die=(1,))
    assert r[1] is None
    survivor = r[0]
    assert survivor["steps"] == 6
    assert survivor["metrics"]["skipped"] == 2 and survivor["metrics"]["mixed"] == 0
    assert survivor["seconds"] < 2 * 5.0 + 60  # two exchange timeouts at most, plus the training itself


def test_replicas_without_noloco_are_refused():
    from ds_ext.config import DsExtConfig, DsExtConfigError
    from ds_ext.topology import Topology
    with pytest.raises(DsExtConfigError, match="enable ds_ext.noloco"):
        Topology.from_config(DsExtConfig(topology={"ranks_per_replica": 1}), world_size=2)
    topo = Topology.from_config(DsExtConfig(noloco={"enabled": True}), world_size=4)
    assert topo.num_replicas == 4  # NoLoCo without ranks_per_replica: every rank is a replica


def _pipeline_body():
    import itertools

    import deepspeed
    import ds_ext
    from ds_ext.models import ModelConfig, llama_pipeline
    config = noloco_config(1, inner_steps=2, outer_lr=1.0, outer_momentum=0.0, ranks_per_replica=2,
                           count_collectives=True)
    config["ds_ext"]["topology"] = {"pipeline_stages": 2}
    topo = ds_ext.build_topology(config)
    torch.manual_seed(0)
    model = llama_pipeline(ModelConfig(**TINY), topology=topo.process_topology())
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=config, topology=topo)
    probe = WeightProbe(2)
    engine.attach_feature(probe)  # phase MODEL: runs before NoLoCo's outer step
    replica = topo.coords(deepspeed.comm.get_rank())[0]
    data = itertools.cycle(list(batches(4, seed=replica)))  # the two stages of a replica read the same data
    losses = [engine.train_batch(data).item() for _ in range(2)]
    noloco = feature(engine, "noloco")
    out = {"coords": topo.coords(deepspeed.comm.get_rank()), "before": probe.before[2],
           "after": flat_weights(engine), "cross": list(noloco.accounting.cross_replica_ops),
           "metrics": noloco.metrics(), "cls": type(engine).__name__, "losses": losses}
    engine.ds_ext_close()
    return out


@pytest.mark.slow
def test_each_replica_a_pipeline_pairs_within_each_stage():
    """4 processes = 2 replicas x 2 pipeline stages (ZeRO-1): stage s of replica 0 mixes with stage s of replica 1."""
    r = run_distributed(_pipeline_body, world_size=4, timeout=500)
    assert [x["coords"] for x in r] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]
    for stage in (0, 1):
        a, b = r[stage], r[2 + stage]
        assert a["cls"] == "DsExtPipelineEngine" and not torch.equal(a["before"], b["before"])
        mean = (a["before"] + b["before"]) / 2
        for x in (a, b):
            assert (x["after"] - mean).abs().max().item() <= ULP_ATOL
            assert x["cross"] == [] and x["metrics"]["mixed"] == 1


def test_wire_bytes_follow_the_ring_model():
    from ds_ext.noloco.accounting import wire_bytes_sent
    assert wire_bytes_sent("all_reduce", 1000, 4) == 1500           # 2(n-1)/n
    assert wire_bytes_sent("reduce_scatter_tensor", 1000, 4) == 750  # (n-1)/n of the full input
    assert wire_bytes_sent("all_gather_into_tensor", 250, 4) == 750  # (n-1) x the local part
    assert wire_bytes_sent("isend", 1000, 2) == 1000 and wire_bytes_sent("irecv", 1000, 2) == 0
    assert wire_bytes_sent("all_reduce", 1000, 1) == 0               # a group of one sends nothing


def _slow_partner_body(flag: str):
    import deepspeed
    engine = build(noloco_config(1, inner_steps=2, exchange_timeout_s=2.0))
    rank = deepspeed.comm.get_rank()
    train_steps(engine, 1, seed=rank)
    if rank == 1:  # held until rank 0 has given up on the outer step of step 2: an event, not a sleep
        while not os.path.exists(flag):
            time.sleep(0.05)
    train_steps(engine, 1, seed=rank)  # the outer step of step 2
    if rank == 0:
        first = feature(engine, "noloco").metrics()["skipped"]
        open(flag, "w").write(str(first))
    train_steps(engine, 8, seed=rank)  # outer steps at 4, 6, 8, 10
    m = feature(engine, "noloco").metrics()
    return {"skipped": m["skipped"], "mixed": m["mixed"], "outer_step": m["outer_step"],
            "first_skipped": int(open(flag).read())}


@pytest.mark.slow
def test_slow_partner_is_skipped_and_the_pair_recovers(tmp_path):
    """Rank 1 is held back until rank 0 has timed out on the first outer step (2 s), so rank 0 skips that mixing
    whatever the machine's speed; rank 1 then finds rank 0's message of that round already there and mixes it, and
    the pair mixes again in later rounds (rank 1 catches up within milliseconds, far inside the 2 s timeout). The
    link survives the timeout and no message lands in the wrong round (each rank counts every round once)."""
    r = run_distributed(_slow_partner_body, world_size=2, args=(str(tmp_path / "skipped"),), timeout=200)
    assert r[0]["first_skipped"] == 1
    assert r[0]["outer_step"] == r[1]["outer_step"] == 5
    for x in r:
        assert x["mixed"] + x["skipped"] == 5
    assert r[1]["skipped"] == 0 and r[1]["mixed"] == 5  # rank 0's messages were always there first
    assert r[0]["mixed"] >= 1  # the pair recovered: a later round mixed again


def _checkpoint_body(save_dir: str):
    import deepspeed
    engine = build(noloco_config(1, inner_steps=2))
    rank = deepspeed.comm.get_rank()
    train_steps(engine, 3, seed=rank)
    engine.save_checkpoint(save_dir)
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in feature(engine, "noloco").state_dict().items()}
    weights = flat_weights(engine)
    engine.ds_ext_close()
    fresh = build(noloco_config(1, inner_steps=2))
    path, _ = fresh.load_checkpoint(save_dir)
    restored = feature(fresh, "noloco").state_dict()
    fresh.ds_ext_close()
    return {"path": path, "saved": saved, "restored": restored, "weights": weights, "loaded": flat_weights(fresh),
            "steps": fresh.global_steps}


def test_outer_state_and_replica_weights_round_trip_through_checkpoints(tmp_path):
    r = run_distributed(_checkpoint_body, world_size=2, args=(str(tmp_path),))
    for rank, x in enumerate(r):
        assert f"replica_{rank}" in x["path"] and x["steps"] == 3
        assert x["restored"]["outer_step"] == x["saved"]["outer_step"] == 1
        assert torch.equal(x["restored"]["anchor"], x["saved"]["anchor"])
        assert torch.equal(x["restored"]["momentum"], x["saved"]["momentum"])
        assert torch.equal(x["loaded"], x["weights"])
    assert not torch.equal(r[0]["weights"], r[1]["weights"])  # each replica restored its own weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replica_0", "replica_1"]
    assert (tmp_path / "replica_1" / "latest").read_text() == "global_step3"


# a few fp32 roundings (pair mean, difference, momentum and anchor updates, each outer step) of weights < 4 in
# magnitude (ulp(4) = 4.8e-7) between the feature's fp32 arithmetic and the float64 recomputation in the test
RULE_ATOL = 1e-5


def _momentum_body():
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    originals = comm_functions()
    config = noloco_config(1, inner_steps=2, outer_lr=0.7, outer_momentum=0.5)  # count_collectives: the default
    config["ds_ext"]["asyncflow"] = {"enabled": True}  # the sample ledger: a second STEP feature, built by features.py
    engine = build(config)
    before, after = WeightProbe(2), WeightProbe(2, Phase.JOURNAL)  # around NoLoCo's outer step
    engine.attach_feature(after)
    engine.attach_feature(before)
    train_steps(engine, 4, seed=deepspeed.comm.get_rank())  # outer steps after optimizer steps 2 and 4
    out = {"start": before.start_weights, "before": before.before, "after": after.before,
           "metrics": feature(engine, "noloco").metrics(), "patched": patched(originals),
           "order": [f.name for f in engine.ds_ext_features]}
    engine.ds_ext_close()
    out["after_close"] = (list(engine.ds_ext_features), patched(originals))
    return out


def test_outer_momentum_end_to_end_and_accounting_off_by_default():
    """2 replicas x 1 rank, outer_lr 0.7, momentum 0.5, two outer steps. After each, every replica's weights are the
    NoLoCo rule recomputed here in float64 from the pair's weights before the step and the replica's own anchor and
    momentum; at the second step the momentum term moves the weights by far more than the tolerance, so a feature
    that dropped it would fail. Without count_collectives no communication function is wrapped and no accounting
    metric is reported."""
    r = run_distributed(_momentum_body, world_size=2)
    lr, beta = 0.7, 0.5
    assert r[0]["order"] == ["probe_model", "noloco", "asyncflow", "probe_journal"]
    assert torch.equal(r[0]["start"], r[1]["start"])  # replicas start from replica 0's weights
    anchor = [x["start"].double() for x in r]
    momentum = [torch.zeros_like(a) for a in anchor]
    for step in (2, 4):
        mean = (r[0]["before"][step].double() + r[1]["before"][step].double()) / 2
        for i, x in enumerate(r):
            without_momentum = anchor[i] + lr * (mean - anchor[i])
            momentum[i] = beta * momentum[i] + lr * (mean - anchor[i])
            anchor[i] = anchor[i] + momentum[i]
            assert (x["after"][step].double() - anchor[i]).abs().max().item() <= RULE_ATOL
            if step == 4:
                assert (anchor[i] - without_momentum).abs().max().item() > 100 * RULE_ATOL
    for x in r:
        assert x["metrics"]["outer_step"] == 2 and x["metrics"]["mixed"] == 2
        assert not any(x["patched"].values()) and "backend.all_gather_into_tensor" in x["patched"]
        assert x["after_close"][0] == [] and not any(x["after_close"][1].values())
        assert not [k for k in x["metrics"] if k.startswith(("calls/", "bytes/", "sent_bytes", "cross_replica"))]


def _odd_replicas_body():
    import deepspeed
    engine = build(noloco_config(1, inner_steps=2, outer_lr=0.7, outer_momentum=0.0))
    before, after = WeightProbe(2), WeightProbe(2, Phase.JOURNAL)
    engine.attach_feature(before)
    engine.attach_feature(after)
    rank = deepspeed.comm.get_rank()
    losses = []
    for _ in range(3):  # the same 4 micro-batches (2 optimizer steps) three times: outer steps at 2, 4 and 6
        for x, y in batches(2 * engine.gradient_accumulation_steps(), seed=rank):
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    out = {"start": before.start_weights, "before": before.before, "after": after.before, "losses": losses,
           "metrics": feature(engine, "noloco").metrics(), "threads": torch.get_num_threads()}
    engine.ds_ext_close()
    return out


def test_odd_number_of_replicas_end_to_end():
    """3 processes = 3 replicas (1 thread each), outer_lr 0.7, momentum 0, three outer steps. In each, the two paired
    replicas move 0.7 of the way from their anchor to the pair mean and the left-over replica 0.7 of the way along
    its own pseudo-gradient (so its weights change too); over the run each replica's loss on its repeated data
    falls."""
    r = run_distributed(_odd_replicas_body, world_size=3, timeout=400)
    assert all(x["threads"] == 1 for x in r)
    lr = 0.7
    anchors = [x["start"].double() for x in r]
    for k, step in enumerate((2, 4, 6)):
        groups = pairing(3, k)
        assert sorted(len(g) for g in groups) == [1, 2]
        for i, x in enumerate(r):
            partner = partner_of(i, 3, k)
            own = r[i]["before"][step].double()
            target = own if partner is None else (own + r[partner]["before"][step].double()) / 2
            expected = anchors[i] + lr * (target - anchors[i])
            assert (x["after"][step].double() - expected).abs().max().item() <= RULE_ATOL, (step, i, partner)
            if partner is None:  # the outer step did move the left-over replica, by a visible amount
                assert (x["after"][step].double() - own).abs().max().item() > 100 * RULE_ATOL
        anchors = [x["after"][step].double() for x in r]
    assert sum(x["metrics"]["sat_out"] for x in r) == 3  # one replica per outer step
    for x in r:
        m = x["metrics"]
        assert m["outer_step"] == 3 and m["mixed"] + m["sat_out"] == 3 and m["skipped"] == 0
        first, last = sum(x["losses"][:4]) / 4, sum(x["losses"][-4:]) / 4  # the same 4 micro-batches
        assert last < 0.9 * first, x["losses"]
