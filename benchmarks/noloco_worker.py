"""One rank of a ``benchmarks/noloco.py`` (and ``noloco_wan.py``) run, not a benchmark itself (it prints no JSON;
the bench tier runs it through theirs): examples/train.py's model, data and loop, plus a communication
counter (installed here, not by the feature) that classifies every call by the benchmark's replica layout (also for
the DDP baseline, whose groups span that layout). Writes ``<out>/rank<R>.json``: train losses, eval curve, seconds,
counters."""
import argparse
import json
import os
import sys
import time

import deepspeed
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import train as example  # noqa: E402  (examples/train.py: the same model, data and loop as the main job)

import ds_ext  # noqa: E402
from ds_ext.config import load_config_file  # noqa: E402
from ds_ext.models import load_corpus, threads_per_process, train_eval_split  # noqa: E402
from ds_ext.noloco.accounting import deepspeed_accounting  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--layout_ranks_per_replica", type=int, required=True)
    own, rest = p.parse_known_args(argv)
    args = example.parse_args(rest)
    torch.set_num_threads(threads_per_process())
    torch.manual_seed(args.seed)
    topology = ds_ext.build_topology(load_config_file(args.deepspeed_config))
    rank = deepspeed.comm.get_rank()
    model = example.build_model(example.model_config(args), topology)
    train_set, eval_set = train_eval_split(load_corpus(args.data), args.seq_len)
    engine, *_ = ds_ext.initialize(args=args, model=model, model_parameters=list(model.parameters()),
                                   topology=topology)
    # The benchmark's own counter, by the benchmark's replica layout (so the DDP baseline, which has no NoLoCo feature,
    # is counted the same way); the runs leave ds_ext.noloco.count_collectives off, so calls are not wrapped twice.
    counter = deepspeed_accounting(rank, lambda r: r // own.layout_ranks_per_replica)
    trainer = example.Trainer(args, engine, train_set, eval_set, topology)
    trainer.start_data(0)
    losses, evals, t0 = [], [], time.perf_counter()
    os.makedirs(own.out, exist_ok=True)
    # the eval curve also goes out line by line: a run stopped at a time cap still has it
    curve = open(os.path.join(own.out, f"rank{rank}.evals.jsonl"), "w")
    for step in range(1, args.max_steps + 1):
        losses.append(trainer.step())
        if step % args.eval_interval == 0 or step == args.max_steps:
            evals.append((step, time.perf_counter() - t0, trainer.eval_loss()))
            curve.write(json.dumps(evals[-1]) + "\n")
            curve.flush()
    seconds = time.perf_counter() - t0
    counter.uninstall()
    os.makedirs(own.out, exist_ok=True)
    with open(os.path.join(own.out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "replica": topology.coords(rank)[0], "losses": losses, "evals": evals,
                   "seconds": seconds, "comm": counter.summary(), "features": engine.ds_ext_metrics()}, f)


if __name__ == "__main__":
    main()
