"""TransferQueue: the streaming data store between rollout producers and training consumers (AsyncFlow,
arXiv 2507.01663, section 3; the column/controller split follows TransferQueue's code).

Data plane: rows are samples, columns are fields (``prompt_ids``, ``response_ids``, ``logprobs``, ``reward``, ...);
a row is written column by column, by whoever produces that field. Control plane (:class:`TransferQueue`, one lock):
per row, which columns are written; per consumer task, which rows it has consumed; per group, its producer, its
batch slot and the policy version it was generated with.

Staleness (bounded, exact): training step ``V`` consumes the groups of *batch slot* ``V`` (``groups_per_step``
groups), streamed as they complete. Every trained sample has ``lag = V - v <= max_staleness`` (``v``: the version of
its oldest token), enforced by ``staleness_policy``: ``pace`` (default) -- a producer whose weights have version ``v``
may reserve a group of slot ``b`` only if ``b - v <= max_staleness`` (it waits for newer weights; 0: the rollout of
slot V waits for the weights of step V, i.e. synchronous); ``drop`` -- producers are held by the capacity only, and a
group delivered with ``b - v > max_staleness`` is discarded (``stale_dropped``) and its prompt regenerated for the
same slot by the next producer (work is lost instead of waited for; TRL's and prime-rl's discard).
Reservations fill slots in order, and at most
``capacity_slots`` slots beyond the one in training hold data (memory bound, admission control).

Faults: a group whose producer died (``producer_died``) or whose lease expired before it completed is dropped whole,
counted, and its reservation goes back to the pool, so another producer regenerates the same prompt for the same
slot: no half group is ever handed out, and no slot stays short. A slow producer that delivers a group after its
lease expired is not an error: :meth:`TransferQueue.put_group` discards the group, counts it (``late_discarded``)
and returns ``False``; the producer goes on with its next reservation.

Consumers get only complete groups (every sample has every required column), each exactly once per consumer task;
``take`` with ``dp_rank/dp_size`` gives each data-parallel rank ``groups_per_step / dp_size`` groups of the slot,
assigned greedily by token count as groups complete (the rank with the fewest tokens gets the next group).
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple


def greedy_ranks(sizes: Sequence[int], load: List[int], count: List[int], share: int) -> List[int]:
    """Token balancing, the one rule of the queue's assignment and the trainer scatter: items in order of size
    (largest first, ties in the given order), each to the rank with the least ``load`` among ranks holding fewer than
    ``share`` items (ties to the lower rank). Returns each item's rank; ``load`` and ``count`` are updated."""
    ranks = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = min((r for r in range(len(load)) if count[r] < share), key=lambda r: (load[r], r))
        ranks[i] = rank
        load[rank] += sizes[i]
        count[rank] += 1
    return ranks


@dataclass
class GroupMeta:
    """One GRPO group: ``group_size`` rows generated from one prompt by one producer with one policy version."""

    group_id: int
    slot: int
    index_in_slot: int
    producer: str
    version: int
    rows: List[int]
    leased_until: float
    complete: bool = False
    tokens: int = 0
    assigned_rank: Optional[int] = None


class RolloutFailed(RuntimeError):
    """A producer reported an error it cannot recover from (e.g. the user's reward raised): every consumer and
    producer call raises this from then on, so no process waits forever on groups that will not come."""


@dataclass
class QueueStats:
    reserved: int = 0
    completed: int = 0
    consumed: int = 0
    dropped_partial: int = 0
    late_discarded: int = 0  # groups delivered after their lease expired (already re-queued): discarded
    stale_dropped: int = 0   # staleness_policy "drop": groups delivered too stale, discarded and regenerated
    lag_histogram: Counter = field(default_factory=Counter)


