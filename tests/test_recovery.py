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

pytestmark = pytest.mark.slow

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


def kill_during_base(kill_step: int):
    """Make this process die half-way through writing the base of ``kill_step`` (the .tmp file partly written, the
    manifest not replaced)."""
    from ds_ext.recovery import journal, records
    write_base = journal.JournalWriter._write_base

    def dying_write(self, step, state):
        if step != kill_step:
            return write_base(self, step, state)
        buffers = records.encode(records.KIND_BASE, step, state)
        with open(os.path.join(self.rank_dir, journal.base_name(step)) + ".tmp", "wb") as f:
            f.writelines(buffers[:2])
            f.flush()
        time.sleep(0.5)  # the record thread writes this step's record meanwhile, and training goes on
        os.kill(os.getpid(), signal.SIGKILL)

    journal.JournalWriter._write_base = dying_write


def _train_body(stage, journal_dir, steps, kill=None):
    """Train to ``steps`` (resuming from the journal if one is there). ``kill=(victim, step, where)``: the victim
    kills itself with SIGKILL in step ``step`` (``where="forward"``: inside that step's forward; ``"base"``: while
    writing the base of that step)."""
    import ds_ext
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    rank = int(os.environ["RANK"])
    if kill and kill[0] == rank and kill[2] == "base":
        kill_during_base(kill[1])
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
        recovery.close()  # idempotent (the contract's close)
        out["metrics"] = recovery.metrics()
        out["damage"] = recovery.damage
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


_REFERENCES = {}


def reference_run(world: int, stage: int, steps: int) -> list:
    """The never-failed run of (world, stage, steps), trained once per session: three tests compare with the one
    of (2, 2, 11), and a run is deterministic (the same seed and data), so each can share it."""
    key = (world, stage, steps)
    if key not in _REFERENCES:
        _REFERENCES[key] = run_distributed(_train_body, world, args=(stage, None, steps), timeout=400)
    return _REFERENCES[key]


