"""Continuous batching for a rollout worker (``rollout_slots > 0``): a fixed number of sequence slots, refilled the
moment a response ends, so the decode batch stays full through the long tail of response lengths. The reference
model decodes with :class:`~ds_ext.asyncflow.slots.SlotDecoder`, a transformers policy with
:class:`~ds_ext.asyncflow.hf_slots.HFSlotDecoder` (same interface).

Loop (one iteration = one decode position for every slot): adopt newer weights (partial rollouts: between any two
decode steps; otherwise only while no slot is busy) -> fill every free slot with the next pending response; when
none is pending, reserve the next group from the queue (without waiting while other slots decode; admission
control may say no: the step is then *starved*), prefill its prompt once and queue its ``G`` responses -> one
:meth:`SlotDecoder.step` -> every slot whose response hit EOS or ``max_new_tokens`` is released; a group whose
``G`` responses are all done is scored and written to the queue. Each token records the version of the weights that
produced its distribution (a response's first token: the version its group's prefill ran with).

Measured (``stats``): ``decode_steps``, ``busy_slot_steps`` (slot-steps doing a live response), ``starved_steps``
(steps with an idle slot because admission control allowed no new group: in sync mode the tail of a step, after its
last group was reserved), ``drain_steps`` (idle slots because the worker's ``max_groups`` are all reserved),
``tail_busy_slot_steps`` (busy slot-steps of starved and drain steps), ``fill_fraction`` = busy slot-steps /
(decode steps x slots), ``response_lengths`` (a :class:`LengthLog`: the length of every delivered response, EOS
included, by the batch slot it was generated for, in bounded memory); ``generate_s`` counts prefills and decode
steps.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ds_ext.asyncflow.protocol import RewardError
from ds_ext.asyncflow.slots import SlotDecoder


def make_decoder(model, cfg, generator):
    """The slot decoder of ``model``: transformers' ``DynamicCache`` for an HF policy
    (:class:`~ds_ext.asyncflow.hf_slots.HFSlotDecoder`), the reference model's own cache otherwise."""
    if hasattr(model, "hf"):
        from ds_ext.asyncflow.hf_slots import HFSlotDecoder  # transformers only when an HF policy is used
        return HFSlotDecoder(model, cfg.rollout_slots, cfg.temperature, cfg.top_p, generator)
    return SlotDecoder(model, cfg.rollout_slots, cfg.max_new_tokens + 1, cfg.temperature, generator, cfg.top_p)


class LengthLog:
    """Response lengths by the batch slot (step) they were generated for, in memory bounded by ``window`` slots.

    The newest ``window`` slots keep a histogram each (``{length: count}``); older ones are folded into one
    histogram. A report wants the trained slots ``[start, stop)``: the slots a run never trains are those generated
    ahead of its end (at most ``capacity`` slots past the last one, the newest), so they are always still per-slot;
    :meth:`histogram` raises if that ever fails. ``track_unsent``: also keep the ``(slot, length)`` pairs added
    since the last :meth:`take_unsent` (an isolated worker's child sends them up with each queue call).
    """

    @classmethod
    def for_config(cls, cfg, track_unsent: bool = False) -> "LengthLog":
        """A window well past how far a run generates ahead (the queue's capacity: ``max_staleness + 1`` slots)."""
        return cls(max(64, 2 * (cfg.max_staleness + 2)), track_unsent)

    def __init__(self, window: int = 64, track_unsent: bool = False):
        self.window = window
        self.recent: Dict[int, Counter] = {}
        self.folded: Counter = Counter()
        self.folded_max_slot = -1
        self.unsent: Optional[List[Tuple[int, int]]] = [] if track_unsent else None

    def add(self, slot: int, lengths: Iterable[int]) -> None:
        lengths = [int(n) for n in lengths]
        self.recent.setdefault(slot, Counter()).update(lengths)
        if self.unsent is not None:
            self.unsent.extend((slot, n) for n in lengths)
        newest = max(self.recent)
        for old in [k for k in self.recent if k <= newest - self.window]:
            self.folded.update(self.recent.pop(old))
            self.folded_max_slot = max(self.folded_max_slot, old)

    def add_pairs(self, pairs: Sequence[Tuple[int, int]]) -> None:
        by_slot: Dict[int, List[int]] = {}
        for slot, n in pairs:
            by_slot.setdefault(slot, []).append(n)
        for slot in sorted(by_slot):
            self.add(slot, by_slot[slot])

    def take_unsent(self) -> List[Tuple[int, int]]:
        if self.unsent is None:
            return []
        out, self.unsent = self.unsent, []
        return out

    def histogram(self, start: int = 0, stop: int = 1 << 62) -> Counter:
        """``{length: count}`` over the slots in ``[start, stop)`` (the folded slots all count: a run generates no
        slot before its start)."""
        if self.folded_max_slot >= stop:
            raise RuntimeError(f"LengthLog: slot {self.folded_max_slot} >= {stop} was folded (window {self.window} "
                               "slots is smaller than how far the run generated ahead)")
        out = Counter(self.folded)
        for slot, counts in self.recent.items():
            if start <= slot < stop:
                out.update(counts)
        return out


