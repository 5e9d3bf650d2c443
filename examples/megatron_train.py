"""Train a tiny megatron-core GPTModel with ds_ext features switched on by the "ds_ext" block of a config file.

    python -m torch.distributed.run --nproc_per_node 2 examples/megatron_train.py --config configs/megatron_noloco.json
    python -m torch.distributed.run --nproc_per_node 2 examples/megatron_train.py --config configs/megatron_grouped.json
    python examples/megatron_train.py --config configs/megatron_grouped.json       # one process

The file holds a "megatron" section (model size, batch, optimizer; keys below in DEFAULTS) and the same "ds_ext"
block DeepSpeed users write. The model is megatron-core's GPTModel with megatron's DistributedDataParallel and
distributed optimizer (Adam); ds_ext attaches through ds_ext.megatron: the layer spec's core attention (Prefix
Grouper), streamed TransformerLayers (StreamBP), replica-sized groups + finalize_model_grads_func + after_step
(NoLoCo), the step journal (recovery; a relaunch resumes from it). On a CPU-only machine everything runs inside ds_ext.megatron.cpu_shims().
The training loop is a plain forward/backward/step loop: megatron's pipeline schedules need CUDA.

Data: byte-level windows of the Python standard library's source (no download). With Prefix Grouper on, each window
becomes one GRPO-style group: the first half is the shared prompt and ``group_size`` responses are continuations
of different lengths, trained on their tokens' NLL through the packed layout. Prints the loss every
``--log_every`` steps and ends with one JSON line (first_loss, last_loss: means of the first / last 5 steps).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# megatron-core without apex / Transformer Engine says so on every import; torch 2.13 flags megatron's collectives
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope).*")
warnings.filterwarnings("ignore", category=FutureWarning)

DEFAULTS = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
            "ffn_hidden_size": 172, "seq_length": 64, "micro_batch_size": 4, "group_size": 4, "lr": 3e-3,
            "clip_grad": 1.0, "steps": 60, "seed": 0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="JSON with a 'megatron' section and a 'ds_ext' block")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides megatron.steps)")
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--journal_dir", default=None, help="overrides ds_ext.recovery.journal_dir")
    p.add_argument("--kill_at", default=None, metavar="RANK:STEP",
                   help="SIGKILL that rank before that step, in the first launch round only (watch the journal "
                        "resume under torch.distributed.run --max_restarts 1)")
    return p.parse_args(argv)


def load_settings(path: str):
    from ds_ext.megatron.model import parse_ds_ext
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    unknown = set(raw.get("megatron", {})) - set(DEFAULTS)
    if unknown:
        raise SystemExit(f"{path}: unknown megatron keys {sorted(unknown)}; allowed: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **raw.get("megatron", {})}, parse_ds_ext(raw, source=path)


def init_distributed():
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533")):
        os.environ.setdefault(key, value)
    from ds_ext.data.corpus import threads_per_process
    torch.set_num_threads(threads_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))))
    # ds_ext's start-up: restart-safe under torch elastic (each restart round meets under its own store prefix)
    from ds_ext.distributed import init_distributed as ds_ext_init
    ds_ext_init()
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(1, 1)


def batches(settings, rank: int, world: int, start_batch: int = 0):
    """Endless ``(input_ids, labels)`` micro-batches ``[mbs, seq]`` of this rank's data shard, from ``start_batch``
    on (a resumed run continues the same sequence)."""
    from ds_ext.data.corpus import TokenWindows, load_corpus, sharded_batches
    windows = TokenWindows(load_corpus(max_bytes=1 << 20), settings["seq_length"])
    return sharded_batches(windows, settings["micro_batch_size"], (rank, world), seed=settings["seed"],
                           start_batch=start_batch)


def grouped_batch(input_ids: torch.Tensor, group_size: int):
    """Each row -> one group: prompt = first half, responses = the continuation cut to ``group_size`` lengths."""
    from ds_ext.prefix_grouper.layout import pack
    n, seq = input_ids.shape
    p = seq // 2
    rest = seq - p
    lens = [max(1, rest - j * max(1, rest // (2 * group_size))) for j in range(group_size)]
    comp = input_ids[:, p:].repeat_interleave(group_size, 0)
    mask = torch.zeros_like(comp)
    for r in range(comp.shape[0]):
        mask[r, :lens[r % group_size]] = 1
    batch = pack(input_ids[:, :p], torch.ones(n, p, dtype=torch.long), comp, mask, [group_size] * n)
    return batch, comp, mask


def build(settings, ext, rank: int):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ds_ext.megatron import noloco_setup, replica_groups, streambp_layers, tiny_gpt
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size")
    model = tiny_gpt(ext, vocab_size=259, max_sequence_length=settings["seq_length"], seed=settings["seed"],
                     **{k: settings[k] for k in keys})
    groups = replica_groups(ext.ranks_per_replica(dist.get_world_size())) if ext.noloco.enabled else None
    pgc = dict(pg_collection=groups.pg_collection) if groups else {}
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=True,
                                                                              grad_reduce_in_fp32=True), model, **pgc)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=settings["lr"], use_distributed_optimizer=True,
                                                 clip_grad=settings["clip_grad"], adam_beta2=0.95), [ddp],
                                 **(dict(pgc, use_gloo_process_groups=False) if groups else {}))
    streambp_layers(ddp, ext.streambp)
    # collectives are counted from after the journal's resume (an all-gather over every rank, once, at start)
    noloco = noloco_setup([ddp], opt, ext.noloco, groups, count_collectives=False) if groups else None
    return model, ddp, opt, noloco


def loss_of(ddp, ext, settings, input_ids, labels):
    if ext.prefix_grouper.enabled:
        from ds_ext.megatron import grouped_forward
        batch, comp, mask = grouped_batch(input_ids, settings["group_size"])
        logp = batch.completion_logprobs(grouped_forward(ddp, batch), comp)
        return -(logp * mask).sum() / mask.sum()
    return ddp(input_ids, None, None, labels=labels).mean()


def train(args) -> dict:
    from ds_ext.megatron import MegatronJournal, MegatronRunner, cpu_shims
    from megatron.core.distributed import finalize_model_grads
    settings, ext = load_settings(args.config)
    if args.journal_dir:
        ext.recovery.journal_dir = args.journal_dir
    kill = tuple(int(x) for x in args.kill_at.split(":")) if args.kill_at else None
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        kill = None
    steps = args.steps if args.steps is not None else settings["steps"]
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    losses, start = [], time.time()
    with cpu_shims():
        model, ddp, opt, noloco = build(settings, ext, rank)
        finalize = noloco.finalize_model_grads_func if noloco else finalize_model_grads
        # the features, driven through the Feature contract in phase order: NoLoCo's outer step, then the journal
        journal = MegatronJournal(opt, [ddp], ext.recovery) if ext.recovery.active else None
        runner = MegatronRunner([noloco, journal])
        done = runner.start()  # the journal resumes here (and replays NoLoCo's outer steps) if it exists
        if noloco is not None:
            noloco.count_collectives()
        if rank == 0 and done:
            print(f"resumed from the journal after step {done}", flush=True)
        data = batches(settings, rank, world, start_batch=done)
        for step in range(done + 1, steps + 1):
            if kill == (rank, step):
                os.kill(os.getpid(), 9)
            input_ids, labels = next(data)
            ddp.zero_grad_buffer()
            opt.zero_grad()
            loss = loss_of(ddp, ext, settings, input_ids, labels)  # the journal's pre-hook waits for step-1's frames
            loss.backward()
            finalize([ddp])
            opt.step()
            runner.after_step()
            losses.append(loss.item())
            if rank == 0 and (step % args.log_every == 0 or step == 1):
                print(f"step {step:4d}  loss {loss.item():.4f}  ({time.time() - start:.1f} s)", flush=True)
    summary = {"first_loss": sum(losses[:5]) / len(losses[:5]), "last_loss": sum(losses[-5:]) / len(losses[-5:]),
               "steps": steps, "resumed_after": done, "world": world, "seconds": round(time.time() - start, 2),
               "features": {k: getattr(ext, k).enabled for k in ("noloco", "streambp", "prefix_grouper")}}
    if noloco is not None:
        summary["cross_replica_collectives"] = runner.metrics()["noloco/cross_replica_collectives"]
    runner.close()
    if rank == 0:
        print(json.dumps(summary), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    train(parse_args())
