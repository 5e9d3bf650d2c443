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
# What ds_ext patches in DeepSpeed, all of it here: (1) the engine classes ``deepspeed.initialize`` builds, swapped
# for one call (:func:`initialize_with_engines`); (2) ``deepspeed.initialize`` itself after ``ds_ext.register()``
# (:func:`replace_initialize`); (3) the per-optimizer-step method of the engine, overridden on the ds_ext engine
# mixin (:func:`install_step_seam`); (4) a pipeline grid's model-parallel group, narrowed to one replica
# (:func:`set_pipeline_model_group`); (5) with ``ds_ext.noloco.count_collectives`` only, the two collectives DeepSpeed's
# comm backend binds at start-up, wrapped by the counter (:func:`comm_backend_collectives`).
#
# ``deepspeed.initialize``, ``deepspeed.DeepSpeedEngine`` and ``deepspeed.PipelineEngine`` are public names, so they
# are not in INTERNALS; what (1) relies on (``initialize`` reading the engine classes as module globals at call
# time) is checked on every call instead: :func:`initialize_with_engines` raises if DeepSpeed built another class.

import contextlib  # noqa: E402  (Section A's imports stay in Section A)
import functools  # noqa: E402
import math  # noqa: E402
import threading  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import deepspeed  # noqa: E402
import deepspeed.comm.comm as _ds_comm  # noqa: E402

_STEP_METHOD = "_take_model_step"
INTERNALS += [("deepspeed.runtime.engine.DeepSpeedEngine", _STEP_METHOD),
              ("deepspeed.runtime.pipe.engine.PipelineEngine", _STEP_METHOD),
              ("deepspeed.comm.comm", "cdb")]
# "pipeline_grid": the PipelineParallelGrid of a built PipelineModule (``module.mpu()``); "comm_backend": the object
# :func:`comm_backend` returns after ``deepspeed.init_distributed``.
INSTANCE_INTERNALS += [("pipeline_grid", "ds_model_proc_group"), ("pipeline_grid", "ds_model_world_size"),
                       ("pipeline_grid", "ds_model_rank"), ("comm_backend", "all_gather_function"),
                       ("comm_backend", "reduce_scatter_function")]

STOCK_INITIALIZE = deepspeed.initialize  # captured at import, before replace_initialize can swap it
_ENGINE_SWAP_LOCK = threading.Lock()


def install_step_seam(mixin: type) -> type:
    """Class decorator: give ``mixin`` an override of DeepSpeed's per-optimizer-step method (private, called by
    ``DeepSpeedEngine.step()`` and by the pipeline engine's ``OptimizerStep`` instruction alike). The override runs
    the stock method, then ``self.ds_ext_after_model_step()``. ``mixin`` must come before DeepSpeed's engine in the
    MRO of the classes built from it. The override must be a method of the class (DeepSpeed calls it on ``self``);
    installing it here keeps the private name in this module. When ``self.ds_ext_step_gradient_factor`` is set
    (a float), this step's gradients are multiplied by it first (:func:`step_gradient_factor`), and it is reset."""

    def seam(self, lr_kwargs, *args, **kwargs):
        factor, self.ds_ext_step_gradient_factor = self.ds_ext_step_gradient_factor, None
        with step_gradient_factor(self.optimizer, factor):  # undone before the hooks (the journal reads the scaler)
            getattr(super(mixin, self), _STEP_METHOD)(lr_kwargs, *args, **kwargs)
        self.ds_ext_after_model_step()

    seam.__name__, seam.__qualname__ = _STEP_METHOD, f"{mixin.__qualname__}.{_STEP_METHOD}"
    seam.__doc__ = "DeepSpeed's optimizer step, then the ds_ext step hooks (installed by ds_ext._deepspeed)."
    setattr(mixin, _STEP_METHOD, seam)
    return mixin


