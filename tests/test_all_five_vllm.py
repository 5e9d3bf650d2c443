"""``configs/all.json`` (async GRPO + Prefix Grouper + StreamBP + NoLoCo + journal: 4 trainer ranks, 1 rollout
worker) with the vLLM rollout engine on a generated Qwen2 directory, and a trainer rank SIGKILLed mid-step: torch
elastic relaunches every process (the vLLM engine starts again), the trainers resume from their journals, and the
run completes with every prompt of every step trained exactly once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist import free_port

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS, PROMPTS, KILLED, AT = 8, 16, 1, 4


def test_all_json_with_vllm_survives_a_trainer_kill(tmp_path):
    from tests.hf_dirs import make_model_dir, qwen2_config
    model = make_model_dir(tmp_path / "qwen", qwen2_config(hidden_size=128, intermediate_size=256,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=2))
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n"
                                              for i in range(64)))
    config = json.loads((ROOT / "configs" / "all.json").read_text())
    config.pop("csv_monitor")
    config["ds_ext"]["recovery"]["journal_dir"] = str(tmp_path / "journal")
    # enforce_eager: no inductor compile (CI's fresh machine has no vLLM compile cache; ~15 s per engine start)
    config["ds_ext"]["asyncflow"]["rollout"] = {"engine": "vllm", "shm_dir": str(tmp_path), "enforce_eager": True}
    (tmp_path / "all.json").write_text(json.dumps(config))
    ledgers = tmp_path / "ledger"
    cmd = [sys.executable, "-m", "ds_ext.launch", "--max_restarts", "1", "--master_port", str(free_port()),
           "--config", str(tmp_path / "all.json"), str(ROOT / "examples" / "grpo.py"), "--model", str(model),
           "--prompts", "x.jsonl", "--steps", str(STEPS), "--plot", str(tmp_path / "reward.png"),
           "--ledger_out", str(ledgers), "--kill_step", f"{KILLED}:{AT}:0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "grpo: rollout engine vllm" in proc.stdout
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["start_step"] >= AT and summary["steps"] == STEPS, summary  # resumed from the journal
    # Every push's engine-vs-trainer log-probs are asserted in tests/test_asyncflow_vllm.py. Here the resumed round is
    # 4 steps: under a loaded machine it can end before any reload's probe comes back (logprob_checks 0, mismatch
    # NaN; seen once in a full-suite run), so the bound is checked on the pairs that were compared.
    if summary.get("logprob_checks", 0):
        assert summary["logprob_mismatch"] <= 1e-4, summary  # same bound and reason as tests/test_asyncflow_vllm.py
    trained = []
    for rank in range(4):
        ledger = json.loads((ledgers / f"ledger_rank{rank}.json").read_text())
        assert sorted(map(int, ledger["steps"])) == list(range(1, STEPS + 1)), f"rank {rank} misses a step"
        trained += [group[0] for groups in ledger["steps"].values() for group in groups]
    assert sorted(trained) == list(range(STEPS * PROMPTS)), "a prompt was trained twice or never"
