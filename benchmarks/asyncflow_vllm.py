"""AsyncFlow with the vLLM rollout engine on long-tailed response lengths: async against the best synchronous run.

    python benchmarks/asyncflow.py --engine vllm            # ~10 min on 2 CPU cores: 4 runs of ours (~1.1 min each,
                                                            # an engine start-up included) and 3 TRL runs (~1.8 min each)
    python benchmarks/asyncflow_vllm.py --steps 16 --threads 2

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
``generate_s`` and ``train_busy_s``. Ideal overlap of the async layout (one core per phase, perfectly pipelined,
whole steps): the N steps take ``min(G_1, R_1) + N max(G_1, R_1)`` -- the pipeline's fill (step 0's generation has
nothing to overlap with, nor has the last step's training) plus N steps of the slower phase -- against the best
sync run's ``N (G_2 + R_2)``. So ``overlap_bound = N (G_2 + R_2) / (min(G_1, R_1) + N max(G_1, R_1))`` is the most
async can gain over the best sync run in the window timed, and ``async_vs_best_sync_over_bound`` is how much of it is
realised; ``overlap_bound_steady`` is its limit for N -> infinity, ``(G_2 + R_2) / max(G_1, R_1)`` (the formula
before 2026-12-07's third pass, which left the fill out of the bound but not out of the measured time). Throughput = trained responses per second of the step loop (engine start-up excluded in every mode: the
async runtime waits for every worker's engine before its clock starts, as the one-process runs build theirs first).

    python benchmarks/asyncflow_vllm.py --smoke     # CI size: the async run only (one eager engine start-up), 2 steps

Last-line JSON keys:
- `engine`: "vllm"
- `steps`: --steps
- `threads`: --threads
- `samples_per_s_async`: async samples per second of the step loop
- `samples_per_s_sync_2proc`: the two-process sync's (without --modes async)
- `samples_per_s_sync_best`: the best sync run's (without --modes async)
- `samples_per_s_sync_1thread`: the one-core one-process run's (without --modes async)
- `phase_gen_s_1thread`: generation seconds per step at 1 thread (without --modes async)
- `phase_train_s_1thread`: training seconds per step at 1 thread (without --modes async)
- `phase_gen_s_2threads`: generation seconds per step at --threads threads (without --modes async)
- `phase_train_s_2threads`: training seconds per step at --threads threads (without --modes async)
- `async_vs_best_sync`: async samples/s over the best synchronous run's (one process, every thread)
  (without --modes async)
- `async_vs_sync_2proc`: async over the two-process sync on the same processes (without --modes async)
- `overlap_bound`: N (G_2 + R_2) / (min(G_1, R_1) + N max(G_1, R_1)), the most async can gain over the best sync
  run in N = --steps steps, the pipeline's fill included (without --modes async)
- `overlap_bound_steady`: (G_2 + R_2) / max(G_1, R_1), the same for N -> infinity (without --modes async)
- `async_vs_best_sync_over_bound`: `async_vs_best_sync` / `overlap_bound` (without --modes async)
- `weight_sync_blocking_s_per_step`: seconds the trainer is held by a weight push, mean per push
- `weight_sync_bytes_per_push`: bytes written per push
- `weight_sync_transfer_s`: push start to the last worker's acknowledgement, mean
- `logprob_mismatch`: max relative error of the engines' probe log-probs against the trainer's after every push
- `length_p50`: median response length of the async run
- `length_p99`: its 99th percentile
- `reward_first5_async`: the async run's mean reward of its first 5 steps
- `reward_last5_async`: the same over its last 5 steps
- `wall_samples_per_s_async`: trained responses over the async process's whole life (launch .. last step)
- `wall_samples_per_s_sync_best`: the same for the best sync run (without --modes async)
- `trl_vllm_threads`: threads of TRL's fastest GRPOTrainer(use_vllm=True) run; null if it did not run
  (`trl_vllm_error` says why)
- `throughput_ratio_vs_trl_vllm`: async samples/s over TRL+vLLM's fastest `train()` samples/s; null without TRL
- `trl_vllm_error`: why TRL+vLLM did not run (also printed when a TRL run fails; "skipped") (with --trl_repeats 0)
- `trl_vllm_samples_per_s`: each TRL run's samples/s from model load to the last step (without --trl_repeats 0)
- `best_sync_vs_trl_vllm`: the best sync run over TRL+vLLM's fastest (without --trl_repeats 0) (without --modes async)
- `trl_vllm_wall_samples_per_s`: each TRL run's responses over its whole process life (without --trl_repeats 0)
- `trl_vllm_train_samples_per_s`: each TRL run's `train()` samples/s (without --trl_repeats 0)
- `wall_ratio_vs_trl_vllm`: async over TRL's fastest, each over its whole process life (without --trl_repeats 0)
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _keys import parse_with_smoke  # noqa: E402

MODES = ("async", "sync_2proc", "sync_best", "sync_1thread")
SMOKE = {"steps": 2, "max_new_tokens": 16, "trl_repeats": 0, "modes": "async", "enforce_eager": True}
REWARD = '''def vowels(prompt, completion):
    return sum(c in "aeiou " for c in completion) / max(1, len(completion))
'''


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="the machine's thread budget (async: 1 + 1 processes)")
    p.add_argument("--staleness", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=192)
    p.add_argument("--stop_tokens", type=int, default=6, help="ids that end a response (the long tail's rate)")
    p.add_argument("--trl_repeats", type=int, default=3)
    p.add_argument("--enforce_eager", action="store_true",
                   help="asyncflow.rollout.enforce_eager: no torch.compile in the engines (faster start, slower decode)")
    p.add_argument("--in_flight_kv", default="recompute", choices=("recompute", "keep"),
                   help="asyncflow.rollout.in_flight_kv of every run (what a reload does to requests in flight)")
    p.add_argument("--work", default=None)
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated runs of ours (the comparisons need all four; 'async' alone: the CI size)")
    args = parse_with_smoke(p, argv, SMOKE)
    args.modes = args.modes.split(",")
    if set(args.modes) - set(MODES) or "async" not in args.modes or (len(args.modes) > 1 and len(args.modes) < 4):
        p.error(f"--modes: 'async' or all of {','.join(MODES)}")
    return args


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
                        max_num_seqs=64, in_flight_kv=args.in_flight_kv, enforce_eager=args.enforce_eager)
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
                      "--max_new_tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
                     + (["--enforce_eager"] if args.enforce_eager else []))  # both sides compiled, or both eager
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


def compare(args, runs: dict, res: dict) -> None:
    """The comparisons against the synchronous runs and the ideal-overlap bound (all four modes ran)."""
    g2, r2 = phases(runs["sync_best"], args.steps)
    g1, r1 = phases(runs["sync_1thread"], args.steps)
    n = args.steps
    bound = n * (g2 + r2) / (min(g1, r1) + n * max(g1, r1))  # the fill: one step of the faster phase, unoverlapped
    sps = {k: v["samples_per_s"] for k, v in runs.items()}
    res.update(phase_gen_s_1thread=g1, phase_train_s_1thread=r1, phase_gen_s_2threads=g2, phase_train_s_2threads=r2)
    res["async_vs_best_sync"] = sps["async"] / sps["sync_best"]
    res["async_vs_sync_2proc"] = sps["async"] / sps["sync_2proc"]
    res["overlap_bound"] = bound
    res["overlap_bound_steady"] = (g2 + r2) / max(g1, r1)
    res["async_vs_best_sync_over_bound"] = res["async_vs_best_sync"] / bound


def compare_trl(args, runs: dict, res: dict, trl: dict) -> None:
    sps = runs["async"]["samples_per_s"]
    if not trl["runs"]:
        res["trl_vllm_threads"], res["throughput_ratio_vs_trl_vllm"] = None, None
        res["trl_vllm_error"] = (trl["error"] or "")[-600:]
        return
    # steady state on both sides: our step loop against TRL's train() (model load excluded in both)
    best = max(trl["runs"], key=lambda r: r["train_samples_per_s"])
    res["trl_vllm_threads"] = best["threads"]
    res["trl_vllm_samples_per_s"] = [r["samples_per_s"] for r in trl["runs"]]
    res["throughput_ratio_vs_trl_vllm"] = sps / best["train_samples_per_s"]
    if "sync_best" in runs:
        res["best_sync_vs_trl_vllm"] = runs["sync_best"]["samples_per_s"] / best["train_samples_per_s"]
    res["trl_vllm_wall_samples_per_s"] = [steps_wall(args, r) for r in trl["runs"]]
    res["trl_vllm_train_samples_per_s"] = [r["train_samples_per_s"] for r in trl["runs"]]
    res["wall_ratio_vs_trl_vllm"] = steps_wall(args, runs["async"]) / max(steps_wall(args, r) for r in trl["runs"])


def steps_wall(args, r: dict) -> float:
    """Trained responses over the process's whole life (launch .. last step; with DS_EXT_BENCH_LOCK this includes
    the wait for the lock: compare wall_* only from unlocked runs)."""
    return args.steps * 64 / r["wall_s"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="ds_ext_asyncflow_vllm_")
    os.makedirs(work, exist_ok=True)
    model = make_inputs(work)
    res = {"engine": "vllm", "steps": args.steps, "threads": args.threads}
    layout = {"async": (2, args.staleness, None), "sync_2proc": (2, 0, None), "sync_best": (1, 0, None),
              "sync_1thread": (1, 0, "0")}
    runs = {m: run(args, work, model, m, *layout[m]) for m in MODES if m in args.modes}
    res.update({f"samples_per_s_{k}": v["samples_per_s"] for k, v in runs.items()})
    if len(runs) == len(MODES):
        compare(args, runs, res)
    a = runs["async"]
    res["weight_sync_blocking_s_per_step"] = a.get("weight_sync_blocking_s")
    res["weight_sync_bytes_per_push"] = a.get("weight_sync_bytes_per_push")
    res["weight_sync_transfer_s"] = a.get("weight_sync_transfer_s")
    res["logprob_mismatch"] = max(r.get("logprob_mismatch", 0.0) for r in runs.values())
    res["length_p50"], res["length_p99"] = a.get("length_p50"), a.get("length_p99")
    res["reward_first5_async"], res["reward_last5_async"] = a["reward_first5"], a["reward_last5"]
    trl = run_trl_vllm(args, work, model) if args.trl_repeats > 0 else {"runs": [], "error": "skipped"}
    compare_trl(args, runs, res, trl)
    print(f"{'mode':14s} {'samples/s':>10s} {'gen_s':>8s} {'train_s':>8s} {'seconds':>8s}")
    for k, v in runs.items():
        print(f"{k:14s} {v['samples_per_s']:10.2f} {v['generate_s']:8.2f} {v['train_busy_s']:8.2f} "
              f"{v['train_loop_s']:8.2f}")
    if "overlap_bound" in res:
        print(f"async / best sync {res['async_vs_best_sync']:.2f}x, bound {res['overlap_bound']:.2f}x, realised "
              f"{res['async_vs_best_sync_over_bound']:.2f}; async / 2-process sync {res['async_vs_sync_2proc']:.2f}x")
    res["wall_samples_per_s_async"] = steps_wall(args, a)
    if "sync_best" in runs:
        res["wall_samples_per_s_sync_best"] = steps_wall(args, runs["sync_best"])
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
