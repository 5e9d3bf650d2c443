"""One rank's trainable state as checkpoint-free recovery moves it: whole (a peer copy) or by pipeline layer (a
neighbour rebuild), plus the point-to-point transfer of such states between ranks.

Two engine kinds: ZeRO-1/2 (the fp32 partition and its optimizer state, through
:class:`ds_ext.recovery.zero_state.ZeroPartitionState`; the model's low-precision params are refreshed from the
partitions afterwards, a collective inside the ZeRO group) and ZeRO-0 (the module's parameters and the torch
optimizer's state, identical on every data-parallel rank).
"""
from __future__ import annotations

import copy
import io
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ds_ext.recovery.zero_state import ENGINE_COUNTERS, ZeroPartitionState, _hyper, rng_state, set_rng_state

SKIPPED_FEATURES = ("recovery", "checkpoint_free", "asyncflow")  # the rank's own, not the shard's


class RankState:
    """Snapshot / restore / wipe of one engine's state, and its pipeline stage split into repeated layers ("body")
    and the rest ("ends": embedding, final norm, head)."""

    def __init__(self, engine, layer_class: Optional[str]):
        self.engine = engine
        self.zero = ZeroPartitionState(engine) if hasattr(engine.optimizer, "single_partition_of_fp32_groups") \
            else None
        if self.zero is not None:
            self.zero.capturing = False  # the journal has its own instance; this one only reads and writes state
        self.inner = engine.optimizer.optimizer if self.zero is not None else engine.optimizer
        self.body = _body_layers(engine.module, layer_class)
        body_ids = {id(p) for layer in self.body for p in layer.parameters()}
        self.ends = {n: p for n, p in engine.module.named_parameters() if id(p) not in body_ids}

    # -- whole state (peer copy) -----------------------------------------------------------------------------
    def snapshot(self) -> Dict[str, Any]:
        if self.zero is not None:
            state = self.zero.snapshot()
        else:
            state = {"module": {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()},
                     "optimizer": copy.deepcopy(self.inner.state_dict()), **self.step_state()}
        state["features"] = {k: v for k, v in self.engine.ds_ext_state_dict().items() if k not in SKIPPED_FEATURES}
        return state

    def restore(self, state: Dict[str, Any]) -> None:
        if self.zero is not None:
            self.zero.restore(state)
        else:
            self.engine.module.load_state_dict(state["module"])
            self.inner.load_state_dict(state["optimizer"])
            self.restore_step_state(state)
        self.engine.ds_ext_load_state_dict(state["features"])

    def step_state(self) -> Dict[str, Any]:
        if self.zero is not None:
            return self.zero.step_state()
        e = self.engine
        counters = {k: int(getattr(e, k)) for k in ENGINE_COUNTERS}
        if getattr(e, "ds_ext_in_step", False) and not hasattr(e, "pipe_buffers"):
            counters["micro_steps"] += 1  # DeepSpeedEngine.step() counts it after the features ran
        return {"counters": counters,
                "hyper": [_hyper(g) for g in self.inner.param_groups], "scaler": {},
                "lr_scheduler": e.lr_scheduler.state_dict() if e.lr_scheduler is not None else None,
                "rng": rng_state()}

    def restore_step_state(self, state: Dict[str, Any]) -> None:
        if self.zero is not None:
            return self.zero.restore_step_state(state)
        e = self.engine
        for k, v in state["counters"].items():
            setattr(e, k, v)
        for group, hyper in zip(self.inner.param_groups, state["hyper"]):
            group.update({k: (tuple(v) if isinstance(group.get(k), tuple) else v) for k, v in hyper.items()})
        if state["lr_scheduler"] is not None and e.lr_scheduler is not None:
            e.lr_scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_state(state["rng"])

    def refresh(self) -> None:
        """Make the model's params agree with the fp32 partitions (ZeRO: all-gather inside the ZeRO group; every
        rank of the group must call it)."""
        if self.zero is not None:
            self.zero.refresh_low_precision()

    def wipe(self) -> None:
        """Lose everything, as a replaced node would: params and partitions NaN, optimizer state and counters gone."""
        with torch.no_grad():
            for p in self.engine.module.parameters():
                p.fill_(float("nan"))
            if self.zero is not None:
                for t in self.zero.fp32:
                    t.fill_(float("nan"))
        self.inner.state.clear()
        for k in ENGINE_COUNTERS:
            setattr(self.engine, k, 0)

    # -- by layer (neighbour rebuild) ------------------------------------------------------------------------
    def body_state(self) -> Dict[str, torch.Tensor]:
        """The repeated layers' parameters, keyed ``"<local layer index>.<name>"`` (comparable across stages)."""
        return {f"{j}.{k}": p.detach().clone() for j, layer in enumerate(self.body) for k, p in layer.named_parameters()}

    def end_state(self) -> Dict[str, torch.Tensor]:
        """The stage's other parameters by their module names (embedding, final norm, head)."""
        return {n: p.detach().clone() for n, p in self.ends.items()}

    def load_stage(self, body: Dict[str, torch.Tensor], ends: Dict[str, torch.Tensor]) -> None:
        """Set this stage's parameters and restart its optimizer from zero moments (CheckFree: moments are not
        transferred). The fp32 partition is refreshed from the new params locally."""
        mine = self.body_state()
        if body.keys() != mine.keys():
            raise ValueError("the neighbouring stage's layers do not match this stage's: "
                             f"{sorted(set(body) ^ set(mine))[:6]} (CheckFree needs stages of equal layers)")
        missing = set(self.ends) - set(ends)
        if missing:
            raise ValueError(f"no replica of this stage's {sorted(missing)} was received (CheckFree+ copies them "
                             "every replicate_ends_interval steps; has one passed since the start?)")
        with torch.no_grad():
            for j, layer in enumerate(self.body):
                for k, p in layer.named_parameters():
                    p.copy_(body[f"{j}.{k}"])
            for n, p in self.ends.items():
                p.copy_(ends[n])
        if self.zero is not None:
            self.zero.opt.refresh_fp32_params()
        self.inner.state.clear()

    def close(self) -> None:
        if self.zero is not None:
            self.zero.close()


def _body_layers(module: nn.Module, layer_class: Optional[str]) -> List[nn.Module]:
    funcs = getattr(module, "forward_funcs", None)
    if funcs is None:
        return []
    if layer_class is None:
        layer_class = repeated_layer_class(module)
    return [f for f in funcs if isinstance(f, nn.Module) and type(f).__name__ == layer_class]


def repeated_layer_class(module: nn.Module) -> str:
    """The class name that occurs most often in a PipelineModule's layer specs (its transformer layer)."""
    names = [getattr(getattr(spec, "typename", None), "__name__", None) for spec in module._layer_specs]
    names = [n for n in names if n is not None]
    if not names:
        raise ValueError("cannot tell the repeated layer class of this PipelineModule: set "
                         "ds_ext.recovery.checkpoint_free.layer_class")
    return max(set(names), key=names.count)


# -- transfer -------------------------------------------------------------------------------------------------
def send_obj(obj: Any, dst: int) -> list:
    """Start sending ``obj`` (anything ``torch.save`` writes) to global rank ``dst``; returns the work handles."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    return [dist.isend(size, dst), dist.isend(payload, dst), payload, size]  # tensors kept alive until waited


def recv_obj(src: int) -> Any:
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src)
    payload = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(payload, src)
    return torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=True)


def wait_all(handles: list) -> None:
    for h in handles:
        if hasattr(h, "wait"):
            h.wait()
