"""Async GRPO on your task: rollout workers generate while the DeepSpeed trainer learns (AsyncFlow).

    ds-ext --num_procs 3 --config configs/grpo_async.json examples/grpo.py --model /data/qwen-dir \
        --prompts math.jsonl --reward my_rewards:exact_answer
    ds-ext --config configs/grpo_async.json examples/grpo.py            # the built-in addition task
    ds-ext --config configs/grpo_sync.json examples/grpo.py             # "max_staleness": 0, the sync baseline

The task (see ``ds_ext/asyncflow/task.py``): ``--prompts`` is a JSONL file, one object per line with ``"prompt"``
text or ``"messages"`` (rendered with the tokenizer's chat template) plus any metadata fields; ``--reward`` is
``module:function`` (importable from the working directory) or ``file.py:function``, called as
``fn(prompt, completion, **metadata) -> float``; built-in verifiers: ``ds_ext.asyncflow.rewards:exact_match``,
``:last_number``, ``:regex`` (metadata ``answer`` / ``pattern``). ``--model DIR`` is a local transformers causal-LM
directory (policy and tokenizer). Bad input (a record without ``prompt``, a reward that does not import or returns a
non-number on a probe call) exits 2 on every rank before anything starts; a reward that raises mid-run stops the
run with the prompt index and the traceback.

Rank 0 trains (a ds_ext DeepSpeed engine) and owns the transfer queue; every other rank is a rollout worker reached
over torch.distributed.rpc. With ``max_staleness`` 0 rank 0 alternates generation and training with all the
machine's threads and the other ranks exit. The reference model first gets a short supervised warm start on the
task (cached in ``--sft_cache``), then GRPO. Rank 0 shows a progress bar, writes the reward curve to ``--plot``,
metrics through the config's monitor blocks, and prints one JSON summary as its last line.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional

import torch
from tqdm import tqdm

from ds_ext.asyncflow import runtime
from ds_ext.asyncflow.rewards import RewardError
from ds_ext.asyncflow.task import AdditionPrompts, Task, TaskError, build_task
from ds_ext.config import load_config_file, parse_ext_config
from ds_ext.launch import local_cores
from ds_ext.models import LlamaForCausalLM, ModelConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--deepspeed_config", required=True)
    p.add_argument("--deepspeed", action="store_true")
    p.add_argument("--steps", type=int, default=40, help="GRPO optimizer steps")
    p.add_argument("--sft_steps", type=int, default=150, help="supervised warm-start steps")
    p.add_argument("--sft_cache", default="runs/grpo_sft.pt")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="reference",
                   help="'reference' (the reference model), 'hf' (a transformers LlamaForCausalLM of the same size, "
                        "random init) or a local transformers model directory (policy and tokenizer)")
    p.add_argument("--prompts", default=None, help="JSONL prompts (default: the built-in addition task)")
    p.add_argument("--reward", default="ds_ext.asyncflow.rewards:exact_match",
                   help="module:function or file.py:function, fn(prompt, completion, **metadata) -> float")
    p.add_argument("--peer", action="store_true",
                   help="the peer-comparable setting: HF Llama, prompts 'a+b=' with 2-digit a, b, no instruction")
    p.add_argument("--plot", default="runs/grpo_reward.png")
    p.add_argument("--kill", action="append", default=[], metavar="RANK:SECONDS[:ROUND]",
                   help="SIGKILL this rank SECONDS after all processes met (RPC up), in launch round ROUND "
                        "(default 0) of ds-ext --max_restarts (to watch recovery); may be repeated")
    p.add_argument("--kill_step", action="append", default=[], metavar="RANK:STEP[:ROUND]",
                   help="SIGKILL trainer rank RANK in the middle of GRPO step STEP or the first after it (after a "
                        "forward); a rollout rank once trainer rank 0's journal holds step STEP; in launch round "
                        "ROUND (default 0)")
    p.add_argument("--ledger_out", default=None,
                   help="directory: each trainer rank writes ledger_rank<R>.json (step -> [prompt, version] trained)")
    args = p.parse_args(argv)
    if args.peer:
        args.model = "hf"
    return args


def is_model_dir(kind: str) -> bool:
    return kind not in ("reference", "hf")


def load_policy(path: str) -> torch.nn.Module:
    """A local transformers causal-LM directory as a GRPO policy (fp32), through the loader every entry point uses
    (``ds_ext.models.hf.load_hf_model``: a bad directory or an unsupported family exits 2 naming it)."""
    from ds_ext.asyncflow.hf_policy import HFPolicy
    from ds_ext.models.hf import HFModelError, load_hf_model
    try:
        return HFPolicy(load_hf_model(path, init="pretrained", dtype=torch.float32))
    except HFModelError as exc:
        fail(str(exc))


def load_tokenizer(kind: str):
    """The transformers tokenizer of a model directory; ``None`` (the byte tokenizer) for the built-in models."""
    if not is_model_dir(kind):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(kind)


def task_for(args) -> Task:
    """The task of this run (every up-front check; exit 2 naming the problem). Without ``--prompts``: the addition
    task (the peer setting's 2-digit 'a+b=' prompts with ``--peer``)."""
    if is_model_dir(args.model) and not os.path.isdir(args.model):
        fail(f"--model {args.model}: not 'reference', 'hf' or a directory")
    if args.prompts is None:
        prompts = (AdditionPrompts(min_operand=10, max_operand=99, instruction="", seed=args.seed) if args.peer
                   else AdditionPrompts(seed=args.seed))
    else:
        prompts = args.prompts
    try:
        return build_task(prompts, args.reward, load_tokenizer(args.model))
    except (TaskError, RewardError) as exc:
        fail(str(exc))


def fail(message: str) -> None:
    import sys
    print(f"grpo: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def build_model(hidden: int, layers: int, state=None, kind: str = "reference") -> torch.nn.Module:
    torch.manual_seed(0)
    if is_model_dir(kind):
        model = load_policy(kind)
    elif kind == "hf":
        from ds_ext.asyncflow.hf_policy import HFPolicy, tiny_llama
        model = HFPolicy(tiny_llama(hidden, layers))
    else:
        model = LlamaForCausalLM(ModelConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 8 * 8,
                                             num_layers=layers, num_heads=4, num_kv_heads=2, max_seq_len=256))
    if state is not None:
        model.load_state_dict(state)
    return model


def warm_start_path(args, task: Task) -> str:
    """Where the warm start of this model and task is cached (benchmarks/asyncflow.py reads the --peer one)."""
    p = task.prompts
    return (f"{args.sft_cache}.{args.model}.{p.min_operand}-{p.max_operand}.{len(p.instruction)}."
            f"{args.hidden}x{args.layers}.{args.sft_steps}.{args.seed}")


def wants_warm_start(args) -> bool:
    """The built-in addition task on a built-in (random-init) model gets a supervised warm start; a model
    directory or a user's prompt file starts from the model's own weights."""
    return args.prompts is None and not is_model_dir(args.model) and args.sft_steps > 0


def warm_start(args, task: Task) -> Optional[dict]:
    """A short supervised run on the task (plain torch), cached: every mode starts from the same weights."""
    if not wants_warm_start(args):
        return None  # build_model loads / seeds the same weights in every process
    key = warm_start_path(args, task)
    if os.path.exists(key):
        return torch.load(key, weights_only=True)
    model = build_model(args.hidden, args.layers, kind=args.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    # Every other process of the run waits for this file (trainer ranks poll for it, rollout workers wait in
    # init_rpc for rank 0), so the warm start takes all the cores this process may run on: 77 s -> 44 s for the
    # default model on 2 cores. The caller's thread count is restored for training.
    threads = torch.get_num_threads()
    torch.set_num_threads(local_cores())
    try:
        for step in range(args.sft_steps):
            x, y = task.sft_batch(list(range(10_000_000 + step * 64, 10_000_000 + (step + 1) * 64)))
            loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(key) or ".", exist_ok=True)
    torch.save(state, key + ".tmp")
    os.replace(key + ".tmp", key)  # other trainer ranks wait for this file
    return state


def wait_for_warm_start(args, task: Task, rank: int, timeout_s: float = 1800.0) -> dict:
    """Trainer rank 0 computes the warm start; the other trainer ranks load it once it is on disk."""
    if rank == 0 or not wants_warm_start(args):
        return warm_start(args, task)
    key = warm_start_path(args, task)
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(key):
        if time.monotonic() > deadline:
            raise TimeoutError(f"trainer rank 0 did not write the warm start {key} within {timeout_s} s")
        time.sleep(0.5)
    return torch.load(key, weights_only=True)


def trainer_engine(args, ds_config: dict, state: dict, rank: int = 0, trainers: int = 1):
    """The trainer's DeepSpeed engine on its own process group (the ``trainers`` trainer ranks only; NoLoCo
    replicas and ZeRO inside them as the config's ``ds_ext`` block lays them out). Under torch elastic the group
    meets in the agent's store (``ds_ext.initialize`` keys it by restart round); otherwise on ``MASTER_PORT + 2``."""
    import ds_ext
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(trainers)}
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        env["MASTER_PORT"] = str(int(os.environ.get("MASTER_PORT", "29500")) + 2)
    os.environ.update(env)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    model = build_model(args.hidden, args.layers, state, args.model)
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine


