"""CheckFree vs checkpoint restart under injected pipeline-stage failures: loss vs step and vs wall-clock.

    python benchmarks/checkfree.py                  # CPU default: 4 processes (4 stages), 5 runs, ~6 min
    python benchmarks/checkfree.py --steps 400 --rates 0.05 0.16 0.33
    python benchmarks/checkfree.py --smoke --out /tmp/cf.png   # CI size: 16 steps, hidden 32, one rate

Model: the reference Llama-style decoder (``--layers`` layers, ``--hidden`` wide, vocabulary 259) as a 4-stage
DeepSpeed ``PipelineEngine`` on 4 gloo processes, ZeRO-1, AdamW, windows of the shipped corpus. Every stage of
the pipeline fails at random with an hourly probability (``--rates``, CheckFree's 5-33 %/h), turned into a per-step
probability for a step of ``--nominal_step_s`` seconds (the step time of the paper's models, not this toy's), the
same failures for every method (drawn from ``--seed`` and the iteration number):

* ``none``: no failures (the reference curve and the loss target);
* ``checkfree``: ds_ext checkpoint-free recovery — a middle stage becomes the gradient-norm-weighted average of its
  neighbours (CheckFree), an end stage copies its neighbour's layers and the replica of its embedding / head the
  neighbour keeps (the CheckFree+ rule, without CheckFree+'s out-of-order micro-batches, see README); fresh Adam
  moments, LR x 1.1 on the rebuilt stage;
* ``checkpoint``: stock DeepSpeed ``save_checkpoint`` every ``--ckpt_every`` steps; a failure rolls every stage
  back with ``load_checkpoint`` and the lost steps are trained again.

``--swap`` (CheckFree+, ``recovery.checkpoint_free.swap_end_stages``; quick CPU default: 150 steps, 4 layers of 64,
~4 min): failures at the reference code's per-iteration stage-failure probabilities for 5, 10 and 33 %/h
(``--iteration_rates`` 0.0009 0.002 0.01, its 500M model) times ``--failure_scale`` (default 2, so a 150-step toy
run sees failures; 1 = the reference's rates; much higher makes two neighbouring stages fail in one step, which no
checkpoint-free method can rebuild); with 4 stages every stage is an end-side one. Runs ``none`` and
``none_swap`` (failure-free, plain vs swapped schedule), then per rate ``checkfree_plus`` (swap on: a lost stage is
a copy of its partner), ``checkfree`` (no swap) and ``checkpoint``.

Wall-clock counts everything each method does (saves, loads, rebuilds, redone steps) but not relaunching
processes, which both would pay for a replaced node (so the checkpoint baseline is favoured). The loss target is
the failure-free run's smoothed training loss (EMA 0.1) at ``--target_at`` of its steps; time to target is when a
run's smoothed loss first reaches it. Theory for the time ratio, if a rebuild cost nothing in loss:
``S / (S + F * ckpt_every / 2)`` with ``F`` the expected failures in ``S`` steps. Table, PNG, last line JSON.

Last-line JSON keys:
- `rows`: one row per run (method, rate, failures, iterations, wall / to-target / save-load / rebuild seconds, eval loss)
- `target_loss`: the failure-free run's smoothed loss at --target_at of its steps
- `params`: model parameters (all stages)
- `steps`: --steps
- `ckpt_every`: --ckpt_every
- `nominal_step_s`: --nominal_step_s
- `loss_gap_vs_no_failure`: CheckFree eval loss / failure-free eval loss - 1, at the highest rate
- `time_ratio_vs_checkpoint_restart`: CheckFree / checkpoint-restart time to the loss target, at the highest rate
- `time_ratio_theory`: S / (S + F * ckpt_every / 2)
- `high_rate_per_hour`: the highest --rates
- `versions`: torch and deepspeed versions
- `swap`: true (with --swap)
- `iteration_rates`: the per-iteration failure probabilities run, after --failure_scale (with --swap)
- `failure_scale`: --failure_scale (with --swap)
- `checkfree_plus_time_ratio_vs_ckpt`: CheckFree+ / checkpoint-restart time to target at the middle rate (the
  paper: <= 0.88 at 5-10 %/h) (with --swap)
- `checkfree_plus_time_ratio_vs_checkfree`: CheckFree+ / CheckFree (no swap) time to target, middle rate (with --swap)
- `checkfree_plus_time_ratio_vs_ckpt_by_rate`: the same ratio at each rate (with --swap)
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
import socket
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _keys import parse_with_smoke  # noqa: E402

SMOKE = {"steps": 16, "hidden": 32, "layers": 4, "seq_len": 16, "micro": 2, "rates": [0.33], "nominal_step_s": 900.0,
         "ckpt_every": 4}
STAGES = 4


def parse_args(argv=None):
    swap = "--swap" in (sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--swap", action="store_true", help="CheckFree+ runs (see the module docstring)")
    p.add_argument("--iteration_rates", type=float, nargs="+", default=[0.0009, 0.002, 0.01],
                   help="--swap: per-iteration stage failure probabilities (reference: 5, 10, 33 %%/h)")
    p.add_argument("--failure_scale", type=float, default=2.0, help="--swap: multiplies --iteration_rates")
    p.add_argument("--steps", type=int, default=150 if swap else 400)
    p.add_argument("--hidden", type=int, default=64 if swap else 128)
    p.add_argument("--layers", type=int, default=4 if swap else 8)
    p.add_argument("--seq_len", type=int, default=32 if swap else 64)
    p.add_argument("--micro", type=int, default=2 if swap else 4)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rates", type=float, nargs="+", default=[0.10, 0.33], help="stage failures per hour")
    p.add_argument("--nominal_step_s", type=float, default=90.0)
    p.add_argument("--ckpt_every", type=int, default=20)
    p.add_argument("--target_at", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "checkfree.png"))
    return parse_with_smoke(p, argv, SMOKE)


def ds_config(args, method: str, rate: float) -> dict:
    ext = {"topology": {"pipeline_stages": STAGES}}
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


def worker(rank: int, args, method: str, rate: float, work: str, port: int, result_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(STAGES),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    import ds_ext
    from ds_ext.checkfree.rules import failures_at
    from ds_ext.models import ModelConfig, llama_pipeline
    cfg = ds_config(args, method, rate)
    topo = ds_ext.build_topology(cfg)
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=259, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                       num_layers=args.layers, num_heads=4, num_kv_heads=2, max_seq_len=args.seq_len)
    model = llama_pipeline(mcfg, topology=topo.process_topology())
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=cfg, topology=topo)
    data, ckpt_dir = Batches(args), os.path.join(work, "ckpt")
    log, failures, iteration, t0, io_s = [], [], 0, time.perf_counter(), 0.0
    if method == "checkpoint":
        engine.save_checkpoint(ckpt_dir)
    while engine.global_steps < args.steps:
        iteration += 1
        loss = float(engine.train_batch(data.iterator(iteration)))
        log.append((time.perf_counter() - t0, engine.global_steps, loss))
        if method == "checkpoint":
            t = time.perf_counter()
            if failures_at(iteration, [], rate, args.nominal_step_s, args.seed, topo):
                failures.append(iteration)
                engine.load_checkpoint(ckpt_dir)
            elif engine.global_steps % args.ckpt_every == 0:
                engine.save_checkpoint(ckpt_dir)
            io_s += time.perf_counter() - t
    eval_loss = sum(float(engine.eval_batch(iter([data.get(-1 - k, m) for m in range(args.gas)])))
                    for k in range(16)) / 16
    metrics = engine.ds_ext_metrics()
    if method.startswith("checkfree"):
        failures = [int(m) for m in [metrics.get("checkpoint_free/failures", 0)]]
    out = {"log": log, "eval_loss": eval_loss, "failures": failures, "iterations": iteration, "io_s": io_s,
           "metrics": metrics, "params": sum(p.numel() for p in engine.module.parameters())}
    engine.ds_ext_close()
    torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, method: str, rate: float) -> dict:
    import torch.multiprocessing as mp
    work, result_dir = tempfile.mkdtemp(prefix="ds_ext_cf_"), tempfile.mkdtemp(prefix="ds_ext_cf_res_")
    try:
        mp.start_processes(worker, args=(args, method, rate, work, free_port(), result_dir), nprocs=STAGES,
                           start_method="spawn")
        ranks = [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False) for r in range(STAGES)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(result_dir, ignore_errors=True)
    last = ranks[-1]  # the last stage computes the loss
    params = sum(r["params"] for r in ranks)
    return {"method": method, "rate": rate, "log": last["log"], "eval_loss": last["eval_loss"],
            "iterations": last["iterations"], "io_s": max(r["io_s"] for r in ranks), "params": params,
            "failures": (len(last["failures"]) if method == "checkpoint" else int(last["metrics"].get(
                "checkpoint_free/failures", 0))),
            "rebuild_s": max(r["metrics"].get("checkpoint_free/rebuild_s", 0.0) for r in ranks)}


def smoothed(log, alpha=0.1):
    out, ema = [], None
    for t, step, loss in log:
        ema = loss if ema is None else (1 - alpha) * ema + alpha * loss
        out.append((t, step, ema))
    return out


def time_to(log, target):
    return next((t for t, _, ema in smoothed(log) if ema <= target), float("nan"))


def summarise(args, runs: list) -> dict:
    from ds_ext.checkfree.rules import per_step_probability
    ref = next(r for r in runs if r["method"] == "none")
    ref_smooth = smoothed(ref["log"])
    target = ref_smooth[int(args.target_at * len(ref_smooth)) - 1][2]
    rows = []
    for r in runs:
        p = per_step_probability(r["rate"], args.nominal_step_s)
        expected_failures = STAGES * p * args.steps
        rows.append({"method": r["method"], "rate_per_hour": r["rate"], "failures": r["failures"],
                     "expected_failures": expected_failures, "iterations": r["iterations"],
                     "wall_s": r["log"][-1][0], "time_to_target_s": time_to(r["log"], target),
                     "eval_loss": r["eval_loss"], "io_s": r["io_s"], "rebuild_s": r["rebuild_s"]})
    high = max(args.rates)
    cf = next(x for x in rows if x["method"] == "checkfree" and x["rate_per_hour"] == high)
    ck = next(x for x in rows if x["method"] == "checkpoint" and x["rate_per_hour"] == high)
    none = next(x for x in rows if x["method"] == "none")
    f = ck["expected_failures"]
    return {"rows": rows, "target_loss": target, "params": ref["params"], "steps": args.steps,
            "ckpt_every": args.ckpt_every, "nominal_step_s": args.nominal_step_s,
            "loss_gap_vs_no_failure": cf["eval_loss"] / none["eval_loss"] - 1,
            "time_ratio_vs_checkpoint_restart": cf["time_to_target_s"] / ck["time_to_target_s"],
            "time_ratio_theory": args.steps / (args.steps + f * args.ckpt_every / 2),
            "high_rate_per_hour": high,
            "versions": {"torch": torch.__version__, "deepspeed": __import__("deepspeed").__version__},
            "curves": {f"{r['method']}@{r['rate']}": [(round(t, 3), s, round(l, 4)) for t, s, l in r["log"]]
                       for r in runs}}


def print_table(res: dict) -> None:
    print(f"4-stage pipeline, {res['params'] / 1e6:.2f}M params, {res['steps']} steps, checkpoint every "
          f"{res['ckpt_every']}, loss target {res['target_loss']:.3f} (failure-free EMA at its "
          f"{res['steps']}-step run's target point)")
    print(f"{'method':<12}{'rate/h':>8}{'fails':>7}{'expect':>8}{'iters':>7}{'wall s':>9}{'to target s':>13}"
          f"{'eval loss':>11}{'save/load s':>13}{'rebuild s':>11}")
    for r in res["rows"]:
        print(f"{r['method']:<12}{r['rate_per_hour']:>8.2f}{r['failures']:>7}{r['expected_failures']:>8.1f}"
              f"{r['iterations']:>7}{r['wall_s']:>9.1f}{r['time_to_target_s']:>13.1f}{r['eval_loss']:>11.4f}"
              f"{r['io_s']:>13.2f}{r['rebuild_s']:>11.2f}")
    print(f"at {res['high_rate_per_hour']:.2f}/h: CheckFree / checkpoint restart time to target "
          f"{res['time_ratio_vs_checkpoint_restart']:.3f} (theory if a rebuild cost no loss: "
          f"{res['time_ratio_theory']:.3f}); CheckFree eval loss vs no failure {100 * res['loss_gap_vs_no_failure']:+.2f} %")


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
    runs = [run(args, "none", 0.0), run(args, "none_swap", 0.0)]
    for rate in rates:
        for method in ("checkfree_plus", "checkfree", "checkpoint"):
            runs.append(run(args, method, rate))
            print(f"done {method} @ p={rate:.4f}/iteration: {runs[-1]['failures']} failures, "
                  f"{runs[-1]['log'][-1][0]:.1f} s", flush=True)
    res = summarise(args, [r for r in runs if r["method"] != "none_swap"])
    by = {(r["method"], r["rate"]): r for r in runs}
    rows = {(x["method"], x["rate_per_hour"]): x for x in summarise(args, runs)["rows"]}
    mid, high = rates[len(rates) // 2], rates[-1]

    def ratio(a, b):
        return rows[a]["time_to_target_s"] / rows[b]["time_to_target_s"]

    def steps_per_s(r):
        return len(r["log"]) / r["log"][-1][0]
    res.update({
        "swap": True, "iteration_rates": rates, "failure_scale": args.failure_scale,
        "checkfree_plus_time_ratio_vs_ckpt": ratio(("checkfree_plus", mid), ("checkpoint", mid)),
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
          f"{res['checkfree_plus_time_ratio_vs_ckpt']:.3f}; "
          f"vs CheckFree {res['checkfree_plus_time_ratio_vs_checkfree']:.3f}; "
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
    runs = [run(args, "none", 0.0)]
    for rate in args.rates:
        for method in ("checkfree", "checkpoint"):
            runs.append(run(args, method, rate))
            print(f"done {method} @ {rate}/h: {runs[-1]['failures']} failures, {runs[-1]['log'][-1][0]:.1f} s",
                  flush=True)
    res = summarise(args, runs)
    print_table(res)
    plot(res, args.out)
    print(json.dumps({k: v for k, v in res.items() if k != "curves"}))
    return res


if __name__ == "__main__":
    main()
