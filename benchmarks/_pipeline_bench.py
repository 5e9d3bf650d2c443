"""What the pipeline benchmarks share (``checkfree.py``, ``noloco_routing.py``): one spawned gloo rank's environment,
the reference model (``--hidden`` wide, ``--layers`` layers, vocabulary 259, ``--seq_len`` context) built as a DeepSpeed
``PipelineEngine`` through ``ds_ext.initialize``, a free port, and an optional lock held around a group of runs (a
shared machine: other jobs stay off the cores while a run is timed)."""
from __future__ import annotations

import contextlib
import fcntl
import os

import torch

from ds_ext.distributed import free_port  # noqa: F401 -- re-exported for the benchmarks


def rank_env(rank: int, world: int, port: int) -> None:
    """Environment of spawned gloo rank ``rank`` of ``world`` on this host; one torch thread per process."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)


def model_config(args):
    """The reference model's config from ``args.hidden``, ``args.layers``, ``args.seq_len``."""
    from ds_ext.models import ModelConfig
    return ModelConfig(vocab_size=259, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                       num_layers=args.layers, num_heads=4, num_kv_heads=2, max_seq_len=args.seq_len)


def build_engine(args, cfg: dict):
    """``(engine, topology)``: the reference model (seed 0, the same initial weights in every run) as a
    ``PipelineEngine`` laid out by ``cfg``'s ``ds_ext.topology`` (collective: every rank calls it)."""
    import ds_ext
    from ds_ext.models import llama_pipeline
    topo = ds_ext.build_topology(cfg)
    torch.manual_seed(0)
    model = llama_pipeline(model_config(args), topology=topo.process_topology())
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=cfg, topology=topo)
    return engine, topo


@contextlib.contextmanager
def maybe_locked(path):
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block; no-op when ``path`` is falsy."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
