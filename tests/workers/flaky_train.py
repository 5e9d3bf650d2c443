"""A worker for the launcher tests: trains the tiny reference model for 2 steps through ds_ext.initialize.

On the first attempt of an elastic run (TORCHELASTIC_RESTART_COUNT=0) the rank named by --die_rank kills itself
with SIGKILL after its first step; restarted workers finish and write ``<out>/rank<R>.json``.
"""
import argparse
import json
import os
import signal

import deepspeed
import torch

import ds_ext
from ds_ext.models import LlamaForCausalLM, ModelConfig

p = argparse.ArgumentParser()
p.add_argument("--local_rank", type=int, default=-1)
p.add_argument("--out", required=True)
p.add_argument("--die_rank", type=int, default=-1)
deepspeed.add_config_arguments(p)
args = p.parse_args()
torch.set_num_threads(1)
torch.manual_seed(0)
model = LlamaForCausalLM(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1))
engine, *_ = ds_ext.initialize(args=args, model=model, model_parameters=model.parameters())
rank, attempt = deepspeed.comm.get_rank(), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, f"started.{rank}.{attempt}"), "w"):
    pass
for step in range(2):
    x = torch.randint(0, 256, (engine.train_micro_batch_size_per_gpu(), 9))
    for _ in range(engine.gradient_accumulation_steps()):
        engine.backward(engine(x[:, :-1], x[:, 1:]))
        engine.step()
    if attempt == 0 and rank == args.die_rank:
        os.kill(os.getpid(), signal.SIGKILL)
with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "attempt": attempt, "world": deepspeed.comm.get_world_size(),
               "engine": type(engine).__name__, "steps": engine.global_steps}, f)
