"""Pretrain the ds_ext reference model, or train your own HF model on your data, with a DeepSpeed engine; every
ds_ext feature is switched on by config alone.

    ds-ext --config configs/baseline.json examples/train.py --max_steps 200
    ds-ext --config configs/streambp.json examples/train.py --model /data/Qwen2.5-0.5B --data sft.jsonl --seq_len 4096
    mpirun --allow-run-as-root -np 2 python examples/train.py --deepspeed_config configs/baseline.json
    deepspeed --num_gpus 2 examples/train.py --deepspeed_config configs/baseline.json

Metrics (train loss, tokens/s, eval loss) go through the DeepSpeed monitor blocks of the config (``csv_monitor``,
``tensorboard``); rank 0 shows a progress bar and prints one JSON summary as its last line. ``--save_dir`` with
``--save_interval`` writes DeepSpeed checkpoints; ``--resume`` continues from the latest one, data position included.
With ``ds_ext.recovery.journal_dir`` in the config the engine resumes from its journal by itself (relaunch after a
failure: ``ds-ext --max_restarts K``); the data position follows ``engine.global_steps``. ``--fault_inject R:S``
kills rank R with SIGKILL inside step S of the first launch round, to watch the recovery happen.

``--model DIR`` (a local HF model directory; ``--init random`` for config.json alone) trains that model on ``--data``
(text files/directories, or JSONL with ``text``, ``prompt`` + ``completion`` or ``messages``), tokenized with the
directory's tokenizer (or ``--tokenizer DIR``) and packed into ``--seq_len`` rows with per-document positions
(:mod:`ds_ext.data`); ``--save_hf DIR`` writes the trained fp32 weights as ``save_pretrained`` does, with config and
tokenizer. A model, tokenizer or data problem exits 2 before anything is written.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import deepspeed
import torch
from tqdm import tqdm

import ds_ext
from ds_ext.config import load_config_file
from ds_ext.data import DataError, build_datasets
from ds_ext.models import (LlamaForCausalLM, ModelConfig, llama_pipeline, load_corpus, sharded_batches,
                           threads_per_process, train_eval_split)
from ds_ext.models.hf import (HFCausalLM, HFModelError, check_seq_len, gather_fp32_state, hf_export_meta,
                              load_hf_model, load_tokenizer, save_hf_state)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)))
    p.add_argument("--max_steps", type=int, default=1000, help="optimizer steps")
    p.add_argument("--model", default="reference",
                   help="'reference' (the built-in byte-level model) or a local Hugging Face model directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the --model directory)")
    p.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                   help="HF model: its weights, or a random init from config.json (pretraining from scratch)")
    p.add_argument("--save_hf", default=None, metavar="DIR",
                   help="HF model: at the end write fp32 weights (safetensors), config and tokenizer to DIR")
    p.add_argument("--data", default=None, help="text file or directory (default: the Python standard library); "
                   "HF models also take JSONL with text, prompt + completion, or messages")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--eval_interval", type=int, default=50, help="steps between eval-loss measurements")
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--save_dir", default=None, help="DeepSpeed checkpoint directory")
    p.add_argument("--save_interval", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="load the latest checkpoint in --save_dir")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--fault_inject", default=None, metavar="RANK:STEP",
                   help="kill -9 rank RANK in the forward of step STEP, first launch round only (recovery demo/test)")
    deepspeed.add_config_arguments(p)
    return p.parse_args(argv)


def model_config(args) -> ModelConfig:
    return ModelConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4 // 8 * 8,
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       max_seq_len=args.seq_len)


def build_model(cfg: ModelConfig, topology):
    if topology.pipeline_stages > 1:
        return llama_pipeline(cfg, topology=topology.process_topology())
    return LlamaForCausalLM(cfg)


def hf_pipeline_module(hf, topology, hf_meta: dict):
    """The HF model as a ``PipelineModule`` (``ds_ext.models.hf_pipeline``, when this build has it)."""
    try:
        from ds_ext.models.hf_pipeline import hf_pipeline
    except ModuleNotFoundError as e:
        if e.name != "ds_ext.models.hf_pipeline":
            raise
        raise HFModelError(f"ds_ext.topology.pipeline_stages={topology.pipeline_stages} with an HF model needs "
                           "ds_ext.models.hf_pipeline, which this build does not have; use pipeline_stages=1") from e
    return hf_pipeline(hf, topology, hf_meta=hf_meta)


def build_hf(args, ds_config: dict, topology):
    """Model, tokenizer and packed train/eval rows of an HF run; every refusal (model dir, family, tokenizer,
    seq_len, data) is raised here, before the engine exists and before anything is written."""
    streambp = bool(ds_config.get("ds_ext", {}).get("streambp", {}).get("enabled"))
    hf = load_hf_model(args.model, args.init, streambp=streambp)
    check_seq_len(hf.config, args.seq_len, args.model)
    tokenizer_dir = args.tokenizer or args.model
    tokenizer = load_tokenizer(tokenizer_dir, hf.config)
    micro = int(ds_config.get("train_micro_batch_size_per_gpu", 1))
    shards = topology.data_shard(deepspeed.comm.get_rank())[1]
    train_set, eval_set = build_datasets(args.data, tokenizer, args.seq_len, micro * shards)
    if topology.pipeline_stages > 1:
        meta = hf_export_meta(hf.config, os.path.abspath(args.model), tokenizer_dir)
        model = hf_pipeline_module(hf, topology, meta)
    else:
        model = HFCausalLM(hf, source=os.path.abspath(args.model), tokenizer_dir=tokenizer_dir)
    return model, tokenizer, train_set, eval_set, hf.config


def refuse(e: Exception) -> None:
    print(f"examples/train.py: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def save_hf(engine, hf_config, tokenizer, out: str, topology, rank: int) -> None:
    """The weights written by global rank 0 as an HF directory (collective): replica 0's when NoLoCo runs several.
    A plain engine: the fp32 master weights gathered from the ZeRO partitions; a pipeline: every stage's parameters
    gathered by ``ds_ext.models.hf_pipeline`` (the module's dtype)."""
    if isinstance(engine, deepspeed.PipelineEngine):
        from ds_ext.models.hf_pipeline import gather_hf_state_dict  # present: it built this pipeline
        state = gather_hf_state_dict(engine.module, topology, hf_config.num_hidden_layers,
                                     hf_config.tie_word_embeddings)
    else:
        state = gather_fp32_state(engine.module)
    if rank == 0:
        save_hf_state(state, json.loads(hf_config.to_json_string()), tokenizer, out)
        print(f"wrote HF model {out}", flush=True)
    deepspeed.comm.barrier()


class Trainer:
    """The loop: one ``step()`` is one optimizer step (``gradient_accumulation_steps`` micro-batches)."""

    def __init__(self, args, engine, train_set, eval_set, topology):
        self.args, self.engine, self.topology = args, engine, topology
        self.is_pipe = isinstance(engine, deepspeed.PipelineEngine)
        self.gas = engine.gradient_accumulation_steps()
        self.micro = engine.train_micro_batch_size_per_gpu()
        self.train_set, self.eval_set = train_set, eval_set
        self.batches = None
        # packed HF rows (input_ids, labels, position_ids) reach a pipeline as ((input_ids, position_ids), labels)
        packed_pipe = self.is_pipe and args.model != "reference"
        self.form = (lambda b: ((b[0], b[2]), b[1])) if packed_pipe else (lambda b: b)

    def batches_of(self, dataset, shard, seed: int, start_batch: int = 0):
        return map(self.form, sharded_batches(dataset, self.micro, shard, seed=seed, start_batch=start_batch))

    def start_data(self, consumed_batches: int) -> None:
        shard = self.topology.data_shard(deepspeed.comm.get_rank())
        self.batches = self.batches_of(self.train_set, shard, self.args.seed, consumed_batches)

    def step(self) -> float:
        if self.is_pipe:
            return self.engine.train_batch(self.batches).item()
        total = 0.0
        for _ in range(self.gas):
            loss = self.engine(*next(self.batches))
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item()
        return total / self.gas

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Mean loss on the first ``eval_batches`` held-out batches (the same on every rank: no collective)."""
        it = self.batches_of(self.eval_set, (0, 1), seed=0)
        self.engine.eval()
        if self.is_pipe:
            losses = [self.engine.eval_batch(it).item() for _ in range(self.args.eval_batches)]
        else:
            losses = [self.engine(*next(it)).item() for _ in range(self.args.eval_batches)]
        self.engine.train()
        return sum(losses) / len(losses)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(threads_per_process())
    torch.manual_seed(args.seed)
    ds_config = load_config_file(args.deepspeed_config)
    topology = ds_ext.build_topology(ds_config)
    rank = deepspeed.comm.get_rank()
    tokenizer = hf_config = None
    if args.model == "reference":
        if args.save_hf:
            refuse("--save_hf needs an HF model (--model DIR)")
        model = build_model(model_config(args), topology)
        train_set, eval_set = train_eval_split(load_corpus(args.data), args.seq_len)
    else:
        try:
            model, tokenizer, train_set, eval_set, hf_config = build_hf(args, ds_config, topology)
        except (HFModelError, DataError) as e:
            refuse(e)
    engine, *_ = ds_ext.initialize(args=args, model=model, model_parameters=[p for p in model.parameters()],
                                   topology=topology)
    trainer = Trainer(args, engine, train_set, eval_set, topology)
    start = engine.global_steps  # > 0 when the recovery journal resumed the engine
    if args.fault_inject:
        inject_fault(engine, args.fault_inject, rank)
    if args.resume and args.save_dir:
        path, client = engine.load_checkpoint(args.save_dir)
        start = engine.global_steps if path else 0
        if rank == 0:
            print(f"resumed from {path} at step {start}" if path else f"no checkpoint in {args.save_dir}")
    trainer.start_data(start * trainer.gas)
    summary = run(args, engine, trainer, topology, start, rank)
    if args.save_dir:
        engine.save_checkpoint(args.save_dir, client_state={"data_batches": engine.global_steps * trainer.gas})
    if args.save_hf:
        save_hf(engine, hf_config, tokenizer, args.save_hf, topology, rank)
    engine.ds_ext_close()
    if rank == 0:
        print(json.dumps(summary))


def inject_fault(engine, spec: str, rank: int) -> None:
    """``RANK:STEP``: SIGKILL this process in the first forward of step STEP (after the journal's own pre-hook, so
    the previous step is on disk), in the first launch round only."""
    victim, step = (int(v) for v in spec.split(":"))
    if rank != victim or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return

    def kill(module, inputs):
        if engine.global_steps == step - 1:
            os.kill(os.getpid(), signal.SIGKILL)

    engine.module.register_forward_pre_hook(kill)


def run(args, engine, trainer, topology, start, rank) -> dict:
    tokens_per_step = trainer.micro * trainer.gas * args.seq_len * topology.num_replicas * topology.data_parallel_size
    bar = tqdm(total=args.max_steps, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)
    first = last = None
    eval_first = trainer.eval_loss() if start < args.max_steps else None
    t0, steps_done = time.perf_counter(), 0
    for step in range(start + 1, args.max_steps + 1):
        t = time.perf_counter()
        loss = trainer.step()
        dt = time.perf_counter() - t
        first, last, steps_done = first if first is not None else loss, loss, steps_done + 1
        events = [("Train/loss", loss, step), ("Train/tokens_per_s", tokens_per_step / dt, step)]
        if step % args.eval_interval == 0 and step < args.max_steps:
            events.append(("Eval/loss", trainer.eval_loss(), step))
        engine.monitor.write_events(events)
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)
        if args.save_dir and args.save_interval and step % args.save_interval == 0 and step < args.max_steps:
            engine.save_checkpoint(args.save_dir, client_state={"data_batches": step * trainer.gas})
    bar.close()
    elapsed = time.perf_counter() - t0
    eval_last = trainer.eval_loss() if steps_done else None
    if eval_last is not None:
        engine.monitor.write_events([("Eval/loss", eval_last, args.max_steps)])
    return {"steps": steps_done, "start_step": start, "first_loss": first, "last_loss": last,
            "eval_loss_start": eval_first, "eval_loss_end": eval_last,
            "tokens_per_s": tokens_per_step * steps_done / elapsed if steps_done else None,
            "world_size": topology.world_size, "replicas": topology.num_replicas, **engine.ds_ext_metrics()}


if __name__ == "__main__":
    main()
