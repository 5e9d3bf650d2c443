"""Engine mode on real DeepSpeed engines over 2-4 gloo processes: bit-identity with features off, the feature
seams, ZeRO sharding inside a replica, and the pipeline engine."""
import itertools

import pytest
import torch

from dist import run_distributed
from ds_ext.contract import FeatureBase, Phase

TINY = dict(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32)


def ds_config(stage: int, ext: dict = None, gas: int = 2) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "gradient_clipping": 1.0,
           "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
           "zero_optimization": {"stage": stage}}
    if ext is not None:
        cfg["ds_ext"] = ext
    return cfg


def batches(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 256, (2, 17), generator=g)
        yield x[:, :-1], x[:, 1:]


def train(init_fn, stage: int, steps: int, ext=None, seed_data=None, **init_kwargs):
    """Build the tiny reference model (seed 0), train ``steps`` optimizer steps, return the engine."""
    import deepspeed
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**TINY))
    engine, *_ = init_fn(model=model, model_parameters=model.parameters(), config=ds_config(stage, ext),
                         **init_kwargs)
    rank = deepspeed.comm.get_rank() if seed_data is None else seed_data
    for x, y in batches(steps * engine.gradient_accumulation_steps(), seed=rank):
        engine.backward(engine(x, y))
        engine.step()
    return engine


def weights(engine) -> dict:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _parity_body(stage: int):
    import deepspeed
    import ds_ext
    stock = train(deepspeed.initialize, stage, 10)
    via_ext = train(ds_ext.initialize, stage, 10, ext={})
    ds_ext.register()
    try:
        via_register = train(deepspeed.initialize, stage, 10, ext={})
    finally:
        ds_ext.unregister()
    torch.manual_seed(0)
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    initial = {n: p.detach().clone() for n, p in LlamaForCausalLM(ModelConfig(**TINY)).named_parameters()}
    return {"classes": [type(e).__name__ for e in (stock, via_ext, via_register)],
            "stock": weights(stock), "ext": weights(via_ext), "register": weights(via_register), "initial": initial}


@pytest.mark.parametrize("stage", [1, 2])
def test_features_off_is_bit_identical_to_stock_deepspeed(stage):
    results = run_distributed(_parity_body, world_size=2, args=(stage,))
    for r in results:
        assert r["classes"] == ["DeepSpeedEngine", "DsExtEngine", "DsExtEngine"]
        for name, w in r["stock"].items():
            assert torch.equal(w, r["ext"][name]), f"ds_ext.initialize differs from stock at {name}"
            assert torch.equal(w, r["register"][name]), f"register() path differs from stock at {name}"
        changed = [n for n, w in r["stock"].items() if not torch.equal(w, r["initial"][n])]
        assert len(changed) == len(r["stock"]), "training must move every weight, or the comparison proves nothing"
    for name, w in results[0]["stock"].items():
        assert torch.equal(w, results[1]["stock"][name]), "data-parallel ranks must hold the same weights"


class CountingFeature(FeatureBase):
    """A minimal feature: counts optimizer steps and keeps that count in the engine's checkpoints."""

    name = "counter"

    def __init__(self):
        self.steps = 0

    def after_optimizer_step(self, engine):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, sd):
        self.steps = sd["steps"]


def _feature_seam_body(save_dir: str):
    import ds_ext
    engine = train(ds_ext.initialize, 1, 0, ext={})
    feature = CountingFeature()
    engine.attach_feature(feature)
    for x, y in batches(6, seed=1):  # gas=2: 3 optimizer steps
        engine.backward(engine(x, y))
        engine.step()
    engine.save_checkpoint(save_dir, tag="t3", client_state={"user": 7})
    fresh = train(ds_ext.initialize, 1, 0, ext={})
    restored = CountingFeature()
    fresh.attach_feature(restored)
    _, client = fresh.load_checkpoint(save_dir, tag="t3")
    duplicate_refused = False
    try:
        fresh.attach_feature(CountingFeature())
    except ValueError:
        duplicate_refused = True
    return {"steps": feature.steps, "global_steps": engine.global_steps, "restored": restored.steps,
            "client": client, "duplicate_refused": duplicate_refused}


def test_feature_hooks_run_once_per_optimizer_step_and_ride_in_checkpoints(tmp_path):
    for r in run_distributed(_feature_seam_body, world_size=2, args=(str(tmp_path),)):
        assert r["steps"] == 3 == r["global_steps"]
        assert r["restored"] == 3
        assert r["client"]["user"] == 7 and "ds_ext" not in r["client"]
        assert r["duplicate_refused"]


