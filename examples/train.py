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
from ds_ext.config import DsExtConfigError, load_config_file
from ds_ext.data import DataError, build_datasets
from ds_ext.distributed import shutdown
from ds_ext.models import (LlamaForCausalLM, ModelConfig, TokenWindows, llama_pipeline, load_corpus,
                           sharded_batches, threads_per_process, train_eval_split)
from ds_ext.models.hf import (HFCausalLM, HFModelError, check_seq_len, gather_fp32_state, hf_export_meta,
                              load_hf_model, load_tokenizer, save_hf_state)
from ds_ext.train_flags import (FlagError, check_sequence_parallel, checkpoint_dir, override_config,
                                rotate_checkpoints, run_name, set_run_name, set_total_steps, steps_for_epochs,
                                write_effective)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in ``--help`` (a help text that says its own
    default, e.g. "default: the JSON's", keeps it instead)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default:" in text else super()._get_help_string(action)


def env_rank() -> int:
    """This process's global rank from the launcher's environment (before torch.distributed exists)."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class Parser(argparse.ArgumentParser):
    """Usage, help and errors printed by rank 0 only: every rank parses the same command line, so the others
    would print the same text again (the exit status stays 2 on every rank)."""

    def print_usage(self, file=None):
        if env_rank() == 0:
            super().print_usage(file)

    def print_help(self, file=None):
        if env_rank() == 0:
            super().print_help(file)

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n" if env_rank() == 0 else None)


def at_least(least, kind=int):
    def parse(text):
        value = kind(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" message
    return parse


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)),
                   help="set by the launcher")
    p.add_argument("--model", default="reference",
                   help="'reference' (the built-in byte-level model) or a local Hugging Face model directory")
    p.add_argument("--data", default=None, help="text file or directory; HF models also take JSONL with text, "
                   "prompt + completion, or messages (default: the Python standard library)")
    p.add_argument("--seq_len", type=at_least(2), default=128,
                   help="tokens per row (HF data: documents are packed into rows of this length)")
    p.add_argument("--seed", type=int, default=1234, help="model init and data order")
    t = p.add_argument_group("training length and optimizer (override the DeepSpeed JSON; see docs/training.md)")
    t.add_argument("--max_steps", type=at_least(1), default=1000,
                   help="optimizer steps (scheduler.params.total_num_steps of WarmupDecayLR/WarmupCosineLR)")
    t.add_argument("--epochs", type=positive_float, default=None,
                   help="passes over the training rows instead of --max_steps (rounded up to whole steps)")
    t.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate: optimizer.params.lr and scheduler.params.warmup_max_lr "
                        "(default: the JSON's)")
    t.add_argument("--warmup_steps", type=at_least(0), default=None,
                   help="scheduler.params.warmup_num_steps; the warm-up starts at lr / warmup_steps, never 0 "
                        "(default: the JSON's)")
    t.add_argument("--gradient_accumulation_steps", type=at_least(1), default=None,
                   help="micro-batches per optimizer step: gradient_accumulation_steps (default: the JSON's)")
    t.add_argument("--no_packing", action="store_true",
                   help="HF data: one document per row (padded) instead of packing several into a row")
    h = p.add_argument_group("HF model (--model DIR)")
    h.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the --model directory)")
    h.add_argument("--init", choices=("pretrained", "random"), default="pretrained",
                   help="its weights, or a random init from config.json (pretraining from scratch)")
    h.add_argument("--save_hf", default=None, metavar="DIR",
                   help="at the end write the fp32 master weights (safetensors), config and tokenizer to DIR")
    h.add_argument("--save_hf_interval", type=at_least(0), default=0, metavar="N",
                   help="also every N steps, to DIR/checkpoint-<step> (0: only at the end)")
    h.add_argument("--save_hf_total_limit", type=at_least(1), default=None, metavar="K",
                   help="keep only the K newest DIR/checkpoint-<step> (default: keep all)")
    e = p.add_argument_group("evaluation and outputs")
    e.add_argument("--eval_data", default=None, help="held-out data in --data's formats (default: the last "
                   "max(one micro-batch per data shard, 5%%) of --data's rows, which then do not train)")
    e.add_argument("--eval_interval", type=at_least(1), default=50, help="steps between eval-loss measurements")
    e.add_argument("--eval_batches", type=at_least(1), default=None,
                   help="micro-batches per eval (default: all of --eval_data; 4 of the held-out split)")
    e.add_argument("--run_name", default=None, help="CSV/TensorBoard run directory under each monitor's "
                   "output_path (default: <job_name>-<YYYYmmdd-HHMMSS>, a new one per run)")
    e.add_argument("--save_dir", default=None, help="DeepSpeed checkpoint directory")
    e.add_argument("--save_interval", type=at_least(0), default=0,
                   help="steps between checkpoints (0: only at the end)")
    e.add_argument("--resume", action="store_true", help="load the latest checkpoint in --save_dir")
    e.add_argument("--fault_inject", default=None, metavar="RANK:STEP",
                   help="kill -9 rank RANK in the forward of step STEP, first launch round only (recovery demo/test)")
    r = p.add_argument_group("reference model size (--model reference only)")
    r.add_argument("--layers", type=at_least(1), default=4, help="decoder layers")
    r.add_argument("--hidden", type=at_least(8), default=128, help="hidden size")
    r.add_argument("--heads", type=at_least(1), default=4, help="attention heads")
    r.add_argument("--kv_heads", type=at_least(1), default=2, help="key/value heads (grouped-query attention)")
    deepspeed.add_config_arguments(p)
    return p


def given_flags(argv=None) -> set:
    """The destinations set on the command line (not by a default): the same parser with every default
    suppressed."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_known_args(argv)[0]))


