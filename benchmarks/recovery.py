"""Recovery journal vs DeepSpeed checkpoints: step-time overhead, bytes written, time to resume, steps lost.

    python benchmarks/recovery.py                      # CPU default: 2 processes, ZeRO-2, 81 steps per mode, ~90 s
    python benchmarks/recovery.py --hidden 512 --rounds 10 --journal_dir /local_nvme/bench
    python benchmarks/recovery.py --smoke --out /tmp/recovery.png   # CI size: hidden 64, 2 layers, 51 steps

Model: the reference Llama-style decoder (``--hidden``/``--layers``, vocabulary 259, sequence ``--seq_len``), fp32,
AdamW (torch), ZeRO-``--stage`` over ``--world`` gloo processes on this machine, random tokens.

Four engines train side by side in the same processes, in interleaved blocks of ``--block`` steps (so machine
noise hits every mode alike): ``none`` (stock DeepSpeed), ``journal`` (ds_ext recovery, base every
``--base_interval`` steps), ``ckpt_every_step`` and ``ckpt_every_50`` (stock DeepSpeed ``save_checkpoint``).
``overhead_pct`` is the median over rounds of (mode block time / same round's stock block time) - 1, so slow
drift of this shared machine cancels; the ratio of overall means is printed too. A journal block ends by waiting for its writers, and that wait counts as step time (an upper bound: in a
real run the base write keeps overlapping the steps that follow). Then a fresh engine resumes from the journal
(scan + base + replay) and another loads the newest checkpoint with ``load_checkpoint``; steps lost = steps trained
- step resumed. ``resume_time_ratio_vs_load`` compares the time to be back at the step of the failure: journal
resume vs load_checkpoint plus recomputing the steps since the last checkpoint (24.5 on average with a checkpoint
every 50 steps); the raw load time ratio is reported too (``resume_time_ratio_vs_load_raw``). Each block ends
with ``os.sync()``, timed with that block: every mode pays for writing its own dirty pages back to the disk and
none for another mode's. Theory: the journal writes 4 bytes per parameter per step (the fp32 gradient
partitions of all ranks) plus 12 bytes per parameter per base; its step cost is a clone of the gradient partition.
Prints a table, writes a PNG and prints one JSON object as its last line.

Last-line JSON keys:
- `mean_step_s`: mean step time (s) per mode, {mode: seconds}; a step ends when its slowest rank ends
- `overhead_pct`: the journal's step-time overhead over stock DeepSpeed, % (median of paired blocks)
- `overhead_pct_of_means`: the same from the ratio of overall mean step times, %
- `overhead_pct_ckpt_every_step`: save_checkpoint after every step, % over stock (paired blocks)
- `overhead_pct_ckpt_every_50`: save_checkpoint every 50 steps, % over stock (paired blocks)
- `bytes_per_param_per_step`: journal bytes written per parameter per step (all ranks, bases included)
- `bytes_per_param_per_step_theory`: 4 + 12 / base_interval
- `ckpt_bytes_per_param`: bytes of one DeepSpeed checkpoint per parameter
- `resume_s`: journal resume time (scan + base + replay; slowest rank), from the journal lifecycle's metrics
- `load_checkpoint_s`: DeepSpeed load_checkpoint time of the newest checkpoint (slowest rank)
- `lost_steps`: steps trained minus the step the journal resumed at (0 expected)
- `lost_steps_ckpt_every_50`: steps trained minus the newest every-50 checkpoint's step
- `journal_writer`: rank 0's journal writer metrics over the run (records, bytes, write/fsync/wait seconds)
- `steps`: optimizer steps trained per mode (1 warm-up + rounds x block)
- `params`: model parameters
- `world`: processes
- `zero_stage`: ZeRO stage
- `regain_s_ckpt_every_50`: load_checkpoint + redoing this run's lost steps (s)
- `regain_s_ckpt_every_50_expected`: load_checkpoint + redoing 24.5 steps, the average loss (s)
- `resume_time_ratio_vs_load`: resume_s / regain_s_ckpt_every_50_expected
- `resume_time_ratio_vs_load_raw`: resume_s / load_checkpoint_s
- `versions`: torch and deepspeed versions
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _keys import parse_with_smoke  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("none", "journal", "ckpt_every_step", "ckpt_every_50")
# --smoke: 51 steps per mode, so that the every-50 checkpoint exists
SMOKE = {"hidden": 64, "layers": 2, "seq_len": 32, "micro": 2, "block": 10, "rounds": 5, "base_interval": 10}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--stage", type=int, default=2, choices=(1, 2))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--block", type=int, default=10, help="steps per interleaved block")
    p.add_argument("--rounds", type=int, default=6, help="blocks per mode")
    p.add_argument("--base_interval", type=int, default=50)
    p.add_argument("--fsync", default="interval", choices=("always", "interval", "never"))
    p.add_argument("--journal_dir", default=None, help="where journal and checkpoints go (default: a temp dir)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "recovery.png"))
    return parse_with_smoke(p, argv, SMOKE)


def ds_config(args, journal_dir=None) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
           "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1, "torch_adam": True}},
           "zero_optimization": {"stage": args.stage}}
    if journal_dir:
        cfg["ds_ext"] = {"recovery": {"journal_dir": journal_dir, "base_interval": args.base_interval,
                                      "fsync": args.fsync}}
    return cfg


def build(args, journal_dir=None):
    import ds_ext
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4 // 8 * 8,
                                         num_layers=args.layers, num_heads=8, num_kv_heads=4,
                                         max_seq_len=args.seq_len))
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(),
                                   config=ds_config(args, journal_dir))
    return engine


def recovery_of(engine):
    return next(f for f in engine.ds_ext_features if f.name == "recovery")


def train_step(engine, gen, args) -> None:
    x = torch.randint(0, 256, (args.micro, args.seq_len + 1), generator=gen)
    engine.backward(engine(x[:, :-1], x[:, 1:]))
    engine.step()


def run_block(mode, engine, gen, args, work) -> list:
    times = []
    for _ in range(args.block):
        t = time.perf_counter()
        train_step(engine, gen, args)
        if mode == "ckpt_every_step" or (mode == "ckpt_every_50" and engine.global_steps % 50 == 0):
            engine.save_checkpoint(os.path.join(work, mode))
        times.append(time.perf_counter() - t)
    if mode == "journal":
        t = time.perf_counter()
        recovery_of(engine).writer.flush()
        times[-1] += time.perf_counter() - t
    return times


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def worker(rank: int, args, work: str, port: int, result_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(args.world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world))
    import deepspeed
    journal_dir = os.path.join(work, "journal")
    engines = {m: build(args, journal_dir if m == "journal" else None) for m in MODES}
    gens = {m: torch.Generator().manual_seed(rank) for m in MODES}
    for m in MODES:  # one warm-up step each, not timed
        train_step(engines[m], gens[m], args)
    times = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for m in MODES:
            block = run_block(m, engines[m], gens[m], args, work)
            # each mode pays for its own writeback: the dirty pages its block left are synced and timed with it
            deepspeed.comm.barrier()
            t = time.perf_counter()
            os.sync()
            deepspeed.comm.barrier()
            block[-1] += time.perf_counter() - t
            times[m] += block
    trained = engines["journal"].global_steps
    journal_metrics = recovery_of(engines["journal"]).metrics()
    engines["journal"].ds_ext_close()
    deepspeed.comm.barrier()
    resumed = build(args, journal_dir)
    resume = recovery_of(resumed).metrics()  # the journal lifecycle's own account of its resume (public API)
    loader = build(args)
    t = time.perf_counter()
    path, _ = loader.load_checkpoint(os.path.join(work, "ckpt_every_step"))  # same files as every 50, newest
    load_s = time.perf_counter() - t
    with open(os.path.join(work, "ckpt_every_50", "latest")) as f:
        ckpt50_step = int(f.read().strip().replace("global_step", ""))
    n_params = sum(p.numel() for p in resumed.module.parameters())
    out = {"times": times, "trained": trained, "journal": journal_metrics, "resumed_step": resume["resumed_step"],
           "resume_s": resume["resume_s"], "load_s": load_s, "ckpt50_step": ckpt50_step, "n_params": n_params}
    torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
    deepspeed.comm.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarise(ranks: list, args, work: str) -> dict:
    steps = {m: [max(r["times"][m][i] for r in ranks) for i in range(len(ranks[0]["times"][m]))]
             for m in MODES}  # a step ends when its slowest rank ends
    mean = {m: statistics.mean(v) for m, v in steps.items()}
    blocks = {m: [sum(v[i:i + args.block]) for i in range(0, len(v), args.block)] for m, v in steps.items()}
    # each round's journal block against the same round's stock block (machine drift cancels), then the median
    paired = {m: 100 * (statistics.median(b / a for a, b in zip(blocks["none"], blocks[m])) - 1) for m in MODES}
    r0, steps_total = ranks[0], ranks[0]["trained"]
    n = r0["n_params"]
    journal_bytes = sum(r["journal"]["bytes_per_step"] for r in ranks) + \
        sum(r["journal"]["base_bytes"] for r in ranks) / max(1, steps_total)
    ckpt_step_bytes = dir_bytes(os.path.join(work, "ckpt_every_step")) / max(1, len(os.listdir(
        os.path.join(work, "ckpt_every_step"))) - 1)
    return {"mean_step_s": mean, "overhead_pct": paired["journal"],
            "overhead_pct_of_means": 100 * (mean["journal"] / mean["none"] - 1),
            "overhead_pct_ckpt_every_step": paired["ckpt_every_step"],
            "overhead_pct_ckpt_every_50": paired["ckpt_every_50"],
            "bytes_per_param_per_step": journal_bytes / n,
            "bytes_per_param_per_step_theory": 4 + 12 / args.base_interval,
            "ckpt_bytes_per_param": ckpt_step_bytes / n,
            "resume_s": max(r["resume_s"] for r in ranks), "load_checkpoint_s": max(r["load_s"] for r in ranks),
            "lost_steps": steps_total - r0["resumed_step"], "lost_steps_ckpt_every_50": steps_total - r0["ckpt50_step"],
            "journal_writer": r0["journal"], "steps": steps_total, "params": n, "world": args.world, "zero_stage": args.stage}


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ms = [1000 * res["mean_step_s"][m] for m in MODES]
    a.bar(MODES, ms, color=["grey", "tab:green", "tab:red", "tab:orange"])
    a.set_ylabel("mean step time (ms)")
    a.set_title(f"step time, {res['params'] / 1e6:.1f}M params, ZeRO-{res['zero_stage']} x {res['world']}")
    a.tick_params(axis="x", rotation=20)
    b.bar(["journal\nresume", "load_checkpoint\n(raw)", "load + redo\n(ckpt every 50)"],
          [res["resume_s"], res["load_checkpoint_s"], res["regain_s_ckpt_every_50_expected"]],
          color=["tab:green", "tab:orange", "tab:red"])
    b.set_yscale("log")
    b.set_ylabel("seconds (log)")
    b.set_title("back at the step of the failure")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


def print_table(res: dict) -> None:
    print(f"{'mode':<18}{'mean step ms':>14}{'overhead % (means)':>20}{'overhead % (paired blocks)':>28}")
    for m in MODES:
        over = 100 * (res["mean_step_s"][m] / res["mean_step_s"]["none"] - 1)
        paired = 0.0 if m == "none" else res["overhead_pct" if m == "journal" else f"overhead_pct_{m}"]
        print(f"{m:<18}{1000 * res['mean_step_s'][m]:>14.1f}{over:>20.2f}{paired:>28.2f}")
    print(f"journal bytes/param/step {res['bytes_per_param_per_step']:.3f} (theory "
          f"{res['bytes_per_param_per_step_theory']:.3f}); a checkpoint {res['ckpt_bytes_per_param']:.2f} bytes/param")
    j = res["journal_writer"]
    print(f"journal writer (rank 0, whole run): records {j['record_write_s']:.2f} s, fsync {j['fsync_s']:.2f} s, "
          f"bases {j['base_write_s']:.2f} s on background threads; training waited {j['wait_s']:.2f} s")
    print(f"resume: journal {res['resume_s']:.3f} s (0 steps to redo) vs load_checkpoint {res['load_checkpoint_s']:.3f} s"
          f" raw (ratio {res['resume_time_ratio_vs_load_raw']:.2f}); back at the failed step: checkpoint every 50 "
          f"{res['regain_s_ckpt_every_50_expected']:.2f} s expected (24.5 steps to redo on average; this run "
          f"{res['lost_steps_ckpt_every_50']}), ratio {res['resume_time_ratio_vs_load']:.3f} (theory: replaying a "
          f"step costs only its optimizer update)")


def main(argv=None) -> dict:
    import torch.multiprocessing as mp
    args = parse_args(argv)
    work = args.journal_dir or tempfile.mkdtemp(prefix="ds_ext_recovery_bench_")
    result_dir = tempfile.mkdtemp(prefix="ds_ext_recovery_results_")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    try:
        mp.start_processes(worker, args=(args, work, free_port(), result_dir), nprocs=args.world,
                           start_method="spawn")
        ranks = [torch.load(os.path.join(result_dir, f"rank{r}.pt")) for r in range(args.world)]
        res = summarise(ranks, args, work)
    finally:
        shutil.rmtree(result_dir, ignore_errors=True)
        if args.journal_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    # time back to the step of the failure: a checkpoint must also recompute the steps trained since it was saved
    res["regain_s_ckpt_every_50"] = res["load_checkpoint_s"] + res["lost_steps_ckpt_every_50"] * res["mean_step_s"]["none"]
    res["regain_s_ckpt_every_50_expected"] = res["load_checkpoint_s"] + 24.5 * res["mean_step_s"]["none"]
    res["resume_time_ratio_vs_load"] = res["resume_s"] / res["regain_s_ckpt_every_50_expected"]
    res["resume_time_ratio_vs_load_raw"] = res["resume_s"] / res["load_checkpoint_s"]
    res["versions"] = {"torch": torch.__version__, "deepspeed": __import__("deepspeed").__version__}
    print_table(res)
    plot(res, args.out)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
