"""What the journal reads and writes inside a ZeRO-1/2 engine: the rank's fp32 partition, its optimizer state, and
the counters that make a step (DeepSpeed 0.19 ``DeepSpeedZeroOptimizer``, ``runtime/zero/stage_1_and_2.py``).

Capture: a torch optimizer step pre-hook (``Optimizer.register_step_pre_hook``) on ZeRO's inner optimizer. ZeRO
calls the inner ``step()`` once per parameter group from ``_optimizer_step(g)``, with ``param_groups`` narrowed to
group ``g`` and ``single_partition_of_fp32_groups[g].grad`` holding the reduced, unscaled and clipped fp32 gradient of
this rank's partition: exactly the input the update needs. Replaying that gradient through the same inner
optimizer with the same hyperparameters reproduces the update bit for bit.

Call order per optimizer step: ZeRO step -> ``_optimizer_step(g)`` for each group (pre-hook captures grads) ->
lp params gathered -> LR scheduler step -> :meth:`ZeroPartitionState.step_state` reads counters, scheduler, loss
scale and the hyperparameters the *next* step will use. Read there (``engine.ds_ext_in_step``) the micro-step
counter still lacks the micro-step ``DeepSpeedEngine.step()`` counts on return; read between steps (a base at start
or after a rebuild) it does not.
"""
from __future__ import annotations

import random
from typing import Any, Callable, Dict, List, Optional

import torch

ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _hyper(group: dict) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()
            if k != "params" and isinstance(v, (int, float, bool, str, tuple, type(None)))}


def rng_state() -> Dict[str, Any]:
    version, internal, gauss = random.getstate()  # one copy of the 625-word state per step, not three
    state = {"torch": torch.get_rng_state(), "python": list(internal), "python_version": version,
             "python_gauss": gauss}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ZeroPartitionState:
    """This rank's ZeRO-1/2 partition of one engine: capture per step, snapshot, restore, replay."""

    def __init__(self, engine):
        opt = engine.optimizer
        if not hasattr(opt, "single_partition_of_fp32_groups"):
            raise ValueError("ds_ext.recovery journals ZeRO-1/2 partitions: set zero_optimization.stage to 1 or 2 "
                             f"(the engine's optimizer is {type(opt).__name__})")
        if getattr(opt, "cpu_offload", False):
            raise ValueError("ds_ext.recovery: zero_optimization.offload_optimizer is not supported yet")
        self.engine, self.opt = engine, opt
        # DeepSpeedEngine.step() counts the micro-step after _take_model_step returns (the journal reads counters
        # inside it); PipelineEngine does not count micro-steps there.
        from deepspeed.runtime.pipe.engine import PipelineEngine
        self._micro_steps_pending = 0 if isinstance(engine, PipelineEngine) else 1
        self.fp32: List[torch.Tensor] = list(opt.single_partition_of_fp32_groups)
        self._index = {id(t): g for g, t in enumerate(self.fp32)}
        self.on_grad: Optional[Callable[[int, torch.Tensor], None]] = None
        self.captured: List[int] = []
        self.capturing = True
        self._hook = opt.optimizer.register_step_pre_hook(self._capture)

    def layout(self) -> Dict[str, Any]:
        """What must match between the run that wrote a journal and the one that resumes from it."""
        return {"zero_stage": self.engine.zero_optimization_stage(), "partition_numel": [t.numel() for t in self.fp32],
                "optimizer": type(self.opt.optimizer).__name__,
                "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1}

    def _capture(self, optimizer, args, kwargs) -> None:
        """Step pre-hook: hand each group's gradient partition to ``on_grad(group, grad)`` (no copy: ZeRO drops
        its reference after the step and refills its buffers only in the next backward)."""
        if not self.capturing:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = self._index.get(id(p))
                if g is not None and p.grad is not None:
                    self.captured.append(g)
                    if self.on_grad is not None:
                        self.on_grad(g, p.grad.detach())

    def take_captured(self) -> List[int]:
        """The groups whose gradients were captured since the last call."""
        groups, self.captured = self.captured, []
        return groups

    def step_state(self) -> Dict[str, Any]:
        """Plain state after a step: counters, hyperparameters for the next step, loss scale, scheduler, RNG."""
        e = self.engine
        sched = e.lr_scheduler.state_dict() if e.lr_scheduler is not None else None
        scaler = getattr(self.opt, "loss_scaler", None)
        counters = {k: int(getattr(e, k)) for k in ENGINE_COUNTERS}
        if getattr(e, "ds_ext_in_step", False):  # read inside the step: count the micro-step step() will count
            counters["micro_steps"] += self._micro_steps_pending
        return {"counters": counters,
                "hyper": [_hyper(g) for g in self.opt.optimizer.param_groups],
                "scaler": {k: getattr(scaler, k) for k in SCALER_FIELDS if hasattr(scaler, k)},
                "lr_scheduler": sched, "rng": rng_state()}

    def snapshot(self) -> Dict[str, Any]:
        """A clone of everything a base holds (safe to write from another thread while training goes on)."""
        inner = self.opt.optimizer
        return {"fp32": [t.detach().clone() for t in self.fp32],
                "optim": [{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in inner.state[t].items()}
                          for t in self.fp32],
                **self.step_state()}

    def restore(self, base: Dict[str, Any]) -> None:
        """Load a base (``snapshot()`` read back): partitions, optimizer state, step state."""
        inner = self.opt.optimizer
        for t, saved, state in zip(self.fp32, base["fp32"], base["optim"]):
            t.data.copy_(saved)
            inner.state.pop(t, None)
            if state:
                inner.state[t] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.items()}
        self.restore_step_state(base)

    def restore_step_state(self, state: Dict[str, Any]) -> None:
        e = self.engine
        for k, v in state["counters"].items():
            setattr(e, k, v)
        for group, hyper in zip(self.opt.optimizer.param_groups, state["hyper"]):
            group.update({k: (tuple(v) if isinstance(group.get(k), tuple) else v) for k, v in hyper.items()})
        scaler = getattr(self.opt, "loss_scaler", None)
        for k, v in state["scaler"].items():
            setattr(scaler, k, v)
        if state["lr_scheduler"] is not None and e.lr_scheduler is not None:
            e.lr_scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_state(state["rng"])

    def replay(self, grads: Dict[str, torch.Tensor]) -> None:
        """Apply one journaled step's gradients through ZeRO's own ``_optimizer_step`` (not captured again)."""
        self.capturing = False
        try:
            for key, grad in grads.items():
                g = int(key)
                self.fp32[g].grad = grad
                self.opt._optimizer_step(g)
                self.fp32[g].grad = None
        finally:
            self.capturing = True

    def refresh_low_precision(self) -> None:
        """Copy the fp32 partitions into the model's params and gather them inside the ZeRO group (collective)."""
        self.opt.update_lp_params()

    def close(self) -> None:
        self._hook.remove()