def initialize_with_engines(engine_cls: type, pipeline_engine_cls: type, engine_kwargs: dict, **initialize_kwargs):
    """Stock ``deepspeed.initialize(**initialize_kwargs)`` building ``engine_cls(..., **engine_kwargs)`` (or
    ``pipeline_engine_cls`` for a ``PipelineModule``) in place of DeepSpeed's engine classes.

    ``deepspeed.initialize`` looks its engine classes up as globals of the ``deepspeed`` module when it runs, so they
    are swapped for this call only, under a lock (another thread's initialize waits), and restored after.
    """
    with _ENGINE_SWAP_LOCK:
        saved = deepspeed.DeepSpeedEngine, deepspeed.PipelineEngine
        deepspeed.DeepSpeedEngine = functools.partial(engine_cls, **engine_kwargs)
        deepspeed.PipelineEngine = functools.partial(pipeline_engine_cls, **engine_kwargs)
        try:
            result = STOCK_INITIALIZE(**initialize_kwargs)
        finally:
            deepspeed.DeepSpeedEngine, deepspeed.PipelineEngine = saved
    if not isinstance(result[0], (engine_cls, pipeline_engine_cls)):
        raise RuntimeError(f"deepspeed {deepspeed.__version__} built a {type(result[0]).__name__}, not a ds_ext "
                           "engine: its initialize no longer reads the engine classes from the deepspeed module; "
                           "update ds_ext/_deepspeed.py:initialize_with_engines for this DeepSpeed version")
    return result


def replace_initialize(fn: Callable) -> None:
    """Make ``deepspeed.initialize`` call ``fn`` (``ds_ext.register``); code that imported the function itself
    earlier keeps the stock one."""
    deepspeed.initialize = functools.wraps(STOCK_INITIALIZE)(fn)


def restore_initialize() -> None:
    deepspeed.initialize = STOCK_INITIALIZE


def set_pipeline_model_group(grid, group, ranks: Sequence[int], rank: int) -> None:
    """Make ``group`` (global ``ranks``, ``rank`` among them) the model-parallel group of a ``PipelineParallelGrid``:
    DeepSpeed's grid keeps it in internal attributes that its ``get_model_parallel_*`` methods read."""
    grid.ds_model_proc_group = group
    grid.ds_model_world_size = len(ranks)
    grid.ds_model_rank = list(ranks).index(rank)


def comm_backend():
    """DeepSpeed's communication backend object (``deepspeed.comm.comm.cdb``), or None before
    ``deepspeed.init_distributed``."""
    return getattr(_ds_comm, "cdb", None)


def comm_backend_collectives() -> List[Tuple[object, str, str]]:
    """``(object, attribute, torch.distributed name)`` of the collectives DeepSpeed's backend bound at start-up
    (``all_gather_into_tensor`` and ``reduce_scatter_tensor``, held as attributes, so wrapping ``torch.distributed``
    alone misses them); empty before ``deepspeed.init_distributed``."""
    backend = comm_backend()
    pairs = (("all_gather_function", "all_gather_into_tensor"), ("reduce_scatter_function", "reduce_scatter_tensor"))
    return [(backend, attr, name) for attr, name in pairs if getattr(backend, attr, None) is not None]



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


INSTANCE_INTERNALS += [("zero_optimizer", "custom_loss_scaler"), ("loss_scaler", "dynamic")]


def can_scale_step_gradients(optimizer) -> bool:
    """Whether :func:`step_gradient_factor` works on ``optimizer``: DeepSpeed's ZeRO-1/2 optimizer with fp32 or bf16
    parameters (a static loss scale). Not fp16 (its dynamic scaler folds the scale into its overflow bookkeeping,
    and gradients made smaller by the factor's inverse risk underflow), not a custom loss scaler, not Muon
    parameters (ZeRO re-multiplies Muon's updates by the loss scale, which would cancel the factor), not
    ``BF16_Optimizer`` (bf16 with ``grad_accum_dtype`` fp32) or ZeRO-3."""
    import torch
    scaler = getattr(optimizer, "loss_scaler", None)
    if zero_partitions(optimizer) is None or scaler is None or getattr(scaler, "dynamic", True):
        return False
    params = [p for group in zero_param_groups(optimizer) for p in group]  # ZeRO's low-precision (or fp32) params
    if getattr(optimizer, "custom_loss_scaler", True) or any(p.dtype == torch.float16 for p in params):
        return False
    return not any(getattr(p, "use_muon", False) for p in params)