REFERENCE_ONLY = ("layers", "hidden", "heads", "kv_heads")
HF_ONLY = ("tokenizer", "init", "save_hf", "save_hf_interval", "save_hf_total_limit", "no_packing")


def check_flags(args, given: set) -> None:
    """Flags that would have no effect are refused, not ignored (FlagError names them)."""
    def flags(names):
        return ", ".join(f"--{n}" for n in names)
    if args.model != "reference":
        wasted = [n for n in REFERENCE_ONLY if n in given]
        if wasted:
            raise FlagError(f"{flags(wasted)} size the reference model and have no effect with --model DIR (its "
                            "config.json sets the size); drop them")
    else:
        wasted = [n for n in HF_ONLY if n in given]
        if wasted:
            raise FlagError(f"{flags(wasted)} need an HF model (--model DIR); the reference model trains on "
                            "byte windows and has no HF format")
    if "epochs" in given and "max_steps" in given:
        raise FlagError("--epochs and --max_steps both set the training length; give one")
    if args.save_hf_interval and not args.save_hf:
        raise FlagError("--save_hf_interval N writes DIR/checkpoint-<step>: it needs --save_hf DIR")
    if args.save_hf_total_limit is not None and not args.save_hf_interval:
        raise FlagError("--save_hf_total_limit K keeps the newest checkpoint-<step> directories: it needs "
                        "--save_hf_interval N")


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_flags(args, given_flags(argv))
    except FlagError as e:
        refuse(e)
    return args


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
    tokenizer = load_tokenizer(tokenizer_dir, hf.config, flag="--tokenizer" if args.tokenizer else "--model")
    micro = int(ds_config.get("train_micro_batch_size_per_gpu", 1))
    shards = topology.data_shard(deepspeed.comm.get_rank())[1]
    train_set, eval_set = build_datasets(args.data, tokenizer, args.seq_len, micro * shards, eval_path=args.eval_data,
                                         packing=not args.no_packing, eval_min_rows=micro)
    if topology.pipeline_stages > 1:
        meta = hf_export_meta(hf.config, os.path.abspath(args.model), tokenizer_dir)
        model = hf_pipeline_module(hf, topology, meta)
    else:
        model = HFCausalLM(hf, source=os.path.abspath(args.model), tokenizer_dir=tokenizer_dir)
    return model, tokenizer, train_set, eval_set, hf.config


