"""One rank's trainable state as checkpoint-free recovery moves it: whole (a peer copy) or by pipeline layer (a
neighbour rebuild), plus the point-to-point transfer of such states between ranks.

The whole state is the engine's :class:`~ds_ext.state.partition.PartitionState` (ZeRO-1/2: the fp32 partition and
its optimizer state, the model's low-precision params refreshed from the partitions afterwards, a collective inside
the ZeRO group; ZeRO-0: the module's parameters and the torch optimizer's state, identical on every data-parallel
rank) plus the ``state_dict()`` of every attached feature whose ``state_from_peer`` is true (state of the shard, not
of the rank: the journal's and the sample ledger's are the rank's own).
"""
from __future__ import annotations

import io
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ds_ext import _deepspeed as ds
from ds_ext.state.partition import ZeroPartitionState, partition_state


def peer_copyable(features) -> List[str]:
    """Names of the features whose state a rebuilt rank may take from a live peer holding the same shard."""
    return [f.name for f in features if getattr(f, "state_from_peer", True)]


class RankState:
    """Snapshot / restore / wipe of one engine's state, and its pipeline stage split into repeated layers ("body")
    and the rest ("ends": embedding, final norm, head)."""

    def __init__(self, engine, layer_class: Optional[str]):
        self.engine = engine
        self.partition = partition_state(engine)  # reads and writes state only: no gradient capture
        self.zero = self.partition if isinstance(self.partition, ZeroPartitionState) else None
        self.inner = self.partition.inner
        self.body = _body_layers(engine.module, layer_class)
        body_ids = {id(p) for layer in self.body for p in layer.parameters()}
        self.ends = {n: p for n, p in engine.module.named_parameters() if id(p) not in body_ids}

    # -- whole state (peer copy) -----------------------------------------------------------------------------
    def snapshot(self) -> Dict[str, Any]:
        state = self.partition.snapshot()
        copyable = set(peer_copyable(self.engine.ds_ext_features))
        state["features"] = {k: v for k, v in self.engine.ds_ext_state_dict().items() if k in copyable}
        return state

    def restore(self, state: Dict[str, Any]) -> None:
        self.partition.restore(state)
        self.engine.ds_ext_load_state_dict(state["features"])

    def step_state(self) -> Dict[str, Any]:
        return self.partition.step_state()

    def restore_step_state(self, state: Dict[str, Any]) -> None:
        self.partition.restore_step_state(state)

    def refresh(self) -> None:
        """Make the model's params agree with the fp32 partitions (ZeRO: all-gather inside the ZeRO group; every
        rank of the group must call it)."""
        self.partition.refresh()

    def wipe(self) -> None:
        """Lose everything, as a replaced node would: params and partitions NaN, optimizer state and counters gone."""
        with torch.no_grad():
            for p in self.engine.module.parameters():
                p.fill_(float("nan"))
            if self.zero is not None:
                for t in self.zero.tensors:
                    t.fill_(float("nan"))
        self.inner.state.clear()
        ds.set_engine_counters(self.engine, {k: 0 for k in ds.ENGINE_COUNTERS})

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
        self.partition.refresh_from_params()
        self.inner.state.clear()

    def close(self) -> None:
        self.partition.close()


def _body_layers(module: nn.Module, layer_class: Optional[str]) -> List[nn.Module]:
    funcs = ds.pipeline_layers(module)
    if funcs is None:
        return []
    if layer_class is None:
        layer_class = repeated_layer_class(module)
    return [f for f in funcs if isinstance(f, nn.Module) and type(f).__name__ == layer_class]


def repeated_layer_class(module: nn.Module) -> str:
    """The class name that occurs most often in a PipelineModule's layer specs (its transformer layer)."""
    specs = ds.pipeline_layer_specs(module)
    names = [getattr(getattr(spec, "typename", None), "__name__", None) for spec in specs]
    names = [n for n in names if n is not None]
    if not names:
        raise ValueError("cannot tell the repeated layer class of this PipelineModule: set "
                         "ds_ext.recovery.checkpoint_free.layer_class")
    return max(set(names), key=names.count)


# -- transfer -------------------------------------------------------------------------------------------------
def send_obj(obj: Any, dst: int, group) -> list:
    """Start sending ``obj`` (tensors and plain values, as ``torch.save`` writes them) to global rank ``dst`` of
    ``group``; returns the work handles (and the buffers they read, kept alive until waited)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8)
    size = torch.tensor([payload.numel()], dtype=torch.int64)
    return [dist.isend(size, dst, group=group), dist.isend(payload, dst, group=group), payload, size]


def recv_obj(src: int, group) -> Any:
    """Receive what :func:`send_obj` sent from global rank ``src`` of ``group`` (``weights_only``: no code runs)."""
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=group)
    payload = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(payload, src, group=group)
    return torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=True)


def wait_all(handles: list) -> None:
    for h in handles:
        if hasattr(h, "wait"):
            h.wait()
