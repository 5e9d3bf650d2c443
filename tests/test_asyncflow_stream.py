"""Streaming with several trainer ranks, the weight sync's cost, a rollout worker that dies without a relaunch, and
the launcher's process count from ``asyncflow.rollout_workers``.

The slow test is one real run as a user starts it: ``ds-ext`` (no ``--num_procs``: the config's 2 trainer ranks + 2
rollout workers), DAPO normalisation (micro-batches stream with an estimated token total, corrected before the
update: tests/test_asyncflow_grpo.py checks the correction is exact), and
``--kill_group`` kills rollout rank 3's generator process while it holds a reservation."""
import csv
import json
from pathlib import Path

import pytest

from conftest import ds_ext_run
from ds_ext import launch
from ds_ext.config import check_file
from ds_ext.asyncflow.queue import GroupMeta
from ds_ext.asyncflow.scatter import balance, group_tokens

ROOT = Path(__file__).resolve().parents[1]
STEPS, GROUPS, G, HIDDEN, LAYERS = 5, 8, 4, 32, 1


def _config(tmp_path, **asyncflow) -> Path:
    config = json.loads((ROOT / "configs" / "grpo_async.json").read_text())
    config["csv_monitor"].update(output_path=str(tmp_path / "csv"), job_name="stream")
    config["train_micro_batch_size_per_gpu"] = 2 * G  # 2 groups per micro-batch per rank
    config["gradient_accumulation_steps"] = 2
    config["ds_ext"]["asyncflow"].update(asyncflow)
    path = tmp_path / "stream.json"
    path.write_text(json.dumps(config))
    return path


def test_launcher_refuses_a_process_count_that_contradicts_the_config(tmp_path, capsys):
    path = _config(tmp_path, trainer_ranks=2, rollout_workers=1)
    assert launch.main(["--num_procs", "4", "--config", str(path), str(ROOT / "examples" / "grpo.py")]) == 2
    err = capsys.readouterr().err
    assert "--num_procs 4" in err and "= 3 processes" in err and "no worker was started" in err, err
    # without --num_procs the config's count is used
    own, ns, _ = launch.split_argv(["--config", str(path), "x.py"])
    assert launch._apply_configured_procs(own, ns, check_file(path)) is None and own["num_procs"] == "3"


def test_a_streamed_micro_batch_splits_over_ranks_by_response_tokens():
    lengths = [9, 1, 8, 2, 7, 3]  # one response per group: its tokens
    groups = [{"meta": GroupMeta(i, 0, i, "w", 0, [i], 0.0), "samples": [{"response_len": n}]}
              for i, n in enumerate(lengths)]
    split = balance(groups, world=2, per_rank=3)
    assert [len(g) for g in split] == [3, 3]
    assert sorted(g["meta"].index_in_slot for r in split for g in r) == list(range(6))  # each group once
    loads = [sum(group_tokens(g) for g in r) for r in split]
    # greedy, longest first, to the open rank with fewer tokens: 9->r0, 8->r1, 7->r1, 3->r0, 2->r0 (r0 full), 1->r1
    assert loads == [14, 16], loads
    assert all([g["meta"].index_in_slot for g in r] == sorted(g["meta"].index_in_slot for g in r) for r in split)


def _model_bytes() -> int:
    from ds_ext.grpo import cli as mod
    return sum(t.numel() * t.element_size() for t in mod.build_model(HIDDEN, LAYERS).state_dict().values())


def _csv(tmp_path, name: str) -> list:
    with open(tmp_path / "csv" / "stream" / f"GRPO_{name}.csv") as f:
        return [float(row[1]) for row in list(csv.reader(f))[1:]]


@pytest.mark.slow
def test_two_trainer_ranks_stream_and_a_dead_workers_groups_are_regenerated(tmp_path):
    path = _config(tmp_path, trainer_ranks=2, rollout_workers=2, group_size=G, groups_per_step=GROUPS,
                   max_new_tokens=6, loss_norm="dapo", max_staleness=1)
    ledgers = tmp_path / "ledger"
    proc = ds_ext_run(["--config", path, ROOT / "examples" / "grpo.py", "--steps", STEPS, "--sft_steps", 0,
                       "--hidden", HIDDEN, "--layers", LAYERS, "--plot", tmp_path / "reward.png",
                       "--ledger_out", ledgers, "--kill_group", "3:1"])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    print({k: out[k] for k in ("samples_per_s", "streamed_micro_batches", "micro_batches", "weight_sync_bytes_per_push",
                               "weight_sync_transfer_s", "weight_sync_blocking_s", "dropped_partial_groups")})

    # streaming: micro-batches were handed out (and trained) before their step's last group was complete
    assert out["micro_batches"] == STEPS * 2
    # ... and never a step's last micro-batch, which holds the step's last group: at most 1 of the 2 per step
    assert 0 < out["streamed_micro_batches"] <= STEPS, out

    # the killed generator: dropped from the pushes, its reserved group regenerated, every prompt trained once
    assert out["dropped_workers"] == ["rollout3"], log[-3000:]
    assert out["dropped_partial_groups"] >= 1
    trained = []
    for rank in range(2):
        ledger = json.loads((ledgers / f"ledger_rank{rank}.json").read_text())
        assert sorted(map(int, ledger["steps"])) == list(range(1, STEPS + 1)), f"rank {rank} misses a step"
        trained += [group[0] for groups in ledger["steps"].values() for group in groups]
    assert sorted(trained) == list(range(STEPS * GROUPS)), "a prompt was trained twice or never"

    # weight sync: each push carries the fp32 state once per live worker (2 before the kill, 1 after)
    state = _model_bytes()
    pushed = _csv(tmp_path, "weight_sync_bytes_per_push")
    assert len(pushed) == STEPS and set(pushed) <= {2.0 * state, 1.0 * state} and pushed[-1] == state, pushed
    # A push of this ~0.1 MB state over local TCP and a pipe takes milliseconds; 5 s would mean a push that waited
    # on something else (a stuck worker), not a slow copy.
    transfers = _csv(tmp_path, "weight_sync_transfer_s")  # step V reports push V-1's (settled at push V)
    assert transfers[0] == 0.0 and all(0 < t < 5 for t in transfers[1:]), transfers
    # the trainer is blocked only for the clone and the hand-off to RPC (and a previous push still in flight)
    assert all(0 <= t < 5 for t in _csv(tmp_path, "weight_sync_blocking_s"))
    assert 0 < out["weight_sync_transfer_s"] < 5 and 0 <= out["weight_sync_blocking_s"] < 5
    assert len(_csv(tmp_path, "streamed_micro_batches")) == STEPS