class TransferQueue:
    """Thread-safe controller + column store for one RL task (see the module docstring)."""

    def __init__(self, group_size: int, groups_per_step: int, max_staleness: int = 1, capacity_slots: int = None,
                 lease_s: float = 600.0, token_column: str = "response_len", start_slot: int = 0,
                 staleness_policy: str = "pace"):
        if group_size < 1 or groups_per_step < 1 or max_staleness < 0:
            raise ValueError("group_size and groups_per_step must be >= 1, max_staleness >= 0")
        if staleness_policy not in ("pace", "drop"):
            raise ValueError(f"staleness_policy {staleness_policy!r}: 'pace' or 'drop'")
        self.group_size, self.groups_per_step, self.max_staleness = group_size, groups_per_step, max_staleness
        self.staleness_policy = staleness_policy
        self.capacity_slots = capacity_slots if capacity_slots is not None else max_staleness + 1
        self.lease_s, self.token_column = lease_s, token_column
        self._cv = threading.Condition()
        self._columns: Dict[int, Dict[str, Any]] = {}
        self._groups: Dict[int, GroupMeta] = {}
        self._free: List[Tuple[int, int]] = []          # (slot, index) reservations given back by dropped groups
        # slot * groups_per_step + index of the next fresh one; a resumed run starts at the slot after its last step
        self._next_reservation = start_slot * groups_per_step
        self._consumed: Dict[str, set] = {}
        self._train_slot = start_slot                   # the slot the trainer consumes now (= trainer version)
        self._next_row = 0
        self._next_group = 0
        self.stats = QueueStats()
        self.closed = False
        self.error: Optional[str] = None

    def fail(self, message: str) -> None:
        """A producer's unrecoverable error (its message names the prompt and carries the traceback): wakes
        every waiter, and every later call raises :class:`RolloutFailed` with it."""
        with self._cv:
            if self.error is None:
                self.error = message
            self._cv.notify_all()

    def _check_failed(self) -> None:
        if self.error is not None:
            raise RolloutFailed(self.error)

    # -- producers ---------------------------------------------------------------------------------------------
    def reserve(self, producer: str, version: int, timeout: Optional[float] = None) -> Optional[GroupMeta]:
        """A group to generate with weights ``version``: blocks while admission control says no (staleness bound or
        capacity). Returns ``None`` on timeout or when the queue is closed. ``(slot, index_in_slot)`` names the
        prompt: any producer regenerating a dropped group gets the same pair."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                self._check_failed()
                self._expire_leases()
                nxt = self._peek_reservation()
                if self.closed:
                    return None
                if nxt is not None and self._admissible(nxt[0], version):
                    return self._take_reservation(producer, version)
                if not self._cv.wait(self._wait_s(deadline)):
                    if deadline is not None and time.monotonic() >= deadline:
                        return None

    def _wait_s(self, deadline) -> float:
        left = 1.0 if deadline is None else deadline - time.monotonic()
        return max(0.0, min(1.0, left))  # wake at least once a second to expire leases

    def _peek_reservation(self) -> Optional[Tuple[int, int]]:
        if self._free:
            return min(self._free)
        return divmod(self._next_reservation, self.groups_per_step)

    def _admissible(self, slot: int, version: int) -> bool:
        """``pace``: the staleness bound holds producers back here; ``drop``: only the capacity does (a group too
        stale is discarded when it is delivered, :meth:`put_group`)."""
        fresh = self.staleness_policy == "drop" or slot - version <= self.max_staleness
        return fresh and slot < self._train_slot + self.capacity_slots

    def _take_reservation(self, producer: str, version: int) -> GroupMeta:
        if self._free:
            slot, index = min(self._free)
            self._free.remove((slot, index))
        else:
            slot, index = divmod(self._next_reservation, self.groups_per_step)
            self._next_reservation += 1
        rows = list(range(self._next_row, self._next_row + self.group_size))
        self._next_row += self.group_size
        group = GroupMeta(self._next_group, slot, index, producer, version, rows, time.monotonic() + self.lease_s)
        self._next_group += 1
        self._groups[group.group_id] = group
        for r in rows:
            self._columns[r] = {}
        self.stats.reserved += 1
        return group

    def put(self, group_id: int, sample: int, columns: Dict[str, Any]) -> None:
        """Write columns of sample ``sample`` (0..group_size-1) of a reserved group."""
        with self._cv:
            group = self._groups.get(group_id)
            if group is None:
                raise KeyError(f"group {group_id} is not reserved (dropped after its producer died?)")
            self._columns[group.rows[sample]].update(columns)
            self._cv.notify_all()

    def complete(self, group_id: int, required: Sequence[str]) -> None:
        """Mark a group complete; every sample must have every ``required`` column."""
        with self._cv:
            group = self._groups[group_id]
            missing = [(i, c) for i, r in enumerate(group.rows) for c in required if c not in self._columns[r]]
            if missing:
                raise ValueError(f"group {group_id} is missing columns (sample, column): {missing[:5]}")
            group.complete = True
            group.tokens = sum(int(self._columns[r].get(self.token_column, 0)) for r in group.rows)
            self.stats.completed += 1
            self._cv.notify_all()

    def put_group(self, group_id: int, samples: Sequence[Dict[str, Any]], required: Sequence[str]) -> bool:
        """All samples of a group at once, then :meth:`complete` (one call: one RPC from a remote producer).
        Returns ``False`` -- the group discarded and counted (``late_discarded``), the producer in good standing --
        when its lease expired before it arrived (a slow producer: the reservation went back to the pool and
        another producer regenerates that prompt for that slot)."""
        with self._cv:
            self._expire_leases()
            if group_id not in self._groups:
                self.stats.late_discarded += 1
                return False
            group = self._groups[group_id]
            oldest = min([int(s.get("version", group.version)) for s in samples] + [1 << 62])
            if group.slot - oldest > self.max_staleness:  # ``drop``: too stale to train; regenerated elsewhere
                self._drop(group, stale=True)
                self._cv.notify_all()
                return False
            for i, columns in enumerate(samples):
                self.put(group_id, i, columns)
            self.complete(group_id, required)
            return True

    def producer_died(self, producer: str) -> int:
        """Drop every incomplete group of ``producer`` (their reservations return to the pool); returns how many."""
        with self._cv:
            dropped = [g for g in self._groups.values() if g.producer == producer and not g.complete]
            for g in dropped:
                self._drop(g)
            self._cv.notify_all()
            return len(dropped)

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for g in [g for g in self._groups.values() if not g.complete and g.leased_until < now]:
            self._drop(g)

    def _drop(self, group: GroupMeta, stale: bool = False) -> None:
        del self._groups[group.group_id]
        for r in group.rows:
            self._columns.pop(r, None)
        self._free.append((group.slot, group.index_in_slot))
        if stale:
            self.stats.stale_dropped += 1
        else:
            self.stats.dropped_partial += 1

    # -- consumers ---------------------------------------------------------------------------------------------
    def take(self, consumer: str, slot: int, max_groups: int, dp_rank: int = 0, dp_size: int = 1,
             timeout: Optional[float] = None) -> Optional[List[Dict[str, Any]]]:
        """Up to ``max_groups`` complete, not yet consumed groups of ``slot`` for this data-parallel rank (blocks
        until at least one is ready; ``[]`` when the rank's share of the slot is used up; ``None`` on timeout).
        Each group is returned as ``{"meta": GroupMeta, "samples": [columns of each sample]}``."""
        share = self.groups_per_step // dp_size
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            done = self._consumed.setdefault(consumer, set())
            while True:
                self._check_failed()
                self._assign(slot, dp_size)
                mine = [g for g in self._groups.values() if g.slot == slot and g.assigned_rank == dp_rank]
                ready = sorted((g for g in mine if g.group_id not in done), key=lambda g: g.index_in_slot)
                if ready:
                    return [self._hand_out(consumer, g) for g in ready[:max_groups]]
                if sum(g.group_id in done for g in mine) >= share:
                    return []
                if not self._cv.wait(self._wait_s(deadline)) and deadline is not None \
                        and time.monotonic() >= deadline:
                    return None

    def _assign(self, slot: int, dp_size: int) -> None:
        """Greedy token balancing: each newly complete group of the slot goes to the rank with the fewest tokens
        among ranks that still have room (``groups_per_step / dp_size`` groups each)."""
        share = self.groups_per_step // dp_size
        groups = [g for g in self._groups.values() if g.slot == slot]
        load = [0] * dp_size
        count = [0] * dp_size
        for g in groups:
            if g.assigned_rank is not None:
                load[g.assigned_rank] += g.tokens
                count[g.assigned_rank] += 1
        new = [g for g in groups if g.complete and g.assigned_rank is None]
        for g, rank in zip(new, greedy_ranks([g.tokens for g in new], load, count, share)):
            g.assigned_rank = rank

    def _hand_out(self, consumer: str, group: GroupMeta) -> Dict[str, Any]:
        self._consumed[consumer].add(group.group_id)
        lag = group.slot - group.version  # slot V is trained at policy version V
        assert lag <= self.max_staleness, f"staleness bound broken: lag {lag}"
        self.stats.consumed += 1
        self.stats.lag_histogram[lag] += 1
        return {"meta": group, "samples": [dict(self._columns[r]) for r in group.rows]}

    def slot_tokens(self, slot: int, wait: bool = True, timeout: Optional[float] = None) -> Optional[int]:
        """Total ``token_column`` over the whole slot (waits until every group of the slot is complete): the
        global denominator of token-mean (DAPO) normalisation."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while True:
                self._check_failed()
                groups = [g for g in self._groups.values() if g.slot == slot and g.complete]
                if len(groups) == self.groups_per_step:
                    return sum(g.tokens for g in groups)
                if not wait or (not self._cv.wait(self._wait_s(deadline)) and deadline is not None
                                and time.monotonic() >= deadline):
                    return None

    def finish_slot(self, slot: int, consumers: Sequence[str] = ("train",)) -> None:
        """The trainer finished step ``slot``: free its rows (once every consumer took them) and open admission for
        the slot ``capacity_slots`` ahead."""
        with self._cv:
            for g in [g for g in self._groups.values() if g.slot == slot]:
                if all(g.group_id in self._consumed.get(c, ()) for c in consumers):
                    del self._groups[g.group_id]
                    for r in g.rows:
                        self._columns.pop(r, None)
            self._train_slot = slot + 1
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()

    def summary(self) -> Dict[str, Any]:
        with self._cv:
            return {"reserved": self.stats.reserved, "completed": self.stats.completed,
                    "consumed": self.stats.consumed, "dropped_partial": self.stats.dropped_partial,
                    "late_discarded": self.stats.late_discarded, "stale_dropped": self.stats.stale_dropped,
                    "lag_histogram": dict(self.stats.lag_histogram), "train_slot": self._train_slot,
                    "max_lag": max(self.stats.lag_histogram, default=0)}
