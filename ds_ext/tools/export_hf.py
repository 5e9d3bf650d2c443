"""``python -m ds_ext.recovery export JOURNAL_DIR --hf OUT [--replica R] [--tokenizer DIR]``: the consolidated fp32
weights of one replica at the newest step its ranks' journals reach, written as ``save_pretrained`` writes them
(``model.safetensors``, ``config.json``) plus the tokenizer files: a directory ``from_pretrained`` loads.

What it needs is in the journal (:mod:`ds_ext.recovery.meta`, written by runs of :class:`ds_ext.models.hf.HFCausalLM`):
the HF config (no model directory needed) and the tokenizer directory (``--tokenizer DIR`` overrides it, e.g. when
the directory moved). Replica R is global ranks ``R * ranks_per_replica ...`` (the topology's layout); one local
process per rank of that replica (gloo, CPU) builds a parameters-only module and a stock DeepSpeed engine with the
run's config, loads base + records exactly as a resume does (:func:`ds_ext.recovery.resume.replay_journal`; feature
payloads as each feature declares, :func:`ds_ext.tools.export.export_features`: NoLoCo / DiLoCo outer steps from
their recorded payloads, no partner needed; CheckFree's learning-rate scaling of rebuilt stages), assembles each parameter's fp32
master from the ZeRO partitions (:func:`ds_ext.models.hf.gather_fp32_state`); the exporting process writes the
directory.
Pipeline-engine journals (``ds_ext.models.hf_pipeline.HFPipelineModule`` records the same HF meta): the replica's
ranks are replayed as one pipeline engine (:func:`ds_ext.tools.export_pipe.export_pipeline`, which can write the
DeepSpeed checkpoint from the same replay: ``also_checkpoint``) and its fp32 masters gathered as ``--save_hf``
gathers them; journals written before the pipeline layout was recorded replay each stage's data-parallel ranks as
their own ZeRO group and map the stages' parameter names to HF names by
``ds_ext.models.hf_pipeline.pipeline_state_to_hf``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from ds_ext.distributed import free_port
from ds_ext.recovery.meta import read_export_meta
from ds_ext.tools.export import export
from ds_ext.tools.export_base import export_step, journal_ranks, replayed_engine, replica_rank_dirs, start_exporters
from ds_ext.tools.export_pipe import export_pipeline, pipeline_layout_of


def _export_rank(rank: int, rank_dirs: List[str], first: int, state_out: str, target: int, port: int,
                 feature_types: Dict[str, type]) -> None:
    """One rank of one ZeRO group (``rank_dirs``; global ranks ``first + rank``): replay its journal to ``target``
    and, on the group's rank 0, save the gathered fp32 state (parameter names as the run's module has them)."""
    import deepspeed
    import torch
    from ds_ext.models.hf import gather_fp32_state
    _, module = replayed_engine(rank, rank_dirs, target, port, first + rank, feature_types)
    state = gather_fp32_state(module)
    if rank == 0:
        torch.save(state, state_out)
    deepspeed.comm.barrier()


def _replayed_state(rank_dirs: List[str], first: int, target: int, feature_types: Dict[str, type]) -> Dict[str, Any]:
    """The fp32 state of one ZeRO group's module at ``target`` (one local process per rank, gloo)."""
    import tempfile
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")
        start_exporters(_export_rank, (rank_dirs, first, path, target, free_port(), feature_types), len(rank_dirs))
        return torch.load(path, weights_only=True)


def _replica_state(rank_dirs: List[str], meta: Dict[str, Any], replica: int, target: int,
                   feature_types: Dict[str, type]) -> Dict[str, Any]:
    """HF parameter name -> fp32 weight of replica ``replica``. Without a pipeline its ranks are one ZeRO group;
    with one, each stage's data-parallel ranks are replayed as their own group and the stages' parameters are
    mapped to HF names by :func:`ds_ext.models.hf_pipeline.pipeline_state_to_hf`."""
    from ds_ext.topology import Topology
    topology = Topology(**meta["topology"])
    if not meta["pipeline"]:
        first = replica * topology.ranks_per_replica
        return _replayed_state(rank_dirs[first:first + topology.ranks_per_replica], first, target, feature_types)
    from ds_ext.models.hf_pipeline import pipeline_state_to_hf
    merged: Dict[str, Any] = {}
    for stage in range(topology.pipeline_stages):
        ranks = [topology.rank_of(replica, stage, d) for d in range(topology.data_parallel_size)]
        merged.update(_replayed_state([rank_dirs[r] for r in ranks], ranks[0], target, feature_types))
    config = meta["hf"]["config"]
    return pipeline_state_to_hf(merged, config["num_hidden_layers"], bool(config.get("tie_word_embeddings")))


def export_hf(journal_dir: str, out: str, replica: int = 0, tokenizer_dir: str = None, step: int = None,
              feature_types: Optional[Dict[str, type]] = None, also_checkpoint: Optional[str] = None,
              tag: Optional[str] = None) -> int:
    """Write replica ``replica``'s HF model directory of ``step`` (default: the newest its ranks reach) to ``out``;
    returns the step exported. ``also_checkpoint``: also write the DeepSpeed checkpoint of that step there (tag
    ``tag``, default ``global_step<N>``), for a pipeline journal from the same replay. ``feature_types``: as
    :func:`ds_ext.tools.export.export`'s."""
    from ds_ext.models.hf import load_tokenizer, save_hf_state
    rank_dirs = journal_ranks(journal_dir)
    meta = read_export_meta(rank_dirs[0])
    if not meta.get("hf"):
        raise SystemExit(f"ds_ext.recovery export --hf: {journal_dir} was not written by an HF model run (no HF "
                         "config in its EXPORT.bin); export it as a DeepSpeed checkpoint instead")
    topo = meta["topology"]
    _, mine = replica_rank_dirs(journal_dir, rank_dirs, topo, replica, "ds_ext.recovery export --hf")
    tokenizer_dir = tokenizer_dir or meta["hf"]["tokenizer_dir"]
    if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
        raise SystemExit(f"ds_ext.recovery export --hf: the run's tokenizer directory {tokenizer_dir} is gone; "
                         "pass --tokenizer DIR")
    if meta["pipeline"] and also_checkpoint is not None:
        pipeline_layout_of(meta, rank_dirs[0])  # refused before anything is written
    if meta["pipeline"] and meta.get("pipeline_layout"):
        target, _, state = export_pipeline(journal_dir, also_checkpoint, tag, True, replica, step, feature_types)
        save_hf_state(state, meta["hf"]["config"], load_tokenizer(tokenizer_dir), out)
        return target
    target = export_step(mine, step, feature_types)
    state = _replica_state(rank_dirs, meta, replica, target, feature_types or {})
    save_hf_state(state, meta["hf"]["config"], load_tokenizer(tokenizer_dir), out)
    if also_checkpoint is not None:
        export(journal_dir, also_checkpoint, tag, target, feature_types, replica)
    return target