def check_step_gradient_factor(optimizer, factor: float) -> float:
    """``factor`` as a float when :func:`step_gradient_factor` can apply it on ``optimizer``; ``ValueError`` naming
    what is wrong otherwise (checked once, when the factor is set, not inside the step)."""
    if not can_scale_step_gradients(optimizer):
        raise ValueError("a step gradient factor needs DeepSpeed's ZeRO stage 1 or 2 optimizer on fp32 or bf16 "
                         f"parameters without Muon; this engine's optimizer is {type(optimizer).__name__}")
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"step gradient factor {factor!r}: must be a finite number > 0")
    return float(factor)


@contextlib.contextmanager
def step_gradient_factor(optimizer, factor: Optional[float]):
    """Within the block, ZeRO-1/2's optimizer step multiplies the step's reduced gradients by ``factor`` before the
    norm is taken, clipping applied and the update made (``None``: a plain step). ``factor`` was checked by
    :func:`check_step_gradient_factor`.

    How: ZeRO's step divides the gradients by the loss scale (``unscale_and_clip_grads``) and reads the norm as
    ``norm / loss_scale``; the backward passes of the step already ran with the static scale ``s``, so setting the
    scale to ``s / factor`` for the step alone scales gradient, norm and clipping alike. The scale is restored on
    leaving the block.
    """
    if factor is None:
        yield
        return
    scaler = optimizer.loss_scaler
    saved = scaler.cur_scale
    scaler.cur_scale = saved / factor
    try:
        yield
    finally:
        scaler.cur_scale = saved


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


# The journal's exporter rebuilds a run's PipelineModule from parameters-only layers (ds_ext.tools.export_pipe) and
# must give each stage the layers it had in the run, whatever partition method split them: the layout is read with
# DeepSpeed's public ``stage_owner`` (:func:`pipeline_layout`) and imposed by replacing the module's partition step
# (:func:`pipeline_module_with_layout`). Its ``parts`` attribute (what ``stage_owner`` reads) has a name too generic
# to register (ds_ext's own schedules have ``Segment.parts``); the builder checks it by reading the layout back.
INTERNALS += [("deepspeed.runtime.pipe.module.PipelineModule", name) for name in ("_partition_layers",
                                                                                   "_set_bounds")]


