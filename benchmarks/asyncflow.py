"""Async GRPO (AsyncFlow) vs the synchronous baseline on the same machine and thread budget.

    python benchmarks/asyncflow.py                 # CPU default: 40 GRPO steps per mode, ~3 min
    python benchmarks/asyncflow.py --steps 80 --workers 1
    python benchmarks/asyncflow.py --smoke --out /tmp/af.png --sft_cache /tmp/sft.pt   # CI size: 2 steps, no peer/long tail

Both modes run ``examples/grpo.py`` through ``ds-ext`` on the addition task (reference model, Prefix Grouper on,
G = 8, 16 prompts per step, responses of at most 8 tokens, DAPO normalisation), from the same supervised warm
start, with the same total threads: sync = 1 process x (1 + workers) threads, generation then training, each phase
with every thread; async = 1 trainer process + ``--workers`` rollout processes, 1 thread each, overlapping through
the transfer queue with ``--staleness`` k. Reported: samples (responses) per second, the trainer's idle fraction,
mean reward of the last 5 steps (after the same number of samples; +- its binomial standard error), and the
staleness histogram. Then the peer-comparable setting (``--peer_steps``): examples/grpo.py ``--peer`` (a
transformers LlamaForCausalLM of the same size, prompts "a+b=" with 2-digit numbers, no instruction, Prefix Grouper
off) sync and async, and TRL's GRPOTrainer (benchmarks/asyncflow_trl.py: same model, warm start, ids, prompts, G,
batch, lengths, loss) in one process with all the threads. The trainer process generates too whenever the queue has nothing for it. "Ideal" = the sync
step time over (async generation + training thread-seconds) / threads per step: what perfect packing of the
measured one-thread work would give; it exceeds 1 because one-thread phases use a core better than two-thread ones.
Then the long-tail setting (``--longtail_steps``; ``--only_longtail`` runs it alone): ``examples/grpo.py --task
reverse`` (reverse a string of log-uniform length, correct responses 3 .. 257 tokens, reward prefix_match), G = 8,
8 prompts per step, every mode decoding with the same continuous-batching engine (``rollout_slots``) from the same
warm start: sync on the async layout (k = 0, ``trainer_generates`` false: the worker generates step V's batch with
weights V, then the trainer trains), async (k = ``--longtail_staleness``) on the same processes, and sync in one
process with all the threads. Printed per run: samples/s, response tokens/s, trainer and rollout idle fractions,
response length mean/p50/p99, decode-batch fill (overall and before the tail: steps while a group was still there
to admit), reward of the last 5 steps (after equal samples), staleness.
TRL runs only when ``trl`` is installed (``pip install -e .[trl]``; not a dependency); otherwise
``throughput_ratio_vs_trl`` is absent.
Prints a table, writes a PNG and prints one JSON object as its last line.

``--engine vllm`` runs ``benchmarks/asyncflow_vllm.py`` instead (its other options pass through): the vLLM rollout
engine on long-tailed lengths -- async, the best synchronous run (one process, every thread), the two-process sync,
the measured phase times at 1 and 2 threads with the ideal-overlap bound, and TRL's GRPOTrainer with
``use_vllm=True`` on the same model directory.

Last-line JSON keys:
- `max_observed_staleness`: the largest staleness any async run trained with (without --engine vllm)
- `trl_threads`: TRL's faster thread count in the peer setting; null without TRL or the peer setting (without --engine vllm)
- `sync`: the sync run's summary (examples/grpo.py's JSON) (without --only_peer) (without --only_longtail) (without --engine vllm)
- `async`: the async run's summary (without --only_peer) (without --only_longtail) (without --engine vllm)
- `threads_total`: threads of every mode, 1 + --workers (without --only_peer) (without --only_longtail) (without --engine vllm)
- `processes_sync`: 1 (without --only_peer) (without --only_longtail) (without --engine vllm)
- `processes_async`: 1 + --workers (without --only_peer) (without --only_longtail) (without --engine vllm)
- `staleness`: --staleness (without --only_peer) (without --only_longtail) (without --engine vllm)
- `steps`: --steps (without --only_peer) (without --only_longtail) (without --engine vllm)
- `samples`: responses per mode, steps x 16 x 8 (without --only_peer) (without --only_longtail) (without --engine vllm)
- `throughput_ratio_async_vs_sync`: async / sync samples per second (without --only_peer) (without --only_longtail) (without --engine vllm)
- `throughput_ratio_ideal_overlap`: the sync step time over the perfectly packed async one (without --only_peer)
  (without --only_longtail) (without --engine vllm)
- `reward_sync`: the sync run's mean reward of its last 5 steps (without --only_peer) (without --only_longtail) (without --engine vllm)
- `reward_async`: the same for async (without --only_peer) (without --only_longtail) (without --engine vllm)
- `reward_stderr`: the binomial standard error of those rewards (without --only_peer) (without --only_longtail) (without --engine vllm)
- `trl`: "installed" or "not installed" (without --only_peer) (without --only_longtail) (without --engine vllm)
- `decode_fill_fraction`: {sync, async} decode-batch fill with continuous batching (with --slots) (without --engine vllm)
- `peer`: the peer-comparable setting's runs (without --peer_steps 0) (without --only_longtail) (without --engine vllm)
- `throughput_ratio_vs_trl`: ours async / TRL's fastest, peer setting; only when trl is installed (without --peer_steps 0) (without --engine vllm)
- `longtail`: the long-tail setting's runs (without --longtail_steps 0) (without --only_peer) (without --engine vllm)
- `longtail_throughput_ratio_async_vs_sync`: long-tail async / sync samples per second
  (without --longtail_steps 0) (without --only_peer) (without --engine vllm)
- `length_p50`: median response length of the long-tail async run (without --longtail_steps 0) (without --only_peer) (without --engine vllm)
- `length_p99`: its 99th percentile (without --longtail_steps 0) (without --only_peer) (without --engine vllm)
- `async_vs_best_sync`: async samples/s over the best synchronous run's (one process, every thread) (with --engine vllm)
- `overlap_bound`: N (G_2 + R_2) / (min(G_1, R_1) + N max(G_1, R_1)) from the measured generation / training seconds per step at 1 and 2 threads, N steps: the most async can gain over the best sync run in the window timed (with --engine vllm)
- `overlap_bound_steady`: (G_2 + R_2) / max(G_1, R_1), its limit for N -> infinity (with --engine vllm)
- `async_vs_best_sync_over_bound`: `async_vs_best_sync` / `overlap_bound`, the share of the bound realised (with --engine vllm)
- `async_vs_sync_2proc`: async over the two-process sync on the same processes (with --engine vllm)
- `weight_sync_blocking_s_per_step`: seconds the trainer is held by a weight push (bucket writes + handles), mean per push (with --engine vllm)
- `logprob_mismatch`: max relative error of the engine's probe log-probs against the trainer's after every push (with --engine vllm)
- `trl_vllm_threads`: threads of TRL's fastest GRPOTrainer(use_vllm=True) run; null if TRL could not run vLLM (`trl_vllm_error` says why) (with --engine vllm)
- `throughput_ratio_vs_trl_vllm`: our async samples/s (step loop) over TRL+vLLM's fastest `train()` samples/s (with --engine vllm)
- `wall_ratio_vs_trl_vllm`: the same over each process's whole life, model load to the last step (with --engine vllm)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _keys import parse_with_smoke  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_CACHE = os.path.join(ROOT, "runs", "grpo_sft.pt")  # examples/grpo.py --sft_cache: warm starts shared by all modes
SMOKE = {"steps": 2, "peer_steps": 0, "longtail_steps": 0, "sft_steps": 10}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=1, help="rollout processes in async mode")
    p.add_argument("--staleness", type=int, default=1)
    p.add_argument("--slots", type=int, default=0,
                   help="asyncflow.rollout_slots: continuous-batching slots per rollout worker (0: a group at a time; "
                        "the decode fill fraction is reported when > 0)")
    p.add_argument("--peer_steps", type=int, default=10, help="GRPO steps of the peer-comparable setting (0: skip)")
    p.add_argument("--peer_sft_steps", type=int, default=400, help="warm-start steps of the peer setting's model")
    p.add_argument("--only_peer", action="store_true", help="run the peer-comparable setting only")
    p.add_argument("--peer_repeats", type=int, default=1, help="runs of ours (sync and async) in the peer setting")
    p.add_argument("--trl_repeats", type=int, default=3,
                   help="runs of TRL at each thread count (a single run of a peer is not a measurement: its spread "
                        "is reported and the fastest run is the one compared against)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "asyncflow.png"))
    p.add_argument("--only_longtail", action="store_true", help="run the long-tail setting only")
    p.add_argument("--longtail_steps", type=int, default=12, help="GRPO steps of the long-tail setting (0: skip)")
    p.add_argument("--longtail_sft_steps", type=int, default=300,
                   help="supervised warm-start steps on the reverse task (cached in runs/; 0: none)")
    p.add_argument("--longtail_slots", type=int, default=16, help="continuous-batching slots of the rollout worker")
    p.add_argument("--longtail_staleness", type=int, default=2, help="k of the long-tail async run")
    p.add_argument("--longtail_max_len", type=int, default=256, help="longest string to reverse")
    p.add_argument("--longtail_lr", type=float, default=1e-4,
                   help="AdamW lr of the long-tail setting (small: the response lengths, which set the work per "
                        "sample, should move little over the run, so samples/s compares like with like)")
    p.add_argument("--longtail_model", choices=("reference", "hf"), default="reference",
                   help="the policy: the reference model (Prefix Grouper on) or a transformers Llama of the same size")
    p.add_argument("--sft_cache", default=SFT_CACHE, help="examples/grpo.py --sft_cache (warm starts)")
    p.add_argument("--sft_steps", type=int, default=None,
                   help="warm-start steps of the addition setting (default: examples/grpo.py's)")
    return parse_with_smoke(p, argv, SMOKE)


def run_mode(name: str, staleness: int, procs: int, args, work: str, steps: int = None, extra=(),
             asyncflow: dict = None, micro_batch: int = None, lr: float = None) -> dict:
    steps = steps or args.steps
    with open(os.path.join(ROOT, "configs", "grpo_async.json")) as f:
        config = json.load(f)
    config.pop("csv_monitor", None)
    config["ds_ext"]["asyncflow"]["max_staleness"] = staleness
    if "--peer" not in extra:
        config["ds_ext"]["asyncflow"]["rollout_slots"] = args.slots
    config["ds_ext"]["asyncflow"].update(asyncflow or {})
    if micro_batch:
        config["train_micro_batch_size_per_gpu"] = micro_batch
    if lr:
        config["optimizer"]["params"]["lr"] = lr
    if "--peer" in extra:  # TRL's trainer has no prefix grouping: the peer setting compares plain attention
        config["ds_ext"]["prefix_grouper"]["enabled"] = False
    path = os.path.join(work, f"{name}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    cmd = [sys.executable, "-m", "ds_ext.launch", "--num_procs", str(procs), "--config", path,
           os.path.join(ROOT, "examples", "grpo.py"), "--steps", str(steps),
           "--sft_cache", args.sft_cache, "--plot", os.path.join(work, f"{name}.png"),
           *(["--sft_steps", str(args.sft_steps)] if args.sft_steps and "--sft_steps" not in extra else []), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def peer_warm_start_path(args) -> str:
    """The file examples/grpo.py caches the peer setting's warm start in (named by that script, not here)."""
    spec = importlib.util.spec_from_file_location("grpo_example", os.path.join(ROOT, "examples", "grpo.py"))
    grpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grpo)
    peer = grpo.parse_args(["--deepspeed_config", "unused", "--peer", "--sft_steps", str(args.peer_sft_steps),
                            "--sft_cache", args.sft_cache])
    return grpo.warm_start_path(peer, grpo.task_for(peer))