class Recorder(FeatureBase):
    """Logs every hook it receives as ``(name, hook, global_steps)`` into a log shared by several features. Its
    journal payload is the step its ``after_optimizer_step`` saw (None until then, and after it was read)."""

    def __init__(self, name: str, phase: Phase, log: list):
        self.name, self.phase, self.log = name, phase, log
        self._step_payload = None

    def _note(self, hook, engine=None):
        self.log.append((self.name, hook, None if engine is None else engine.global_steps))

    def start(self, engine):
        self._note("start", engine)

    def after_optimizer_step(self, engine):
        self._note("after_optimizer_step", engine)
        self._step_payload = engine.global_steps

    def after_skipped_step(self, engine):
        self._note("after_skipped_step", engine)

    def after_state_lost(self, engine):
        self._note("after_state_lost", engine)

    def journal_payload(self):
        payload, self._step_payload = self._step_payload, None
        return payload

    def close(self):
        self._note("close")


class JournalRecorder(Recorder):
    """Like the recovery journal: in its ``after_optimizer_step`` it records every other feature's payload."""

    def __init__(self, log: list):
        super().__init__("journal", Phase.JOURNAL, log)
        self.records = {}

    def after_optimizer_step(self, engine):
        super().after_optimizer_step(engine)
        self.records[engine.global_steps] = {f.name: f.journal_payload() for f in engine.ds_ext_features
                                             if f is not self}


class FailingStart(Recorder):
    def start(self, engine):
        raise ValueError("no start today")


def _optimizer_steps(engine, n: int, seed: int, scale: float = 1.0):
    for x, y in batches(n * engine.gradient_accumulation_steps(), seed=seed):
        engine.backward(engine(x, y) * scale)
        engine.step()


def _refusal(fn) -> str:
    try:
        fn()
    except (TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


def _contract_body():
    import ds_ext
    engine = train(ds_ext.initialize, 1, 0, ext={})  # initialize started the (no) built-in features
    log = []
    journal = JournalRecorder(log)
    engine.attach_feature(journal)  # attached first, yet runs last: its phase is JOURNAL
    engine.attach_feature(Recorder("user", Phase.STEP, log))
    engine.attach_feature(Recorder("model", Phase.MODEL, log))
    order = [f.name for f in engine.ds_ext_features]
    starts = list(log)
    del log[:]
    _optimizer_steps(engine, 2, seed=0)
    steps_log = list(log)
    del log[:]
    # a non-finite gradient: ZeRO's overflow check skips the optimizer step (as on an fp16 loss-scale overflow)
    _optimizer_steps(engine, 1, seed=1, scale=float("nan"))
    skipped_log, skipped = list(log), engine.skipped_steps
    del log[:]
    engine.ds_ext_notify("after_state_lost")
    lost_log = list(log)
    refused = {"not_a_feature": _refusal(lambda: engine.attach_feature(object())),
               "partial": _refusal(lambda: engine.attach_feature(type("Partial", (), {"name": "p"})())),
               "bad_phase": _refusal(lambda: engine.attach_feature(Recorder("odd", 7, log))),
               "duplicate": _refusal(lambda: engine.attach_feature(Recorder("user", Phase.STEP, log))),
               "unknown_hook": _refusal(lambda: engine.ds_ext_notify("after_lunch")),
               "start_via_notify": _refusal(lambda: engine.ds_ext_notify("start")),
               "start_fails": _refusal(lambda: engine.attach_feature(FailingStart("late", Phase.STEP, log)))}
    refused["late_attached"] = any(f.name == "late" for f in engine.ds_ext_features)
    del log[:]
    engine.ds_ext_close()
    close_log, attached_after_close = list(log), list(engine.ds_ext_features)
    del log[:]
    engine.ds_ext_close()  # idempotent: nothing left to close
    _optimizer_steps(engine, 1, seed=2)  # detached: no hook runs any more
    return {"order": order, "starts": starts, "steps_log": steps_log, "records": journal.records,
            "skipped_log": skipped_log, "skipped": skipped, "lost_log": lost_log, "refused": refused,
            "close_log": close_log, "attached_after_close": attached_after_close, "log_after_close": list(log)}


def test_feature_contract_phases_start_notify_skip_and_close():
    """Features a user attaches after ds_ext.initialize run in phase order whatever the attach order, are started at
    once, and the JOURNAL-phase feature sees each STEP feature's payload of the same step; a skipped step sends
    after_skipped_step only; ds_ext_notify is the event bus; bad features are refused with a message; ds_ext_close
    closes in reverse phase order, detaches, and is idempotent."""
    (r,) = run_distributed(_contract_body, world_size=1)
    assert r["order"] == ["model", "user", "journal"]
    assert r["starts"] == [("journal", "start", 0), ("user", "start", 0), ("model", "start", 0)]
    hooks = [(name, hook) for name, hook, _ in r["steps_log"]]
    assert hooks == [("model", "after_optimizer_step"), ("user", "after_optimizer_step"),
                     ("journal", "after_optimizer_step")] * 2
    assert r["records"][1] == {"model": 1, "user": 1} and r["records"][2] == {"model": 2, "user": 2}
    assert r["skipped"] == 1
    assert [(name, hook) for name, hook, _ in r["skipped_log"]] == [
        ("model", "after_skipped_step"), ("user", "after_skipped_step"), ("journal", "after_skipped_step")]
    assert len(r["records"]) == 2  # the journal recorded nothing for the skipped step
    assert [(n, h) for n, h, _ in r["lost_log"]] == [(n, "after_state_lost") for n in ("model", "user", "journal")]
    refused = r["refused"]
    assert refused["not_a_feature"].startswith("TypeError") and "FeatureBase" in refused["not_a_feature"]
    assert "after_optimizer_step" in refused["partial"] and "phase" in refused["partial"]
    assert refused["bad_phase"].startswith("ValueError") and "7" in refused["bad_phase"]
    assert refused["duplicate"] == "ValueError: feature 'user' is already attached"
    assert "after_lunch" in refused["unknown_hook"] and refused["start_via_notify"].startswith("ValueError")
    assert refused["start_fails"] == "ValueError: no start today" and not refused["late_attached"]
    assert r["close_log"] == [("journal", "close", None), ("user", "close", None), ("model", "close", None)]
    assert r["attached_after_close"] == [] and r["log_after_close"] == []


def _replica_body():
    import deepspeed
    import ds_ext
    from ds_ext.topology import Topology
    topo = Topology(world_size=4, ranks_per_replica=2)
    engine = train(ds_ext.initialize, 2, 3, ext={}, topology=topo)
    rank = deepspeed.comm.get_rank()
    total = sum(p.numel() for p in engine.module.parameters())
    shard = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)
    return {"rank": rank, "dp_world": engine.dp_world_size, "shard": shard, "total": total,
            "weights": weights(engine)}


