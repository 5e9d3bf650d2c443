"""``python -m ds_ext.recovery export JOURNAL_DIR --hf OUT [--replica R] [--tokenizer DIR]``: the consolidated fp32
weights of one replica at the newest step its ranks' journals reach, written as ``save_pretrained`` writes them
(``model.safetensors``, ``config.json``) plus the tokenizer files: a directory ``from_pretrained`` loads.

What it needs is in the journal (:mod:`ds_ext.recovery.meta`, written by runs of :class:`ds_ext.models.hf.HFCausalLM`):
the HF config (no model directory needed) and the tokenizer directory (``--tokenizer DIR`` overrides it, e.g. when
the directory moved). Replica R is global ranks ``R * ranks_per_replica ...`` (the topology's layout); one local
process per rank of that replica (gloo, CPU) builds a parameters-only module and a stock DeepSpeed engine with the
run's config, loads base + records exactly as a resume does (:func:`ds_ext.recovery.resume.replay_journal`; NoLoCo /
DiLoCo outer steps are replayed from their recorded payloads, no partner needed), assembles each parameter's fp32
master from the ZeRO partitions (:func:`ds_ext.models.hf.gather_fp32_state`) and the first writes the directory.
Pipeline-engine journals: the stage-to-HF name mapping belongs to ``ds_ext.models.hf_pipeline`` (not handled here).
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


def _export_rank(rank: int, rank_dirs: List[str], first: int, out: str, target: int, tokenizer_dir: str,
                 port: int) -> None:
    import deepspeed
    from ds_ext.models.hf import gather_fp32_state, load_tokenizer, save_hf_state
    _, module = replayed_engine(rank, rank_dirs, target, port,
                                lambda meta, engine: replayed_features(meta, engine, first + rank))
    state = gather_fp32_state(module)
    if rank == 0:
        meta = read_export_meta(rank_dirs[rank])
        save_hf_state(state, meta["hf"]["config"], load_tokenizer(tokenizer_dir), out)
    deepspeed.comm.barrier()


def export_hf(journal_dir: str, out: str, replica: int = 0, tokenizer_dir: str = None) -> int:
    """Write replica ``replica``'s HF model directory to ``out``; returns the step exported."""
    import torch.multiprocessing as mp
    rank_dirs = journal_ranks(journal_dir)
    meta = read_export_meta(rank_dirs[0])
    if meta["pipeline"]:
        raise SystemExit("ds_ext.recovery export --hf: pipeline-engine journals need the stage-to-HF name mapping "
                         "of ds_ext.models.hf_pipeline, which this exporter does not have; resume the job and use "
                         "--save_hf instead")
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
    group = rank_dirs[first:first + topo["ranks_per_replica"]]
    target = newest_common_step(group)
    mp.start_processes(_export_rank, args=(group, first, out, target, tokenizer_dir, _free_port()),
                       nprocs=len(group), start_method="spawn")
    return target
