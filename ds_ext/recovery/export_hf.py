"""``python -m ds_ext.recovery export JOURNAL_DIR --hf OUT [--replica R] [--tokenizer DIR]``: the consolidated fp32
weights of one replica at the newest step its ranks' journals reach, written as ``save_pretrained`` writes them
(``model.safetensors``, ``config.json``) plus the tokenizer files: a directory ``from_pretrained`` loads.

What it needs is in the journal (:mod:`ds_ext.recovery.meta`, written by runs of :class:`ds_ext.models.hf.HFCausalLM`):
the HF config (no model directory needed) and the tokenizer directory (``--tokenizer DIR`` overrides it, e.g. when
the directory moved). Replica R is global ranks ``R * ranks_per_replica ...`` (the topology's layout); one local
process per rank of that replica (gloo, CPU) builds a parameters-only module and a stock DeepSpeed engine with the
run's config, loads base + records exactly as a resume does (:func:`ds_ext.recovery.resume.replay_journal`; NoLoCo /
DiLoCo outer steps are replayed from their recorded payloads, no partner needed), assembles each parameter's fp32
master from the ZeRO partitions (:func:`ds_ext.models.hf.gather_fp32_state`); the exporting process writes the
directory.
Pipeline-engine journals (``ds_ext.models.hf_pipeline.HFPipelineModule`` records the same HF meta): each stage's
data-parallel ranks are replayed as their own ZeRO group and the stages' parameter names are mapped to HF names by
``ds_ext.models.hf_pipeline.pipeline_state_to_hf``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

from ds_ext.recovery.export import _free_port, journal_ranks, newest_common_step, replayed_engine
from ds_ext.recovery.meta import read_export_meta


def replayed_features(meta: Dict[str, Any], engine, global_rank: int) -> Dict[str, Any]:
    """The features whose journal payloads change the weights, rebuilt for replay only (no network)."""
    noloco = (meta.get("ds_ext") or {}).get("noloco") or {}
    if not noloco.get("enabled"):
        return {}
    from ds_ext.noloco.config import NoLoCoConfig
    from ds_ext.noloco.feature import FP32Shards, NoLoCoFeature
    from ds_ext.topology import Topology
    topology = Topology(**meta["topology"])
    return {"noloco": NoLoCoFeature(NoLoCoConfig.model_validate(noloco), topology, global_rank, FP32Shards(engine),
                                    peer_group=None)}


def _export_rank(rank: int, rank_dirs: List[str], first: int, state_out: str, target: int, port: int) -> None:
    """One rank of one ZeRO group (``rank_dirs``; global ranks ``first + rank``): replay its journal to ``target``
    and, on the group's rank 0, save the gathered fp32 state (parameter names as the run's module has them)."""
    import deepspeed
    import torch
    from ds_ext.models.hf import gather_fp32_state
    _, module = replayed_engine(rank, rank_dirs, target, port,
                                lambda meta, engine: replayed_features(meta, engine, first + rank))
    state = gather_fp32_state(module)
    if rank == 0:
        torch.save(state, state_out)
    deepspeed.comm.barrier()


def _replayed_state(rank_dirs: List[str], first: int, target: int) -> Dict[str, Any]:
    """The fp32 state of one ZeRO group's module at ``target`` (one local process per rank, gloo)."""
    import tempfile
    import torch
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")
        mp.start_processes(_export_rank, args=(rank_dirs, first, path, target, _free_port()),
                           nprocs=len(rank_dirs), start_method="spawn")
        return torch.load(path, weights_only=True)


def _replica_state(rank_dirs: List[str], meta: Dict[str, Any], replica: int, target: int) -> Dict[str, Any]:
    """HF parameter name -> fp32 weight of replica ``replica``. Without a pipeline its ranks are one ZeRO group;
    with one, each stage's data-parallel ranks are replayed as their own group and the stages' parameters are
    mapped to HF names by :func:`ds_ext.models.hf_pipeline.pipeline_state_to_hf`."""
    from ds_ext.topology import Topology
    topology = Topology(**meta["topology"])
    if not meta["pipeline"]:
        first = replica * topology.ranks_per_replica
        return _replayed_state(rank_dirs[first:first + topology.ranks_per_replica], first, target)
    from ds_ext.models.hf_pipeline import pipeline_state_to_hf
    merged: Dict[str, Any] = {}
    for stage in range(topology.pipeline_stages):
        ranks = [topology.rank_of(replica, stage, d) for d in range(topology.data_parallel_size)]
        merged.update(_replayed_state([rank_dirs[r] for r in ranks], ranks[0], target))
    config = meta["hf"]["config"]
    return pipeline_state_to_hf(merged, config["num_hidden_layers"], bool(config.get("tie_word_embeddings")))


def export_hf(journal_dir: str, out: str, replica: int = 0, tokenizer_dir: str = None, step: int = None) -> int:
    """Write replica ``replica``'s HF model directory to ``out`` at ``step`` (default: the newest step its ranks'
    journals reach; an older one needs its base still kept, ``keep_bases``); returns the step exported."""
    from ds_ext.models.hf import load_tokenizer, save_hf_state
    rank_dirs = journal_ranks(journal_dir)
    meta = read_export_meta(rank_dirs[0])
    if not meta.get("hf"):
        raise SystemExit(f"ds_ext.recovery export --hf: {journal_dir} was not written by an HF model run (no HF "
                         "config in its EXPORT.bin); export it as a DeepSpeed checkpoint instead")
    topo = meta["topology"]
    if topo["world_size"] != len(rank_dirs):
        raise SystemExit(f"ds_ext.recovery export --hf: {journal_dir} holds {len(rank_dirs)} rank journals but the "
                         f"run had {topo['world_size']} ranks")
    replicas = topo["world_size"] // topo["ranks_per_replica"]
    if not 0 <= replica < replicas:
        raise SystemExit(f"ds_ext.recovery export --hf: --replica {replica}: this journal has {replicas} "
                         f"replica(s), 0..{replicas - 1}")
    tokenizer_dir = tokenizer_dir or meta["hf"]["tokenizer_dir"]
    if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
        raise SystemExit(f"ds_ext.recovery export --hf: the run's tokenizer directory {tokenizer_dir} is gone; "
                         "pass --tokenizer DIR")
    first = replica * topo["ranks_per_replica"]
    target = newest_common_step(rank_dirs[first:first + topo["ranks_per_replica"]])
    if step is not None:
        if not 0 <= step <= target:
            raise SystemExit(f"ds_ext.recovery export --hf: --step {step}: this journal reaches steps up to {target}")
        target = step
    state = _replica_state(rank_dirs, meta, replica, target)
    save_hf_state(state, meta["hf"]["config"], load_tokenizer(tokenizer_dir), out)
    return target