def plot(history: list, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["reward"] for h in history], marker=".")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward of sampled responses")
    ax.set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def arm_kills(specs, rank: int) -> None:
    """Fault injection: a daemon timer that SIGKILLs this process (see ``--kill``)."""
    import signal
    import threading
    launch_round = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for spec in specs:
        parts = spec.split(":")
        if int(parts[0]) == rank and int(parts[2] if len(parts) > 2 else 0) == launch_round:
            timer = threading.Timer(float(parts[1]), os.kill, args=(os.getpid(), signal.SIGKILL))
            timer.daemon = True
            timer.start()


def arm_step_kills(specs, rank: int, engine) -> None:
    """Fault injection for trainer ranks (see ``--kill_step``): a forward hook that SIGKILLs mid-step."""
    import signal
    launch_round = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for spec in specs:
        parts = [int(p) for p in spec.split(":")]
        if parts[0] == rank and (parts[2] if len(parts) > 2 else 0) == launch_round:
            step = parts[1]
            engine.module.register_forward_hook(
                lambda *_: os.kill(os.getpid(), signal.SIGKILL) if engine.global_steps >= step else None)


def arm_rollout_step_kills(specs, rank: int, ext) -> None:
    """``--kill_step`` for a rollout rank: a daemon thread that SIGKILLs this process once trainer rank 0's journal
    holds step STEP (the run is then really training; needs ``ds_ext.recovery.journal_dir``)."""
    import signal
    import threading
    from ds_ext.recovery import journal
    from ds_ext.recovery.journal import rank_dir
    launch_round = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for spec in specs:
        parts = [int(p) for p in spec.split(":")]
        if parts[0] != rank or (parts[2] if len(parts) > 2 else 0) != launch_round:
            continue
        if ext.recovery.journal_dir is None:
            raise SystemExit("--kill_step for a rollout rank watches the trainers' journal: set "
                             "ds_ext.recovery.journal_dir")
        watched = rank_dir(ext.recovery.journal_dir, 0)

        def watch(step=parts[1]):
            while not os.path.isdir(watched) or journal.scan(watched).newest_reachable() < step:
                time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=watch, daemon=True).start()