def pipeline_layout(module) -> Dict[str, Any]:
    """How a built ``PipelineModule`` lays out its layers: ``num_stages``, ``stage`` (this rank's),
    ``stage_starts`` (``num_stages + 1`` layer indices: stage s holds layers ``stage_starts[s]`` ..
    ``stage_starts[s + 1] - 1``) and ``layers``, one entry per layer spec: ``{"kind": "tied", "key",
    "tied_weight_attr"}`` (a ``TiedLayerSpec``: parameters under ``tied_modules.<key>.``), ``{"kind": "module"}``
    (a ``LayerSpec`` or module: parameters under ``<index>.``) or ``{"kind": "function"}`` (no state)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    from torch import nn
    specs = pipeline_layer_specs(module)
    owners = [module.stage_owner(i) for i in range(len(specs))]
    layers = []
    for spec in specs:
        if isinstance(spec, TiedLayerSpec):
            layers.append({"kind": "tied", "key": spec.key, "tied_weight_attr": list(spec.tied_weight_attr)})
        else:
            layers.append({"kind": "module" if isinstance(spec, (LayerSpec, nn.Module)) else "function"})
    return {"num_stages": module.num_stages, "stage": module.stage_id, "layers": layers,
            "stage_starts": [sum(1 for o in owners if o < s) for s in range(module.num_stages + 1)]}


def pipeline_module_with_layout(layers: Sequence[Any], topology, stage_starts: Sequence[int], **kwargs):
    """A ``PipelineModule(layers=layers, topology=topology, **kwargs)`` whose stage s holds layers
    ``stage_starts[s]`` .. ``stage_starts[s + 1] - 1`` (see :func:`pipeline_layout`) instead of the split its
    partition method would compute. Collective, as ``PipelineModule`` is."""
    from deepspeed.pipe import PipelineModule
    starts = [int(s) for s in stage_starts]

    class FixedLayoutPipelineModule(PipelineModule):
        def _partition_layers(self, method="uniform"):
            self.parts = list(starts)
            self._set_bounds(start=starts[self.stage_id], stop=starts[self.stage_id + 1])

    module = FixedLayoutPipelineModule(layers=list(layers), topology=topology, **kwargs)
    if pipeline_layout(module)["stage_starts"] != starts:
        raise RuntimeError(f"deepspeed {deepspeed.__version__}: a PipelineModule built with stage starts {starts} "
                           f"reports {pipeline_layout(module)['stage_starts']}; update "
                           "ds_ext/_deepspeed.py:pipeline_module_with_layout for this DeepSpeed version")
    return module



# ---------------------------------------------------------------------------------------------------------------
# Section C: ZeRO's per-parameter gradient-ready flag (StreamBP)
# ---------------------------------------------------------------------------------------------------------------

INSTANCE_INTERNALS += [("zero_param", "ds_grad_is_ready")]


def set_grad_ready(params, ready: bool) -> None:
    """Mark parameters' gradients ready (or not) for ZeRO-1/2's reduction.

    ZeRO-1/2's per-parameter gradient hook reduces a gradient only when ``param.ds_grad_is_ready`` is true (read
    with ``getattr(param, "ds_grad_is_ready", True)``, ``deepspeed/runtime/zero/stage_1_and_2.py``). StreamBP runs
    one inner backward per sequence chunk: it marks its layer's parameters not ready for every chunk but the last,
    so each gradient is reduced once per backward, as without StreamBP. Outside ZeRO the attribute is inert.
    """
    for p in params:
        p.ds_grad_is_ready = ready


# ---------------------------------------------------------------------------------------------------------------
# Section D: ds_ext's own pipeline schedule on PipelineEngine (CheckFree+ swaps, NoLoCo routing)
# ---------------------------------------------------------------------------------------------------------------
# PipelineEngine.train_batch runs ``self._exec_schedule(self._train_schedule())``: a PipeSchedule yields lists of
# instructions, each looked up in the class's ``_INSTRUCTION_MAP``. When a ds_ext schedule is set on the engine
# (``engine.ds_ext_pipeline_schedule``), :func:`install_schedule_seam` makes ``_train_schedule`` yield one ds_ext
# instruction (the step's forward and backward of every micro-batch, run by the schedule object) and then DeepSpeed's
# own ReduceTiedGrads, ReduceGrads and OptimizerStep, so gradient reduction, the optimizer step, the step seam and
# the loss aggregation stay stock. The schedule runs a stage's layers through DeepSpeed's engine forward (its backward
# hooks, ZeRO's backward prologue/epilogue) with the stage's ``forward_funcs`` narrowed to the part it runs.
from deepspeed.runtime.engine import DeepSpeedEngine as _DeepSpeedEngine  # noqa: E402
from deepspeed.runtime.pipe import schedule as _pipe_schedule  # noqa: E402
from deepspeed.runtime.pipe.engine import PipelineEngine as _PipelineEngine  # noqa: E402

INTERNALS += [("deepspeed.runtime.pipe.engine.PipelineEngine", name) for name in (
    "_train_schedule", "_INSTRUCTION_MAP", "_exec_schedule", "_next_batch", "_backward_prologue_per_tensor")]
INSTANCE_INTERNALS += [("pipeline_engine", name) for name in ("total_loss", "_running_engine_backward",
                                                               "using_bf16_optimizer")]


class RunDsExtSchedule(_pipe_schedule.PipeInstruction):
    """The forward and backward of every micro-batch of the step, run by the engine's ds_ext schedule."""