@pytest.mark.slow
def test_zero_shards_inside_a_replica():
    """4 ranks as 2 replicas x 2 ZeRO-2 ranks, each rank its own data and no cross-replica sync: ZeRO's group is
    the replica (shard = half the model), replicas agree internally and diverge from each other."""
    r = run_distributed(_replica_body, world_size=4, timeout=400)
    assert [x["dp_world"] for x in r] == [2, 2, 2, 2]
    for x in r:
        assert x["total"] / 2 <= x["shard"] <= x["total"] / 2 + 64  # + alignment padding of the flat partition
    same = lambda a, b: all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"])
    assert same(r[0], r[1]) and same(r[2], r[3])
    assert not same(r[0], r[2])


def _pipeline_body():
    import deepspeed
    import ds_ext
    from ds_ext.models import ModelConfig, llama_pipeline
    cfg = ModelConfig(**TINY)
    config = ds_config(1, gas=2)
    deepspeed.init_distributed(dist_backend="gloo")
    losses = {}
    for mode in ("stock", "ds_ext"):
        torch.manual_seed(0)
        if mode == "stock":
            model = llama_pipeline(cfg, num_stages=2)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        else:
            ext_config = dict(config, ds_ext={"topology": {"pipeline_stages": 2}})
            topo = ds_ext.build_topology(ext_config)
            model = llama_pipeline(cfg, topology=topo.process_topology())
            engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=ext_config,
                                           topology=topo)
        it = itertools.cycle(list(batches(2, seed=0)))  # one repeated batch: the loss must fall
        losses[mode] = [engine.train_batch(it).item() for _ in range(5)]
        losses[mode + "_cls"] = type(engine).__name__
    return losses


@pytest.mark.slow
def test_pipeline_engine_matches_stock_pipeline():
    for r in run_distributed(_pipeline_body, world_size=2):
        assert r["stock_cls"] == "PipelineEngine" and r["ds_ext_cls"] == "DsExtPipelineEngine"
        assert r["stock"] == r["ds_ext"]
        assert r["stock"][-1] < r["stock"][0]


def _shutdown_body():
    import torch.distributed as dist
    from ds_ext.distributed import init_distributed, shutdown
    init_distributed()
    dist.all_reduce(torch.ones(2))  # gloo has worked: its threads exist
    shutdown()
    destroyed = not dist.is_initialized()
    shutdown()  # a second call (or a process that never started a group) is a no-op
    return destroyed


def test_shutdown_destroys_the_process_group_and_is_idempotent():
    """``ds_ext.distributed.shutdown``, what ``examples/train.py`` and ``examples/grpo.py`` call after ``main()``:
    without it gloo can abort a finished run at interpreter exit (SIGABRT, pytorch/pytorch#190489)."""
    assert run_distributed(_shutdown_body, world_size=2) == [True, True]