@pytest.mark.parametrize("world,stage", [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_kill_9_mid_step_resumes_bit_identical_with_no_lost_step(world, stage, tmp_path):
    steps = 11
    kill_step = random.Random(world * 10 + stage).randint(3, steps - 2)
    victim = random.Random(stage).randrange(world)
    reference = reference_run(world, stage, steps)
    journal_dir = str(tmp_path / "journal")
    run_distributed(_train_body, world, args=(stage, journal_dir, steps, (victim, kill_step, "forward")),
                    timeout=400, may_die=tuple(range(world)), group_dies_with=True)
    resumed = run_distributed(_train_body, world, args=(stage, journal_dir, steps), timeout=400)
    for rank in range(world):
        # The victim died inside step kill_step's forward, after step kill_step - 1 had been applied everywhere.
        assert resumed[rank]["start"] == kill_step - 1, f"lost steps: resumed at {resumed[rank]['start']}"
        assert resumed[rank]["metrics"]["resumed_step"] == kill_step - 1
        assert_same_state(resumed[rank], reference[rank], f"rank {rank} (killed rank {victim} at {kill_step})")


def test_kill_9_while_a_base_is_written_falls_back_to_the_previous_base(tmp_path):
    world, stage, steps, victim = 2, 2, 11, 1
    reference = reference_run(world, stage, steps)
    journal_dir = str(tmp_path / "journal")
    run_distributed(_train_body, world, args=(stage, journal_dir, steps, (victim, 8, "base")), timeout=400,
                    may_die=tuple(range(world)), group_dies_with=True)
    victim_dir = tmp_path / "journal" / f"rank{victim:05d}"
    assert (victim_dir / "base_000000000008.bin.tmp").exists(), "the kill must land inside the base write"
    assert 8 not in json.loads((victim_dir / "MANIFEST.json").read_text())["bases"]
    resumed = run_distributed(_train_body, world, args=(stage, journal_dir, steps), timeout=400)
    for rank in range(world):
        # The base of step 8 never committed on the victim: it resumes from base 4 and replays records 5.. on.
        assert resumed[rank]["start"] >= 8
        assert_same_state(resumed[rank], reference[rank], f"rank {rank}")


def _flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def test_torn_or_corrupt_journal_resumes_from_the_last_good_step(tmp_path):
    """Journal of 10 steps (bases 4 and 8 kept). Rank 1's last record torn -> all ranks resume at 9; rank 0's
    record 10 with a flipped byte -> 9; rank 1's newest base corrupt -> base 4 + records 5..10 still reach 10.
    Each resumed run trains on to step 11 and must equal the never-failed run."""
    import shutil
    from ds_ext.recovery import journal
    world, stage, steps = 2, 2, 11
    reference = reference_run(world, stage, steps)
    clean = str(tmp_path / "clean")
    run_distributed(_train_body, world, args=(stage, clean, 10), timeout=400)
    scans = [journal.scan(os.path.join(clean, f"rank{r:05d}")) for r in range(world)]
    assert all(s.listed_bases == [4, 8] and sorted(s.records) == [9, 10] and not s.damage for s in scans)

    def damaged(name, rank, damage):
        target = tmp_path / name
        shutil.copytree(clean, target)
        damage(str(target / f"rank{rank:05d}"), scans[rank])
        return run_distributed(_train_body, world, args=(stage, str(target), steps), timeout=400)

    def tear_last(rank_dir, scan):
        path = scan.records[10].path
        os.truncate(os.path.join(rank_dir, os.path.basename(path)), os.path.getsize(path) - 10)

    def flip_record(rank_dir, scan):
        where = scan.records[10]
        _flip_byte(os.path.join(rank_dir, os.path.basename(where.path)), min(where.grads.values()) + 200)

    def flip_base(rank_dir, scan):
        _flip_byte(os.path.join(rank_dir, journal.base_name(8)), 4000)

    cases = [("torn", 1, tear_last, 9, "torn record for step 10"),
             ("flipped", 0, flip_record, 9, "checksum mismatch in the record for step 10"),  # a gradient frame
             ("bad_base", 1, flip_base, 10, "checksum mismatch")]
    for name, rank, damage, expect_step, message in cases:
        resumed = damaged(name, rank, damage)
        assert [r["start"] for r in resumed] == [expect_step] * world, name
        assert any(message in d for d in resumed[rank]["damage"]), (name, resumed[rank]["damage"])
        assert not resumed[1 - rank]["damage"], name
        for r in range(world):
            assert_same_state(resumed[r], reference[r], f"{name}: rank {r}")


def test_ds_ext_max_restarts_resumes_from_the_journal_by_itself(tmp_path, baseline_run):
    """The user path: ``ds-ext --max_restarts 1`` relaunches after rank 1 is killed in step 7; the engine resumes
    from the journal at step 6 and ends with exactly the losses of a run that never failed (the session's
    ``baseline_run``: the same command with configs/baseline.json, i.e. without the journal)."""
    from pathlib import Path
    from conftest import BASELINE_STEPS, QUICK_TRAIN, ds_ext_run, run_summary
    root = Path(__file__).resolve().parents[1]
    config = json.loads((root / "configs" / "recovery.json").read_text())
    config["ds_ext"]["recovery"].update(journal_dir=str(tmp_path / "journal"), base_interval=4)
    config.pop("csv_monitor")
    (tmp_path / "recovery.json").write_text(json.dumps(config))
    straight = baseline_run
    assert straight["steps"] == BASELINE_STEPS == 12
    failed = run_summary(ds_ext_run(["--config", tmp_path / "recovery.json", "--max_restarts", "1",
                                     root / "examples" / "train.py", "--max_steps", BASELINE_STEPS] + QUICK_TRAIN
                                    + ["--fault_inject", "1:7"], timeout=400))
    assert failed["start_step"] == 6 and failed["recovery/resumed_step"] == 6
    assert failed["last_loss"] == straight["last_loss"]
    assert failed["eval_loss_end"] == straight["eval_loss_end"]


def _load_exported_body(stage, ckpt_dir):
    import deepspeed
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    torch.manual_seed(1)  # different initial weights: everything must come from the checkpoint
    model = LlamaForCausalLM(ModelConfig(**TINY))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(stage))
    path, _ = engine.load_checkpoint(ckpt_dir)
    assert path is not None
    return state_of(engine)


def test_export_writes_a_deepspeed_checkpoint_of_the_newest_step(tmp_path):
    import subprocess
    import sys
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    world, stage = 2, 2
    journal_dir, out = str(tmp_path / "journal"), str(tmp_path / "ckpt")
    trained = run_distributed(_train_body, world, args=(stage, journal_dir, 7), timeout=400)
    proc = subprocess.run([sys.executable, "-m", "ds_ext.recovery", "export", journal_dir, out],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "global_step7"
    loaded = run_distributed(_load_exported_body, world, args=(stage, out), timeout=400)
    for rank in range(world):
        assert_same_state(loaded[rank], trained[rank], f"exported checkpoint, rank {rank}")
    fp32 = get_fp32_state_dict_from_zero_checkpoint(out)
    for name, w in trained[0]["weights"].items():
        assert torch.equal(fp32[name], w), name


def _noloco_body(mode, journal_dir, steps, kill=None):
    """2 replicas x 2 ZeRO-1 shards with outer steps every 3 steps, journaled; ``kill`` as in ``_train_body``."""
    import ds_ext
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**TINY))
    cfg = ds_config(1, journal_dir)
    cfg.setdefault("ds_ext", {})["noloco"] = {"enabled": True, "mode": mode, "inner_steps": 3,
                                              "ranks_per_replica": 2}
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    start = engine.global_steps
    for step in range(start + 1, steps + 1):
        for micro in range(engine.gradient_accumulation_steps()):
            if kill and kill[0] == rank and kill[1] == step and micro == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            x, y = micro_batch(rank, step, micro)
            engine.backward(engine(x, y))
            engine.step()
    out = state_of(engine)
    noloco = next(f for f in engine.ds_ext_features if f.name == "noloco")
    out.update(start=start, outer=noloco.state_dict())
    engine.ds_ext_close()
    return out


