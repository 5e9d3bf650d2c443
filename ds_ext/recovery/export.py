"""``python -m ds_ext.recovery export JOURNAL_DIR OUT``: a standard DeepSpeed checkpoint of the newest step every
rank's journal reaches, written by DeepSpeed's own ``save_checkpoint``.

Each rank's journal holds ``EXPORT.bin`` (:mod:`ds_ext.recovery.meta`; one frame: the DeepSpeed config,
parameter names/shapes/dtypes in ZeRO's group order, group hyperparameters, module buffers). The exporter starts
one local process per journal rank (gloo, CPU), builds a parameters-only module with those names and shapes, a
stock DeepSpeed engine with the same config (so ZeRO partitions identically), loads base + records exactly as a
resume does (:func:`ds_ext.recovery.resume.replay_journal`), and calls ``save_checkpoint(OUT, tag)``. The result
loads with ``engine.load_checkpoint`` and DeepSpeed's ``zero_to_fp32``. No model code is needed. Not covered:
pipeline-engine journals and journals of several NoLoCo replicas.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ds_ext.recovery import journal, records
from ds_ext.recovery.meta import read_export_meta
from ds_ext.recovery.resume import replay_journal
from ds_ext.state.partition import ZeroPartitionState


class ShapeOnlyModule(nn.Module):
    """Parameters (zeros) and buffers under the journal's dotted names; no forward. Only for loading and saving."""

    def __init__(self, shapes: Dict[str, list], buffers: Dict[str, torch.Tensor]):
        super().__init__()
        for name, (shape, dtype) in shapes.items():
            owner, leaf = self._owner(name)
            owner.register_parameter(leaf, nn.Parameter(torch.zeros(shape, dtype=records.DTYPES[dtype])))
        for name, value in buffers.items():
            owner, leaf = self._owner(name)
            owner.register_buffer(leaf, value.clone())

    def _owner(self, name: str):
        module, *path = [self] + name.split(".")
        for part in path[:-1]:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        return module, path[-1]


def journal_ranks(journal_dir: str) -> List[str]:
    dirs = sorted(d for d in os.listdir(journal_dir) if d.startswith("rank") and d[4:].isdigit())
    if not dirs:
        raise SystemExit(f"ds_ext.recovery export: no rank<R> journal directories in {journal_dir}")
    return [os.path.join(journal_dir, d) for d in dirs]


def newest_common_step(rank_dirs: List[str]) -> int:
    scans = [journal.scan(d) for d in rank_dirs]
    for s in scans:
        for damage in s.damage:
            print(f"ds_ext.recovery export: {damage} (not used)")
    target = min(s.newest_reachable() for s in scans)
    if target < 0:
        raise SystemExit(f"ds_ext.recovery export: some rank in {os.path.dirname(rank_dirs[0])} has no usable base")
    return target


def replayed_engine(rank: int, rank_dirs: List[str], target: int, port: int,
                    features: Optional[Callable] = None):
    """Local rank ``rank`` of one exporter group (one process per journal of ``rank_dirs``, gloo, CPU): a
    parameters-only module under the journal's names, a stock DeepSpeed engine with the run's config (so ZeRO
    partitions identically) and the journal replayed into it up to ``target``. ``features(meta, engine)`` gives the
    features whose payloads are replayed too (NoLoCo's outer steps). Returns ``(engine, module)``."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(rank_dirs)),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)
    import deepspeed
    meta = read_export_meta(rank_dirs[rank])
    module = ShapeOnlyModule(meta["shapes"], meta["buffers"])
    params = dict(module.named_parameters())
    groups = [{"params": [params[n] for n in names], **hyper} for names, hyper in zip(meta["groups"], meta["hyper"])]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=groups, config=meta["ds_config"])
    replay_journal(ZeroPartitionState(engine), journal.scan(rank_dirs[rank]), target,
                   features(meta, engine) if features is not None else None)
    return engine, module


def _export_rank(rank: int, rank_dirs: List[str], out: str, target: int, tag: str, port: int) -> None:
    import deepspeed
    engine, _ = replayed_engine(rank, rank_dirs, target, port)
    engine.save_checkpoint(out, tag=tag)
    deepspeed.comm.barrier()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export(journal_dir: str, out: str, tag: str = None) -> str:
    """Write the checkpoint; returns its tag. Refuses journals it cannot express as one DeepSpeed checkpoint."""
    import torch.multiprocessing as mp
    rank_dirs = journal_ranks(journal_dir)
    meta = read_export_meta(rank_dirs[0])
    if meta["pipeline"] or meta["dp_world_size"] != len(rank_dirs):
        raise SystemExit("ds_ext.recovery export: only journals of one data-parallel ZeRO group are supported "
                         f"(this one: pipeline={meta['pipeline']}, ZeRO group of {meta['dp_world_size']} of "
                         f"{len(rank_dirs)} ranks); resume the job instead and call save_checkpoint")
    target = newest_common_step(rank_dirs)
    tag = tag or f"global_step{target}"
    mp.start_processes(_export_rank, args=(rank_dirs, out, target, tag, _free_port()),
                       nprocs=len(rank_dirs), start_method="spawn")
    return tag
