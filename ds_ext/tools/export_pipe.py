"""Export of pipeline-engine journals: one replay of one replica's ranks gives the DeepSpeed pipeline checkpoint
(``export JOURNAL OUT``), the HF model's fp32 weights (``export JOURNAL --hf DIR``), or both at once.

What the run's ``PipelineModule`` looked like is in each rank's ``EXPORT.bin`` (:mod:`ds_ext.recovery.meta`):
``pipeline_layout`` (:func:`ds_ext._deepspeed.pipeline_layout`: the stage count, the layer index each stage starts at,
each layer's kind: a layer with parameters under ``<index>.``, a tied layer under ``tied_modules.<key>.`` with its
tied attribute, or a function) and the rank's parameter names, shapes, buffers and ZeRO groups. The exporter starts
one local process per rank of the replica (gloo, CPU; local rank ``l`` replays run rank ``replica *
ranks_per_replica + l``, the same stage and data index, since both layouts are row-major ``(pipe, data)``), builds a
``PipelineModule`` on DeepSpeed's ``PipeDataParallelTopology`` whose layers are parameters-only modules holding the
run's parameters under the run's names (:func:`pipeline_layers`), with each stage holding the run's layers
(:func:`ds_ext._deepspeed.pipeline_module_with_layout`), a stock DeepSpeed ``PipelineEngine`` with the run's config
(so each stage's ZeRO group partitions as it did), and replays the journal into it as a resume does
(:func:`ds_ext.tools.export_base.replay_into`). Then:

* DeepSpeed checkpoint: the engine's own ``save_checkpoint(OUT, tag)`` writes it (``layer_XX-model_states.pt``
  per layer, ``mp_rank_XX_model_states.pt`` per stage, each stage's ZeRO optimizer partitions, ``latest``). A
  ``PipelineEngine`` with the same stage count and the same layer specs loads it with ``load_checkpoint``; the
  layer files are named after the global layer index (no replica axis), as a plain DeepSpeed pipeline writes them.
* HF weights: the fp32 masters gathered as ``--save_hf`` gathers them
  (:func:`ds_ext.models.hf_pipeline.gather_hf_state_dict`), under HF names.

Journals written before ``pipeline_layout`` was recorded: the DeepSpeed form is refused, naming what is missing;
``--hf`` replays each stage as its own ZeRO group instead (:mod:`ds_ext.tools.export_hf`).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from ds_ext import _deepspeed as ds
from ds_ext.distributed import free_port
from ds_ext.recovery.meta import EXPORT_FILE, read_export_meta
from ds_ext.tools.export_base import (ShapeOnlyModule, export_step, exporter_process, journal_ranks, param_groups,
                                      replay_into, replica_rank_dirs, start_exporters)


def pipeline_layout_of(meta: Dict[str, Any], rank_dir: str) -> Dict[str, Any]:
    """The recorded ``pipeline_layout`` of a pipeline journal's rank; refuses (``SystemExit``) a journal without one,
    naming what is missing and what to do."""
    layout = meta.get("pipeline_layout")
    if not layout:
        raise SystemExit(f"ds_ext.recovery export: {os.path.join(rank_dir, EXPORT_FILE)} of this pipeline journal "
                         "records no pipeline_layout (the stage count, the layer each stage starts at and each "
                         "layer's kind), which a DeepSpeed pipeline checkpoint needs; the journal was written by an "
                         "older ds_ext. Export it with --hf DIR (HF model runs), or resume the job with this ds_ext "
                         "(its journal then records the layout) and export again or call save_checkpoint")
    return layout


def _under(meta: Dict[str, Any], prefix: str) -> Tuple[Dict[str, list], Dict[str, Any]]:
    """This rank's parameter shapes and buffers whose names start with ``prefix``, the prefix cut off."""
    cut = len(prefix)
    return ({n[cut:]: v for n, v in meta["shapes"].items() if n.startswith(prefix)},
            {n[cut:]: v for n, v in meta["buffers"].items() if n.startswith(prefix)})


def _function_layer(x):
    """Stands for a layer that is a plain function in the run (no state; the exporter runs no forward)."""
    return x


