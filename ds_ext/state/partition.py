"""This rank's share of the training state behind one protocol, for the journal, checkpoint-free recovery and NoLoCo.

Two protocols:

* :class:`FlatShards` (NoLoCo's outer step): ``tensors`` (this rank's fp32 master tensors), ``read()`` a flat fp32
  copy ``[n]`` of them, ``write(flat)`` them back and refresh the model's params from them (collective inside the
  group that shards them).
* :class:`PartitionState` (journal, rebuilds): ``snapshot()`` / ``restore(base)`` of the master tensors and their
  optimizer state, ``step_state()`` / ``restore_step_state(s)`` (counters, the hyperparameters the *next* step
  uses, loss scale, LR scheduler, RNG), ``refresh()`` (collective), ``close()``. A :class:`JournaledState` adds
  what a journal needs: ``layout()``, ``capture(on_grad)`` of each stepped tensor's gradient, ``take_captured()``
  and ``replay(grads)`` through the same inner optimizer (bit-identical to the step that was captured).

Implementations here: :class:`ZeroPartitionState` (DeepSpeed ZeRO-1/2: ``single_partition_of_fp32_groups`` and
ZeRO's inner torch optimizer) and :class:`ReplicatedState` (DeepSpeed ZeRO-0: the module's params and the torch
optimizer, identical on every data-parallel rank; no journal). :mod:`ds_ext.state.megatron` has megatron-core's
distributed optimizer. DeepSpeed internals are reached only through :mod:`ds_ext._deepspeed`.

Capture (ZeRO): a torch optimizer step pre-hook (``Optimizer.register_step_pre_hook``) on ZeRO's inner optimizer.
ZeRO calls the inner ``step()`` once per parameter group from ``_optimizer_step(g)``, with ``param_groups``
narrowed to group ``g`` and ``single_partition_of_fp32_groups[g].grad`` holding the reduced, unscaled and clipped
fp32 gradient of this rank's partition: exactly the input the update needs.

Call order per optimizer step: ZeRO step -> ``_optimizer_step(g)`` for each group (pre-hook captures grads) -> lp
params gathered -> LR scheduler step -> :meth:`step_state` reads counters, scheduler, loss scale and the
hyperparameters the next step will use. Read there (``engine.ds_ext_in_step``) the micro-step counter still lacks
the micro-step ``DeepSpeedEngine.step()`` counts on return (``PipelineEngine`` counts none there); read between
steps (a base at start or after a rebuild) it does not.
"""
from __future__ import annotations

import abc
import copy
from typing import Any, Callable, Dict, List, Optional, Protocol

import torch

from ds_ext import _deepspeed as ds
from ds_ext.state.tree import clone_tree, hyperparameters, restore_hyperparameters, rng_state, set_rng_state

GradSink = Callable[[int, torch.Tensor], None]


class FlatShards(Protocol):
    """This rank's fp32 master weights as one flat vector (NoLoCo's outer step)."""

    tensors: List[torch.Tensor]

    def read(self) -> torch.Tensor: ...

    def write(self, flat: torch.Tensor) -> None: ...


class PartitionState(Protocol):
    """This rank's master tensors, their optimizer state and the step state (see the module docstring)."""

    tensors: List[torch.Tensor]

    def snapshot(self) -> Dict[str, Any]: ...

    def restore(self, base: Dict[str, Any]) -> None: ...

    def step_state(self) -> Dict[str, Any]: ...

    def restore_step_state(self, state: Dict[str, Any]) -> None: ...

    def refresh(self) -> None: ...

    def close(self) -> None: ...


class JournaledState(PartitionState, Protocol):
    """A :class:`PartitionState` a journal can record and replay step by step."""

    def layout(self) -> Dict[str, Any]: ...

    def capture(self, on_grad: GradSink) -> None: ...

    def take_captured(self) -> List[int]: ...

    def replay(self, grads: Dict[str, torch.Tensor]) -> None: ...


