"""NoLoCo over slow links: wall-clock time to a target eval loss for DDP, DiLoCo and NoLoCo on emulated hosts.

    sudo python benchmarks/noloco_wan.py                          # quick default, < 15 min on 2 cores
    sudo python benchmarks/noloco_wan.py --layouts 2x2 --rates 100 --steps 300
    sudo python benchmarks/noloco_wan.py --smoke --out /tmp/wan.png   # CI size: 2x1 at 100 Mbit/s, 10 steps

Hosts are Linux network namespaces on this machine joined by a bridge, every host link shaped with ``tc tbf`` to
the given rate in both directions (:mod:`wan_hosts`; the kernel here has ``tbf`` but no ``netem``, so no added
latency). Layouts: ``2x2`` = 2 hosts x 2 ranks (ZeRO inside a host over its own address, unshaped; NoLoCo/DiLoCo
replicas = hosts), ``4x1`` = 4 hosts x 1 rank and ``2x1`` (the CI size) = 2 hosts x 1 rank. Each run is
``benchmarks/noloco_worker.py`` (examples/train.py's model, data and loop) on hosts x ranks gloo processes, one
thread each, equal tokens per step in every mode: ``ddp`` = ZeRO-1
over all ranks, ``diloco`` and ``noloco`` with ``--inner_steps`` H. The target eval loss is fixed in advance from
the DDP run on unshaped links: its eval loss at ``--target_fraction`` of ``--steps``. Time to target = training
wall-clock (start-up excluded) at the first eval at or below it; a run is stopped at ``--cap_s`` and then counts
as "not reached" (speed-ups against it are lower bounds, marked ``>``). Bytes per link: the hosts' ``tx_bytes``.
Nothing is sent outside the namespaces (link-local addresses, no route out). Table, PNG (loss vs wall-clock per
rate), JSON last line. Skips cleanly (exit 0, JSON with ``skipped``) without root, iproute2/tc or namespaces.

Last-line JSON keys:
- `skipped`: why nothing ran (no root, iproute2/tc or namespaces); then the only key
- `partial`: true when --modes is not all of ddp,diloco,noloco; then only `runs` follows (with --modes)
- `runs`: {layout/mode@rate: time to target} of a partial run (with --modes)
- `layouts`: the layouts run (without --modes)
- `rates_mbit`: the link rates (without --modes)
- `summary`: {layout/mode@rate: time_to_target, speedup_vs_ddp, lower_bound}; null times: target not reached
  (without --modes)
- `speedup_vs_ddp_100mbit`: DDP / NoLoCo time to target at 100 Mbit/s (first layout); null when NoLoCo did not
  reach it (with --rates 100)
- `speedup_vs_ddp_100mbit_lower_bound`: true when DDP did not reach the target (its cap counted) (with --rates 100)
- `speedup_vs_diloco_100mbit`: DiLoCo / NoLoCo time to target at 100 Mbit/s; null when NoLoCo did not reach it
  (with --rates 100)
- `loss_ratio_vs_ddp`: NoLoCo / DDP eval loss at the fastest rate, at the last step both reached; null when
  neither evaluated (without --modes)
- `loss_ratio_at_step`: that step (without --modes)
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
import wan_hosts  # noqa: E402
from _keys import parse_with_smoke  # noqa: E402
from noloco import run_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "benchmarks", "noloco_worker.py")
LAYOUTS = {"2x2": (2, 2), "4x1": (4, 1), "2x1": (2, 1)}
MODES = ("ddp", "diloco", "noloco")
SMOKE = {"layouts": "2x1", "rates": "100", "steps": 10, "eval_interval": 5, "inner_steps": 5, "cap_s": 30.0,
         "hidden": 32, "layers": 1, "seq_len": 32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="2x2,4x1")
    p.add_argument("--rates", default="1000,100,20", help="link rates in Mbit/s")
    p.add_argument("--modes", default=",".join(MODES), help="subset of ddp,diloco,noloco (the table needs all)")
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--eval_interval", type=int, default=10)
    p.add_argument("--inner_steps", type=int, default=20)
    p.add_argument("--target_fraction", type=float, default=0.5)
    p.add_argument("--cap_s", type=float, default=40.0, help="training seconds after which a run is stopped")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--port", type=int, default=29740)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "noloco_wan.png"))
    return parse_with_smoke(p, argv, SMOKE)


def worker_env(rank: int, world: int, per_host: int, net, args) -> dict:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank % per_host), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), MASTER_ADDR=net.address(0), MASTER_PORT=str(args.port),
               GLOO_SOCKET_IFNAME=net.ifname, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return env


def run(layout: str, mode: str, rate, args, work: str) -> dict:
    hosts, per_host = LAYOUTS[layout]
    world = hosts * per_host
    with open(os.path.join(ROOT, "configs", "baseline.json")) as f:
        cfg = run_config(json.load(f), mode, per_host, args.inner_steps)
    cfg["train_micro_batch_size_per_gpu"] = args.micro
    name = f"{layout}_{mode}_{rate or 'unshaped'}"
    cfg_path, out = os.path.join(work, name + ".json"), os.path.join(work, name)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    cmd = [sys.executable, WORKER, "--out", out, "--layout_ranks_per_replica", str(per_host), "--deepspeed_config",
           cfg_path, "--max_steps", str(args.steps), "--eval_interval", str(args.eval_interval), "--seq_len",
           str(args.seq_len), "--eval_batches", "2", "--hidden", str(args.hidden), "--layers", str(args.layers)]
    with wan_hosts.EmulatedHosts(hosts, rate) as net:
        tx0 = [net.tx_bytes(h) for h in range(hosts)]
        procs = [subprocess.Popen(net.exec_prefix(r // per_host) + cmd, env=worker_env(r, world, per_host, net, args),
                                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"{name}.r{r}.log"), "w"))
                 for r in range(world)]
        completed = wait_capped(procs, out, args.cap_s)
        link_bytes = sum(net.tx_bytes(h) - b for h, b in enumerate(tx0)) / hosts
    firsts = range(0, world, per_host) if mode != "ddp" else [0]  # one rank per replica
    curves = [read_curve(os.path.join(out, f"rank{r}.evals.jsonl")) for r in firsts]
    n = min(map(len, curves))
    curve = [(curves[0][i][0], curves[0][i][1], sum(c[i][2] for c in curves) / len(curves)) for i in range(n)]
    if not curve and completed:
        raise RuntimeError(f"{name}: no eval curve; see {work}/{name}.r0.log")
    return {"layout": layout, "mode": mode, "rate": rate, "completed": completed, "curve": curve,
            "link_bytes": link_bytes, "steps_done": curve[-1][0] if curve else 0}


def wait_capped(procs, out: str, cap_s: float) -> bool:
    """Wait for the ranks; stop them ``cap_s`` training seconds after their first eval line (start-up excluded)."""
    start, first_eval = time.monotonic(), None
    while any(p.poll() is None for p in procs):
        if first_eval is None and os.path.exists(os.path.join(out, "rank0.evals.jsonl")):
            first_eval = time.monotonic()
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() - start > cap_s + 120 or (
                first_eval is not None and time.monotonic() - first_eval > cap_s):
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            return False
        time.sleep(0.2)
    return all(p.returncode == 0 for p in procs)


def read_curve(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f if line.strip()]


def time_to(curve: list, target: float):
    return next((sec for _, sec, loss in curve if loss <= target), None)


def main(argv=None) -> dict:
    args = parse_args(argv)
    why = wan_hosts.unavailable()
    if why:
        print(f"noloco_wan: skipped: {why}")
        print(json.dumps({"skipped": why}))
        return {"skipped": why}
    work = tempfile.mkdtemp(prefix="ds_ext_wan_")
    rates = [float(r) for r in args.rates.split(",")]
    rows, results = [], {}
    for layout in args.layouts.split(","):
        base = run(layout, "ddp", None, args, work)
        target_step = int(args.steps * args.target_fraction)
        target = next(loss for step, _, loss in base["curve"] if step >= target_step)
        results[layout] = {"target_loss": target, "unshaped_ddp": base, "runs": {}}
        for rate in rates:
            for mode in args.modes.split(","):
                r = run(layout, mode, rate, args, work)
                r["time_to_target"] = time_to(r["curve"], target)
                results[layout]["runs"][f"{mode}@{rate:g}"] = r
                rows.append(r)
                print(f"  {layout} {mode:<7}{rate:>7g} Mbit/s: time to target {fmt(r['time_to_target'])}, "
                      f"{r['steps_done']} steps, {r['link_bytes'] / 1e6:.1f} MB per link", file=sys.stderr)
    if set(args.modes.split(",")) != set(MODES):
        out = {"partial": True, "runs": {f"{lay}/{k}": v["time_to_target"] for lay, res in results.items()
                                         for k, v in res["runs"].items()}}
        print(json.dumps(out))
        return out
    return report(results, rates, args)


def fmt(t) -> str:
    return "not reached" if t is None else f"{t:.1f} s"


def speedup(slow, fast, cap):
    """(value, is_lower_bound): a run that never reached the target counts as ``cap`` seconds."""
    if fast is None:
        return None, False
    return (cap if slow is None else slow) / fast, slow is None


def report(results: dict, rates: list, args) -> dict:
    summary = {}
    print(f"{'layout':<7}{'rate Mbit/s':>12}{'mode':>8}{'to target s':>13}{'steps':>7}{'MB/link':>9}{'vs ddp':>9}"
          f"{'vs diloco':>11}")
    for layout, res in results.items():
        for rate in rates:
            runs = {m: res["runs"][f"{m}@{rate:g}"] for m in MODES}
            for mode, r in runs.items():
                vs_ddp, lb1 = speedup(runs["ddp"]["time_to_target"], r["time_to_target"], args.cap_s)
                vs_dil, lb2 = speedup(runs["diloco"]["time_to_target"], r["time_to_target"], args.cap_s)
                print(f"{layout:<7}{rate:>12g}{mode:>8}{fmt(r['time_to_target']):>13}{r['steps_done']:>7}"
                      f"{r['link_bytes'] / 1e6:>9.1f}{_x(vs_ddp, lb1):>9}{_x(vs_dil, lb2):>11}")
                summary[f"{layout}/{mode}@{rate:g}"] = {"time_to_target": r["time_to_target"],
                                                        "speedup_vs_ddp": vs_ddp, "lower_bound": lb1}
        print(f"{layout}: target eval loss {res['target_loss']:.3f} (unshaped DDP at step "
              f"{int(args.steps * args.target_fraction)})")
    first = next(iter(results))
    at100 = {m: results[first]["runs"].get(f"{m}@100") for m in MODES}
    out = {"layouts": list(results), "rates_mbit": rates, "summary": summary}
    if all(at100.values()):
        out["speedup_vs_ddp_100mbit"], out["speedup_vs_ddp_100mbit_lower_bound"] = speedup(
            at100["ddp"]["time_to_target"], at100["noloco"]["time_to_target"], args.cap_s)
        out["speedup_vs_diloco_100mbit"], _ = speedup(at100["diloco"]["time_to_target"],
                                                      at100["noloco"]["time_to_target"], args.cap_s)
    fastest = results[first]["runs"][f"noloco@{max(rates):g}"], results[first]["runs"][f"ddp@{max(rates):g}"]
    common = min(fastest[0]["steps_done"], fastest[1]["steps_done"])
    loss_at = lambda r: next(l for s, _, l in r["curve"] if s >= common)  # noqa: E731
    out["loss_ratio_vs_ddp"] = loss_at(fastest[0]) / loss_at(fastest[1]) if common else None
    out["loss_ratio_at_step"] = common
    plot(results, rates, args.out)
    print(json.dumps(out))
    return out


def _x(v, lower_bound) -> str:
    return "-" if v is None else (">" if lower_bound else "") + f"{v:.1f}x"


def plot(results: dict, rates: list, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layouts = list(results)
    fig, axes = plt.subplots(len(layouts), len(rates), figsize=(4 * len(rates), 3.2 * len(layouts)), squeeze=False)
    for i, layout in enumerate(layouts):
        for j, rate in enumerate(rates):
            ax = axes[i][j]
            for mode, color in zip(MODES, ("grey", "tab:orange", "tab:green")):
                c = results[layout]["runs"][f"{mode}@{rate:g}"]["curve"]
                ax.plot([x[1] for x in c], [x[2] for x in c], label=mode, color=color)
            ax.axhline(results[layout]["target_loss"], ls=":", color="k", lw=1)
            ax.set_title(f"{layout}, {rate:g} Mbit/s")
            ax.set_xlabel("training wall-clock (s)")
            ax.set_ylabel("eval loss")
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
