"""megatron-core's ``DistributedOptimizer`` (or a ``ChainedOptimizer`` of them) behind the state protocols of
:mod:`ds_ext.state.partition`: this rank's fp32 main-param shards, their Adam state, and the step state.

The master tensors are the params of each distributed optimizer's inner torch optimizer (megatron's main-param
shards, one tensor per model param this rank owns a slice of), in the order of those optimizers' param groups.
Captured gradients are cloned: megatron's ``main_param.grad`` views the DDP grad buffer, which the next
``zero_grad_buffer`` clears while the journal's writer may still be writing. :meth:`MegatronPartitionState.refresh`
does what megatron's ``step_with_ready_grads`` does after the inner update: main params into the model params, then
an all-gather of the params inside the data-parallel group (collective).

Step state: ``{"counters": {"steps": n}, "hyper", "scaler": {}, "lr_scheduler", "rng"}`` with the hyperparameters
read when the step is committed, i.e. those the next step uses: commit a step after the LR scheduler's step. Imports
no megatron module (the objects are passed in).
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
import torch.distributed as dist

from ds_ext.state.partition import InnerOptimizerState, read_flat, write_flat
from ds_ext.state.tree import hyperparameters, restore_hyperparameters, rng_state, set_rng_state


class MegatronPartitionState(InnerOptimizerState):
    """This rank's shards of a megatron distributed optimizer (a :class:`~ds_ext.state.partition.JournaledState`
    and :class:`~ds_ext.state.partition.FlatShards`).

    Args:
        optimizer: megatron's optimizer from ``get_megatron_optimizer``.
        model_chunks: the DDP-wrapped model chunks (``start_param_sync`` gathers their params).
        scheduler: optional LR scheduler with ``state_dict``/``load_state_dict``, part of the step state.
    """

    clone_grads = True

    def __init__(self, optimizer, model_chunks: List[torch.nn.Module], scheduler=None):
        self.optimizers = list(getattr(optimizer, "chained_optimizers", [optimizer]))
        inners = [o.optimizer for o in self.optimizers]
        super().__init__([p for o in inners for g in o.param_groups for p in g["params"]], inners)
        self.model_chunks, self.scheduler = model_chunks, scheduler
        self.steps = 0  # optimizer steps done (the journal's step counter)

    def layout(self) -> Dict[str, Any]:
        return {"kind": "megatron_distributed_optimizer", "shard_numel": [t.numel() for t in self.tensors],
                "optimizer": [type(o).__name__ for o in self.inners],
                "world_size": dist.get_world_size() if dist.is_initialized() else 1}

    def _param_groups(self) -> list:
        return [g for o in self.inners for g in o.param_groups]

    def step_state(self) -> Dict[str, Any]:
        return {"counters": {"steps": self.steps}, "hyper": [hyperparameters(g) for g in self._param_groups()],
                "scaler": {}, "lr_scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "rng": rng_state()}

    def restore_step_state(self, state: Dict[str, Any]) -> None:
        self.steps = int(state["counters"]["steps"])
        for group, hyper in zip(self._param_groups(), state["hyper"]):
            restore_hyperparameters(group, hyper)
        if self.scheduler is not None and state["lr_scheduler"] is not None:
            self.scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_state(state["rng"])

    def _replay(self, grads: Dict[str, torch.Tensor]) -> None:
        """Every inner optimizer steps once with the captured gradients (tensors without one are skipped by the
        update, as in the captured step)."""
        for key, grad in grads.items():
            self.tensors[int(key)].grad = grad
        for o in self.inners:
            o.step()
        for t in self.tensors:
            t.grad = None

    def refresh(self) -> None:
        """Main params into the model params, then all-gather them inside the data-parallel group (collective)."""
        for opt in self.optimizers:
            copy = getattr(opt, "_copy_main_params_to_model_params", None)
            if copy is not None:
                copy()
        for chunk in self.model_chunks:
            if hasattr(chunk, "start_param_sync"):
                chunk.start_param_sync(force_sync=True)

    def read(self) -> torch.Tensor:
        """A flat fp32 copy ``[n]`` of the shards."""
        return read_flat(self.tensors)

    def write(self, flat: torch.Tensor) -> None:
        """Write the shards back and :meth:`refresh` the model params from them (collective)."""
        write_flat(self.tensors, flat)
        self.refresh()

