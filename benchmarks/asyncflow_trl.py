"""TRL's GRPOTrainer on the AsyncFlow peer-comparable setting (run by ``benchmarks/asyncflow.py`` when ``trl`` is
installed; it is an optional extra, not a dependency).

    python benchmarks/asyncflow_trl.py --steps 10 --sft_state runs/grpo_sft.pt.hf...

The same transformers ``LlamaForCausalLM`` (size, warm-start weights), the same byte ids (through
:func:`ds_ext.asyncflow.hf_policy.byte_tokenizer_hf`), the same prompts ``"a+b="`` (2-digit ``a, b``, by index as
ours), G = 8, 16 prompts per step, at most 8 new tokens, temperature 1, DAPO loss with clip-higher (0.2 / 0.28),
no KL, AdamW lr 3e-4, one process with ``--threads`` torch threads (the whole budget). Prints one JSON line:
samples per second over ``trainer.train()`` and the mean reward of the first / last 5 steps.

    python benchmarks/asyncflow_trl.py --smoke   # CI size: 2 steps, hidden 32, 1 layer, no warm start

Without ``trl`` installed it prints ``{"skipped": "trl is not installed ..."}`` and exits 0.

Last-line JSON keys:
- `skipped`: why nothing ran (trl is not installed); then the only key
- `mode`: "trl"
- `trl_version`: TRL's version
- `steps`: --steps
- `threads`: --threads
- `seconds`: wall time of trainer.train()
- `samples_per_s`: steps x 128 / seconds
- `reward_first5`: mean reward of the first 5 steps
- `reward_last5`: mean reward of the last 5 steps
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _keys import parse_with_smoke  # noqa: E402

SMOKE = {"steps": 2, "hidden": 32, "layers": 1}
NO_TRL = "trl is not installed (an optional extra: pip install -e .[trl])"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--sft_state", default=None, help="warm-start state of examples/grpo.py --peer (HFPolicy keys)")
    p.add_argument("--seed", type=int, default=0)
    return parse_with_smoke(p, argv, SMOKE)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if importlib.util.find_spec("trl") is None:
        print(json.dumps({"skipped": NO_TRL}))
        return {"skipped": NO_TRL}
    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from ds_ext.asyncflow.hf_policy import byte_tokenizer_hf, tiny_llama
    from ds_ext.grpo.task import AdditionPrompts
    model = tiny_llama(args.hidden, args.layers)
    if args.sft_state:
        state = torch.load(args.sft_state, weights_only=True)
        model.load_state_dict({k[len("hf."):]: v for k, v in state.items()})
    prompts = AdditionPrompts(min_operand=10, max_operand=99, instruction="", seed=args.seed)
    records = [prompts.record(i) for i in range(args.steps * 16)]
    data = Dataset.from_dict({"prompt": ["<bos>" + r.text for r in records],
                              "answer": [r.metadata["answer"] for r in records]})

    def exact_sum(completions, answer, **_):
        return [float(c == a) for c, a in zip(completions, answer)]

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=128, gradient_accumulation_steps=1,
                         num_generations=8, max_completion_length=8, temperature=1.0, learning_rate=3e-4,
                         adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0, beta=0.0, loss_type="dapo",
                         epsilon=0.2, epsilon_high=0.28, max_steps=args.steps, logging_steps=1, report_to=[],
                         use_cpu=True, save_strategy="no", seed=args.seed, shuffle_dataset=False,
                         lr_scheduler_type="constant", warmup_steps=0, disable_tqdm=True)
        trainer = GRPOTrainer(model=model, reward_funcs=exact_sum, args=cfg, train_dataset=data,
                              processing_class=byte_tokenizer_hf())
        t = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    res = {"mode": "trl", "trl_version": __import__("trl").__version__, "steps": args.steps,
           "threads": args.threads, "seconds": seconds, "samples_per_s": args.steps * 128 / seconds,
           "reward_first5": sum(rewards[:5]) / max(1, len(rewards[:5])),
           "reward_last5": sum(rewards[-5:]) / max(1, len(rewards[-5:]))}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
