"""Per-rank counters of collectives and bytes, by kind and by the span of their group.

Every ``torch.distributed`` communication call of this process (DeepSpeed's ``deepspeed.comm`` ends in them; the
collectives DeepSpeed's backend binds at start-up, :func:`ds_ext._deepspeed.comm_backend_collectives`, are wrapped
too) is recorded as ``(kind, span)``:

* kind: ``all_reduce``, ``reduce_scatter``, ``all_gather``, ``broadcast``, ``reduce``, ``all_to_all``,
  ``barrier``, ``p2p``, ``other``;
* span: ``self`` (a group of one rank), ``replica`` (all ranks in one replica), ``cross_replica`` (the group, or the
  point-to-point peer, is in another replica).

Opt-in (``ds_ext.noloco.count_collectives``; benchmarks install their own). :meth:`CommAccounting.install` replaces
the functions **process-wide** (``torch.distributed`` module attributes, so every caller in the process is counted)
until :meth:`CommAccounting.uninstall`. Cost per call, no communication: binding the arguments to the function's
signature (``inspect.Signature.bind_partial``), a group-span lookup (``dist.get_process_group_ranks`` on the first
call per group, cached by ``id``) and three dict updates.
"""
from __future__ import annotations

import functools
import inspect
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ds_ext._deepspeed import comm_backend_collectives

KINDS = {
    "all_reduce": "all_reduce", "all_reduce_coalesced": "all_reduce", "reduce_scatter": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter", "all_gather": "all_gather",
    "all_gather_into_tensor": "all_gather", "_all_gather_base": "all_gather", "all_gather_object": "all_gather",
    "broadcast": "broadcast", "broadcast_object_list": "broadcast", "reduce": "reduce", "gather": "other",
    "scatter": "other", "all_to_all": "all_to_all", "all_to_all_single": "all_to_all", "barrier": "barrier",
    "send": "p2p", "recv": "p2p", "isend": "p2p", "irecv": "p2p",
}
P2P_PEER_ARG = {"send": "dst", "isend": "dst", "recv": "src", "irecv": "src"}
# The argument holding what this rank contributes (defaults to the first argument).
PAYLOAD_ARG = {"all_gather_into_tensor": "input_tensor", "_all_gather_base": "input_tensor",
               "reduce_scatter": "input_list", "reduce_scatter_tensor": "input", "_reduce_scatter_base": "input",
               "all_to_all_single": "input", "all_to_all": "input_tensor_list"}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def wire_bytes_sent(name: str, payload: int, n: int) -> float:
    """Bytes this rank puts on the wire for one call with an ``n``-rank group, by the bandwidth-optimal (ring)
    algorithms: all-reduce 2(n-1)/n, reduce-scatter and all-to-all (n-1)/n of the payload, all-gather (n-1) times
    the local part, broadcast/reduce one payload, a send its tensor, a receive nothing."""
    kind = KINDS.get(name, "other")
    if n <= 1 or kind == "barrier" or name in ("recv", "irecv"):
        return 0.0
    factor = {"all_reduce": 2 * (n - 1) / n, "reduce_scatter": (n - 1) / n, "all_to_all": (n - 1) / n,
              "all_gather": n - 1}.get(kind, 1.0)
    return factor * payload


class CommAccounting:
    """Counts this rank's communication. ``replica_of`` maps a global rank to its replica index."""

    def __init__(self, rank: int, replica_of: Callable[[int], int]):
        self.rank, self.replica_of = rank, replica_of
        self.calls: Dict[Tuple[str, str], int] = defaultdict(int)
        self.bytes: Dict[Tuple[str, str], int] = defaultdict(int)   # payload bytes handed to the call
        self.sent: Dict[Tuple[str, str], float] = defaultdict(float)  # estimated wire bytes sent (ring model)
        self.cross_replica_ops: List[str] = []  # names of collectives (not p2p) that spanned replicas
        self._saved: List[tuple] = []
        self._group_span: Dict[int, str] = {}

    def _span_of_group(self, group) -> Tuple[str, int]:
        key = id(group)
        if key not in self._group_span:
            ranks = dist.get_process_group_ranks(group if group is not None else c10d._get_default_group())
            replicas = {self.replica_of(r) for r in ranks}
            span = "self" if len(ranks) == 1 else "replica" if len(replicas) == 1 else "cross_replica"
            self._group_span[key] = (span, len(ranks))
        return self._group_span[key]

    def record(self, name: str, payload: int, group, peer: Optional[int] = None) -> None:
        kind = KINDS.get(name, "other")
        if peer is not None:
            span, n = ("replica" if self.replica_of(peer) == self.replica_of(self.rank) else "cross_replica"), 2
        else:
            span, n = self._span_of_group(group)
        self.calls[(kind, span)] += 1
        self.bytes[(kind, span)] += payload
        self.sent[(kind, span)] += wire_bytes_sent(name, payload, n)
        if span == "cross_replica" and kind != "p2p":
            self.cross_replica_ops.append(name)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            bound = sig.bind_partial(*args, **kwargs).arguments
            peer = bound.get(P2P_PEER_ARG[name]) if name in P2P_PEER_ARG else None
            payload = bound.get(PAYLOAD_ARG.get(name), next(iter(bound.values()), None))
            self.record(name, _nbytes(payload), bound.get("group"), peer)
            return fn(*args, **kwargs)
        return counted

    def install(self, extra: Sequence[Tuple[object, str, str]] = ()) -> "CommAccounting":
        """Wrap ``torch.distributed``'s communication functions, and each ``(object, attribute, torch.distributed
        name)`` of ``extra``: functions bound elsewhere before this call (DeepSpeed's backend:
        :func:`deepspeed_accounting`; megatron's grad buffers: ``install_megatron_accounting``)."""
        if self._saved:
            raise RuntimeError("CommAccounting is already installed")
        targets = [(dist, n) for n in KINDS if hasattr(dist, n)]
        targets += [(c10d, n) for n in ("_all_gather_base", "_reduce_scatter_base") if hasattr(c10d, n)]
        for obj, attr in targets:
            self._swap(obj, attr, attr)
        for obj, attr, name in extra:
            self._swap(obj, attr, name)
        return self

    def _swap(self, obj, attr: str, name: str) -> None:
        original = getattr(obj, attr)
        self._saved.append((obj, attr, original))
        setattr(obj, attr, self._wrap(name, original))

    def uninstall(self) -> None:
        for obj, attr, original in reversed(self._saved):
            setattr(obj, attr, original)
        self._saved.clear()

    def summary(self) -> Dict[str, int]:
        """Flat counters for metrics: ``calls/<kind>/<span>`` and ``bytes/<kind>/<span>``."""
        out = {f"calls/{k}/{s}": v for (k, s), v in sorted(self.calls.items())}
        out.update({f"bytes/{k}/{s}": v for (k, s), v in sorted(self.bytes.items())})
        out["sent_bytes"] = sum(self.sent.values())
        out["sent_bytes_cross_replica"] = sum(v for (_, s), v in self.sent.items() if s == "cross_replica")
        out["cross_replica_collectives"] = len(self.cross_replica_ops)
        return out


def deepspeed_accounting(rank: int, replica_of: Callable[[int], int]) -> CommAccounting:
    """A :class:`CommAccounting` installed on ``torch.distributed`` and on DeepSpeed's comm backend (call it after
    ``deepspeed.init_distributed``)."""
    return CommAccounting(rank, replica_of).install(comm_backend_collectives())