def read_flat(tensors: List[torch.Tensor]) -> torch.Tensor:
    """A flat fp32 copy ``[sum numel]`` of ``tensors``, in order."""
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def write_flat(tensors: List[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy consecutive slices of ``flat`` into ``tensors`` (the inverse of :func:`read_flat`)."""
    offset = 0
    for t in tensors:
        t.data.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


class InnerOptimizerState(abc.ABC):
    """What every :class:`JournaledState` shares: master ``tensors`` stepped by torch optimizers ``inners`` (each
    tensor in exactly one), gradient capture by a step pre-hook, and snapshot/restore of the per-tensor optimizer
    state. Subclasses give ``step_state``/``restore_step_state``/``replay``/``refresh``/``layout``."""

    clone_grads = False  # True where the captured gradient's storage is reused before the writer is done with it

    def __init__(self, tensors: List[torch.Tensor], inners: list):
        self.tensors, self.inners = tensors, inners
        self._index = {id(t): g for g, t in enumerate(tensors)}
        self._owner = {id(p): o for o in inners for group in o.param_groups for p in group["params"]}
        self.captured: List[int] = []
        self.capturing = True
        self._on_grad: Optional[GradSink] = None
        self._hooks: list = []

    def capture(self, on_grad: GradSink) -> None:
        """From now on hand each stepped tensor's gradient to ``on_grad(index, grad)`` (during the inner step,
        before the update; no copy unless :attr:`clone_grads`)."""
        self._on_grad = on_grad
        if not self._hooks:
            self._hooks = [o.register_step_pre_hook(self._capture) for o in self.inners]

    def _capture(self, optimizer, args, kwargs) -> None:
        if not self.capturing:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = self._index.get(id(p))
                if g is not None and p.grad is not None:
                    self.captured.append(g)
                    grad = p.grad.detach()
                    self._on_grad(g, grad.clone() if self.clone_grads else grad)

    def take_captured(self) -> List[int]:
        """The tensors whose gradients were captured since the last call."""
        groups, self.captured = self.captured, []
        return groups

    def optimizer_state(self) -> List[Dict[str, Any]]:
        """Clones of each tensor's optimizer state (``{}`` before its first step)."""
        return [clone_tree(dict(self._owner[id(t)].state.get(t, {}))) for t in self.tensors]

    def snapshot(self) -> Dict[str, Any]:
        """A clone of everything a base holds (safe to write from another thread while training goes on)."""
        return {"fp32": [t.detach().clone() for t in self.tensors], "optim": self.optimizer_state(),
                **self.step_state()}

    def restore(self, base: Dict[str, Any]) -> None:
        """Load a base (``snapshot()`` read back): master tensors, optimizer state, step state."""
        for t, saved, state in zip(self.tensors, base["fp32"], base["optim"]):
            t.data.copy_(saved)
            owner = self._owner[id(t)]
            owner.state.pop(t, None)
            if state:
                owner.state[t] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}
        self.restore_step_state(base)

    def replay(self, grads: Dict[str, torch.Tensor]) -> None:
        """Apply one journaled step's gradients (``{str(index): grad}``) with the same update (not captured)."""
        self.capturing = False
        try:
            self._replay(grads)
        finally:
            self.capturing = True

    @abc.abstractmethod
    def _replay(self, grads: Dict[str, torch.Tensor]) -> None:
        """Step the inner optimizer once on ``grads`` (each subclass knows where its optimizer reads gradients)."""

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def engine_step_state(engine, param_groups: list, scaler: Dict[str, Any]) -> Dict[str, Any]:
    """The step state of a DeepSpeed engine (see the module docstring for the micro-step rule)."""
    # inside a DeepSpeedEngine step, step() counts the micro-step after the features ran (PipelineEngine: none)
    pending = getattr(engine, "ds_ext_in_step", False) and not ds.is_pipeline(engine)
    counters = ds.engine_counters(engine, micro_step_pending=pending)
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    return {"counters": counters, "hyper": [hyperparameters(g) for g in param_groups], "scaler": scaler,
            "lr_scheduler": sched, "rng": rng_state()}


