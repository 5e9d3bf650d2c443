"""NoLoCo vs DiLoCo vs DDP on 4 CPU processes: eval loss at equal tokens, bytes and collectives per rank per step,
and a latency-bandwidth model of one synchronisation for 8..1024 workers.

    python benchmarks/noloco.py                 # CPU default: 300 steps, H=50, layouts 2x2 and 4x1 (~8 min)
    python benchmarks/noloco.py --steps 100 --inner_steps 25 --layouts 2x2
    python benchmarks/noloco.py --steps 3000 --eval_interval 250 --layouts 2x2 --modes noloco   # ~26 min
    python benchmarks/noloco.py --steps 8000 --eval_interval 500 --layouts 4x1 --modes noloco   # ~67 min
    python benchmarks/noloco.py --smoke --plot /tmp/noloco.png   # CI size: 16 steps, DDP and NoLoCo 2x1 (2 processes)

Runs (each through the real ``ds-ext`` launcher on R x K gloo processes, 4 by default, every layout the same
count; ZeRO-1, the reference model on the default corpus, the same seed, micro-batch and steps, so equal tokens):
* ``ddp``: one replica of all R x K ranks (stock ZeRO all-reduce over all ranks);
* ``diloco-RxK`` / ``noloco-RxK``: R replicas of K ZeRO ranks, outer step every H steps.

Every rank counts its communication by the replica layout (benchmarks/noloco_worker.py installs the counter, DDP
included), so "cross replica" means what would cross between hosts if each replica were a host. The configs leave
``ds_ext.noloco.count_collectives`` off: the worker's counter already sees every call, and a second one would wrap
each call twice in the NoLoCo runs only. Wire bytes use the ring model
(all-reduce 2(n-1)/n of the payload). Prints a table, writes a PNG, and prints one JSON object as its last line.

``--routing`` (``ds_ext.noloco.random_routing``; quick CPU default: 60 steps, H=10, 4 layers of 64, ~2 min): 2
replicas x 2 pipeline stages, routed vs unrouted NoLoCo vs DDP (one replica, 2 stages x 2 ZeRO ranks), equal steps
(benchmarks/noloco_routing.py).

Last-line JSON keys:
- `benchmark`: "noloco", or "noloco_routing" with --routing
- `steps`: optimizer steps of every run
- `schedule`: the inner LR schedule (without --routing)
- `inner_steps`: H
- `world`: processes per run
- `loss_ratio_vs_ddp`: the worst NoLoCo run's eval loss / DDP's (without --routing)
- `loss_ratio_diloco_vs_ddp`: the worst DiLoCo run's eval loss / DDP's; null without a diloco run (without --routing)
- `bytes_ratio_vs_ddp`: DDP's cross-replica bytes per step / NoLoCo's (the smallest over layouts) (without --routing)
- `global_collectives`: collectives over all ranks in the NoLoCo runs (0 expected) (without --routing)
- `diloco_global_collectives`: the same in the DiLoCo runs (without --routing)
- `projected_sync_speedup_1024`: ring all-reduce / gossip seconds for one sync at 1024 workers (the model above) (without --routing)
- `runs`: every run's eval loss, bytes, collectives, seconds and eval curve
- `plot`: the PNG written, relative to the repository root (without --routing)
- `routing_loss_ratio_vs_ddp`: routed NoLoCo eval loss / DDP eval loss, equal steps (with --routing)
- `noloco_loss_ratio_vs_ddp`: unrouted NoLoCo eval loss / DDP eval loss, equal steps (with --routing)
- `routing_replica_distance_ratio`: mean replica weight distance, routed / unrouted NoLoCo (< 1 expected: the
  routing mixes the replicas between outer steps) (with --routing)
- `routing_throughput_ratio`: routed / unrouted NoLoCo steps per second (with --routing)
- `ddp_steps_per_s`: DDP's steps per second (with --routing)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _keys import parse_with_smoke  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "benchmarks", "noloco_worker.py")
WORLD = 4
# Latency-bandwidth model of one sync (stated parameters): a 1B-parameter fp32 model over internet-like links.
MODEL_BYTES = 4e9
LATENCY_S = 0.1
BANDWIDTH_BPS = 1e9 / 8
SMOKE = {"steps": 16, "inner_steps": 4, "eval_interval": 8, "eval_batches": 2, "seq_len": 32, "layouts": "2x1",
         "modes": "noloco"}


def ring_allreduce_seconds(n: int, size: float = MODEL_BYTES) -> float:
    """Ring all-reduce: 2(n-1) sequential steps, each a latency plus size/n bytes."""
    return 2 * (n - 1) * (LATENCY_S + size / n / BANDWIDTH_BPS)


def gossip_seconds(n: int, size: float = MODEL_BYTES) -> float:
    """Pairwise exchange: one latency plus the model each way on a full-duplex link, whatever n."""
    return LATENCY_S + size / BANDWIDTH_BPS


def run_config(base: dict, mode: str, rpr: int, inner_steps: int, schedule: str = "constant",
               steps: int = 0) -> dict:
    cfg = json.loads(json.dumps(base))
    if schedule == "cosine":  # the NoLoCo reference's inner schedule: warm-up, cosine to lr/10 over the run
        cfg["scheduler"] = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": steps, "warmup_num_steps": 30, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}}
    cfg.pop("csv_monitor", None)
    cfg.pop("tensorboard", None)
    cfg["zero_optimization"] = {"stage": 1}
    cfg["ds_ext"] = {} if mode == "ddp" else {
        "noloco": {"enabled": True, "mode": mode, "inner_steps": inner_steps, "ranks_per_replica": rpr}}
    return cfg


def launch(name: str, cfg: dict, layout_rpr: int, args, workdir: str, world: int) -> list:
    cfg_path, out = os.path.join(workdir, f"{name}.json"), os.path.join(workdir, name)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    cmd = [sys.executable, "-m", "ds_ext.launch", "--num_procs", str(world), "--master_port", str(args.port),
           "--config", cfg_path, WORKER, "--out", out, "--layout_ranks_per_replica", str(layout_rpr),
           "--max_steps", str(args.steps), "--eval_interval", str(args.eval_interval), "--seq_len",
           str(args.seq_len), "--eval_batches", str(args.eval_batches)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def summarise(name: str, ranks: list, steps: int) -> dict:
    """Eval loss averaged over replicas (one rank each); communication averaged over ranks, per step."""
    per_replica = {r["replica"]: r["evals"][-1][2] for r in ranks}
    comm = [r["comm"] for r in ranks]
    mean = lambda key: sum(c.get(key, 0) for c in comm) / len(comm) / steps
    collectives = sum(v for c in comm for k, v in c.items() if k.startswith("calls/") and "/p2p/" not in k
                      and not k.endswith("/self")) / len(comm) / steps
    return {"run": name, "eval_loss": sum(per_replica.values()) / len(per_replica),
            "sent_bytes_per_step": mean("sent_bytes"), "cross_bytes_per_step": mean("sent_bytes_cross_replica"),
            "collectives_per_step": collectives,
            "global_collectives": sum(c["cross_replica_collectives"] for c in comm),
            "seconds": max(r["seconds"] for r in ranks),
            "curve": [(s, l) for s, _, l in ranks[0]["evals"]]}


def theoretical_bytes_ratio(mode: str, rpr: int, inner_steps: int, world: int) -> float:
    """Cross-replica wire bytes per step, DDP over the run's. DDP with ZeRO-1 sends 3(n-1)/n of the model per step
    (gradient all-reduce 2(n-1)/n, parameter all-gather (n-1)/n). Per H steps NoLoCo sends its 1/rpr shard once;
    DiLoCo all-reduces it over the R replicas, 2(R-1)/R of the shard."""
    ddp = 3 * (world - 1) / world
    replicas = world // rpr
    per_sync = 1.0 if mode == "noloco" else 2 * (replicas - 1) / replicas
    return ddp / (per_sync / rpr / inner_steps)


def plot(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        steps, losses = zip(*row["curve"])
        a.plot(steps, losses, marker="o", label=row["run"])
    a.set(xlabel="optimizer step (equal tokens)", ylabel="eval loss", title="4 CPU ranks, ZeRO-1")
    a.legend()
    ns = [2 ** k for k in range(3, 11)]
    b.loglog(ns, [ring_allreduce_seconds(n) for n in ns], marker="o", label="ring all-reduce (DDP/DiLoCo)")
    b.loglog(ns, [gossip_seconds(n) for n in ns], marker="o", label="pairwise gossip (NoLoCo)")
    b.set(xlabel="workers", ylabel="seconds per sync",
          title=f"model {MODEL_BYTES / 1e9:.0f} GB, {LATENCY_S * 1e3:.0f} ms, {BANDWIDTH_BPS * 8 / 1e9:.0f} Gbit/s")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_tables(rows: list, ddp: dict, args) -> None:
    print(f"{'run':<14}{'eval loss':>10}{'vs ddp':>8}{'sent B/step':>14}{'cross B/step':>14}"
          f"{'ratio':>8}{'theory':>8}{'coll/step':>10}{'global':>8}{'sec':>7}")
    for row in rows:
        rpr = int(row["run"].split("x")[1]) if "x" in row["run"] else None
        ratio = ddp["cross_bytes_per_step"] / row["cross_bytes_per_step"] if row["cross_bytes_per_step"] else 0
        theory = theoretical_bytes_ratio(row["run"].split("-")[0], rpr, args.inner_steps, args.world) if rpr else 1.0
        print(f"{row['run']:<14}{row['eval_loss']:>10.4f}{row['eval_loss'] / ddp['eval_loss']:>8.3f}"
              f"{row['sent_bytes_per_step']:>14.0f}{row['cross_bytes_per_step']:>14.0f}{ratio:>8.1f}"
              f"{theory:>8.1f}{row['collectives_per_step']:>10.2f}{row['global_collectives']:>8d}"
              f"{row['seconds']:>7.0f}")
    print(f"\none sync, {MODEL_BYTES / 1e9:.0f} GB model, latency {LATENCY_S * 1e3:.0f} ms, "
          f"{BANDWIDTH_BPS * 8 / 1e9:.0f} Gbit/s links")
    print(f"{'workers':>8}{'ring all-reduce s':>20}{'gossip s':>10}{'speedup':>9}")
    for n in [2 ** k for k in range(3, 11)]:
        print(f"{n:>8}{ring_allreduce_seconds(n):>20.1f}{gossip_seconds(n):>10.1f}"
              f"{ring_allreduce_seconds(n) / gossip_seconds(n):>9.1f}")


def main(argv=None) -> dict:
    routing = "--routing" in (sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routing", action="store_true", help="random pipeline routing runs (see the docstring)")
    p.add_argument("--steps", type=int, default=60 if routing else 300)
    p.add_argument("--inner_steps", type=int, default=10 if routing else 50)
    p.add_argument("--eval_interval", type=int, default=50)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=32 if routing else 128)
    p.add_argument("--hidden", type=int, default=64, help="--routing: model width")
    p.add_argument("--layers", type=int, default=4, help="--routing: decoder layers")
    p.add_argument("--micro", type=int, default=2, help="--routing: micro-batch size")
    p.add_argument("--gas", type=int, default=2, help="--routing: micro-batches per step")
    p.add_argument("--lr", type=float, default=3e-3, help="--routing: AdamW learning rate")
    p.add_argument("--distance_every", type=int, default=5, help="--routing: replica distance sampling")
    p.add_argument("--seed", type=int, default=0, help="--routing: shared routing seed")
    p.add_argument("--layouts", default="2x2,4x1", help="replicas x ranks-per-replica, comma separated")
    p.add_argument("--modes", default="diloco,noloco", help="replica modes to run beside DDP, comma separated")
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--schedule", default="constant", choices=("cosine", "constant"),
                   help="inner LR schedule for every run: the baseline config's warm-up then constant, or cosine to "
                        "lr/10 over --steps (the NoLoCo reference's; at 1000 steps it widened the gap to DDP)")
    p.add_argument("--plot", default=os.path.join(ROOT, "benchmarks", "results", "noloco.png"))
    args = parse_with_smoke(p, argv, SMOKE)
    if args.routing:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        sys.path.insert(0, ROOT)
        from noloco_routing import routing_main
        result = {"benchmark": "noloco_routing", "world": WORLD, **routing_main(args)}
        print(json.dumps(result))
        return result
    modes = args.modes.split(",")
    if "noloco" not in modes or not set(modes) <= {"diloco", "noloco"}:
        p.error(f"--modes {args.modes!r}: give noloco, optionally with diloco (comma separated)")
    base = json.load(open(os.path.join(ROOT, "configs", "baseline.json")))
    layouts = [tuple(int(v) for v in s.split("x")) for s in args.layouts.split(",")]
    worlds = {r * k for r, k in layouts}
    if len(worlds) != 1:
        p.error(f"--layouts {args.layouts!r}: every layout needs the same number of processes")
    world = args.world = worlds.pop()
    with tempfile.TemporaryDirectory() as workdir:
        ddp_cfg = run_config(base, "ddp", world, 0, args.schedule, args.steps)
        ddp = summarise("ddp", launch("ddp", ddp_cfg, layouts[0][1], args, workdir, world), args.steps)
        rows = [ddp]
        for replicas, rpr in layouts:
            for mode in modes:
                name = f"{mode}-{replicas}x{rpr}"
                cfg = run_config(base, mode, rpr, args.inner_steps, args.schedule, args.steps)
                rows.append(summarise(name, launch(name, cfg, rpr, args, workdir, world), args.steps))
    print_tables(rows, ddp, args)
    os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    plot(rows, args.plot)
    noloco = [r for r in rows if r["run"].startswith("noloco")]
    diloco = [r for r in rows if r["run"].startswith("diloco")]
    result = {
        "benchmark": "noloco", "steps": args.steps, "schedule": args.schedule, "inner_steps": args.inner_steps,
        "world": world,
        "loss_ratio_vs_ddp": max(r["eval_loss"] / ddp["eval_loss"] for r in noloco),
        "loss_ratio_diloco_vs_ddp": max((r["eval_loss"] / ddp["eval_loss"] for r in diloco), default=None),
        "bytes_ratio_vs_ddp": min(ddp["cross_bytes_per_step"] / r["cross_bytes_per_step"] for r in noloco),
        "global_collectives": sum(r["global_collectives"] for r in noloco),
        "diloco_global_collectives": sum(r["global_collectives"] for r in diloco),
        "projected_sync_speedup_1024": ring_allreduce_seconds(1024) / gossip_seconds(1024),
        "runs": {r["run"]: {k: v for k, v in r.items() if k != "run"} for r in rows},
        "plot": os.path.relpath(args.plot, ROOT),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