def pipeline_layers(meta: Dict[str, Any]) -> List[Any]:
    """The run's layer specs as parameters-only modules: a ``LayerSpec`` of :class:`ShapeOnlyModule` holding the
    parameters and buffers named ``<index>.*`` (this rank's only: other stages' specs are never built), a
    ``TiedLayerSpec`` with the run's key and tied attribute holding ``tied_modules.<key>.*``, a function for a
    function. Built inside a ``PipelineModule`` the names are the run's."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    specs: List[Any] = []
    for index, layer in enumerate(meta["pipeline_layout"]["layers"]):
        if layer["kind"] == "tied":
            specs.append(TiedLayerSpec(layer["key"], ShapeOnlyModule, *_under(meta, f"tied_modules.{layer['key']}."),
                                       tied_weight_attr=layer["tied_weight_attr"]))
        elif layer["kind"] == "module":
            specs.append(LayerSpec(ShapeOnlyModule, *_under(meta, f"{index}.")))
        else:
            specs.append(_function_layer)
    return specs


def _pipeline_rank(rank: int, rank_dirs: List[str], first: int, target: int, port: int,
                   feature_types: Dict[str, type], out: Optional[str], tag: str, state_out: Optional[str]) -> None:
    """Local rank ``rank`` of the exporter group of one replica (``rank_dirs``: its ranks' journals, run ranks
    ``first + l``): build the pipeline engine, replay, then save the checkpoint to ``out`` and/or the HF state to
    ``state_out`` (local rank 0). Every step is collective over the group."""
    exporter_process(rank, len(rank_dirs), port)
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
    deepspeed.init_distributed(dist_backend="gloo")
    meta = read_export_meta(rank_dirs[rank])
    layout = pipeline_layout_of(meta, rank_dirs[rank])
    stages = layout["num_stages"]
    topology = PipeDataParallelTopology(num_pp=stages, num_dp=len(rank_dirs) // stages)
    module = ds.pipeline_module_with_layout(pipeline_layers(meta), topology, layout["stage_starts"])
    if ds.pipeline_layout(module)["stage"] != layout["stage"]:
        raise RuntimeError(f"exporter rank {rank} is stage {ds.pipeline_layout(module)['stage']}, but "
                           f"{rank_dirs[rank]} is the journal of stage {layout['stage']}")
    engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, meta),
                                      config=meta["ds_config"])
    replay_into(engine, meta, rank_dirs[rank], target, first + rank, feature_types)
    if out is not None:
        engine.save_checkpoint(out, tag=tag)
    if state_out is not None:
        import torch
        from ds_ext.models.hf_pipeline import gather_hf_state_dict
        from ds_ext.topology import Topology
        config = meta["hf"]["config"]
        state = gather_hf_state_dict(module, Topology(len(rank_dirs), len(rank_dirs), stages),
                                     config["num_hidden_layers"], bool(config.get("tie_word_embeddings")))
        if rank == 0:
            torch.save(state, state_out)
    deepspeed.comm.barrier()


def export_pipeline(journal_dir: str, out: Optional[str] = None, tag: Optional[str] = None, hf_state: bool = False,
                    replica: int = 0, step: Optional[int] = None,
                    feature_types: Optional[Dict[str, type]] = None) -> Tuple[int, str, Optional[Dict[str, Any]]]:
    """Replay replica ``replica`` of the pipeline journal ``journal_dir`` to ``step`` (default: the newest its ranks
    reach) once; write its DeepSpeed checkpoint to ``out`` under ``tag`` (default ``global_step<N>``) when given, and
    return its HF-named fp32 state when ``hf_state``. Returns ``(step, tag, state or None)``. Refuses (``SystemExit``)
    a journal without a recorded layout, a replica it does not have and a step some rank cannot reach."""
    import torch
    rank_dirs = journal_ranks(journal_dir)
    meta = read_export_meta(rank_dirs[0])
    pipeline_layout_of(meta, rank_dirs[0])
    first, mine = replica_rank_dirs(journal_dir, rank_dirs, meta["topology"], replica, "ds_ext.recovery export")
    target = export_step(mine, step, feature_types)
    tag = tag or f"global_step{target}"
    with tempfile.TemporaryDirectory() as tmp:
        state_out = os.path.join(tmp, "state.pt") if hf_state else None
        start_exporters(_pipeline_rank, (mine, first, target, free_port(), feature_types or {}, out, tag, state_out),
                        len(mine))
        state = torch.load(state_out, weights_only=True) if hf_state else None
    return target, tag, state
