"""AsyncFlow with the vLLM rollout engine on long-tailed response lengths: async against the best synchronous run.

    python benchmarks/asyncflow.py --engine vllm            # ~6 min on 2 CPU cores (4 engine start-ups)
    python benchmarks/asyncflow_vllm.py --steps 8 --threads 2

Every run is ``examples/grpo.py`` through ``ds-ext`` with ``asyncflow.rollout.engine: vllm`` on the same generated
Qwen2 directory (hidden 128, 4 layers, head_dim 32, fp32), prompts, reward (share of vowels), G = 8, 8 prompts per
step, at most ``--max_new_tokens`` tokens. Long tail: ``rollout.stop_token_ids`` holds ``--stop_tokens`` ids of the
vocabulary, so a near-uniform policy stops with probability ~``stop_tokens / vocab`` per token: geometric lengths
cut at ``max_new_tokens`` (p99 / p50 reported).

* ``async``: 1 trainer process + 1 vLLM worker process, 1 thread each, ``max_staleness`` ``--staleness``, the
  trainer only trains (``trainer_generates`` false), weights pushed after every step (safetensors in /dev/shm +
  reload).
* ``sync_2proc``: the same processes with ``max_staleness`` 0: the worker generates step V with weights V while the
  trainer waits, then the trainer trains (one core idle in each phase).
* ``sync_best``: one process, every thread (``--threads``): the in-process vLLM engine generates the step's batch,
  then the trainer trains (the best synchronous schedule on this machine).
* ``sync_1thread``: the same one-process run pinned to one core (``taskset``): the phase times at 1 thread.

Phase times per step (generation G_t, training R_t at t threads) come from the one-process runs' measured
``generate_s`` and ``train_busy_s``. Ideal overlap of the async layout (one core per phase, perfectly pipelined):
step time ``max(G_1, R_1)``; the best sync step is ``G_2 + R_2``, so ``overlap_bound = (G_2 + R_2) / max(G_1, R_1)``
is the most async can gain over the best sync run here; ``async_vs_best_sync_over_bound`` is how much of it is
realised. Throughput = trained responses per second of the step loop (engine start-up excluded in every mode).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REWARD = '''def vowels(prompt, completion):
    return sum(c in "aeiou " for c in completion) / max(1, len(completion))
'''


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="the machine's thread budget (async: 1 + 1 processes)")
    p.add_argument("--staleness", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=192)
    p.add_argument("--stop_tokens", type=int, default=6, help="ids that end a response (the long tail's rate)")
    p.add_argument("--trl_repeats", type=int, default=3)
    p.add_argument("--work", default=None)
    return p.parse_args(argv)


def make_inputs(work: str) -> str:
    sys.path.insert(0, ROOT)
    from tests.hf_dirs import make_model_dir, qwen2_config
    model = os.path.join(work, "qwen")
    if not os.path.exists(os.path.join(model, "config.json")):
        from pathlib import Path
        make_model_dir(Path(model), qwen2_config(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                                 num_attention_heads=4, num_key_value_heads=2))
    with open(os.path.join(work, "bench_rewards.py"), "w") as f:
        f.write(REWARD)
    with open(os.path.join(work, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": f"Question {i}: tell me something"}) + "\n" for i in range(256))
    return model


def config(args, work: str, name: str, staleness: int, trainers_only: bool) -> str:
    with open(os.path.join(ROOT, "configs", "grpo_vllm.json")) as f:
        cfg = json.load(f)
    cfg.pop("csv_monitor", None)
    cfg["zero_optimization"] = {"stage": 1}
    cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = 32, 2
    a = cfg["ds_ext"]["asyncflow"]
    a.update(max_staleness=staleness, trainer_ranks=1, max_new_tokens=args.max_new_tokens,
             trainer_generates=not trainers_only)
    a.pop("rollout_workers", None)
    a["rollout"].update(stop_token_ids=list(range(100, 100 + args.stop_tokens)), shm_dir=work,
                        max_num_seqs=64)
    path = os.path.join(work, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def run(args, work: str, model: str, name: str, procs: int, staleness: int, pin: str = None) -> dict:
    path = config(args, work, name, staleness, trainers_only=procs > 1)
    cmd = [sys.executable, "-m", "ds_ext.launch", "--num_procs", str(procs), "--config", path,
           os.path.join(ROOT, "examples", "grpo.py"), "--model", model, "--prompts", "prompts.jsonl",
           "--reward", "bench_rewards:vowels", "--steps", str(args.steps), "--plot", os.path.join(work, f"{name}.png")]
    if pin is not None:
        cmd = ["taskset", "-c", pin] + cmd
    cmd = locked(cmd)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    out["name"], out["wall_s"] = name, wall
    with open(os.path.join(work, f"{name}.result.json"), "w") as f:  # each run's summary, kept with --work
        json.dump(out, f)
    return out


def locked(cmd: list) -> list:
    """``DS_EXT_BENCH_LOCK=FILE``: each run holds that ``flock`` (a machine shared with other jobs: the runs are
    measured one at a time, the benchmark's own process waits unlocked)."""
    lock = os.environ.get("DS_EXT_BENCH_LOCK")
    return ["flock", lock] + cmd if lock else cmd


def phases(r: dict, steps: int) -> tuple:
    """(generation, training) seconds per step of a one-process sync run."""
    return r["generate_s"] / steps, r["train_busy_s"] / steps


def run_trl_vllm(args, work: str, model: str) -> dict:
    """TRL's GRPOTrainer with ``use_vllm=True`` (benchmarks/asyncflow_trl_vllm.py) on the same directory, prompts,
    G and lengths; ``{"error": ...}`` when it cannot run here."""
    runs, err = [], None
    for _ in range(args.trl_repeats):
        cmd = locked([sys.executable, os.path.join(ROOT, "benchmarks", "asyncflow_trl_vllm.py"), "--model", model,
                      "--prompts", os.path.join(work, "prompts.jsonl"), "--steps", str(args.steps),
                      "--max_new_tokens", str(args.max_new_tokens), "--threads", str(args.threads)])
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work,
                              env={**os.environ, "PYTHONPATH": ROOT})
        wall = time.perf_counter() - t
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        out = json.loads(lines[-1]) if lines else {"error": proc.stderr[-1500:]}
        if "error" in out:
            err = out["error"]
            break
        out["wall_s"] = wall
        runs.append(out)
    return {"runs": runs, "error": err}


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="ds_ext_asyncflow_vllm_")
    os.makedirs(work, exist_ok=True)
    model = make_inputs(work)
    res = {"engine": "vllm", "steps": args.steps, "threads": args.threads}
    runs = {"async": run(args, work, model, "async", 2, args.staleness),
            "sync_2proc": run(args, work, model, "sync_2proc", 2, 0),
            "sync_best": run(args, work, model, "sync_best", 1, 0),
            "sync_1thread": run(args, work, model, "sync_1thread", 1, 0, pin="0")}
    g2, r2 = phases(runs["sync_best"], args.steps)
    g1, r1 = phases(runs["sync_1thread"], args.steps)
    bound = (g2 + r2) / max(g1, r1)
    sps = {k: v["samples_per_s"] for k, v in runs.items()}
    res.update({f"samples_per_s_{k}": v for k, v in sps.items()})
    res.update(phase_gen_s_1thread=g1, phase_train_s_1thread=r1, phase_gen_s_2threads=g2, phase_train_s_2threads=r2)
    res["async_vs_best_sync"] = sps["async"] / sps["sync_best"]
    res["async_vs_sync_2proc"] = sps["async"] / sps["sync_2proc"]
    res["overlap_bound"] = bound
    res["async_vs_best_sync_over_bound"] = res["async_vs_best_sync"] / bound
    a = runs["async"]
    res["weight_sync_blocking_s_per_step"] = a.get("weight_sync_blocking_s")
    res["weight_sync_bytes_per_push"] = a.get("weight_sync_bytes_per_push")
    res["weight_sync_transfer_s"] = a.get("weight_sync_transfer_s")
    res["logprob_mismatch"] = max(r.get("logprob_mismatch", 0.0) for r in runs.values())
    res["length_p50"], res["length_p99"] = a.get("length_p50"), a.get("length_p99")
    res["reward_first5_async"], res["reward_last5_async"] = a["reward_first5"], a["reward_last5"]
    trl = run_trl_vllm(args, work, model) if args.trl_repeats > 0 else {"runs": [], "error": "skipped"}
    if trl["runs"]:
        # steady state on both sides: our step loop against TRL's train() (model load excluded in both)
        best = max(trl["runs"], key=lambda r: r["train_samples_per_s"])
        res["trl_vllm_threads"] = best["threads"]
        res["trl_vllm_samples_per_s"] = [r["samples_per_s"] for r in trl["runs"]]
        res["throughput_ratio_vs_trl_vllm"] = sps["async"] / best["train_samples_per_s"]
        res["best_sync_vs_trl_vllm"] = sps["sync_best"] / best["train_samples_per_s"]
    else:
        res["trl_vllm_threads"], res["throughput_ratio_vs_trl_vllm"] = None, None
        res["trl_vllm_error"] = (trl["error"] or "")[-600:]
    print(f"{'mode':14s} {'samples/s':>10s} {'gen_s':>8s} {'train_s':>8s} {'seconds':>8s}")
    for k, v in runs.items():
        print(f"{k:14s} {v['samples_per_s']:10.2f} {v['generate_s']:8.2f} {v['train_busy_s']:8.2f} "
              f"{v['train_loop_s']:8.2f}")
    print(f"async / best sync {res['async_vs_best_sync']:.2f}x, bound {bound:.2f}x, "
          f"realised {res['async_vs_best_sync_over_bound']:.2f}; async / 2-process sync {res['async_vs_sync_2proc']:.2f}x")
    def steps_wall(r):  # trained responses over the process's whole life (launch .. last step; with
        # DS_EXT_BENCH_LOCK this includes the wait for the lock: compare wall_* only from unlocked runs)
        return args.steps * 64 / r["wall_s"]
    res["wall_samples_per_s_async"] = steps_wall(a)
    res["wall_samples_per_s_sync_best"] = steps_wall(runs["sync_best"])
    if trl["runs"]:
        res["trl_vllm_wall_samples_per_s"] = [steps_wall(r) for r in trl["runs"]]
        res["trl_vllm_train_samples_per_s"] = [r["train_samples_per_s"] for r in trl["runs"]]
        res["wall_ratio_vs_trl_vllm"] = steps_wall(a) / max(steps_wall(r) for r in trl["runs"])
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