def percentile_lengths(histogram: Counter, fractions: Sequence[float]) -> List[int]:
    """The lengths at ``sorted_lengths[min(n - 1, int(f * n))]`` for each fraction ``f``, from a histogram
    ``{length: count}`` with ``n`` entries in all (> 0)."""
    n = sum(histogram.values())
    out = []
    for f in fractions:
        target, seen = min(n - 1, int(f * n)), 0
        for length in sorted(histogram):
            seen += histogram[length]
            if target < seen:
                out.append(length)
                break
    return out


class _Group:
    def __init__(self, meta, index: int, prompt: torch.Tensor, prefix, version: int, size: int):
        self.meta, self.index, self.prompt, self.prefix, self.version = meta, index, prompt, prefix, version
        self.tokens: List[List[int]] = [[] for _ in range(size)]
        self.logps: List[List[float]] = [[] for _ in range(size)]
        self.versions: List[List[int]] = [[] for _ in range(size)]
        self.done = 0


class ContinuousBatcher:
    """Drives one :class:`~ds_ext.asyncflow.rollout.RolloutWorker`'s model with a :class:`SlotDecoder`."""

    def __init__(self, worker):
        self.w, cfg = worker, worker.cfg
        self.cfg = cfg
        self.dec = make_decoder(worker.model, cfg, worker.generator)
        self.pending: deque = deque()
        self.slot_of: List[Optional[tuple]] = [None] * cfg.rollout_slots
        self.reserved = 0
        for key in ("decode_steps", "busy_slot_steps", "starved_steps", "drain_steps", "tail_busy_slot_steps"):
            worker.stats.setdefault(key, 0)
        worker.stats.setdefault("response_lengths", LengthLog.for_config(cfg))

    def _reserve(self, wait: bool) -> bool:
        w = self.w
        t = time.perf_counter()
        meta = w.queue.reserve(w.name, w.version, 0.2 if wait else 0.0)
        w.stats["wait_s"] += time.perf_counter() - t
        if meta is None:
            return False
        index = meta.slot * self.cfg.groups_per_step + meta.index_in_slot
        prompt = w.task.prompt_ids(index)
        self.dec.ensure_capacity(len(prompt) + self.cfg.max_new_tokens + 1)
        t = time.perf_counter()
        group = _Group(meta, index, prompt, self.dec.prefill(prompt), w.version, self.cfg.group_size)
        w.stats["generate_s"] += time.perf_counter() - t
        self.pending.extend((group, j) for j in range(self.cfg.group_size))
        self.reserved += 1
        return True

    def _record(self, slot: int, tok: int, lp: float, version: int) -> None:
        group, j = self.slot_of[slot]
        group.tokens[j].append(tok)
        group.logps[j].append(lp)
        group.versions[j].append(version)
        if tok == self.w.task.eos_id or len(group.tokens[j]) >= self.cfg.max_new_tokens:
            self.dec.release(slot)
            self.slot_of[slot] = None
            group.done += 1
            if group.done == self.cfg.group_size:
                self._deliver(group)

    def _fill(self, max_groups: Optional[int]) -> str:
        """Fill free slots. Returns ``"full"``, ``"starved"`` (a slot stayed idle: admission control allowed no new
        group) or ``"drain"`` (a slot stayed idle: ``max_groups`` groups are reserved, the run is ending)."""
        while None in self.slot_of:  # a response may end at its first token: its slot is refilled at once
            slot = self.slot_of.index(None)
            if not self.pending:
                if max_groups is not None and self.reserved >= max_groups:
                    return "drain"
                if not self._reserve(wait=not bool(self.dec.busy.any())):
                    return "starved"
            group, j = self.pending.popleft()
            self.slot_of[slot] = (group, j)
            tok, lp = self.dec.admit(slot, group.prefix)
            self._record(slot, tok, lp, group.version)
        return "full"

    def _deliver(self, group: _Group) -> None:
        w, cfg, task = self.w, self.cfg, self.w.task
        g, width = cfg.group_size, cfg.max_new_tokens
        resp = torch.full((g, width), task.pad_id)
        logp = torch.zeros(g, width)
        versions = torch.full((g, width), group.version, dtype=torch.long)
        for j in range(g):
            n = len(group.tokens[j])
            resp[j, :n] = torch.tensor(group.tokens[j])
            logp[j, :n] = torch.tensor(group.logps[j])
            versions[j, :n] = torch.tensor(group.versions[j])
            versions[j, n:] = group.versions[j][-1]
        lengths = [len(t) for t in group.tokens]
        try:
            rewards = task.score(group.index, resp, lengths)
        except RewardError as exc:  # the user's reward failed: stop the run with its message, do not hang it
            w.queue.fail(f"rollout worker {w.name}: {exc}")
            raise
        samples = [{"prompt_ids": group.prompt, "response_ids": resp[j], "response_len": lengths[j],
                    "logprobs": logp[j], "token_versions": versions[j], "reward": rewards[j],
                    "prompt_index": group.index, "version": int(versions[j, 0])} for j in range(g)]
        if w.queue.put_group(group.meta.group_id, samples, w.COLUMNS) is False:  # its lease expired: discarded
            w.stats["late_discarded"] = w.stats.get("late_discarded", 0) + 1
            return
        w.stats["groups"] += 1
        w.stats["responses"] += g
        w.stats["response_lengths"].add(group.meta.slot, lengths)

    def run(self, max_groups: Optional[int] = None) -> dict:
        w, stats = self.w, self.w.stats
        while not w.stop:
            # partial_rollouts false: new weights only between groups -- no response decoding and none of a
            # reserved group still waiting for a slot (its prompt was prefilled with the old weights), so every
            # token of a group has the group's one version
            if self.cfg.partial_rollouts or not (bool(self.dec.busy.any()) or self.pending):
                w._adopt_weights()
            state = self._fill(max_groups)
            busy = int(self.dec.busy.sum())
            if busy == 0:
                done = max_groups is not None and self.reserved >= max_groups and not self.pending
                if done or getattr(w.queue, "closed", False) is True:
                    break
                continue
            t = time.perf_counter()
            toks, lps = self.dec.step()
            w.stats["generate_s"] += time.perf_counter() - t
            stats["decode_steps"] += 1
            stats["busy_slot_steps"] += busy
            tail = state != "full" and busy < self.cfg.rollout_slots
            stats["starved_steps"] += int(tail and state == "starved")
            stats["drain_steps"] += int(tail and state == "drain")
            stats["tail_busy_slot_steps"] += busy if tail else 0
            for slot in range(self.cfg.rollout_slots):
                if self.slot_of[slot] is not None:
                    self._record(slot, int(toks[slot]), float(lps[slot]), w.version)
        stats["fill_fraction"] = stats["busy_slot_steps"] / max(1, stats["decode_steps"] * self.cfg.rollout_slots)
        return dict(stats)
