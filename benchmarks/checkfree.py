"""CheckFree vs checkpoint restart under injected pipeline-stage failures: loss vs step and vs wall-clock.

    python benchmarks/checkfree.py                  # CPU default: 4 processes (4 stages), 5 runs
    python benchmarks/checkfree.py --swap           # CheckFree+ at the reference's failure rates, 11 runs
    python benchmarks/checkfree.py --smoke --out /tmp/cf.png   # CI size: 2 stages, 8 steps, one rate

Model: the reference Llama-style decoder (``--layers`` layers, ``--hidden`` wide, vocabulary 259) as a DeepSpeed
``PipelineEngine`` of ``--stages`` stages (default 4) on as many gloo processes, ZeRO-1, AdamW, windows of the shipped
corpus. Every stage of the pipeline fails at random with an hourly probability (``--rates``, CheckFree's 5-33 %/h),
turned into a per-step probability for a step of ``--nominal_step_s`` seconds, the same failures for every method
(drawn from ``--seed`` and the iteration number):

* ``none``: no failures (the reference curve and the loss target);
* ``checkfree``: ds_ext checkpoint-free recovery -- a middle stage becomes the gradient-norm-weighted average of its
  neighbours (CheckFree), an end stage copies its neighbour's layers and the replica of its embedding / head the
  neighbour keeps; fresh Adam moments, LR x 1.1 on the rebuilt stage. The survivors keep running; the pipeline waits
  for the lost stage's replacement process, which is really booted (a fresh Python importing torch, DeepSpeed and
  ds_ext and building the model; ``replacement_boot_s``), then rebuilt (``rebuild_s``);
* ``checkpoint``: stock DeepSpeed ``save_checkpoint`` every ``--ckpt_every`` steps (timed: ``save_s``). A failure
  kills the job: every process exits and the job is really relaunched (a new spawn of all processes, imports,
  process group, engine build: ``relaunch_s``, from the failure to engine-ready), ``load_checkpoint`` rolls every
  stage back (``load_s``) and the lost steps are trained again. Not counted for either method: the time to detect
  the failure and to get a replacement machine (the same for both).

``--swap`` (CheckFree+, ``recovery.checkpoint_free.swap_end_stages``; the reference's set-up where this CPU allows:
4 stages x 3 layers as its 124M model, 4 micro-batches, 300 steps, checkpoint every 100 iterations as its
prototype): failures at the reference code's per-iteration stage-failure probabilities for 5, 10 and 33 %/h
(``--iteration_rates`` 0.0009 0.002 0.01, its 500M config) times ``--failure_scale`` (default 1); with 4 stages every
stage is an end-side one. Runs ``none`` and ``none_swap`` (failure-free, plain vs swapped schedule), then per rate
``checkfree_plus`` (swap on: a lost stage is a copy of its partner), ``checkfree`` (no swap) and ``checkpoint``.

Runs of one failure rate share one spawn of the processes (each builds a fresh engine from the same seed); the
clock of a run starts at its first step, so start-up is not counted, relaunches are. The loss target is the
failure-free run's smoothed training loss (EMA 0.1) at ``--target_at`` of its steps; time to target is when a run's
smoothed loss first reaches it. Theory for the time ratio, if a rebuild cost nothing (neither loss nor time):
``S / (S + F * (ckpt_every / 2 + (relaunch + load) / step))`` with ``F`` the expected failures in ``S`` steps and the
measured relaunch, load and step seconds. ``--lock FILE`` holds a ``flock`` around each spawn group (shared machines).
Table, PNG, last line JSON.

Last-line JSON keys:
- `rows`: one row per run (method, rate, failures, iterations, wall / to-target / save / load / relaunch /
  replacement-boot / rebuild seconds, steps per second, eval loss)
- `target_loss`: the failure-free run's smoothed loss at --target_at of its steps
- `stages`: --stages (pipeline stages, one process each)
- `params`: model parameters (all stages)
- `steps`: --steps
- `ckpt_every`: --ckpt_every
- `nominal_step_s`: --nominal_step_s
- `loss_gap_vs_no_failure`: CheckFree eval loss / failure-free eval loss - 1, at the highest rate
- `time_ratio_vs_checkpoint_restart`: CheckFree / checkpoint-restart time to the loss target, at the highest rate
- `time_ratio_theory`: S / (S + F * (ckpt_every / 2 + (relaunch + load) / step))
- `high_rate_per_hour`: the highest --rates
- `cost_per_event_s`: measured means: `relaunch_s` and `load_checkpoint_s` per checkpoint restart, `save_checkpoint_s`
  per save, `replacement_boot_s` and `rebuild_s` per CheckFree failure, `step_s` per failure-free step; null where
  no such event happened
- `versions`: torch and deepspeed versions
- `swap`: true (with --swap)
- `iteration_rates`: the per-iteration failure probabilities run, after --failure_scale (with --swap)
- `failure_scale`: --failure_scale (with --swap)
- `checkfree_plus_time_ratio_vs_ckpt`: CheckFree+ / checkpoint-restart time to target at the middle rate (the
  paper: <= 0.88 at 5-10 %/h); null if a run missed the target within --max_iterations (with --swap)
- `checkfree_plus_time_ratio_vs_ckpt_without_restarts`: the same with each side's relaunches / replacement boots
  before its target time subtracted (the old accounting: neither side pays a process start) (with --swap)
- `checkfree_plus_time_ratio_vs_checkfree`: CheckFree+ / CheckFree (no swap) time to target, middle rate (with --swap)
- `checkfree_plus_time_ratio_vs_ckpt_by_rate`: the same ratio at each rate; null where a run did not reach the target
  within --max_iterations (with --swap)
- `end_stage_recovery_loss_ratio`: CheckFree+ eval loss at the highest rate / failure-free eval loss, equal steps
  (with --swap)
- `checkfree_end_stage_loss_ratio`: the same for CheckFree without the swap (with --swap)
- `swap_cost_throughput_ratio`: failure-free steps/s with the swapped schedule / with DeepSpeed's (with --swap)
- `swap_failure_free_loss_ratio`: failure-free eval loss with the swapped schedule / without (with --swap)
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

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _keys import parse_with_smoke  # noqa: E402
from _pipeline_bench import build_engine, free_port, maybe_locked, rank_env  # noqa: E402

SMOKE = {"stages": 2, "steps": 8, "hidden": 32, "layers": 4, "seq_len": 16, "micro": 2, "rates": [0.33],
         "nominal_step_s": 900.0, "ckpt_every": 4, "eval_batches": 2, "seed": 39}


def parse_args(argv=None):
    swap = "--swap" in (sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--swap", action="store_true", help="CheckFree+ runs (see the module docstring)")
    p.add_argument("--iteration_rates", type=float, nargs="+", default=[0.0009, 0.002, 0.01],
                   help="--swap: per-iteration stage failure probabilities (reference: 5, 10, 33 %%/h)")
    p.add_argument("--failure_scale", type=float, default=1.0, help="--swap: multiplies --iteration_rates")
    p.add_argument("--stages", type=int, default=4, help="pipeline stages = processes (--swap: >= 4)")
    p.add_argument("--steps", type=int, default=300 if swap else 400)
    p.add_argument("--hidden", type=int, default=64 if swap else 128)
    p.add_argument("--layers", type=int, default=12 if swap else 8, help="decoder layers (4 stages share them)")
    p.add_argument("--seq_len", type=int, default=32 if swap else 64)
    p.add_argument("--micro", type=int, default=2 if swap else 4)
    p.add_argument("--gas", type=int, default=4 if swap else 2, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rates", type=float, nargs="+", default=[0.10, 0.33], help="stage failures per hour")
    p.add_argument("--nominal_step_s", type=float, default=90.0)
    p.add_argument("--ckpt_every", type=int, default=100 if swap else 20)
    p.add_argument("--target_at", type=float, default=0.8)
    p.add_argument("--max_iterations", type=int, default=None,
                   help="stop a run after this many iterations, steps redone included (default 2 x --steps): at "
                        "high rates checkpoint restart may never get through --ckpt_every failure-free steps")
    p.add_argument("--eval_batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lock", default=None, help="a file to flock around each group of runs (a shared machine)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "checkfree.png"))
    return parse_with_smoke(p, argv, SMOKE)


def ds_config(args, method: str, rate: float) -> dict:
    ext = {"topology": {"pipeline_stages": args.stages}}
    if method in ("checkfree", "checkfree_plus"):
        ext["recovery"] = {"checkpoint_free": {"enabled": True, "replicate_ends_interval": 10, "inject": {
            "stage_failure_rate_per_hour": rate, "nominal_step_time_s": args.nominal_step_s, "seed": args.seed}}}
    if method in ("checkfree_plus", "none_swap"):
        ext.setdefault("recovery", {"checkpoint_free": {"enabled": True}})
        ext["recovery"]["checkpoint_free"]["swap_end_stages"] = True
    return {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": args.gas,
            "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
            "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0, "torch_adam": True}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": args.lr,
                                                         "warmup_num_steps": 10}},
            "zero_optimization": {"stage": 1}, "ds_ext": ext}


class Batches:
    """Corpus windows by (iteration, micro-batch): every method sees the same data per iteration."""

    def __init__(self, args):
        from ds_ext.data.corpus import load_corpus
        self.tokens, self.args = load_corpus(max_bytes=4 << 20), args

    def get(self, key: int, micro: int):
        g = torch.Generator().manual_seed(key * 1009 + micro)
        n = self.args.seq_len + 1
        starts = torch.randint(0, self.tokens.numel() - n, (self.args.micro,), generator=g).tolist()
        x = torch.stack([self.tokens[s:s + n] for s in starts]).long()
        return x[:, :-1], x[:, 1:]

    def iterator(self, key: int):
        return iter([self.get(key, m) for m in range(self.args.gas)])


def run_job(rank: int, args, method: str, rate: float, job_dir: str) -> bool:
    """One method's run (or, for ``checkpoint``, its segment since the last relaunch) on this rank; False when a
    failure ends the segment (checkpoint restart: every rank returns and the job is relaunched)."""
    from ds_ext.checkfree.rules import failures_at
    state_path = os.path.join(job_dir, "state.json")
    state = json.load(open(state_path)) if os.path.exists(state_path) else None
    t_build = time.time()
    engine, topo = build_engine(args, ds_config(args, method, rate))
    if rank == 0:
        print(f"{method}@{rate}: engine built in {time.time() - t_build:.1f} s", flush=True)
    data, ckpt_dir = Batches(args), os.path.join(job_dir, "ckpt")
    seg = {"log": [], "save_s": 0.0, "saves": 0, "load_s": 0.0, "launch_s": 0.0, "replace_s": 0.0,
           "pauses": []}
    if state is None:  # a fresh run: the clock starts at the first step (start-up is the same for every method)
        state = {"iteration": 0, "t0": None, "segments": 0}
        if method == "checkpoint":
            engine.save_checkpoint(ckpt_dir)
    else:  # a relaunched checkpoint run: everything since the failure is its restart cost
        seg["launch_s"] = time.time() - state["failed_at"]
        seg["pauses"].append((state["failed_at"] - state["t0"], seg["launch_s"]))
        t = time.time()
        engine.load_checkpoint(ckpt_dir)
        seg["load_s"] = time.time() - t
    iteration, failed, seen = state["iteration"], False, 0.0
    cap = getattr(args, "max_iterations", None) or 2 * args.steps  # checkpoint restart may never get through
    while engine.global_steps < args.steps and not failed and iteration < cap:
        iteration += 1
        state["t0"] = state["t0"] or time.time()
        loss = float(engine.train_batch(data.iterator(iteration)))
        seg["log"].append((time.time() - state["t0"], engine.global_steps, loss))
        if method == "checkpoint":
            if failures_at(iteration, [], rate, args.nominal_step_s, args.seed, topo):
                failed = True  # the job dies here: relaunched by the parent, rolled back to the last save
            elif engine.global_steps % args.ckpt_every == 0:
                t = time.time()
                engine.save_checkpoint(ckpt_dir)
                seg["save_s"] += time.time() - t
                seg["saves"] += 1
        elif method.startswith("checkfree"):
            now = engine.ds_ext_metrics().get("checkpoint_free/failures", 0.0)
            if now > seen:  # a stage was lost: the pipeline waits for its replacement process to boot
                seen, t = now, time.time()
                if rank == 0:
                    boot_replacement(args)
                torch.distributed.barrier()
                seg["replace_s"] += time.time() - t
                seg["pauses"].append((t - state["t0"], time.time() - t))
    state.update(iteration=iteration, segments=state["segments"] + 1)
    if failed:
        state["failed_at"] = time.time()
    else:
        seg["eval_loss"] = sum(float(engine.eval_batch(iter([data.get(-1 - k, m) for m in range(args.gas)])))
                               for k in range(args.eval_batches)) / args.eval_batches
        seg["metrics"] = engine.ds_ext_metrics()
        seg["params"] = sum(p.numel() for p in engine.module.parameters())
    seg["iterations"] = iteration
    torch.save(seg, os.path.join(job_dir, f"rank{rank}_seg{state['segments'] - 1}.pt"))
    torch.distributed.barrier()
    if rank == 0:
        json.dump(state, open(state_path + ".tmp", "w"))
        os.replace(state_path + ".tmp", state_path)
    engine.ds_ext_close()
    torch.distributed.barrier()
    return not failed


def boot_replacement(args) -> None:
    """A replacement node's start-up, really run: a fresh Python that imports torch, DeepSpeed and ds_ext and builds
    the model (what a new process does before it can receive a rebuilt stage)."""
    code = ("import sys, torch, deepspeed, ds_ext; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(1); "
            "import argparse; from _pipeline_bench import model_config; from ds_ext.models import LlamaForCausalLM; "
            "LlamaForCausalLM(model_config(argparse.Namespace(hidden=int(sys.argv[2]), layers=int(sys.argv[3]), "
            "seq_len=int(sys.argv[4]))))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), str(args.hidden),
                    str(args.layers), str(args.seq_len)], check=True, env=env)


def worker(rank: int, args, jobs: list, work: str, port: int) -> None:
    """Runs ``jobs`` (``(key, method, rate)``) in order in one process group; stops at a checkpoint failure."""
    rank_env(rank, args.stages, port)
    for key, method, rate in jobs:
        job_dir = os.path.join(work, key)
        os.makedirs(job_dir, exist_ok=True)
        if not run_job(rank, args, method, rate, job_dir):
            return
        if rank == 0:
            open(os.path.join(job_dir, "done"), "w").close()
        torch.distributed.barrier()


def run_group(args, jobs: list) -> list:
    """Every ``(method, rate)`` of ``jobs``, in one spawn of ``--stages`` processes, respawned after each checkpoint
    failure (the relaunch is part of that run's clock), under ``--lock``. Returns one result per job."""
    import torch.multiprocessing as mp
    work = tempfile.mkdtemp(prefix="ds_ext_cf_")
    keyed = [(f"{m}@{r}", m, r) for m, r in jobs]
    try:
        with maybe_locked(args.lock):
            while True:
                pending = [j for j in keyed if not os.path.exists(os.path.join(work, j[0], "done"))]
                if not pending:
                    break
                mp.start_processes(worker, args=(args, pending, work, free_port()), nprocs=args.stages,
                                   start_method="spawn")
        return [collect(args, os.path.join(work, key), method, rate) for key, method, rate in keyed]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def collect(args, job_dir: str, method: str, rate: float) -> dict:
    state = json.load(open(os.path.join(job_dir, "state.json")))
    ranks = [[torch.load(os.path.join(job_dir, f"rank{r}_seg{s}.pt"), weights_only=False)
              for s in range(state["segments"])] for r in range(args.stages)]
    last = ranks[-1]  # the last stage computes the loss
    total = {k: max(sum(s[k] for s in segs) for segs in ranks) for k in ("save_s", "saves", "load_s", "launch_s",
                                                                         "replace_s")}
    metrics = [segs[-1]["metrics"] for segs in ranks]
    failures = (state["segments"] - 1 if method == "checkpoint"
                else int(metrics[-1].get("checkpoint_free/failures", 0)))
    return {"method": method, "rate": rate, "log": [e for s in last for e in s["log"]],
            "pauses": [p for s in ranks[0] for p in s["pauses"]],
            "eval_loss": last[-1]["eval_loss"], "iterations": state["iteration"], "failures": failures,
            "params": sum(segs[-1]["params"] for segs in ranks), **total,
            "rebuild_s": max(m.get("checkpoint_free/rebuild_s", 0.0) for m in metrics)}


def smoothed(log, alpha=0.1):
    out, ema = [], None
    for t, step, loss in log:
        ema = loss if ema is None else (1 - alpha) * ema + alpha * loss
        out.append((t, step, ema))
    return out


def time_to(log, target):
    return next((t for t, _, ema in smoothed(log) if ema <= target), float("nan"))


def without_pauses(t: float, pauses: list) -> float:
    """``t`` minus the relaunches / replacement boots (``(start, seconds)``) that began before it."""
    return t - sum(d for start, d in pauses if start < t)


def summarise(args, runs: list) -> dict:
    from ds_ext.checkfree.rules import per_step_probability
    ref = next(r for r in runs if r["method"] == "none")
    ref_smooth = smoothed(ref["log"])
    target = ref_smooth[int(args.target_at * len(ref_smooth)) - 1][2]
    rows = []
    for r in runs:
        p = per_step_probability(r["rate"], args.nominal_step_s)
        expected_failures = args.stages * p * args.steps
        rows.append({"method": r["method"], "rate_per_hour": r["rate"], "failures": r["failures"],
                     "expected_failures": expected_failures, "iterations": r["iterations"],
                     "wall_s": r["log"][-1][0], "time_to_target_s": time_to(r["log"], target),
                     "time_to_target_without_restarts_s": without_pauses(time_to(r["log"], target), r["pauses"]),
                     "eval_loss": r["eval_loss"], "save_s": r["save_s"], "load_s": r["load_s"],
                     "saves": r["saves"], "relaunch_s": r["launch_s"], "replacement_boot_s": r["replace_s"],
                     "rebuild_s": r["rebuild_s"],
                     "steps_per_s": len(r["log"]) / r["log"][-1][0]})
    high = max(args.rates)
    cf = next(x for x in rows if x["method"] == "checkfree" and x["rate_per_hour"] == high)
    ck = next(x for x in rows if x["method"] == "checkpoint" and x["rate_per_hour"] == high)
    none = next(x for x in rows if x["method"] == "none")
    f, cost = ck["expected_failures"], cost_per_event(rows)
    restart_steps = ((cost["relaunch_s"] or 0.0) + (cost["load_checkpoint_s"] or 0.0)) / cost["step_s"]
    return {"rows": rows, "stages": args.stages, "target_loss": target, "params": ref["params"], "steps": args.steps,
            "ckpt_every": args.ckpt_every, "nominal_step_s": args.nominal_step_s,
            "loss_gap_vs_no_failure": cf["eval_loss"] / none["eval_loss"] - 1,
            "time_ratio_vs_checkpoint_restart": cf["time_to_target_s"] / ck["time_to_target_s"],
            "time_ratio_theory": args.steps / (args.steps + f * (args.ckpt_every / 2 + restart_steps)),
            "high_rate_per_hour": high, "cost_per_event_s": cost,
            "versions": {"torch": torch.__version__, "deepspeed": __import__("deepspeed").__version__},
            "curves": {f"{r['method']}@{r['rate']}": [(round(t, 3), s, round(l, 4)) for t, s, l in r["log"]]
                       for r in runs}}


def cost_per_event(rows: list) -> dict:
    """Measured means over the runs: one relaunch of the whole job (failure to engine ready, before the load), one
    ``load_checkpoint``, one ``save_checkpoint``, one replacement process boot and one rebuild per CheckFree failure,
    one failure-free step."""
    def mean(pairs):
        pairs = [(v, n) for v, n in pairs if n > 0]
        return sum(v for v, _ in pairs) / sum(n for _, n in pairs) if pairs else None
    ck = [r for r in rows if r["method"] == "checkpoint"]
    cf = [r for r in rows if r["method"].startswith("checkfree")]
    return {"relaunch_s": mean((r["relaunch_s"], r["failures"]) for r in ck),
            "load_checkpoint_s": mean((r["load_s"], r["failures"]) for r in ck),
            "save_checkpoint_s": mean((r["save_s"], r["saves"]) for r in ck),
            "replacement_boot_s": mean((r["replacement_boot_s"], r["failures"]) for r in cf),
            "rebuild_s": mean((r["rebuild_s"], r["failures"]) for r in cf),
            "step_s": 1.0 / next(r["steps_per_s"] for r in rows if r["method"] == "none")}


def print_table(res: dict) -> None:
    print(f"{res['stages']}-stage pipeline, {res['params'] / 1e6:.2f}M params, {res['steps']} steps, checkpoint every "
          f"{res['ckpt_every']}, loss target {res['target_loss']:.3f} (failure-free EMA at its "
          f"{res['steps']}-step run's target point)")
    print(f"{'method':<15}{'rate':>8}{'fails':>6}{'expect':>7}{'iters':>6}{'wall s':>8}{'to target':>10}"
          f"{'eval loss':>10}{'save s':>8}{'load s':>8}{'relaunch s':>11}{'boot s':>8}{'rebuild s':>10}")
    for r in res["rows"]:
        print(f"{r['method']:<15}{r['rate_per_hour']:>8.4f}{r['failures']:>6}{r['expected_failures']:>7.1f}"
              f"{r['iterations']:>6}{r['wall_s']:>8.1f}{r['time_to_target_s']:>10.1f}{r['eval_loss']:>10.4f}"
              f"{r['save_s']:>8.2f}{r['load_s']:>8.2f}{r['relaunch_s']:>11.2f}{r['replacement_boot_s']:>8.2f}"
              f"{r['rebuild_s']:>10.2f}")
    print("per event (s): " + ", ".join(f"{k} {v:.3f}" for k, v in res["cost_per_event_s"].items() if v is not None))
    print(f"at {res['high_rate_per_hour']:.2f}/h: CheckFree / checkpoint restart time to target "
          f"{res['time_ratio_vs_checkpoint_restart']:.3f} (theory if a rebuild cost no loss: "
          f"{res['time_ratio_theory']:.3f}); CheckFree eval loss vs no failure "
          f"{100 * res['loss_gap_vs_no_failure']:+.2f} %")


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in res["curves"].items():
        ema = smoothed(curve)
        a.plot([s for _, s, _ in ema], [l for _, _, l in ema], label=name, lw=1)
        b.plot([t for t, _, _ in ema], [l for _, _, l in ema], label=name, lw=1)
    for ax, xl in ((a, "optimizer step (after rollbacks: the step trained again)"), (b, "wall-clock s")):
        ax.axhline(res["target_loss"], color="k", ls=":", lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel("training loss (EMA 0.1)")
    b.legend(fontsize=7)
    a.set_title("loss vs step")
    b.set_title("loss vs wall-clock")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


def swap_main(args) -> dict:
    """--swap: CheckFree+ vs CheckFree vs checkpoint restart, and the failure-free cost of the swap."""
    args.nominal_step_s = 3600.0  # rate "per hour" = per-step probability for a one-hour step
    rates = [p * args.failure_scale for p in args.iteration_rates]
    args.rates = rates
    runs = run_group(args, [("none", 0.0), ("none_swap", 0.0)])
    for rate in rates:
        runs += run_group(args, [(m, rate) for m in ("checkfree_plus", "checkfree", "checkpoint")])
        for r in runs[-3:]:
            print(f"done {r['method']} @ p={rate:.4f}/iteration: {r['failures']} failures, {r['log'][-1][0]:.1f} s",
                  flush=True)
    res = summarise(args, [r for r in runs if r["method"] != "none_swap"])
    by = {(r["method"], r["rate"]): r for r in runs}
    rows = {(x["method"], x["rate_per_hour"]): x for x in summarise(args, runs)["rows"]}
    mid, high = rates[len(rates) // 2], rates[-1]

    def ratio(a, b, key="time_to_target_s"):
        r = rows[a][key] / rows[b][key]
        return None if r != r else r  # NaN: a run that never reached the target (--max_iterations)

    def steps_per_s(r):
        return len(r["log"]) / r["log"][-1][0]
    res.update({
        "swap": True, "iteration_rates": rates, "failure_scale": args.failure_scale,
        "checkfree_plus_time_ratio_vs_ckpt": ratio(("checkfree_plus", mid), ("checkpoint", mid)),
        "checkfree_plus_time_ratio_vs_ckpt_without_restarts": ratio(
            ("checkfree_plus", mid), ("checkpoint", mid), "time_to_target_without_restarts_s"),
        "checkfree_plus_time_ratio_vs_checkfree": ratio(("checkfree_plus", mid), ("checkfree", mid)),
        "checkfree_plus_time_ratio_vs_ckpt_by_rate": {str(r): ratio(("checkfree_plus", r), ("checkpoint", r))
                                                      for r in rates},
        "end_stage_recovery_loss_ratio": by[("checkfree_plus", high)]["eval_loss"] / by[("none", 0.0)]["eval_loss"],
        "checkfree_end_stage_loss_ratio": by[("checkfree", high)]["eval_loss"] / by[("none", 0.0)]["eval_loss"],
        "swap_cost_throughput_ratio": steps_per_s(by[("none_swap", 0.0)]) / steps_per_s(by[("none", 0.0)]),
        "swap_failure_free_loss_ratio": by[("none_swap", 0.0)]["eval_loss"] / by[("none", 0.0)]["eval_loss"]})
    res["rows"] = list(rows.values())
    res["curves"] = {f"{r['method']}@{r['rate']}": [(round(t, 3), s, round(l, 4)) for t, s, l in r["log"]]
                     for r in runs}
    print_table(res)
    print(f"CheckFree+ / checkpoint restart time to target at p={mid:.4f}: "
          f"{res['checkfree_plus_time_ratio_vs_ckpt']}; "
          f"vs CheckFree {res['checkfree_plus_time_ratio_vs_checkfree']}; "
          f"eval loss vs no failure at p={high:.4f}: {res['end_stage_recovery_loss_ratio']:.4f} (CheckFree "
          f"{res['checkfree_end_stage_loss_ratio']:.4f}); failure-free swap throughput ratio "
          f"{res['swap_cost_throughput_ratio']:.3f}, eval loss ratio {res['swap_failure_free_loss_ratio']:.4f}")
    plot(res, args.out.replace(".png", "_swap.png"))
    print(json.dumps({k: v for k, v in res.items() if k != "curves"}))
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    if args.swap:
        return swap_main(args)
    groups = [[("none", 0.0)] + [(m, r) for m in ("checkfree", "checkpoint")] for r in args.rates[:1]]
    groups += [[(m, r) for m in ("checkfree", "checkpoint")] for r in args.rates[1:]]
    runs = [r for g in groups for r in run_group(args, g)]
    for r in runs:
        print(f"{r['method']} @ {r['rate']}/h: {r['failures']} failures, {r['log'][-1][0]:.1f} s", flush=True)
    res = summarise(args, runs)
    print_table(res)
    plot(res, args.out)
    print(json.dumps({k: v for k, v in res.items() if k != "curves"}))
    return res


if __name__ == "__main__":
    main()
