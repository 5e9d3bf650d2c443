"""Faults injected into a real async GRPO run (torchft's injector style: each fault armed in one process, the run
must end right): one ``ds-ext`` run, a trainer and three rollout workers --

* rollout1 is slow: it delivers every group after its lease expired (discarded late, counted; it stays in the run);
* rollout2 is SIGKILLed holding a reservation (``--kill_group``): dropped, its group regenerated;
* rollout3 sends a frame that is not msgpack: dropped, its group regenerated.

The run ends with exit 0 and every prompt trained exactly once (the ledger), and leaves no process, listening port
or /dev/shm file behind. A reward that hangs fails the queue naming the reward and the prompt (in one process; a
reward that raises does the same: ``test_asyncflow_task.py``), which ends the run with exit 1 and that message.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist import free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS, GROUPS = 4, 4


def test_a_hanging_reward_fails_the_queue_naming_the_prompt(tmp_path):
    import torch
    from ds_ext.asyncflow.config import AsyncFlowConfig
    from ds_ext.asyncflow.queue import RolloutFailed, TransferQueue
    from ds_ext.grpo.rewards import RewardError
    from ds_ext.asyncflow.rollout import RolloutWorker
    from ds_ext.grpo.task import build_task
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(2)))
    # the probe (an empty completion) returns; a sampled completion blocks
    (tmp_path / "hang.py").write_text("import time\ndef hang(prompt, completion, **_):\n"
                                      "    while completion:\n        time.sleep(1)\n    return 0.0\n")
    task = build_task(str(tmp_path / "p.jsonl"), f"{tmp_path / 'hang.py'}:hang")
    task.reward.timeout_s = 0.5
    cfg = AsyncFlowConfig(group_size=2, groups_per_step=2, max_new_tokens=3, reward_timeout_s=0.5)
    queue = TransferQueue(2, 2, 1)
    tiny = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    torch.manual_seed(0)
    worker = RolloutWorker("w0", lambda: LlamaForCausalLM(tiny), task, cfg, queue)
    t = time.monotonic()
    with pytest.raises(RewardError, match=r"did not return within 0.5 s on prompt 0"):
        worker.produce_one(timeout=1.0)
    assert time.monotonic() - t < 30  # the timeout, not the hang, ended it
    with pytest.raises(RolloutFailed, match="rollout worker w0: reward .*hang.* did not return"):
        queue.take("train", 0, 1, timeout=30)


def _session(sid: int) -> set:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return {int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid}


def _ports(pids: set) -> set:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return {line.split()[3] for line in out.splitlines() if any(f"pid={p}," in line for p in pids)}


@pytest.mark.slow
def test_slow_killed_and_garbage_workers_leave_every_prompt_trained_once(tmp_path):
    config = json.loads((ROOT / "configs" / "grpo_async.json").read_text())
    config.pop("csv_monitor")
    config["train_micro_batch_size_per_gpu"] = 4 * GROUPS
    # lease 2 s: a group takes milliseconds to generate here, so only the injected 3 s delay outlives it
    config["ds_ext"]["asyncflow"].update(max_staleness=1, group_size=4, groups_per_step=GROUPS, max_new_tokens=4,
                                         lease_s=2.0)
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    shm_before = set(os.listdir("/dev/shm"))
    ledgers = tmp_path / "ledger"
    cmd = [sys.executable, "-m", "ds_ext.launch", "--num_procs", "4", "--master_port", str(free_port()),
           "--config", str(tmp_path / "cfg.json"), str(ROOT / "examples" / "grpo.py"), "--steps", str(STEPS),
           "--sft_steps", "0", "--hidden", "32", "--layers", "1", "--plot", str(tmp_path / "reward.png"),
           "--ledger_out", str(ledgers), "--fault", "1:slow:3", "--kill_group", "2:1", "--fault", "3:garbage:1"]
    log_path = tmp_path / "log"  # a file, not a pipe: nobody reads a pipe while the run lives
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    pids = set()
    try:
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            pids |= _session(proc.pid)  # every process the run ever had, for the leftovers check below
            time.sleep(0.5)
        proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = log_path.read_text()
    assert proc.returncode == 0, log[-5000:]
    out = json.loads([line for line in log.splitlines() if line.startswith("{")][-1])
    assert sorted(out["dropped_workers"]) == ["rollout2", "rollout3"], log[-3000:]
    assert "rollout worker rollout3: it sent a bad frame" in log
    assert out["late_discarded"] >= 1, out  # the slow worker's groups arrived after their leases
    assert "rollout1" not in out["dropped_workers"]  # ... and it was not punished as a dead one
    ledger = json.loads((ledgers / "ledger_rank0.json").read_text())
    assert sorted(map(int, ledger["steps"])) == list(range(1, STEPS + 1))
    trained = sorted(g[0] for groups in ledger["steps"].values() for g in groups)
    assert trained == list(range(STEPS * GROUPS)), "a prompt was trained twice or never"
    time.sleep(1)
    assert not _session(proc.pid), "a process of the run outlived it"
    assert not _ports(pids), "a port of the run is still open"
    # other sessions may use /dev/shm meanwhile: only names a run of ours could create count
    left = [n for n in set(os.listdir("/dev/shm")) - shm_before if "ds_ext" in n or n.startswith(("torch", "sem.mp"))]
    assert not left, f"/dev/shm files left behind: {left}"