@pytest.mark.parametrize("mode", ["noloco", "diloco"])
def test_noloco_outer_steps_are_replayed_from_the_journal(mode, tmp_path):
    """Kill -9 after two outer steps (H = 3): the resumed run replays the recorded partner shards (or DiLoCo's
    reduced pseudo-gradients) and ends bit-identical, outer anchor and momentum included."""
    world, steps, kill_step = 4, 10, 8
    reference = run_distributed(_noloco_body, world, args=(mode, None, steps), timeout=400)
    journal_dir = str(tmp_path / "journal")
    run_distributed(_noloco_body, world, args=(mode, journal_dir, steps, (3, kill_step)), timeout=400,
                    may_die=tuple(range(world)), group_dies_with=True)
    resumed = run_distributed(_noloco_body, world, args=(mode, journal_dir, steps), timeout=400)
    assert not torch.equal(reference[0]["fp32"][0], reference[2]["fp32"][0]), "replicas must differ, or no test"
    for rank in range(world):
        assert resumed[rank]["start"] == kill_step - 1
        assert_same_state(resumed[rank], reference[rank], f"{mode} rank {rank}")
        assert resumed[rank]["outer"]["outer_step"] == reference[rank]["outer"]["outer_step"] == 3
        for key in ("anchor", "momentum"):
            assert torch.equal(resumed[rank]["outer"][key], reference[rank]["outer"][key]), key


