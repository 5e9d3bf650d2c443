"""Several trainer ranks fed from one transfer queue: rank 0 of the trainers' process group owns the queue and hands
every rank its groups over the trainers' group; the other ranks never talk to the queue.

Encoding (:meth:`ScatteredQueue._scatter`, nothing pickled): rank 0 encodes each rank's payload with the transport's
msgpack codec (:func:`ds_ext.asyncflow.transport.encode`: tensors as raw bytes with dtype and shape, group
reservations as maps), broadcasts the byte lengths as an ``int64 [world]`` tensor, then scatters ``uint8 [max
length]`` tensors (each payload zero-padded); every rank decodes its first ``length`` bytes.

Two paths, chosen by the trainer's first call of a step (every rank runs the same code, so they agree):

* **Streaming** (``take`` first; every normalisation where the engine can correct DAPO's total, see
  :mod:`ds_ext.grpo.trainer`): each ``take`` of ``n`` groups is one collective micro-batch. Rank 0 takes the
  next ``n x world`` complete groups of the slot as they arrive (running ``idle_work`` -- local generation -- while
  too few are complete), splits them over the ranks by response tokens (greedy, longest group first, to the rank
  with the fewest tokens among those with fewer than ``n`` groups) and scatters them. Every rank then trains that
  micro-batch while the rollout workers keep generating the rest of the step. ``last_streamed`` says whether the
  micro-batch was handed out before the step's last group completed. A ``slot_tokens`` call after the step's last
  ``take`` (streamed DAPO's correction) is answered from what rank 0 handed out: each rank gets its replica's
  response-token total (collective; called before the step's last ``take`` it would count only the groups handed
  out so far).
* **Whole step** (``slot_tokens`` first; DAPO where the engine cannot correct a streamed step): rank 0 waits until
  the slot is complete, splits it by the queue's token balancing (``dp_size = world``) and scatters each rank its
  whole share with its replica's token total; later ``take`` calls are served from the rank's list. Nothing streams
  on this path (``last_streamed`` is ``False``).

:class:`ScatteredQueue` has the queue's consumer interface (``take``, ``slot_tokens``, ``finish_slot``), so
:class:`~ds_ext.grpo.trainer.GRPOTrainer` runs unchanged on top of it.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from ds_ext.asyncflow.queue import greedy_ranks
from ds_ext.asyncflow.transport import decode, encode


def group_tokens(group: dict) -> int:
    return sum(int(s["response_len"]) for s in group["samples"])


def balance(groups: List[dict], world: int, per_rank: int) -> List[List[dict]]:
    """Split ``world x per_rank`` groups into ``world`` lists of ``per_rank``, balancing response tokens (greedy:
    longest group first, onto the open rank with the fewest tokens; ties to the lower rank)."""
    out: List[List[dict]] = [[] for _ in range(world)]
    for g, rank in zip(groups, greedy_ranks([group_tokens(g) for g in groups], [0] * world, [0] * world, per_rank)):
        out[rank].append(g)
    for lst in out:  # train in slot order within a micro-batch (deterministic collation)
        lst.sort(key=lambda g: g["meta"].index_in_slot)
    return out


class ScatteredQueue:
    def __init__(self, queue, rank: int, world: int, replica_of: Callable[[int], int], group=None,
                 idle_work: Optional[Callable[[], bool]] = None):
        self.queue, self.rank, self.world, self.group = queue, rank, world, group
        self.replica_of, self.idle_work = replica_of, idle_work
        self.slot: Optional[int] = None  # the slot gathered whole (DAPO path)
        self.mine: List[dict] = []
        self.replica_tokens = 0
        self.last_streamed = False
        self.streaming_slot: Optional[int] = None  # the slot handed out micro-batch by micro-batch
        self.streamed_tokens = [0] * world          # rank 0: response tokens handed to each rank in that slot

    def _scatter(self, payload: Optional[list]):
        """Rank 0's ``payload[r]`` to rank ``r`` (see the module docstring's encoding)."""
        sizes = torch.zeros(self.world, dtype=torch.int64)
        if self.rank == 0:
            blobs = [encode(p) for p in payload]
            sizes = torch.tensor([len(b) for b in blobs], dtype=torch.int64)
        dist.broadcast(sizes, src=self._src(), group=self.group)
        width = int(sizes.max())
        out = torch.zeros(width, dtype=torch.uint8)
        chunks = None
        if self.rank == 0:
            chunks = [torch.zeros(width, dtype=torch.uint8) for _ in blobs]
            for c, b in zip(chunks, blobs):
                if b:
                    c[:len(b)] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
        dist.scatter(out, chunks, src=self._src(), group=self.group)
        return decode(out[:int(sizes[self.rank])].numpy().tobytes())

    def _src(self) -> int:
        """The global rank of the group's rank 0 (the collectives name the source globally)."""
        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def _wait_a_little(self) -> None:
        if self.idle_work is None or not self.idle_work():
            time.sleep(0.02)

    # -- whole step (DAPO) -------------------------------------------------------------------------------------
    def _begin(self, slot: int) -> None:
        if self.slot == slot:
            return
        payload = self._gather_slot(slot) if self.rank == 0 else None
        self.slot, (self.mine, self.replica_tokens) = slot, self._scatter(payload)
        self.last_streamed = False

    def _gather_slot(self, slot: int) -> list:
        share = self.queue.groups_per_step // self.world
        per_rank = [[] for _ in range(self.world)]
        while any(len(g) < share for g in per_rank):
            for r in range(self.world):
                more = self.queue.take("train", slot, share - len(per_rank[r]), r, self.world, timeout=0.0)
                per_rank[r] += more or []
            if any(len(g) < share for g in per_rank):
                self._wait_a_little()
        replica_tokens = self._replica_totals([sum(group_tokens(g) for g in groups) for groups in per_rank])
        return [(per_rank[k], replica_tokens[k]) for k in range(self.world)]

    # -- streaming -----------------------------------------------------------------------------------------------
    def _gather_micro(self, slot: int, n: int) -> list:
        need, got = n * self.world, []
        while len(got) < need:
            got += self.queue.take("train", slot, need - len(got), 0, 1, timeout=0.0) or []
            if len(got) < need:
                self._wait_a_little()
        # the slot is still incomplete now: this micro-batch trains while the step's other groups are generated
        streamed = self.queue.slot_tokens(slot, wait=False) is None
        shares = balance(got, self.world, n)
        for rank, groups in enumerate(shares):
            self.streamed_tokens[rank] += sum(group_tokens(g) for g in groups)
        return [(groups, streamed) for groups in shares]

    def _replica_totals(self, tokens: List[int]) -> List[int]:
        return [sum(tokens[r] for r in range(self.world) if self.replica_of(r) == self.replica_of(k))
                for k in range(self.world)]

    # -- the queue's consumer interface ------------------------------------------------------------------------
    def take(self, consumer: str, slot: int, max_groups: int, dp_rank: int = 0, dp_size: int = 1,
             timeout: Optional[float] = None) -> List[dict]:
        if self.slot == slot:  # the whole step was gathered (DAPO): serve from this rank's list
            out, self.mine = self.mine[:max_groups], self.mine[max_groups:]
            return out
        if self.streaming_slot != slot:
            self.streaming_slot, self.streamed_tokens = slot, [0] * self.world
        payload = self._gather_micro(slot, max_groups) if self.rank == 0 else None
        groups, self.last_streamed = self._scatter(payload)
        return groups

    def slot_tokens(self, slot: int, wait: bool = True, timeout: Optional[float] = None) -> int:
        if self.streaming_slot == slot:  # after the step's takes: the replica's total of what was handed out
            return self._scatter(self._replica_totals(self.streamed_tokens) if self.rank == 0 else None)
        self._begin(slot)
        return self.replica_tokens

    def finish_slot(self, slot: int, consumers=("train",)) -> None:
        if self.rank == 0:
            self.queue.finish_slot(slot, consumers)
