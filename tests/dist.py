"""Run a test body on N real processes over torch.distributed (gloo), the way DeepSpeed's ``DistributedTest`` does.

    results = run_distributed(body, world_size=2, args=(stage,))

``body`` must be a module-level function (it is pickled into spawned processes). Each process gets the
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` environment, ``DS_ACCELERATOR=cpu`` and its share of the CPU
cores as torch threads; ``deepspeed.initialize`` or ``dist.init_process_group("gloo")`` inside the body finds
them. The returned list holds each rank's return value (anything ``torch.save`` can write). An exception in any
rank fails the caller with that rank's traceback; a hang fails it after ``timeout`` seconds, all ranks killed.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, body, args, world_size: int, port: int, out_dir: str, env: dict):
    os.environ.update(env)
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "LOCAL_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        result = body(*args)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{local_rank}.pt"))


def run_distributed(body, world_size: int = 2, args: tuple = (), timeout: float = 300.0, env: dict = None) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(body, args, world_size, free_port(), out_dir, dict(env or {})),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{body.__name__} on {world_size} ranks did not finish in {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
