"""GPU weight sync into running vLLM engines: an NCCL broadcast group between trainer rank 0 and the engines, behind
the interface of :class:`~ds_ext.asyncflow.vllm_sync.FileWeightPusher` (``push`` on the trainer, a handle through
``set_weights``, a ``collective_rpc`` reload between two decode steps in the worker).

Group: trainer rank 0 hosts a ``torch.distributed.TCPStore`` on the address and port it is given
(``rollout.nccl_addr`` / ``nccl_port``; nothing listens elsewhere) and is rank 0 of a ``ProcessGroupNCCL`` over it;
engine ``i`` joins as rank ``i + 1`` (:func:`receive_broadcast` creates its side on the first handle). Only torch's
public process-group API and vLLM's ``collective_rpc`` / model runner ``reload_weights`` are used.

Push ``version`` (call order):

1. the trainer sends every engine the handle ``{"kind": "nccl", "version", "buckets": [[(name, shape, dtype)...]...],
   "addr", "port", "world"}`` (``set_weights``, RPC; small);
2. for each bucket (at most ``bucket_mb``; a larger tensor is a bucket of its own) the trainer packs the module's
   tensors into one flat CUDA buffer (the only copy: one bucket) and broadcasts it from rank 0;
3. each engine, at its next decode-step boundary, receives the buckets in the same order, views them back into
   tensors and streams them into ``reload_weights`` (so a bucket is freed before the next arrives).

The trainer is blocked from its first broadcast until every engine reached a step boundary (at most one decode
step) and the last bucket is sent; ``blocking_s`` measures it. Limits: a dead engine makes the broadcast hang until
NCCL's timeout (the file path drops it instead); one process per GPU (NCCL refuses two ranks on one device -- a
colocated engine on the trainer's GPU uses the file path, which works on GPUs too).
"""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Dict, List

import torch

from ds_ext.asyncflow.vllm_sync import checkpoint_tensors
from ds_ext.asyncflow.weights import WeightPusher


def plan_buckets(module: torch.nn.Module, bucket_bytes: int) -> List[List[tuple]]:
    """``[[(name, shape, dtype name), ...], ...]``: the tensors in broadcast order, grouped into buckets."""
    buckets, cur, size = [], [], 0
    for name, t in checkpoint_tensors(module):
        n = t.numel() * t.element_size()
        if cur and size + n > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append((name, tuple(t.shape), str(t.dtype).replace("torch.", "")))
        size += n
    if cur:
        buckets.append(cur)
    return buckets


def _group(addr: str, port: int, rank: int, world: int):
    store = torch.distributed.TCPStore(addr, port, world, is_master=rank == 0, timeout=timedelta(seconds=600))
    return torch.distributed.ProcessGroupNCCL(store, rank, world)


def _flat(bucket: List[tuple], device) -> torch.Tensor:
    n = sum(int(torch.Size(shape).numel()) * getattr(torch, dt).itemsize for _, shape, dt in bucket)
    return torch.empty(n, dtype=torch.uint8, device=device)


def _views(flat: torch.Tensor, bucket: List[tuple]):
    off = 0
    for name, shape, dt in bucket:
        dtype = getattr(torch, dt)
        n = int(torch.Size(shape).numel()) * dtype.itemsize
        yield name, flat[off:off + n].view(dtype).view(shape)
        off += n


def receive_broadcast(worker, handle: Dict) -> float:
    """Inside vLLM's worker (``collective_rpc``): join the group once, receive the buckets, reload them."""
    from vllm.config import set_current_vllm_config
    if getattr(worker, "_ds_ext_pg", None) is None:
        worker._ds_ext_pg = _group(handle["addr"], handle["port"], handle["rank"], handle["world"])
    pg, device = worker._ds_ext_pg, torch.device("cuda", torch.cuda.current_device())
    t = time.perf_counter()

    def tensors():
        for bucket in handle["buckets"]:
            flat = _flat(bucket, device)
            pg.broadcast(flat, 0).wait()
            yield from _views(flat, bucket)

    runner = worker.model_runner
    with set_current_vllm_config(runner.vllm_config):
        runner.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t


class NCCLWeightPusher(WeightPusher):
    """Trainer rank 0's side (see the module docstring); ``workers``: name -> RRef, engine ``i`` is rank ``i + 1``."""

    def __init__(self, workers: Dict[str, object], queue, addr: str, port: int, bucket_mb: float = 512.0):
        super().__init__(workers, queue)
        self.addr, self.port = addr, port
        self.ranks = {name: i + 1 for i, name in enumerate(workers)}
        self.world = len(workers) + 1
        self.bucket_bytes = max(1, int(bucket_mb * 2 ** 20))
        self.pg = None
        self.probes: Dict[int, torch.Tensor] = {}

    def push(self, version: int, module: torch.nn.Module) -> None:
        t0 = time.perf_counter()
        self._settle()
        buckets = plan_buckets(module, self.bucket_bytes)
        with self._lock:
            targets = list(self.workers.items())
        futures = []
        for name, rref in targets:
            handle = {"kind": "nccl", "version": version, "buckets": buckets, "addr": self.addr,
                      "port": self.port, "rank": self.ranks[name], "world": self.world}
            ack: List[float] = []
            fut = rref.rpc_async().set_weights(version, handle)
            fut.add_done_callback(lambda _f, ack=ack: ack.append(time.perf_counter()))
            futures.append((name, fut, ack))
        if self.pg is None:
            self.pg = _group(self.addr, self.port, 0, self.world)
        params = dict(checkpoint_tensors(module))
        nbytes = 0
        for bucket in buckets:
            flat = torch.cat([params[name].detach().reshape(-1).view(torch.uint8) for name, _, _ in bucket])
            self.pg.broadcast(flat.cuda(), 0).wait()
            nbytes += flat.numel()
        torch.cuda.synchronize()
        self._pending = (t0, futures)
        self.pushes.append({"version": version, "bytes": nbytes, "workers": len(targets), "transfer_s": None,
                            "blocking_s": time.perf_counter() - t0})
