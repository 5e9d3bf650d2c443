"""A user's task through the README command: ``ds-ext --config configs/grpo_async.json examples/grpo.py --model DIR
--prompts FILE.jsonl --reward module:function`` with a generated transformers directory (BPE tokenizer with a chat
template), chat and text prompts, and a reward in the user's own module (imported from the working directory by
every process). Async (1 trainer + 1 rollout worker), partial rollouts, decoupled off-policy correction; the reward
rises, staleness stays within the bound, and every group of every step is trained once."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dist import free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS = 32  # 16 steps left the rise inside the per-step noise under CPU contention (see the bound below)

pytestmark = pytest.mark.slow

REWARD = """
    def digit_share(prompt, completion, topic):
        # dense reward (the share of digit characters): a random policy scores ~0.1, so every group has a signal
        assert topic in ("sum", "chat")
        return sum(c.isdigit() for c in completion) / max(1, len(completion))
"""


def test_user_task_through_the_readme_command(tmp_path):
    from asyncflow_hfdir import make_policy_dir
    model = make_policy_dir(tmp_path / "policy")
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(REWARD))
    rows = [{"prompt": f"What is {i}+{i + 1}?", "topic": "sum"} if i % 2 else
            {"messages": [{"role": "user", "content": f"Compute {i}*3"}], "topic": "chat"} for i in range(24)]
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = json.loads((ROOT / "configs" / "grpo_async.json").read_text())
    config.pop("csv_monitor")
    config["optimizer"]["params"]["lr"] = 1e-2  # a random-init 2-layer model: the rise must show in 32 steps
    config["train_micro_batch_size_per_gpu"] = 16
    config["ds_ext"]["asyncflow"].update(group_size=4, groups_per_step=4, max_new_tokens=8, max_staleness=2,
                                         off_policy="decoupled")
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "ds_ext.launch", "--num_procs", "2", "--master_port", str(free_port()),
           "--config", str(tmp_path / "cfg.json"), str(ROOT / "examples" / "grpo.py"), "--model", str(model),
           "--prompts", "math.jsonl", "--reward", "my_rewards:digit_share", "--steps", str(STEPS),
           "--plot", str(tmp_path / "reward.png"), "--ledger_out", str(tmp_path / "ledger")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert out["mode"] == "async" and 1 <= out["max_observed_staleness"] <= 2, out
    assert sum(out["lag_histogram"].values()) == STEPS * 4
    ledger = json.loads((tmp_path / "ledger" / "ledger_rank0.json").read_text())
    trained = sorted(g[0] for groups in ledger["steps"].values() for g in groups)
    assert trained == list(range(STEPS * 4)), "a prompt index was trained twice or never"
    # 5 steps x 16 samples each side; the per-step reward of 16 samples is noisy (0.004-0.17 around 0.05 at the start).
    # Measured 2026-12-03 on 2 CPU cores: at 16 steps the rise was 2.06x-2.55x alone (8 runs) but 1.37x-2.36x with a
    # busy process beside the run (8 runs) and 1.27x in one CI run: learning only starts after ~10 steps, and thread
    # interleaving moves that point. At 32 steps (same wall time, ~25 s: start-up dominates) first5 0.045-0.051 and
    # last5 0.42-0.69, ratio 9.3x-14x with the busy process (4 runs). A 3x bound is a third of the lowest rise seen
    # and far above the start's own spread (~10 %).
    assert out["reward_last5"] > 3 * out["reward_first5"], out