def run_trl(args, threads: int) -> dict:
    """TRL's GRPOTrainer on the peer setting, from the warm start examples/grpo.py --peer cached."""
    state = peer_warm_start_path(args)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "asyncflow_trl.py"), "--steps", str(args.peer_steps),
           "--threads", str(threads), "--sft_state", state]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def run_peer(args, work: str, threads: int) -> dict:
    """The peer-comparable setting: HF Llama, 'a+b=' with 2-digit numbers, G=8, 16 prompts, <= 8 new tokens;
    ours sync and async (``--peer_repeats`` runs each, the median kept) and TRL's GRPOTrainer when trl is installed
    (``--trl_repeats`` runs at 1 thread and at all threads; its fastest run is compared against: the peer at its
    best), on the same cores. ``*_runs`` hold every run's samples/s, so the spread is in the output."""
    extra = ("--peer", "--sft_steps", str(args.peer_sft_steps))

    def median_run(name, k, procs):
        runs = sorted((run_mode(name, k, procs, args, work, args.peer_steps, extra)
                       for _ in range(max(1, args.peer_repeats))), key=lambda r: r["samples_per_s"])
        return dict(runs[len(runs) // 2], samples_per_s_runs=[r["samples_per_s"] for r in runs])

    out = {"sync": median_run("peer_sync", 0, 1), "async": median_run("peer_async", args.staleness, 1 + args.workers)}
    out["throughput_ratio_async_vs_sync"] = out["async"]["samples_per_s"] / out["sync"]["samples_per_s"]
    if importlib.util.find_spec("trl") is not None:  # 1 and all threads (2 can be slower than 1): the faster
        runs = [run_trl(args, n) for n in sorted({1, threads}) for _ in range(max(1, args.trl_repeats))]
        out["trl"] = dict(max(runs, key=lambda r: r["samples_per_s"]))
        out["trl"]["samples_per_s_runs"] = {str(n): [r["samples_per_s"] for r in runs if r["threads"] == n]
                                            for n in sorted({1, threads})}
        out["throughput_ratio_vs_trl"] = out["async"]["samples_per_s"] / out["trl"]["samples_per_s"]
        out["throughput_ratio_sync_vs_trl"] = out["sync"]["samples_per_s"] / out["trl"]["samples_per_s"]
    return out


def fold_peer(res: dict, peer: dict) -> dict:
    """``res`` with the peer setting's results and its top-level keys (ours vs TRL, TRL's faster thread count)."""
    res["peer"] = peer
    if "trl" in peer:
        res["throughput_ratio_vs_trl"] = peer["throughput_ratio_vs_trl"]
    res["trl_threads"] = peer["trl"]["threads"] if "trl" in peer else None
    return res


LONGTAIL_GROUPS, LONGTAIL_G = 8, 8


def run_longtail(args, work: str, threads: int) -> dict:
    """The long-tail setting: reverse a string of log-uniform length in [2, --longtail_max_len] (correct responses
    3 .. max_len + 1 tokens), reward prefix_match, G = 8, 8 prompts per step, responses up to max_len + 32 tokens.
    Every run decodes with the same continuous-batching engine (``--longtail_slots`` slots) from the same warm start:
    ``sync`` = the async layout with k = 0 (1 trainer + ``--workers`` rollout processes, 1 thread each; only the
    workers generate: step V's whole batch with weights V, then the trainer trains), ``async`` = the same processes
    with k = ``--longtail_staleness``, ``sync_1proc`` = one process with all the threads alternating the phases."""
    flow = {"group_size": LONGTAIL_G, "groups_per_step": LONGTAIL_GROUPS, "max_new_tokens": args.longtail_max_len + 32,
            "rollout_slots": args.longtail_slots, "trainer_generates": False}
    extra = ("--task", "reverse", "--reverse_max_len", str(args.longtail_max_len), "--sft_steps",
             str(args.longtail_sft_steps), "--sft_batch", "16", "--model", args.longtail_model)
    run = lambda name, k, procs, **kw: run_mode(  # noqa: E731
        name, k, procs, args, work, args.longtail_steps, extra, dict(flow, **kw), LONGTAIL_GROUPS * LONGTAIL_G,
        args.longtail_lr)
    out = {"sync": run("longtail_sync", 0, 1 + args.workers),
           "async": run("longtail_async", args.longtail_staleness, 1 + args.workers),
           "sync_1proc": run("longtail_sync_1proc", 0, 1, trainer_generates=True)}
    out["throughput_ratio_async_vs_sync"] = out["async"]["samples_per_s"] / out["sync"]["samples_per_s"]
    out["throughput_ratio_async_vs_sync_1proc"] = out["async"]["samples_per_s"] / out["sync_1proc"]["samples_per_s"]
    tok = {m: out[m]["response_tokens_per_s"] for m in ("sync", "async", "sync_1proc")}
    out["token_throughput_ratio_async_vs_sync"] = tok["async"] / tok["sync"]
    out["token_throughput_ratio_async_vs_sync_1proc"] = tok["async"] / tok["sync_1proc"]
    n = min(5, args.longtail_steps) * LONGTAIL_GROUPS * LONGTAIL_G
    out["reward_stderr"] = stderr(out["sync"]["reward_last5"], n)
    return out


def print_longtail(lt: dict, args) -> None:
    print(f"\nlong-tail setting (reverse a string of 2..{args.longtail_max_len} characters, reward prefix_match, "
          f"{args.longtail_model} model, G={LONGTAIL_G}, {LONGTAIL_GROUPS} prompts/step, {args.longtail_steps} steps, "
          f"{args.longtail_slots} decode slots, warm start {args.longtail_sft_steps} SFT steps):")
    print(f"{'run':<12}{'samples/s':>11}{'tokens/s':>10}{'trainer idle':>14}{'rollout idle':>14}{'len mean':>10}"
          f"{'len p50':>9}{'len p99':>9}"
          f"{'fill':>7}{'fill<tail':>11}{'reward last5':>14}{'max lag':>9}")
    for name in ("sync", "async", "sync_1proc"):
        r = lt[name]
        print(f"{name:<12}{r['samples_per_s']:>11.1f}{r['response_tokens_per_s']:>10.0f}"
              f"{r['trainer_idle_fraction']:>14.2f}"
              f"{r['rollout_idle_fraction']:>14.2f}{r['length_mean']:>10.1f}{r['length_p50']:>9}{r['length_p99']:>9}"
              f"{r['decode_fill_fraction']:>7.2f}{r['decode_fill_before_tail']:>11.2f}{r['reward_last5']:>14.4f}"
              f"{r['max_observed_staleness']:>9}")
    print(f"async / sync {lt['throughput_ratio_async_vs_sync']:.2f} (same {1 + args.workers} processes x 1 thread), "
          f"async / sync_1proc {lt['throughput_ratio_async_vs_sync_1proc']:.2f}; in response tokens/s "
          f"{lt['token_throughput_ratio_async_vs_sync']:.2f} and {lt['token_throughput_ratio_async_vs_sync_1proc']:.2f}"
          f"; reward after equal samples: sync "
          f"{lt['sync']['reward_last5']:.4f}, async {lt['async']['reward_last5']:.4f} (+-{lt['reward_stderr']:.4f}); "
          f"staleness histogram {lt['async']['lag_histogram']}")


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    modes = ["sync", "async"]
    a.bar(modes, [res[m]["samples_per_s"] for m in modes], color=["grey", "tab:green"])
    a.set_ylabel("samples / s")
    a.set_title(f"throughput, {res['threads_total']} threads in total")
    hist = res["async"]["lag_histogram"]
    b.bar([int(k) for k in hist], list(hist.values()), color="tab:green")
    b.set_xticks(sorted(int(k) for k in hist))
    b.set_xlabel("policy lag of trained groups (steps)")
    b.set_ylabel("groups")
    b.set_title(f"staleness, max_staleness={res['staleness']}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


def print_peer(peer: dict, args) -> None:
    print(f"\npeer-comparable setting (HF LlamaForCausalLM 128x4, 'a+b=' 2-digit, G=8, 16 prompts/step, <= 8 "
          f"tokens, {args.peer_steps} steps, warm start {args.peer_sft_steps} SFT steps, no prefix grouping):")
    print(f"{'run':<12}{'samples/s':>11}{'reward first5':>15}{'reward last5':>14}")
    for name in ("sync", "async", "trl"):
        if name in peer:
            r = peer[name]
            print(f"{name:<12}{r['samples_per_s']:>11.1f}{r['reward_first5']:>15.3f}{r['reward_last5']:>14.3f}")
    line = f"async / sync {peer['throughput_ratio_async_vs_sync']:.2f}"
    if "trl" in peer:
        line += (f"; ours async / TRL {peer['throughput_ratio_vs_trl']:.2f}, ours sync / TRL "
                 f"{peer['throughput_ratio_sync_vs_trl']:.2f} (TRL {peer['trl']['trl_version']}, 1 process x "
                 f"{peer['trl']['threads']} threads, its fastest run; all runs' samples/s by thread count: "
                 f"{peer['trl']['samples_per_s_runs']})")
    print(line)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    known, rest = pick.parse_known_args(argv)
    if known.engine == "vllm":  # the vLLM rollout engine's setting (benchmarks/asyncflow_vllm.py)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import asyncflow_vllm
        return asyncflow_vllm.main(rest)
    args = parse_args(rest)
    work = tempfile.mkdtemp(prefix="ds_ext_asyncflow_bench_")
    threads = 1 + args.workers
    if args.only_peer:
        res = fold_peer({}, run_peer(args, work, threads))
        print_peer(res["peer"], args)
        args.longtail_steps = 0
    else:
        res = {} if args.only_longtail else run_short(args, work, threads)
    if args.longtail_steps > 0:
        res["longtail"] = lt = run_longtail(args, work, threads)
        res["longtail_throughput_ratio_async_vs_sync"] = lt["throughput_ratio_async_vs_sync"]
        res["length_p50"], res["length_p99"] = lt["async"]["length_p50"], lt["async"]["length_p99"]
        print_longtail(lt, args)
    res.setdefault("trl_threads", None)  # the peer setting's TRL run (its faster thread count) when trl is installed
    asyncs = [res.get("async"), res.get("peer", {}).get("async"), res.get("longtail", {}).get("async")]
    res["max_observed_staleness"] = max(r["max_observed_staleness"] for r in asyncs if r)  # every async run
    if "sync" in res or "longtail" in res:
        plot(res if "sync" in res else dict(res["longtail"], threads_total=threads,
                                            staleness=args.longtail_staleness), args.out)
    print(json.dumps(res))
    return res


def run_short(args, work: str, threads: int) -> dict:
    """The addition setting (8-token responses) and the peer-comparable setting, with their printed tables."""
    sync = run_mode("sync", 0, 1, args, work)
    asyn = run_mode("async", args.staleness, 1 + args.workers, args, work)
    samples = args.steps * 16 * 8
    per_step_sync = sync["train_loop_s"] / args.steps
    # perfect packing of the async run's measured one-thread work (generation + training) on all threads
    ideal_async_step = (asyn["generate_s"] + asyn["train_busy_s"]) / threads / args.steps
    res = {"sync": sync, "async": asyn, "threads_total": threads, "processes_sync": 1,
           "processes_async": 1 + args.workers, "staleness": args.staleness, "steps": args.steps,
           "samples": samples,
           "throughput_ratio_async_vs_sync": asyn["samples_per_s"] / sync["samples_per_s"],
           "throughput_ratio_ideal_overlap": per_step_sync / ideal_async_step,
           "reward_sync": sync["reward_last5"], "reward_async": asyn["reward_last5"],
           "reward_stderr": stderr(sync["reward_last5"], 5 * 128),
           "max_observed_staleness": asyn["max_observed_staleness"],
           "trl": "installed" if importlib.util.find_spec("trl") is not None else "not installed"}
    if args.peer_steps > 0:
        fold_peer(res, run_peer(args, work, threads))
    print(f"threads in total: {threads} (sync: 1 process x {threads} threads; async: {1 + args.workers} processes "
          f"x 1 thread)")
    print(f"{'mode':<7}{'samples/s':>11}{'trainer idle':>14}{'generate s':>12}{'reward first5':>15}"
          f"{'reward last5':>14}{'max lag':>9}")
    for m, r in (("sync", sync), ("async", asyn)):
        print(f"{m:<7}{r['samples_per_s']:>11.1f}{r['trainer_idle_fraction']:>14.2f}{r['generate_s']:>12.1f}"
              f"{r['reward_first5']:>15.3f}{r['reward_last5']:>14.3f}{r['max_observed_staleness']:>9}")
    if args.slots > 0:
        res["decode_fill_fraction"] = {m: r.get("decode_fill_fraction") for m, r in (("sync", sync), ("async", asyn))}
        print(f"decode batch fill ({args.slots} slots per worker): sync {sync.get('decode_fill_fraction')}, async "
              f"{asyn.get('decode_fill_fraction')} (starved steps: async {asyn.get('decode_starved_steps')})")
    print(f"async / sync throughput {res['throughput_ratio_async_vs_sync']:.2f} (ideal overlap of the measured "
          f"phases {res['throughput_ratio_ideal_overlap']:.2f}); reward after {samples} samples: sync "
          f"{res['reward_sync']:.3f}, async {res['reward_async']:.3f} (+-{res['reward_stderr']:.3f}); staleness "
          f"histogram {asyn['lag_histogram']}; TRL: {res['trl']}")
    if args.peer_steps > 0:
        print_peer(res["peer"], args)
    return res


if __name__ == "__main__":
    main()
