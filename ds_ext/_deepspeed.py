"""The one place ds_ext touches DeepSpeed internals (private methods, internal attributes, module globals).

Every use of a DeepSpeed name that is not part of DeepSpeed's public API goes through a function here, and each such
name is listed in :data:`INTERNALS` (checked on classes and modules) or :data:`INSTANCE_INTERNALS` (checked on a
built ZeRO engine and its optimizer). ``tests/test_deepspeed_adapter.py`` asserts that every listed name exists on
the installed DeepSpeed (so an upgrade fails in that one test, with one message naming what moved) and that none of
the names appears anywhere else in ``ds_ext/``. ``setup.py`` pins the DeepSpeed version this was checked against.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

# (importable object path, attribute): checked with hasattr on the imported class or module.
INTERNALS: List[Tuple[str, str]] = []
# (what, attribute): what is "engine", "zero_optimizer", "pipeline_engine" or "pipeline_module"; checked on built
# objects by the test.
INSTANCE_INTERNALS: List[Tuple[str, str]] = []

# ---------------------------------------------------------------------------------------------------------------
# Section A: engine classes, initialize, pipeline grid and topology, ZeRO gradient flags, comm backend
# (the feature contract / engine work adds its functions here)
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Section B: ZeRO partitions, loss scaler, engine counters, pipeline layers, checkpoint config
# (the partition-state / journal work adds its functions here)
# ---------------------------------------------------------------------------------------------------------------

# ZeRO-1/2 (``deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer``): this rank's flat fp32 partitions, the
# inner torch optimizer that steps them one parameter group at a time, and the low-precision params they refresh.
# (ZeRO's ``optimizer.optimizer``, the inner torch optimizer, is reached only through zero_inner_optimizer(); the
# name is not registered because ``engine.optimizer``, DeepSpeed's public attribute, shares it.)
INSTANCE_INTERNALS += [("zero_optimizer", name) for name in (
    "single_partition_of_fp32_groups", "update_lp_params", "_optimizer_step", "loss_scaler", "cpu_offload",
    "refresh_fp32_params", "bit16_groups", "partition_count")]
# The loss scaler's fields a step changes (read and written where present: a static scaler has only cur_scale).
SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
INSTANCE_INTERNALS += [("loss_scaler", name) for name in SCALER_FIELDS]
# The engine's step counters, read and written back on resume and rebuild (global_steps and global_samples are
# also read by features as public DeepSpeed attributes, so only the two counters ds_ext never reads elsewhere are
# registered), its data-parallel group and its config.
ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
INSTANCE_INTERNALS += [("engine", name) for name in ("micro_steps", "skipped_steps", "data_parallel_group",
                                                      "_config")]
# A PipelineModule's built layers (this stage's) and its layer specs (all stages).
INSTANCE_INTERNALS += [("pipeline_module", "forward_funcs"), ("pipeline_module", "_layer_specs")]


def zero_partitions(optimizer) -> Optional[List[Any]]:
    """ZeRO-1/2's fp32 partitions of this rank, one flat tensor per parameter group; ``None`` for any other
    optimizer (ZeRO-0's torch optimizer, ZeRO-3)."""
    parts = getattr(optimizer, "single_partition_of_fp32_groups", None)
    return None if parts is None else list(parts)


def zero_inner_optimizer(optimizer):
    """The torch optimizer ZeRO-1/2 steps its fp32 partitions with (``param_groups`` hold the partitions)."""
    return optimizer.optimizer


def zero_offloads_optimizer(optimizer) -> bool:
    return bool(getattr(optimizer, "cpu_offload", False))


def zero_step_partition(optimizer, group: int) -> None:
    """ZeRO's own update of parameter group ``group`` from ``single_partition_of_fp32_groups[group].grad``."""
    optimizer._optimizer_step(group)


def zero_refresh_low_precision(optimizer) -> None:
    """Copy the fp32 partitions into the low-precision params and all-gather them (collective in the ZeRO group)."""
    optimizer.update_lp_params()


def zero_refresh_fp32(optimizer) -> None:
    """Copy the low-precision params into this rank's fp32 partitions (local)."""
    optimizer.refresh_fp32_params()


def zero_param_groups(optimizer) -> List[List[Any]]:
    """The model's params per ZeRO parameter group, in ZeRO's (partitioning) order."""
    return [list(group) for group in optimizer.bit16_groups]


def zero_partition_count(optimizer) -> int:
    """How many ranks the partitions are spread over (the ZeRO group's size)."""
    return optimizer.partition_count[0] if optimizer.partition_count else 1


def scaler_state(optimizer) -> Dict[str, Any]:
    """The loss scaler's fields that change per step (empty without a scaler)."""
    scaler = getattr(optimizer, "loss_scaler", None)
    return {k: getattr(scaler, k) for k in SCALER_FIELDS if hasattr(scaler, k)}


def set_scaler_state(optimizer, state: Dict[str, Any]) -> None:
    scaler = getattr(optimizer, "loss_scaler", None)
    for k, v in state.items():
        setattr(scaler, k, v)


def engine_counters(engine, micro_step_pending: bool = False) -> Dict[str, int]:
    """The engine's step counters; ``micro_step_pending``: count the micro-step ``DeepSpeedEngine.step()`` counts
    only after ``_take_model_step`` returns (read from inside that step)."""
    counters = {k: int(getattr(engine, k)) for k in ENGINE_COUNTERS}
    counters["micro_steps"] += int(micro_step_pending)
    return counters


def set_engine_counters(engine, counters: Dict[str, int]) -> None:
    for k, v in counters.items():
        if k not in ENGINE_COUNTERS:
            raise KeyError(f"{k!r} is not an engine counter ({ENGINE_COUNTERS})")
        setattr(engine, k, v)


def engine_config_dict(engine) -> Dict[str, Any]:
    """The DeepSpeed config the engine was built from, as the user's dict."""
    return engine._config._param_dict


def engine_data_parallel_group(engine):
    """The engine's data-parallel process group (``None`` before DeepSpeed set one)."""
    return getattr(engine, "data_parallel_group", None)


def is_pipeline(engine) -> bool:
    """Whether ``engine`` is a ``PipelineEngine`` (it counts micro-steps differently; no plain forward)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine
    return isinstance(engine, PipelineEngine)


def pipeline_layers(module) -> Optional[List[Any]]:
    """This stage's built layers of a ``PipelineModule`` (``None`` for any other module)."""
    funcs = getattr(module, "forward_funcs", None)
    return None if funcs is None else list(funcs)


def pipeline_layer_specs(module) -> List[Any]:
    """Every stage's layer specs of a ``PipelineModule`` (``LayerSpec`` objects and plain callables)."""
    return list(module._layer_specs)



# ---------------------------------------------------------------------------------------------------------------
# Section C: ZeRO's per-parameter gradient-ready flag (StreamBP)
# ---------------------------------------------------------------------------------------------------------------
