"""Several trainer ranks fed from one transfer queue: rank 0 of the trainers' process group owns the queue and, at
the start of each step, takes the whole slot for every rank (the queue's token-balanced split) and scatters each
rank its groups (``torch.distributed.scatter_object_list`` over the trainers' group); the other ranks never talk to
the queue. Every rank also gets its replica's response-token total (DAPO's denominator).

:class:`ScatteredQueue` has the queue's consumer interface (``take``, ``slot_tokens``, ``finish_slot``), so
:class:`~ds_ext.asyncflow.trainer.GRPOTrainer` runs unchanged on top of it. Call order per step ``V``: the first
``take``/``slot_tokens`` of slot ``V`` is collective over the trainers (rank 0 blocks until the slot is complete,
running ``idle_work`` -- local generation -- meanwhile); later calls are served from the rank's list.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional

import torch.distributed as dist


class ScatteredQueue:
    def __init__(self, queue, rank: int, world: int, replica_of: Callable[[int], int], group=None,
                 idle_work: Optional[Callable[[], bool]] = None):
        self.queue, self.rank, self.world, self.group = queue, rank, world, group
        self.replica_of, self.idle_work = replica_of, idle_work
        self.slot: Optional[int] = None
        self.mine: List[dict] = []
        self.replica_tokens = 0

    def _begin(self, slot: int) -> None:
        if self.slot == slot:
            return
        payload = self._gather_slot(slot) if self.rank == 0 else None
        out = [None]
        dist.scatter_object_list(out, payload, src=0, group=self.group)
        self.slot, (self.mine, self.replica_tokens) = slot, out[0]

    def _gather_slot(self, slot: int) -> list:
        share = self.queue.groups_per_step // self.world
        per_rank = [[] for _ in range(self.world)]
        while any(len(g) < share for g in per_rank):
            for r in range(self.world):
                more = self.queue.take("train", slot, share - len(per_rank[r]), r, self.world, timeout=0.0)
                per_rank[r] += more or []
            if any(len(g) < share for g in per_rank) and (self.idle_work is None or not self.idle_work()):
                time.sleep(0.02)
        tokens = [sum(int(s["response_len"]) for g in groups for s in g["samples"]) for groups in per_rank]
        replica_tokens = [sum(tokens[r] for r in range(self.world) if self.replica_of(r) == self.replica_of(k))
                          for k in range(self.world)]
        return [(per_rank[k], replica_tokens[k]) for k in range(self.world)]

    # -- the queue's consumer interface ------------------------------------------------------------------------
    def take(self, consumer: str, slot: int, max_groups: int, dp_rank: int = 0, dp_size: int = 1,
             timeout: Optional[float] = None) -> List[dict]:
        self._begin(slot)
        out, self.mine = self.mine[:max_groups], self.mine[max_groups:]
        return out

    def slot_tokens(self, slot: int, wait: bool = True, timeout: Optional[float] = None) -> int:
        self._begin(slot)
        return self.replica_tokens

    def finish_slot(self, slot: int, consumers=("train",)) -> None:
        if self.rank == 0:
            self.queue.finish_slot(slot, consumers)
