"""TRL's GRPOTrainer with ``use_vllm=True`` (colocate mode) on the setting of ``benchmarks/asyncflow_vllm.py``:
the same generated Qwen2 directory, prompts, reward (share of vowels), G = 8, 8 prompts per step, at most
``--max_new_tokens`` tokens, DAPO loss with clip-higher, AdamW lr 2e-3, ``bf16=False``,
``gradient_checkpointing=False``, logging off, one process with ``--threads`` threads.

    python benchmarks/asyncflow_trl_vllm.py --model DIR --prompts prompts.jsonl --steps 8

    python benchmarks/asyncflow_trl_vllm.py --smoke   # CI size: generated model and prompts, 1 step, 16 tokens, eager

``--enforce_eager`` builds TRL's colocated engine with vLLM's ``enforce_eager=True`` (no inductor compile: ~11 s
instead of ~25 s on a cold compile cache, decoding slower), as ``asyncflow.rollout.enforce_eager`` does for ours;
``benchmarks/asyncflow_vllm.py --enforce_eager`` passes it on, so both sides of a comparison match. TRL 1.16 has no
option for it: its engine constructor (``trl.generation.vllm_generation.LLM``) is wrapped.

Prints one JSON line: samples per second timed from model load to the last step (``samples_per_s``) and over
``trainer.train()`` (``train_samples_per_s``); or ``{"error": ...}`` with the exception when TRL cannot run vLLM here
(``benchmarks/asyncflow_vllm.py`` reports it as ``trl_vllm_error``); ``{"skipped": ...}`` without TRL installed.
Without ``--model`` / ``--prompts`` it generates both as ``benchmarks/asyncflow_vllm.py`` does.

Last-line JSON keys:
- `skipped`: why nothing ran (trl is not installed); then the only key
- `mode`: "trl_vllm"
- `trl_version`: TRL's version
- `threads`: --threads
- `samples_per_s`: steps x 64 responses over model load .. last step
- `train_samples_per_s`: the same over `trainer.train()`
- `enforce_eager`: whether the engine TRL built runs eager (read back from it; true with --enforce_eager)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _keys import parse_with_smoke  # noqa: E402

SMOKE = {"steps": 1, "max_new_tokens": 16, "enforce_eager": True}
NO_TRL = "trl is not installed (an optional extra: pip install -e .[trl])"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a transformers model directory (default: a generated Qwen2)")
    p.add_argument("--prompts", default=None, help="JSONL prompts (default: generated)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=192)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--enforce_eager", action="store_true", help="TRL's vLLM engine without torch.compile")
    return parse_with_smoke(p, argv, SMOKE)


def run(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # colocate mode joins torch.distributed as a one-rank world (the launcher's variables)
    os.environ.update({k: v for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29731"}.items()
                       if k not in os.environ})
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    built = {"enforce_eager": False}
    if args.enforce_eager:
        eager_engine(built)
    with open(args.prompts) as f:
        rows = [json.loads(line) for line in f][: args.steps * 8]
    data = Dataset.from_dict({"prompt": [r["prompt"] for r in rows]})

    def vowels(completions, **_):
        return [sum(c in "aeiou " for c in s) / max(1, len(s)) for s in completions]

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=64, gradient_accumulation_steps=1,
                         num_generations=8, max_completion_length=args.max_new_tokens, temperature=1.0,
                         learning_rate=2e-3, weight_decay=0.0, max_grad_norm=1.0, beta=0.0, loss_type="dapo",
                         epsilon=0.2, epsilon_high=0.28, max_steps=args.steps, logging_strategy="no",
                         report_to=[], use_cpu=True, save_strategy="no", bf16=False, gradient_checkpointing=False,
                         lr_scheduler_type="constant", disable_tqdm=True, use_vllm=True, vllm_mode="colocate",
                         vllm_gpu_memory_utilization=0.3, vllm_enable_sleep_mode=False)
        trainer = GRPOTrainer(model=args.model, reward_funcs=vowels, args=cfg, train_dataset=data)
        t = time.perf_counter()
        trainer.train()
        end = time.perf_counter()
    n = args.steps * 64
    return {"mode": "trl_vllm", "trl_version": __import__("trl").__version__, "threads": args.threads,
            "samples_per_s": n / (end - t0), "train_samples_per_s": n / (end - t), **built}


def eager_engine(built: dict) -> None:
    """TRL's colocated engine built with ``enforce_eager=True`` (TRL 1.16 passes a fixed argument list to
    ``vllm.LLM``; the name it calls is replaced by one that adds the flag). ``built["enforce_eager"]`` is then read
    back from the engine TRL built (the smoke test checks it: a TRL that builds its engine elsewhere fails it)."""
    import trl.generation.vllm_generation as gen
    if not hasattr(gen, "LLM"):
        raise RuntimeError("--enforce_eager: trl.generation.vllm_generation.LLM is gone in this TRL version")
    real = gen.LLM

    def llm(*args, **kwargs):
        engine = real(*args, **dict(kwargs, enforce_eager=True))
        built["enforce_eager"] = bool(engine.llm_engine.vllm_config.model_config.enforce_eager)
        return engine

    gen.LLM = llm


def main(argv=None) -> dict:
    args = parse_args(argv)
    if importlib.util.find_spec("trl") is None:
        res = {"skipped": NO_TRL}
        print(json.dumps(res))
        return res
    try:
        if args.model is None or args.prompts is None:
            import asyncflow_vllm
            work = tempfile.mkdtemp(prefix="ds_ext_trl_vllm_")
            args.model = args.model or asyncflow_vllm.make_inputs(work)
            args.prompts = args.prompts or os.path.join(work, "prompts.jsonl")
        res = run(args)
    except Exception as exc:  # noqa: BLE001 -- reported: why TRL cannot run vLLM here
        res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
