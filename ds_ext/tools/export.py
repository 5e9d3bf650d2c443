"""``python -m ds_ext.recovery export JOURNAL_DIR OUT``: a standard DeepSpeed checkpoint of the newest step every
rank's journal reaches (or ``--step N``), written by DeepSpeed's own ``save_checkpoint``.

Each rank's journal holds ``EXPORT.bin`` (:mod:`ds_ext.recovery.meta`; one frame: the DeepSpeed config,
parameter names/shapes/dtypes in ZeRO's group order, group hyperparameters, module buffers, and for a pipeline engine
its layout). For a journal of one data-parallel ZeRO group the exporter starts one local process per journal rank
(gloo, CPU), builds a parameters-only module with those names and shapes, a stock DeepSpeed engine with the same
config (so ZeRO partitions identically), loads base + records exactly as a resume does
(:func:`ds_ext.tools.export_base.replayed_engine`), and calls ``save_checkpoint(OUT, tag)``. The result loads with
``engine.load_checkpoint`` and DeepSpeed's ``zero_to_fp32``. No model code is needed. A pipeline-engine journal
gives a DeepSpeed pipeline checkpoint of one replica (:mod:`ds_ext.tools.export_pipe`), which a ``PipelineEngine``
with the same stage count loads. Not covered: journals of several NoLoCo replicas without a pipeline (export one
replica with ``--hf``).

Feature payloads are replayed or passed over as each feature declares (see :mod:`ds_ext.tools.export_base`).
"""
from __future__ import annotations

from typing import Dict, List, Optional

from ds_ext.distributed import free_port
from ds_ext.recovery.meta import read_export_meta
from ds_ext.tools.export_base import (ShapeOnlyModule, check_payloads, export_step, journal_ranks,  # noqa: F401
                                      replayed_engine, start_exporters)
from ds_ext.tools.export_pipe import export_pipeline


def _export_rank(rank: int, rank_dirs: List[str], out: str, target: int, tag: str, port: int,
                 feature_types: Dict[str, type]) -> None:
    import deepspeed
    engine, _ = replayed_engine(rank, rank_dirs, target, port, feature_types=feature_types)
    engine.save_checkpoint(out, tag=tag)
    deepspeed.comm.barrier()


def export(journal_dir: str, out: str, tag: str = None, step: int = None,
           feature_types: Optional[Dict[str, type]] = None, replica: int = 0) -> str:
    """Write the checkpoint of ``step`` (default: the newest every rank reaches); returns its tag. ``replica``:
    which replica of a pipeline journal. Refuses journals it cannot express as one DeepSpeed checkpoint.
    ``feature_types``: see :mod:`ds_ext.tools.export_base` (none: a journal holding any feature payload is
    refused)."""
    rank_dirs = journal_ranks(journal_dir)
    meta = read_export_meta(rank_dirs[0])
    if meta["pipeline"]:
        return export_pipeline(journal_dir, out, tag, replica=replica, step=step, feature_types=feature_types)[1]
    if meta["dp_world_size"] != len(rank_dirs):
        raise SystemExit("ds_ext.recovery export: only journals of one data-parallel ZeRO group or of a pipeline "
                         f"are supported (this one: a ZeRO group of {meta['dp_world_size']} of {len(rank_dirs)} "
                         "ranks, several replicas); export one replica with --hf, or resume the job instead and "
                         "call save_checkpoint")
    target = export_step(rank_dirs, step, feature_types)
    tag = tag or f"global_step{target}"
    start_exporters(_export_rank, (rank_dirs, out, target, tag, free_port(), feature_types or {}), len(rank_dirs))
    return tag