class DsExtTrainSchedule(_pipe_schedule.PipeSchedule):
    def steps(self):
        yield [RunDsExtSchedule()]
        yield [_pipe_schedule.ReduceTiedGrads(), _pipe_schedule.ReduceGrads(), _pipe_schedule.OptimizerStep()]

    def num_pipe_buffers(self):
        return 1  # DeepSpeed's buffers stay unused: the ds_ext schedule keeps its own activations


def install_schedule_seam(cls: type) -> type:
    """Class decorator for the ds_ext pipeline engine: ``_train_schedule`` yields :class:`DsExtTrainSchedule` when
    ``self.ds_ext_pipeline_schedule`` is set (stock otherwise; eval_batch is never changed: evaluation keeps the
    fixed path), and the last stage's per-tensor backward hook stops dividing by the accumulation steps while the
    schedule backpropagates a received gradient (DeepSpeed assumes the last stage only ever backpropagates its loss;
    under a ds_ext schedule it may also run body layers whose output gradient arrives already scaled)."""

    def _train_schedule(self):
        if getattr(self, "ds_ext_pipeline_schedule", None) is None:
            return super(cls, self)._train_schedule()
        return DsExtTrainSchedule(micro_batches=self.gradient_accumulation_steps(), stages=self.num_stages,
                                  stage_id=self.stage_id)

    def _run(self):
        self.ds_ext_pipeline_schedule.run_step(self)

    def _backward_prologue_per_tensor(self, grad):
        if getattr(self, "ds_ext_raw_tensor_backward", False):
            return grad
        return super(cls, self)._backward_prologue_per_tensor(grad)

    for fn in (_train_schedule, _backward_prologue_per_tensor):
        fn.__qualname__ = f"{cls.__qualname__}.{fn.__name__}"
        setattr(cls, fn.__name__, fn)
    setattr(cls, "_INSTRUCTION_MAP", {**_PipelineEngine._INSTRUCTION_MAP, RunDsExtSchedule: _run})
    return cls


def pipeline_next_batch(engine):
    """The next ``(inputs, labels)`` of the engine's data iterator (what a first or last stage loads)."""
    return engine._next_batch()


def pipeline_forward(engine, funcs: Sequence[Callable], inputs):
    """Run ``funcs`` (some of this stage's layers) on ``inputs`` through DeepSpeed's engine forward (its backward
    hooks), with the PipelineModule's ``forward_funcs`` narrowed to ``funcs`` for the call."""
    module = engine.module
    saved = module.forward_funcs
    module.forward_funcs = list(funcs)
    try:
        return _DeepSpeedEngine.forward(engine, inputs)
    finally:
        module.forward_funcs = saved


def pipeline_loss_backward(engine, loss) -> None:
    """The last stage's backward of a micro-batch loss, as DeepSpeed's pipeline runs it (scaled by 1/gas)."""
    _DeepSpeedEngine.backward(engine, loss)


def pipeline_tensor_backward(engine, outputs: Sequence, grads: Sequence) -> None:
    """Backpropagate received output gradients (already scaled), as DeepSpeed's pipeline does on a non-last stage."""
    import torch
    engine._running_engine_backward = True
    engine.ds_ext_raw_tensor_backward = True
    try:
        torch.autograd.backward(list(outputs), list(grads))
    finally:
        engine._running_engine_backward = False
        engine.ds_ext_raw_tensor_backward = False