def main(argv=None):
    args = parse_args(argv)
    ds_config = load_config_file(args.deepspeed_config)
    ext = parse_ext_config(ds_config, args.deepspeed_config)
    grouper = ds_config.get("ds_ext", {}).get("prefix_grouper", {})
    if args.model != "reference" and grouper.get("enabled"):
        # Prefix Grouper hooks the reference model's attention_fn; a transformers policy trains ungrouped (the same
        # loss, each response with its own copy of the prompt)
        grouper["enabled"] = False
        if int(os.environ.get("RANK", "0")) == 0:
            print("grpo: ds_ext.prefix_grouper is for the reference model; the transformers policy trains "
                  "without it", flush=True)
    cfg = ext.asyncflow
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    trainers = cfg.trainer_ranks
    if world < trainers or (trainers > 1 and world == trainers):
        raise SystemExit(f"ds_ext.asyncflow.trainer_ranks={trainers} needs at least {trainers + 1} processes "
                         f"(trainers + rollout workers); got {world}: pass --num_procs {trainers + 1}")
    sync = trainers == 1 and (cfg.max_staleness == 0 or world == 1)
    task = task_for(args)
    if sync:
        if rank > 0:
            return
        torch.set_num_threads(os.cpu_count() or 1)
        return stop_on_rollout_failure(run_trainer, args, ds_config, cfg, task, True, rank, world)
    import torch.distributed.rpc as rpc
    torch.set_num_threads(1)
    state = wait_for_warm_start(args, task, rank) if rank < trainers else None
    runtime.init_rpc(runtime.rpc_name(rank, trainers), rank, world)
    arm_kills(args.kill, rank)  # every process is up: the trainers build their engines, then train
    if rank >= trainers:
        arm_rollout_step_kills(args.kill_step, rank, ext)
    if rank >= trainers:  # a rollout worker: its actor runs inside RPC threads until trainer rank 0 is done
        rpc.shutdown()
        return
    stop_on_rollout_failure(run_trainer, args, ds_config, cfg, task, False, rank, world, state)
    rpc.shutdown()


