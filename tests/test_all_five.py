"""All five features in one run, as a user starts it: ``ds-ext --max_restarts 2 --config configs/all.json
examples/grpo.py``: 4 trainer ranks (2 NoLoCo replicas x 2 ZeRO-1 shards, Prefix Grouper, StreamBP, journal) and a
rollout worker. A rollout worker and then a trainer rank are killed with SIGKILL at seeded random points; torch
elastic relaunches, the trainers resume from their journals, and the run completes with every prompt of every step
trained exactly once (from the journaled sample ledgers) and a reward above where it started."""
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS, PROMPTS = 20, 16


def test_all_five_survive_a_rollout_kill_and_a_trainer_kill(tmp_path):
    rng = random.Random(11)
    config = json.loads((ROOT / "configs" / "all.json").read_text())
    config.pop("csv_monitor")
    config["ds_ext"]["recovery"]["journal_dir"] = str(tmp_path / "journal")
    # A 2-layer, 64-wide model (the example's default is 4 x 128) and lr 1e-3 instead of all.json's 3e-4: the
    # supervised warm start and every step cost ~1/4, 137 s -> 83 s of CI. Measured margins of the reward check
    # below: +0.039 at lr 3e-4 (1.7 standard errors of the difference of two 640-sample means), +0.089 at 1e-3 (3.9)
    config["optimizer"]["params"]["lr"] = 1e-3
    (tmp_path / "all.json").write_text(json.dumps(config))
    rollout_step = rng.randrange(3, 9)  # round 0: once trainer rank 0 has journaled this step
    trainer, trainer_step = rng.randrange(4), rng.randrange(rollout_step + 2, STEPS - 2)  # round 1: mid-step
    ledgers = tmp_path / "ledger"
    cmd = [sys.executable, "-m", "ds_ext.launch", "--max_restarts", "2", "--num_procs", "5",
           "--master_port", str(free_port()), "--config", str(tmp_path / "all.json"),
           str(ROOT / "examples" / "grpo.py"), "--steps", str(STEPS), "--hidden", "64", "--layers", "2",
           "--sft_cache", str(tmp_path / "sft.pt"), "--plot", str(tmp_path / "reward.png"),
           "--ledger_out", str(ledgers), "--kill_step", f"4:{rollout_step}:0",
           "--kill_step", f"{trainer}:{trainer_step}:1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["start_step"] >= trainer_step and summary["steps"] == STEPS  # resumed from the journal
    resumed = [int(line.split("resumed at step ")[1].split()[0]) for line in log.splitlines()
               if "ds_ext::recovery rank" in line and "resumed at step" in line]
    assert len(resumed) == 2 * 4, "each relaunch resumes all 4 trainer ranks from their journals"
    # Two relaunches (above) mean two failed rounds; each must have been one of the SIGKILLs. How often torch
    # elastic repeats a failure's exit code (log line, error table) varies across torch versions, so the test
    # checks that every exit code it reported is -9, not how many times it said so.
    codes = set(re.findall(r"exitcode[\s:|]*(-?\d+)", log))
    assert codes == {"-9"}, f"the failed rounds must be the two SIGKILLs, torch elastic reported exit codes {codes}"

    trained, rewards = [], {}
    for rank in range(4):
        ledger = json.loads((ledgers / f"ledger_rank{rank}.json").read_text())
        assert sorted(map(int, ledger["steps"])) == list(range(1, STEPS + 1)), f"rank {rank} misses a step"
        trained += [group[0] for groups in ledger["steps"].values() for group in groups]
        for step, reward in ledger["rewards"].items():
            rewards.setdefault(int(step), []).append(reward)
    assert sorted(trained) == list(range(STEPS * PROMPTS)), "a prompt was trained twice or never"
    per_step = [sum(rewards[s]) / 4 for s in range(1, STEPS + 1)]
    # every rank trains 4 groups x 8 responses per step: the mean of 5 steps is over 640 samples
    assert sum(per_step[-5:]) / 5 > sum(per_step[:5]) / 5, per_step