def refuse(e: Exception) -> None:
    """Exit 2 with the message, printed by rank 0 only (every rank meets the same refusal)."""
    if env_rank() == 0:
        print(f"examples/train.py: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


def save_hf(engine, hf_config, tokenizer, out: str, topology, rank: int, effective: dict) -> None:
    """The fp32 master weights written by global rank 0 as an HF directory (collective), with the effective config
    beside them: replica 0's when NoLoCo runs several. A plain engine: gathered from the ZeRO partitions; a
    pipeline: each stage's gathered from its data-parallel group, then every stage's sent to rank 0
    (``ds_ext.models.hf_pipeline``). ``config.json`` says float32, what was written, whatever the training dtype."""
    if isinstance(engine, deepspeed.PipelineEngine):
        from ds_ext.models.hf_pipeline import gather_hf_state_dict  # present: it built this pipeline
        state = gather_hf_state_dict(engine.module, topology, hf_config.num_hidden_layers,
                                     hf_config.tie_word_embeddings)
    else:
        state = gather_fp32_state(engine.module)
    if rank == 0:
        save_hf_state(state, json.loads(hf_config.to_json_string()), tokenizer, out)
        write_effective(effective, [out])
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

    def eval_micro_batches(self) -> int:
        """``--eval_batches``, else all of ``--eval_data`` (whole micro-batches), else 4 of the held-out split."""
        if self.args.eval_batches:
            return self.args.eval_batches
        return len(self.eval_set) // self.micro if self.args.eval_data else 4

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Mean loss over the eval micro-batches (the same on every rank: no collective). A pipeline's
        ``eval_batch`` takes ``gradient_accumulation_steps`` micro-batches per call."""
        it = self.batches_of(self.eval_set, (0, 1), seed=0)
        n = self.eval_micro_batches()
        self.engine.eval()
        if self.is_pipe:
            losses = [self.engine.eval_batch(it).item() for _ in range(max(1, n // self.gas))]
        else:
            losses = [self.engine(*next(it)).item() for _ in range(n)]
        self.engine.train()
        return sum(losses) / len(losses)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(threads_per_process())
    torch.manual_seed(args.seed)
    try:
        ds_config = override_config(load_config_file(args.deepspeed_config), args.lr, args.warmup_steps,
                                    args.gradient_accumulation_steps)
        topology = ds_ext.build_topology(ds_config)
        check_sequence_parallel(topology.sequence_parallel, args.model != "reference", args.seq_len,
                                not args.no_packing)
    except (FlagError, DsExtConfigError) as e:
        refuse(e)
    rank = deepspeed.comm.get_rank()
    tokenizer = hf_config = None
    try:
        if args.model == "reference":
            model = build_model(model_config(args), topology)
            train_set, eval_set = reference_data(args)
        else:
            model, tokenizer, train_set, eval_set, hf_config = build_hf(args, ds_config, topology)
        if args.epochs is not None:
            args.max_steps = steps_for_epochs(args.epochs, len(train_set), int(ds_config.get(
                "train_micro_batch_size_per_gpu", 1)), topology.data_shard(rank)[1],
                int(ds_config.get("gradient_accumulation_steps", 1)))
    except (HFModelError, DataError, FlagError) as e:
        refuse(e)
    set_total_steps(ds_config, args.max_steps)
    # monitors write on rank 0 only, so only rank 0's name matters; a torch-elastic restart continues its run's dir
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    run_dirs = set_run_name(ds_config, run_name(ds_config, args.run_name, reuse_latest=restarted))
    effective = {"deepspeed_config": ds_config, "train_args": {k: v for k, v in vars(args).items()
                                                               if k != "deepspeed_config"},
                 "train_rows": len(train_set), "eval_rows": len(eval_set)}
    if rank == 0:
        write_effective(effective, run_dirs + [d for d in (args.save_dir,) if d])
        where = ", ".join(run_dirs) or "no run directory"
        print(f"effective config (in {where}): {json.dumps(effective, default=str)}", flush=True)
    ds_args = argparse.Namespace(**{**vars(args), "deepspeed_config": None})  # the effective config goes as config=
    engine, *_ = ds_ext.initialize(args=ds_args, model=model, model_parameters=[p for p in model.parameters()],
                                   config=ds_config, topology=topology)
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

    def save_checkpoint_hf(step: int) -> None:
        save_hf(engine, hf_config, tokenizer, checkpoint_dir(args.save_hf, step), topology, rank, effective)
        if rank == 0:
            rotate_checkpoints(args.save_hf, args.save_hf_total_limit)

    summary = run(args, engine, trainer, topology, start, rank, save_checkpoint_hf)
    if args.save_dir:
        engine.save_checkpoint(args.save_dir, client_state={"data_batches": engine.global_steps * trainer.gas})
    if args.save_hf:
        save_hf(engine, hf_config, tokenizer, args.save_hf, topology, rank, effective)
    engine.ds_ext_close()
    if rank == 0:
        print(json.dumps({**summary, "max_steps": args.max_steps, "train_rows": len(train_set),
                          "eval_rows": len(eval_set), "run_dirs": run_dirs}))


def reference_data(args):
    """Byte windows of ``--data`` and of ``--eval_data`` (else the corpus tail, held out)."""
    if args.eval_data is None:
        return train_eval_split(load_corpus(args.data), args.seq_len)
    return TokenWindows(load_corpus(args.data), args.seq_len), TokenWindows(load_corpus(args.eval_data), args.seq_len)


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


def run(args, engine, trainer, topology, start, rank, save_checkpoint_hf) -> dict:
    tokens_per_step = trainer.micro * trainer.gas * args.seq_len * topology.data_shards
    bar = tqdm(total=args.max_steps, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True)
    first = last = None
    eval_first = trainer.eval_loss() if start < args.max_steps else None
    t0, steps_done = time.perf_counter(), 0
    for step in range(start + 1, args.max_steps + 1):
        lr = engine.get_lr()[0]  # what this step's optimizer update uses (the scheduler steps after it)
        t = time.perf_counter()
        loss = trainer.step()
        dt = time.perf_counter() - t
        first, last, steps_done = first if first is not None else loss, loss, steps_done + 1
        events = [("Train/loss", loss, step), ("Train/tokens_per_s", tokens_per_step / dt, step),
                  ("Train/lr", lr, step)]
        if step % args.eval_interval == 0 and step < args.max_steps:
            events.append(("Eval/loss", trainer.eval_loss(), step))
        engine.monitor.write_events(events)
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)
        if args.save_dir and args.save_interval and step % args.save_interval == 0 and step < args.max_steps:
            engine.save_checkpoint(args.save_dir, client_state={"data_batches": step * trainer.gas})
        if args.save_hf_interval and step % args.save_hf_interval == 0 and step < args.max_steps:
            save_checkpoint_hf(step)
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
    shutdown()  # gloo torn down while the interpreter is alive (ds_ext.distributed.shutdown)