def stop_on_rollout_failure(fn, *args) -> None:
    """Run ``fn``; a rollout failure (the user's reward raised: the message names the prompt and has the
    traceback) ends this process with exit 1 at once, so no process waits on a group that will not come (torch
    elastic then stops the other ranks)."""
    import sys
    from ds_ext.asyncflow.queue import RolloutFailed
    try:
        fn(*args)
    except (RolloutFailed, RewardError) as exc:
        print(f"grpo: the rollout failed: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


def run_trainer(args, ds_config, cfg, task, sync: bool, rank: int, world: int, state=None) -> None:
    trainers = cfg.trainer_ranks
    state = state if state is not None else warm_start(args, task)
    engine = trainer_engine(args, ds_config, state, rank, trainers)
    start = engine.global_steps  # > 0 when the journal resumed the engine
    if start >= args.steps and rank == 0:
        print(f"grpo: the journal already reached step {start} >= --steps {args.steps}: nothing to train (remove "
              "ds_ext.recovery.journal_dir to start over, or raise --steps)", flush=True)
    arm_step_kills(args.kill_step, rank, engine)
    factory = runtime.model_factory_for(build_model, args.hidden, args.layers, None, args.model)
    bar = tqdm(total=args.steps, initial=start, desc="grpo", dynamic_ncols=True, disable=rank > 0)

    def progress(m):
        engine.monitor.write_events([("GRPO/reward", m["reward"], m["step"]), ("GRPO/max_lag", m["max_lag"], m["step"])])
        bar.set_postfix(reward=f"{m['reward']:.3f}", lag=m["max_lag"])
        bar.update(1)

    t = time.perf_counter()
    if sync:
        result = runtime.run_sync(engine, factory, task, cfg, args.steps, progress)
    else:
        topo = engine.topology
        result = runtime.run_async_trainer(engine, factory, task, cfg, args.steps,
                                           runtime.worker_names(world, trainers), progress, start, rank, trainers,
                                           lambda r: topo.coords(r)[0], topo.num_replicas)
    bar.close()
    ledger = next((f for f in engine.ds_ext_features if f.name == "asyncflow"), None)
    trained = ledger.trained_prompts() if ledger is not None else []
    if args.ledger_out and ledger is not None:
        os.makedirs(args.ledger_out, exist_ok=True)
        with open(os.path.join(args.ledger_out, f"ledger_rank{rank}.json"), "w") as f:
            json.dump({"steps": {str(k): v for k, v in sorted(ledger.steps.items())},
                       "rewards": {str(k): v for k, v in sorted(ledger.rewards.items())}}, f)
    if trainers > 1:  # report the reward of every trainer rank's samples, not only rank 0's share
        average_rewards_over_trainers(result["history"], trainers)
    engine.ds_ext_close()
    if rank == 0:
        report(args, cfg, sync, result, time.perf_counter() - t, start, trained)


def average_rewards_over_trainers(history: list, trainers: int) -> None:
    """Replace each step's reward (this rank's samples) by the mean over all trainer ranks (collective)."""
    import torch.distributed as dist
    gathered = [None] * trainers
    dist.all_gather_object(gathered, {h["step"]: h["reward"] for h in history})
    for h in history:
        h["reward"] = sum(g[h["step"]] for g in gathered) / trainers


def report(args, cfg, sync: bool, result: dict, seconds: float, start: int, trained: list) -> None:
    hist = result["history"]
    plot(hist, args.plot, f"GRPO, max_staleness={cfg.max_staleness if not sync else 0}")
    head = sum(h["reward"] for h in hist[:5]) / max(1, min(5, len(hist)))
    tail = sum(h["reward"] for h in hist[-5:]) / max(1, min(5, len(hist)))
    responses = (args.steps - start) * cfg.groups_per_step * cfg.group_size
    print(json.dumps({"mode": "sync" if sync else "async", "steps": args.steps, "start_step": start,
                      "reward_first5": head, "reward_last5": tail,
                      "samples_per_s": responses / max(result["seconds"], 1e-9),
                      "trainer_idle_fraction": result["trainer_idle_s"] / max(result["seconds"], 1e-9),
                      "max_observed_staleness": result["queue"]["max_lag"],
                      "lag_histogram": result["queue"]["lag_histogram"], "seconds": seconds,
                      "generate_s": sum(r["generate_s"] for r in result["rollout"]),
                      "rollout_wait_s": sum(r["wait_s"] for r in result["rollout"]),
                      "train_loop_s": result["seconds"], "train_busy_s": result["train_busy_s"],
                      "rank0_trained_groups": len(trained), **rollout_metrics(cfg, result, hist)}))


def rollout_metrics(cfg, result: dict, hist: list) -> dict:
    """Continuous batching's decode fill (over every rollout worker that ran slots) and the off-policy weights."""
    slots = [r for r in result["rollout"] if r.get("decode_steps")]
    out = {"is_weight_mean": sum(h.get("is_weight_mean", 1.0) for h in hist) / max(1, len(hist)),
           "is_truncated_fraction": sum(h.get("is_truncated_fraction", 0.0) for h in hist) / max(1, len(hist)),
           "mean_token_lag": sum(h.get("mean_token_lag", 0.0) for h in hist) / max(1, len(hist))}
    if slots:
        out["decode_fill_fraction"] = (sum(r["busy_slot_steps"] for r in slots)
                                       / max(1, sum(r["decode_steps"] for r in slots) * cfg.rollout_slots))
        out["decode_starved_steps"] = sum(r["starved_steps"] for r in slots)
        out["decode_steps"] = sum(r["decode_steps"] for r in slots)
    return out


if __name__ == "__main__":
    main()
