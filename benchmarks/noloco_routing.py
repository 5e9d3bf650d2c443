"""``benchmarks/noloco.py --routing``: NoLoCo with random pipeline routing vs NoLoCo without it vs DDP, on a 2-stage
pipeline of the reference model, 4 gloo processes, equal steps and tokens.

* ``ddp``: one replica, 2 stages x 2 ZeRO-1 data-parallel ranks (DeepSpeed's all-reduce every step);
* ``noloco``: 2 replicas x 2 stages, outer step every ``--inner_steps``;
* ``noloco_routed``: the same with ``ds_ext.noloco.random_routing`` (each micro-batch hops replicas at the stage
  boundary, from the shared seed).

Measured: final eval loss (fixed path, mean over replicas), the L2 distance between the two replicas' weights of
each stage every ``--distance_every`` steps (what routing mixes between outer steps), steps per second.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from _pipeline_bench import build_engine, free_port, rank_env

WORLD = 4


def ds_config(args, method: str) -> dict:
    ext = {"topology": {"pipeline_stages": 2}}
    if method != "ddp":
        ext["noloco"] = {"enabled": True, "inner_steps": args.inner_steps, "ranks_per_replica": 2,
                         "random_routing": method == "noloco_routed", "seed": args.seed}
    return {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": args.gas,
            "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
            "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0, "torch_adam": True}},
            "zero_optimization": {"stage": 1}, "ds_ext": ext}


def worker(rank: int, args, method: str, port: int, result_dir: str) -> None:
    rank_env(rank, WORLD, port)
    from ds_ext.data.corpus import load_corpus
    engine, topo = build_engine(args, ds_config(args, method))
    tokens = load_corpus(max_bytes=4 << 20)
    shard, shards = topo.data_shard(rank)  # each replica / data rank its own data; a pipeline's stages the same

    def batch(key: int, micro: int):
        g = torch.Generator().manual_seed((key * 1009 + micro) * 16 + shard)
        starts = torch.randint(0, tokens.numel() - args.seq_len - 1, (args.micro,), generator=g).tolist()
        x = torch.stack([tokens[s:s + args.seq_len + 1] for s in starts]).long()
        return x[:, :-1], x[:, 1:]
    snaps, losses, t0 = [], [], time.perf_counter()
    for step in range(args.steps):
        losses.append(float(engine.train_batch(iter([batch(step, m) for m in range(args.gas)]))))
        if (step + 1) % args.distance_every == 0:
            snaps.append(torch.cat([p.detach().reshape(-1).clone() for p in engine.module.parameters()]))
    wall = time.perf_counter() - t0
    eval_loss = sum(float(engine.eval_batch(iter([batch(-1 - k, m) for m in range(args.gas)])))
                    for k in range(8)) / 8
    engine.ds_ext_close()
    torch.save({"coords": topo.coords(rank), "snaps": snaps, "losses": losses, "wall": wall, "eval": eval_loss},
               os.path.join(result_dir, f"rank{rank}.pt"))


def run(args, method: str) -> dict:
    import torch.multiprocessing as mp
    result_dir = tempfile.mkdtemp(prefix="ds_ext_route_")
    try:
        mp.start_processes(worker, args=(args, method, free_port(), result_dir), nprocs=WORLD, start_method="spawn")
        ranks = [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    finally:
        shutil.rmtree(result_dir, ignore_errors=True)
    distance = []
    if method != "ddp":  # replica 0 = ranks 0, 1 (stages 0, 1); replica 1 = ranks 2, 3
        for i in range(len(ranks[0]["snaps"])):
            d2 = sum(float((ranks[s]["snaps"][i] - ranks[2 + s]["snaps"][i]).pow(2).sum()) for s in (0, 1))
            distance.append(d2 ** 0.5)
    last = [r for r in ranks if r["coords"][1] == 1]  # the loss stages
    return {"method": method, "eval_loss": sum(r["eval"] for r in last) / len(last),
            "steps_per_s": args.steps / max(r["wall"] for r in ranks), "distance": distance,
            "final_train_loss": sum(r["losses"][-1] for r in last) / len(last)}


def routing_main(args) -> dict:
    runs = {m: run(args, m) for m in ("ddp", "noloco", "noloco_routed")}
    ddp, plain, routed = runs["ddp"], runs["noloco"], runs["noloco_routed"]
    print(f"2-stage pipeline, {args.steps} steps, H={args.inner_steps}, replica distance every "
          f"{args.distance_every} steps")
    print(f"{'method':<15}{'eval loss':>11}{'steps/s':>9}  replica distance over time")
    for r in runs.values():
        print(f"{r['method']:<15}{r['eval_loss']:>11.4f}{r['steps_per_s']:>9.2f}  "
              + " ".join(f"{d:.3f}" for d in r["distance"]))
    mean = (lambda xs: sum(xs) / len(xs))
    res = {"steps": args.steps, "inner_steps": args.inner_steps,
           "routing_loss_ratio_vs_ddp": routed["eval_loss"] / ddp["eval_loss"],
           "noloco_loss_ratio_vs_ddp": plain["eval_loss"] / ddp["eval_loss"],
           "routing_replica_distance_ratio": mean(routed["distance"]) / mean(plain["distance"]),
           "routing_throughput_ratio": routed["steps_per_s"] / plain["steps_per_s"],
           "ddp_steps_per_s": ddp["steps_per_s"], "runs": runs}
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [(i + 1) * args.distance_every for i in range(len(plain["distance"]))]
        ax.plot(xs, plain["distance"], label="NoLoCo")
        ax.plot(xs, routed["distance"], label="NoLoCo + routing")
        ax.set_xlabel("step")
        ax.set_ylabel("||replica 0 - replica 1||")
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(args.plot), exist_ok=True)
        fig.savefig(args.plot.replace(".png", "_routing.png"), dpi=120)
    except ImportError:
        pass
    return res
