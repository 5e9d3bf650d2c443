"""``EXPORT.bin``: what the exporter (:mod:`ds_ext.tools.export`) needs besides a DeepSpeed journal, written once
into each rank's journal directory when the journal starts (one frame, :mod:`ds_ext.recovery.records`).

Contents: the DeepSpeed config (without the ``ds_ext`` block), parameter names in ZeRO's group order, their shapes
and dtypes, the groups' hyperparameters, the module's buffers, whether it is a pipeline engine and the ZeRO group
size; the ``ds_ext`` block and the topology (``world_size``, ``ranks_per_replica``, ``pipeline_stages``: which ranks
form replica R) so NoLoCo's outer steps can be replayed; and ``hf``: what the module's ``export_meta()`` returns
when it has one (:class:`ds_ext.models.hf.HFCausalLM`: the HF config and the tokenizer directory), so ``export
--hf`` needs no model directory. A pipeline engine's journal also holds ``pipeline_layout``
(:func:`ds_ext._deepspeed.pipeline_layout`: stage count, this rank's stage, the layer index each stage starts at,
each layer's kind and tied key), from which the exporter rebuilds the ``PipelineModule``; journals written before it
was recorded export to HF directories only.
"""
from __future__ import annotations

import os
from typing import Any, Dict

from ds_ext import _deepspeed as ds
from ds_ext.recovery import records
from ds_ext.state.tree import hyperparameters

EXPORT_FILE = "EXPORT.bin"


def export_meta(engine) -> Dict[str, Any]:
    """What the exporter needs besides the journal (read once when the journal starts)."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    params = {n: p for n, p in engine.module.named_parameters()}
    groups = [[names[id(p)] for p in group] for group in ds.zero_param_groups(engine.optimizer)]
    # None settings are left out: they are the optimizer's defaults when the exporter rebuilds the param groups
    hyper = [{k: v for k, v in hyperparameters(g).items() if v is not None}
             for g in ds.zero_inner_optimizer(engine.optimizer).param_groups]
    param_names = set(params)
    full_config = ds.engine_config_dict(engine)
    config = {k: v for k, v in full_config.items() if k != "ds_ext"}
    topo = getattr(engine, "topology", None)
    module_meta = getattr(engine.module, "export_meta", None)
    return {"ds_config": config, "ds_ext": full_config.get("ds_ext", {}),
            "topology": None if topo is None else {"world_size": topo.world_size,
                                                   "ranks_per_replica": topo.ranks_per_replica,
                                                   "pipeline_stages": topo.pipeline_stages},
            "hf": module_meta() if callable(module_meta) else None, "groups": groups, "hyper": hyper,
            "shapes": {n: [list(params[n].shape), str(params[n].dtype).split(".")[-1]] for g in groups for n in g},
            "buffers": {k: v.detach().clone() for k, v in engine.module.state_dict().items() if k not in param_names},
            "pipeline": ds.is_pipeline(engine),
            "pipeline_layout": ds.pipeline_layout(engine.module) if ds.is_pipeline(engine) else None,
            "dp_world_size": ds.zero_partition_count(engine.optimizer)}


def write_export_meta(rank_dir: str, meta: Dict[str, Any]) -> None:
    path = os.path.join(rank_dir, EXPORT_FILE)
    with open(path + ".tmp", "wb") as f:
        f.writelines(records.encode(records.KIND_BASE, 0, meta))
    os.replace(path + ".tmp", path)


def read_export_meta(rank_dir: str) -> Dict[str, Any]:
    for _, rec in records.read_frames(os.path.join(rank_dir, EXPORT_FILE)):
        return rec.state
    raise ValueError(f"{rank_dir}: empty {EXPORT_FILE}")
