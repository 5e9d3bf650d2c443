"""Recovery journal: record format, damage detection, and kill -9 fault runs on 2 and 4 real processes (ZeRO-1/2)
whose relaunch ends bit-identical to a run that never failed."""
import json
import os
import random
import signal
import time

import pytest
import torch

from dist import run_distributed

TINY = dict(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32)


def ds_config(stage: int, journal_dir=None, base_interval: int = 4, gas: int = 2) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "gradient_clipping": 1.0,
           "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                        "warmup_num_steps": 5}},
           "zero_optimization": {"stage": stage}}
    if journal_dir is not None:
        cfg["ds_ext"] = {"recovery": {"journal_dir": journal_dir, "base_interval": base_interval, "keep_bases": 2}}
    return cfg


def micro_batch(rank: int, step: int, micro: int):
    """The data of (rank, step, micro-batch): a pure function of the position, so a resumed run reads the same."""
    g = torch.Generator().manual_seed(rank * 100003 + step * 101 + micro)
    x = torch.randint(0, 256, (2, 17), generator=g)
    return x[:, :-1], x[:, 1:]


def state_of(engine) -> dict:
    """Everything that must be bit-identical: fp32 partitions, optimizer state, model weights, counters, LR."""
    opt = engine.optimizer
    return {"fp32": [t.detach().clone() for t in opt.single_partition_of_fp32_groups],
            "optim": [{k: v.clone() for k, v in opt.optimizer.state[t].items()}
                      for t in opt.single_partition_of_fp32_groups],
            "weights": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
            "global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "lr": engine.get_lr(), "rng": torch.get_rng_state()}


def kill_during_base(victim: int):
    """Make the victim's next base write die half-way (the .tmp file partly written, the manifest not replaced)."""
    from ds_ext.recovery import journal, records

    def dying_write(self, step, state):
        buffers = records.encode(records.KIND_BASE, step, state)
        with open(os.path.join(self.rank_dir, journal.base_name(step)) + ".tmp", "wb") as f:
            f.writelines(buffers[:2])
            f.flush()
        time.sleep(0.5)  # lets the record thread write this step's record, as it would in a real run
        os.kill(os.getpid(), signal.SIGKILL)

    journal.JournalWriter._write_base = dying_write


def _train_body(stage, journal_dir, steps, kill=None):
    """Train to ``steps`` (resuming from the journal if one is there). ``kill=(victim, step, where)``: the victim
    kills itself with SIGKILL in step ``step`` (``where="forward"``: inside that step's forward; ``"base"``: while
    writing the base of that step)."""
    import deepspeed
    import ds_ext
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    rank = int(os.environ["RANK"])
    if kill and kill[0] == rank and kill[2] == "base":
        kill_during_base(rank)
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**TINY))
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(),
                                   config=ds_config(stage, journal_dir))
    start = engine.global_steps
    recovery = next((f for f in engine.ds_ext_features if f.name == "recovery"), None)
    for step in range(start + 1, steps + 1):
        for micro in range(engine.gradient_accumulation_steps()):
            if kill and kill[0] == rank and kill[1] == step and kill[2] == "forward" and micro == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            x, y = micro_batch(rank, step, micro)
            engine.backward(engine(x, y))
            engine.step()
    out = state_of(engine)
    out["start"] = start
    if recovery is not None:
        recovery.close()
        out["metrics"] = recovery.metrics()
    return out


def assert_same_state(a: dict, b: dict, what: str):
    assert a["global_steps"] == b["global_steps"] and a["global_samples"] == b["global_samples"], what
    assert a["lr"] == b["lr"], what
    for x, y in zip(a["fp32"], b["fp32"]):
        assert torch.equal(x, y), f"{what}: fp32 partition differs"
    for x, y in zip(a["optim"], b["optim"]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{what}: optimizer state differs"
    for name, w in a["weights"].items():
        assert torch.equal(w, b["weights"][name]), f"{what}: weight {name} differs"


@pytest.mark.parametrize("world,stage", [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_kill_9_mid_step_resumes_bit_identical_with_no_lost_step(world, stage, tmp_path):
    steps = 11
    kill_step = random.Random(world * 10 + stage).randint(3, steps - 2)
    victim = random.Random(stage).randrange(world)
    reference = run_distributed(_train_body, world, args=(stage, None, steps), timeout=400)
    journal_dir = str(tmp_path / "journal")
    run_distributed(_train_body, world, args=(stage, journal_dir, steps, (victim, kill_step, "forward")),
                    timeout=400, may_die=tuple(range(world)), group_dies_with=True)
    resumed = run_distributed(_train_body, world, args=(stage, journal_dir, steps), timeout=400)
    for rank in range(world):
        # The victim died inside step kill_step's forward, after step kill_step - 1 had been applied everywhere.
        assert resumed[rank]["start"] == kill_step - 1, f"lost steps: resumed at {resumed[rank]['start']}"
        assert resumed[rank]["metrics"]["resumed_step"] == kill_step - 1
        assert_same_state(resumed[rank], reference[rank], f"rank {rank} (killed rank {victim} at {kill_step})")