def pipeline_add_loss(engine, loss) -> None:
    """Count a micro-batch loss in the step's loss (the last stage's ``total_loss``, averaged by train_batch)."""
    loss = loss.detach()
    engine.total_loss = loss.clone() if engine.total_loss is None else engine.total_loss + loss


def pipeline_check_schedulable(engine) -> None:
    """``ValueError`` when a ds_ext schedule cannot run this pipeline: activation checkpointing (its checkpointed
    ranges are computed for the whole stage) or the BF16 optimizer (its gradient bookkeeping is per pipeline
    instruction)."""
    if engine.module.activation_checkpoint_interval > 0:
        raise ValueError("a ds_ext pipeline schedule runs a stage's layers in parts: build the PipelineModule with "
                         "activation_checkpoint_interval=0")
    if getattr(engine, "using_bf16_optimizer", False):
        raise ValueError("a ds_ext pipeline schedule needs fp32/fp16 or ZeRO-1 bf16; DeepSpeed's BF16_Optimizer "
                         "(bf16 with grad_accum_dtype fp32 and ZeRO 0) is not supported")


# ---------------------------------------------------------------------------------------------------------------
# Section E: Ulysses sequence parallelism (StreamBP with ``sequence_parallel``)
# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed's Ulysses (``deepspeed.runtime.sequence_parallel.ulysses_sp.UlyssesSPAttentionHF``) exchanges q/k/v and
# the attention output with ``deepspeed.sequence.layer._dim_zero_all_to_all`` (a differentiable all-to-all over dim
# 0, registered as a torch operator whose backward is the same exchange); its group resolves by name through
# ``register_all_to_all_group``. The sequence-parallel groups come from ``parallel_state_sp``.
INTERNALS += [("deepspeed.sequence.layer", "_dim_zero_all_to_all")]


def ulysses_register_group(group) -> None:
    """Make ``group`` usable by :func:`ulysses_all_to_all` (outside any compiled region, before the first call)."""
    from deepspeed.sequence.layer import register_all_to_all_group
    register_all_to_all_group(group)


def ulysses_all_to_all(group, tensor):
    """Ulysses' differentiable all-to-all: ``tensor: [N, ...]`` (``N`` = the group's size); slice ``i`` goes to
    group rank ``i``, and slice ``i`` of the result came from group rank ``i``. Backward is the same exchange."""
    from deepspeed.sequence import layer
    return layer._dim_zero_all_to_all(group, tensor)


def ulysses_sequence_group(size: int):
    """The Ulysses sequence-parallel group of this rank for ``size`` ranks (DeepSpeed's ``parallel_state_sp``:
    consecutive ranks form a group; made on the first call, then reused). A different size than the one already
    made is refused (DeepSpeed keeps one set of groups per process)."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as sp_state
    try:
        group = sp_state.get_sequence_parallel_group()
    except AssertionError:  # not made yet
        sp_state.initialize_sequence_parallel(sequence_parallel_size=size)
        group = sp_state.get_sequence_parallel_group()
    made = sp_state.get_sequence_parallel_world_size()
    if made != size:
        raise ValueError(f"DeepSpeed's sequence-parallel groups of this process have size {made}; asked for {size}")
    return group


def ulysses_mpu(size: int):
    """DeepSpeed's own sequence-parallel ``mpu`` (ALST's: what ``UlyssesSPAttentionHF.register_with_transformers``
    returns), its groups made by :func:`ulysses_sequence_group`: the ``parallel_state_sp`` module. Passed to
    ``deepspeed.initialize(mpu=...)`` it makes DeepSpeed count ``world / size`` data-parallel ranks in the batch
    arithmetic (``train_batch_size = micro x accumulation x world / size``) and run ZeRO over the sequence-data-
    parallel group (every rank), whose gradient reduction divides the sum by ``world / size``: with each rank's
    gradient its shard's share of the sequence loss, the step's gradient is the mean over the sequence groups of
    whole-sequence gradients."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as sp_state
    ulysses_sequence_group(size)
    return sp_state