def _pipeline_body(journal_dir, steps, kill=None):
    """2 pipeline stages x 2 ZeRO-1 ranks (PipelineEngine, train_batch), journaled; the victim dies at the start of
    step ``kill[1]``, once its journal holds the step before (what its next forward would wait for)."""
    import deepspeed
    import ds_ext
    from ds_ext.models import ModelConfig, llama_pipeline
    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    cfg = ds_config(1, journal_dir)
    cfg.setdefault("ds_ext", {})["topology"] = {"pipeline_stages": 2}
    topo = ds_ext.build_topology(cfg)
    torch.manual_seed(0)
    model = llama_pipeline(ModelConfig(**TINY), topology=topo.process_topology())
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=cfg, topology=topo)
    start, data_index = engine.global_steps, topo.coords(rank)[2]
    for step in range(start + 1, steps + 1):
        if kill and kill[0] == rank and kill[1] == step:
            next(f for f in engine.ds_ext_features if f.name == "recovery").writer.wait_written()
            os.kill(os.getpid(), signal.SIGKILL)
        engine.train_batch(iter([micro_batch(data_index, step, m) for m in range(2)]))
    out = state_of(engine)
    out["start"] = start
    engine.ds_ext_close()
    return out


def test_pipeline_engine_resumes_from_the_journal(tmp_path):
    world, steps, kill_step = 4, 9, 6
    reference = run_distributed(_pipeline_body, world, args=(None, steps), timeout=400)
    journal_dir = str(tmp_path / "journal")
    run_distributed(_pipeline_body, world, args=(journal_dir, steps, (1, kill_step)), timeout=400,
                    may_die=tuple(range(world)), group_dies_with=True)
    resumed = run_distributed(_pipeline_body, world, args=(journal_dir, steps), timeout=400)
    for rank in range(world):
        assert resumed[rank]["start"] == kill_step - 1
        assert_same_state(resumed[rank], reference[rank], f"pipeline rank {rank}")


def _start_body(stage, journal_dir, recovery_extra):
    import ds_ext
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**TINY))
    cfg = ds_config(stage, journal_dir)
    cfg["ds_ext"]["recovery"].update(recovery_extra)
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine.global_steps


def test_a_journal_of_another_layout_or_with_resume_off_is_refused_and_kept(tmp_path):
    journal_dir = str(tmp_path / "journal")
    run_distributed(_train_body, 2, args=(2, journal_dir, 3), timeout=400)
    before = sorted(p.name for p in (tmp_path / "journal" / "rank00000").iterdir())
    with pytest.raises(AssertionError, match="written by a different layout"):
        run_distributed(_start_body, 2, args=(1, journal_dir, {}), timeout=400)
    with pytest.raises(AssertionError, match="resume is false"):
        run_distributed(_start_body, 2, args=(2, journal_dir, {"resume": False}), timeout=400)
    assert sorted(p.name for p in (tmp_path / "journal" / "rank00000").iterdir()) == before  # nothing lost
    assert run_distributed(_start_body, 2, args=(2, journal_dir, {}), timeout=400) == [3, 3]


def _resume_at_start_body(journal_dir):
    import ds_ext
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**TINY))
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(),
                                   config=ds_config(1, journal_dir, gas=2))
    micro_at_start = engine.micro_steps
    for micro in range(2):
        engine.backward(engine(*micro_batch(int(os.environ["RANK"]), 1, micro)))
        engine.step()
    out = (micro_at_start, engine.global_steps)
    engine.ds_ext_close()
    return out


def test_resume_at_a_base_taken_between_steps_keeps_the_accumulation_boundary(tmp_path):
    """Regression: a base written outside a step (at start) stored micro_steps + 1, so a run resumed exactly there
    stepped the optimizer after the first of 2 micro-batches (found by the all-five test's ledger)."""
    journal_dir = str(tmp_path / "journal")
    first = run_distributed(_resume_at_start_body, 2, args=(journal_dir,), timeout=300)
    for rank in range(2):  # keep only the start-time base: the resume lands exactly on it
        d = os.path.join(journal_dir, f"rank{rank:05d}")
        for name in os.listdir(d):
            if name.startswith("wal_"):
                os.remove(os.path.join(d, name))
    resumed = run_distributed(_resume_at_start_body, 2, args=(journal_dir,), timeout=300)
    assert first == [(0, 1), (0, 1)]
    assert resumed == [(0, 1), (0, 1)], "the resumed engine must count its 2 micro-batches as one step"
