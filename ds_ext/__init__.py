"""ds_ext: a DeepSpeed engine extension switched on by a top-level ``"ds_ext"`` block in the DeepSpeed JSON.

Three ways in, all returning what ``deepspeed.initialize`` returns (``engine, optimizer, dataloader, scheduler``):

* ``ds_ext.initialize(...)``: same arguments as ``deepspeed.initialize`` (plus an optional ``topology=``);
* ``ds_ext.register()``: afterwards ``deepspeed.initialize`` itself routes configs with a ``"ds_ext"`` block here;
* ``ds-ext --config cfg.json script.py``: the launcher validates the config, then starts the workers.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import deepspeed

from ds_ext._deepspeed import (STOCK_INITIALIZE, initialize_with_engines, replace_initialize, restore_initialize,
                               set_pipeline_model_group, ulysses_mpu)
from ds_ext.config import EXT_KEY, DsExtConfig, DsExtConfigError, load_config_file, parse_ext_config
from ds_ext.distributed import init_distributed
from ds_ext.features import attach_features
from ds_ext.engine import DsExtEngine, DsExtPipelineEngine
from ds_ext.topology import Topology

__version__ = "0.1.0"
__all__ = ["initialize", "register", "unregister", "build_topology", "DsExtConfig", "DsExtConfigError",
           "DsExtEngine", "DsExtPipelineEngine", "Topology", "__version__"]



def _resolve_config(args, config, config_params) -> Dict[str, Any]:
    """The DeepSpeed config as a dict, from the same places ``deepspeed.initialize`` looks."""
    config = config if config is not None else config_params
    if config is None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None:
        raise DsExtConfigError([("$", "no DeepSpeed config: pass config= or --deepspeed_config")])
    return dict(config) if isinstance(config, dict) else load_config_file(config)


def build_topology(config, ext: Optional[DsExtConfig] = None) -> Topology:
    """Initialise torch.distributed (as ``deepspeed.initialize`` would) and build the :class:`Topology` of a
    config (dict or path). Call it before building the model when data sharding or a ``PipelineModule`` needs
    the layout; pass the result to :func:`initialize` as ``topology=``."""
    ds_config = config if isinstance(config, dict) else load_config_file(config)
    ext = ext or parse_ext_config(ds_config)
    init_distributed()
    return Topology.from_config(ext, deepspeed.comm.get_world_size())


def _check_pipeline_layout(model, topology: Topology) -> None:
    if topology.pipeline_stages == 1 and topology.num_replicas == 1:
        return  # no ds_ext layout asked for: the module's own topology stands, as with stock DeepSpeed
    dims = {axis: model.topology().get_dim(axis) for axis in model.topology().get_axis_names()}
    want = dict(zip(topology.process_topology().get_axis_names(), topology.process_topology().dims))
    if dims != want:
        raise DsExtConfigError([("ds_ext.topology", f"the PipelineModule was built with topology {dims}, the config "
                                 f"asks for {want}: build it with PipelineModule(..., "
                                 "topology=ds_ext.build_topology(config).process_topology())")])


def _narrow_pipeline_grid(model, topology: Topology) -> None:
    """Make the pipeline grid's model-parallel group one replica's stages (collective; see
    :meth:`Topology.build_pipeline_model_group` for why)."""
    rank = deepspeed.comm.get_rank()
    group = topology.build_pipeline_model_group(rank)
    set_pipeline_model_group(model.mpu(), group, topology.pipeline_model_ranks(rank), rank)


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               distributed_port=None, mpu=None, dist_init_required=None, collate_fn=None, config=None,
               mesh_param=None, config_params=None, *, topology: Optional[Topology] = None):
    """``deepspeed.initialize`` with the ds_ext engine. Same arguments and return value; in addition
    ``topology=`` takes a prebuilt :class:`Topology` (else it is built from the config's ``ds_ext.topology``).

    Builds :class:`DsExtEngine` (or :class:`DsExtPipelineEngine` for a ``PipelineModule``) through stock
    ``deepspeed.initialize``; DeepSpeed's data-parallel group becomes one replica through the ``mpu`` (with
    ``ds_ext.streambp.sequence_parallel: N``, DeepSpeed's Ulysses ``mpu``: ``world / N`` data-parallel ranks).
    """
    ds_config = _resolve_config(args, config, config_params)
    ext = parse_ext_config(ds_config)
    init_distributed(dist_init_required, distributed_port)
    topology = topology or Topology.from_config(ext, deepspeed.comm.get_world_size())
    if isinstance(model, deepspeed.PipelineModule):
        _check_pipeline_layout(model, topology)
        if topology.num_replicas > 1:
            _narrow_pipeline_grid(model, topology)
    elif not topology.is_trivial:
        if mpu is not None:
            raise ValueError("pass either mpu= or a ds_ext topology with several replicas or sequence_parallel, not "
                             "both")
        # sequence parallelism: DeepSpeed's own Ulysses mpu (ds_ext._deepspeed.ulysses_mpu: batch arithmetic and
        # ZeRO's reduction over the sequence groups)
        sp = topology.sequence_parallel
        mpu = ulysses_mpu(sp) if sp > 1 else topology.build_mpu()
    bound = dict(ds_ext_config=ext, topology=topology)
    kwargs = dict(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                  training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu,
                  dist_init_required=dist_init_required, collate_fn=collate_fn, config=config,
                  mesh_param=mesh_param, config_params=config_params)
    if distributed_port is not None:
        kwargs["distributed_port"] = distributed_port
    result = initialize_with_engines(DsExtEngine, DsExtPipelineEngine, bound, **kwargs)
    attach_features(result[0], ext, topology)
    return result


def _routing_initialize(*args, **kwargs):
    """``deepspeed.initialize`` after :func:`register`: configs with a ``"ds_ext"`` block go to ds_ext."""
    names = ("args", "model", "optimizer", "model_parameters", "training_data", "lr_scheduler", "distributed_port",
             "mpu", "dist_init_required", "collate_fn", "config", "mesh_param", "config_params")
    kwargs.update(zip(names, args))
    ds_config = _resolve_config(kwargs.get("args"), kwargs.get("config"), kwargs.get("config_params"))
    if EXT_KEY in ds_config:
        return initialize(**kwargs)
    return STOCK_INITIALIZE(**kwargs)


def register() -> None:
    """Make ``deepspeed.initialize`` build ds_ext engines for configs that have a ``"ds_ext"`` block. Code that
    imported the function itself (``from deepspeed import initialize``) before this call keeps the stock one."""
    replace_initialize(_routing_initialize)


def unregister() -> None:
    """Undo :func:`register`."""
    restore_initialize()