def restore_engine_step_state(engine, param_groups: list, state: Dict[str, Any]) -> None:
    """Put :func:`engine_step_state` back, except the loss scaler (its owner restores it)."""
    ds.set_engine_counters(engine, state["counters"])
    for group, hyper in zip(param_groups, state["hyper"]):
        restore_hyperparameters(group, hyper)
    if state["lr_scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    set_rng_state(state["rng"])


class ZeroPartitionState(InnerOptimizerState):
    """This rank's ZeRO-1/2 partition of one DeepSpeed engine: one fp32 tensor per ZeRO parameter group."""

    def __init__(self, engine):
        opt = engine.optimizer
        parts = ds.zero_partitions(opt)
        if parts is None:
            raise ValueError("ds_ext.recovery journals ZeRO-1/2 partitions: set zero_optimization.stage to 1 or 2 "
                             f"(the engine's optimizer is {type(opt).__name__})")
        if ds.zero_offloads_optimizer(opt):
            raise ValueError("ds_ext.recovery: zero_optimization.offload_optimizer is not supported yet")
        super().__init__(parts, [ds.zero_inner_optimizer(opt)])
        self.engine, self.opt, self.inner = engine, opt, self.inners[0]

    def layout(self) -> Dict[str, Any]:
        """What must match between the run that wrote a journal and the one that resumes from it."""
        return {"zero_stage": self.engine.zero_optimization_stage(),
                "partition_numel": [t.numel() for t in self.tensors], "optimizer": type(self.inner).__name__,
                "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}

    def step_state(self) -> Dict[str, Any]:
        return engine_step_state(self.engine, self.inner.param_groups, ds.scaler_state(self.opt))

    def restore_step_state(self, state: Dict[str, Any]) -> None:
        restore_engine_step_state(self.engine, self.inner.param_groups, state)
        ds.set_scaler_state(self.opt, state["scaler"])

    def _replay(self, grads: Dict[str, torch.Tensor]) -> None:
        """Through ZeRO's own ``_optimizer_step(g)``, group by group, as the captured step did."""
        for key, grad in grads.items():
            g = int(key)
            self.tensors[g].grad = grad
            ds.zero_step_partition(self.opt, g)
            self.tensors[g].grad = None

    def refresh(self) -> None:
        """Copy the fp32 partitions into the model's params and gather them inside the ZeRO group (collective)."""
        ds.zero_refresh_low_precision(self.opt)

    def refresh_from_params(self) -> None:
        """The other way round: the fp32 partitions from the model's params (local)."""
        ds.zero_refresh_fp32(self.opt)


class ReplicatedState:
    """A ZeRO-0 engine's state: the module's params and the torch optimizer, identical on every data-parallel
    rank (no partitions; not journaled)."""

    def __init__(self, engine):
        self.engine, self.inner = engine, engine.optimizer
        self.tensors = [p for p in engine.module.parameters()]

    def snapshot(self) -> Dict[str, Any]:
        return {"module": {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()},
                "optimizer": copy.deepcopy(self.inner.state_dict()), **self.step_state()}

    def restore(self, state: Dict[str, Any]) -> None:
        self.engine.module.load_state_dict(state["module"])
        self.inner.load_state_dict(state["optimizer"])
        self.restore_step_state(state)

    def step_state(self) -> Dict[str, Any]:
        return engine_step_state(self.engine, self.inner.param_groups, {})

    def restore_step_state(self, state: Dict[str, Any]) -> None:
        restore_engine_step_state(self.engine, self.inner.param_groups, state)

    def refresh(self) -> None:
        """Nothing to gather: the params are the master weights."""

    def refresh_from_params(self) -> None:
        """Nothing to copy: the params are the master weights."""

    def close(self) -> None:
        pass


def partition_state(engine):
    """The :class:`PartitionState` of a DeepSpeed engine: ZeRO-1/2 partitions, else the replicated ZeRO-0 state."""
    if ds.zero_partitions(engine.optimizer) is not None:
        return ZeroPartitionState(engine)
    return ReplicatedState(engine)


class EngineShards:
    """:class:`FlatShards` of a DeepSpeed engine: ZeRO-1/2's flat partitions, or the parameters themselves with
    ZeRO-0 in fp32. ``write`` refreshes the low-precision params (ZeRO: all-gather in the ZeRO group)."""

    def __init__(self, engine):
        opt = engine.optimizer
        parts = ds.zero_partitions(opt)
        if parts is not None:
            self.tensors: List[torch.Tensor] = parts
            self._refresh = lambda: ds.zero_refresh_low_precision(opt)
        elif engine.zero_optimization_stage() == 0 and all(
                p.dtype == torch.float32 for p in engine.module.parameters()):
            self.tensors = [p.data for p in engine.module.parameters() if p.requires_grad]
            self._refresh = lambda: None
        else:
            raise ValueError("NoLoCo needs fp32 master weights: ZeRO stage 1/2, or stage 0 in fp32")

    def read(self) -> torch.Tensor:
        """A flat fp32 copy ``[n]`` of the shard."""
        return read_flat(self.tensors)

    def write(self, flat: torch.Tensor) -> None:
        write_flat(self.tensors, flat)
        self._refresh()
