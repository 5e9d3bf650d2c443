"""The pure parts of checkpoint-free recovery: the CheckFree weighting rule, the rebuild plan, the failure schedule.

CheckFree (arXiv 2506.15461, reference code ``gensyn-ai/CheckFree`` mode ``ours-grad-avg``): a lost intermediate
stage ``i`` gets, entry by entry of its layers' state dicts::

    W_i = (a * W_{i+1} + b * W_{i-1}) / (a + b),   a = |g_{i+1}| + eps,   b = |g_{i-1}| + eps

with ``|g_s|`` stage ``s``'s gradient L2 norm of the last step (after reduction and clipping). Note the cross
weighting as in the reference code: the neighbour with the larger gradient norm gets the larger weight. The end
stages (CheckFree+) copy their one neighbour's layers and the (de)embedding that neighbour keeps a replica of.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

PEER, NEIGHBOURS, PARTNER = "peer", "neighbours", "partner"


def neighbour_average(prev: Dict[str, torch.Tensor], nxt: Dict[str, torch.Tensor], gnorm_prev: float,
                      gnorm_next: float, eps: float = 1e-4) -> Dict[str, torch.Tensor]:
    """The CheckFree weights of a lost middle stage from its neighbours' tensors (same keys and shapes)."""
    if prev.keys() != nxt.keys():
        raise ValueError(f"neighbour stages differ in layer structure: {sorted(set(prev) ^ set(nxt))}")
    a, b = float(gnorm_next) + eps, float(gnorm_prev) + eps
    out = {}
    for key, p in prev.items():
        n = nxt[key]
        if p.shape != n.shape:
            raise ValueError(f"neighbour stages differ at {key!r}: {tuple(p.shape)} vs {tuple(n.shape)}")
        out[key] = ((a * n.double() + b * p.double()) / (a + b)).to(p.dtype)
    return out


@dataclass(frozen=True)
class Rebuild:
    """How one lost rank is rebuilt: ``kind`` is ``peer`` (``sources[0]`` holds the same shard), ``neighbours``
    (``sources`` = previous and next stage) or ``partner`` (an end stage: ``sources[0]`` is its one neighbour)."""

    rank: int
    kind: str
    sources: Tuple[int, ...]


def plan_rebuilds(topology, lost: Set[int], shards_identical_in_replica: bool,
                  swap_end_stages: bool = False) -> List[Rebuild]:
    """Choose a source for every lost rank: a live peer holding the same shard (another replica at the same stage
    and data index, or with ZeRO-0 any data-parallel rank of the stage), else the neighbouring stages of its
    replica. With ``swap_end_stages`` (CheckFree+) stages 1 and S-2 are rebuilt by a plain copy of their partner
    (stage 0, S-1), which trained in their position on every odd micro-batch. Raises ``ValueError`` naming the rank
    when no source exists."""
    plans = []
    for rank in sorted(lost):
        peer = _live_peer(topology, rank, lost, shards_identical_in_replica)
        if peer is not None:
            plans.append(Rebuild(rank, PEER, (peer,)))
            continue
        partner = swap_partner(topology, rank) if swap_end_stages else None
        if partner is not None and partner not in lost:
            plans.append(Rebuild(rank, PARTNER, (partner,)))
            continue
        plans.append(_neighbour_plan(topology, rank, lost))
    return plans


def swap_partner(topology, rank: int) -> Optional[int]:
    """The rank whose stage swaps execution order with ``rank``'s under CheckFree+ (0<->1, S-2<->S-1), or None."""
    replica, stage, data = topology.coords(rank)
    last = topology.pipeline_stages - 1
    pairs = {0: 1, 1: 0, last - 1: last, last: last - 1}
    if topology.pipeline_stages < 4 or stage not in pairs:
        return None
    return topology.rank_of(replica, pairs[stage], data)


def _live_peer(topology, rank: int, lost: Set[int], identical: bool) -> Optional[int]:
    replica, stage, data = topology.coords(rank)
    candidates = [topology.rank_of(r, stage, data) for r in range(topology.num_replicas) if r != replica]
    if identical:
        candidates = [topology.rank_of(replica, stage, d) for d in range(topology.data_parallel_size)
                      if d != data] + candidates
    live = [c for c in candidates if c not in lost]
    return live[0] if live else None


def _neighbour_plan(topology, rank: int, lost: Set[int]) -> Rebuild:
    replica, stage, data = topology.coords(rank)
    stages = topology.pipeline_stages
    neighbours = [s for s in (stage - 1, stage + 1) if 0 <= s < stages]
    sources = tuple(topology.rank_of(replica, s, data) for s in neighbours)
    dead = [s for s in sources if s in lost]
    if not sources or dead:
        why = "no pipeline neighbours" if not sources else f"its neighbour rank(s) {dead} are lost too"
        raise ValueError(f"rank {rank} (replica {replica}, stage {stage}, data {data}) cannot be rebuilt without a "
                         f"checkpoint: no live replica holds its shard and {why}. Resume from the journal "
                         "(recovery.journal_dir) or a checkpoint")
    return Rebuild(rank, NEIGHBOURS if len(sources) == 2 else PARTNER, sources)


def per_step_probability(rate_per_hour: float, step_time_s: float) -> float:
    """P(a stage fails within one step) for an hourly failure probability (independent steps)."""
    return 1.0 - (1.0 - rate_per_hour) ** (step_time_s / 3600.0)


def failures_at(step: int, events: Sequence, rate_per_hour: float, step_time_s: float, seed: int,
                topology) -> Set[int]:
    """The ranks that fail after optimizer step ``step``: the listed events plus random stage failures drawn from
    ``seed`` and ``step`` only (every rank computes the same set)."""
    victims: Set[int] = set()
    for ev in events:
        if ev.step != step:
            continue
        if ev.rank is not None:
            victims.add(ev.rank)
        else:
            victims.update(_stage_ranks(topology, ev.replica, ev.stage))
    if rate_per_hour > 0:
        p = per_step_probability(rate_per_hour, step_time_s)
        draws = np.random.default_rng([seed, step]).random((topology.num_replicas, topology.pipeline_stages))
        for replica, stage in zip(*np.nonzero(draws < p)):
            victims.update(_stage_ranks(topology, int(replica), int(stage)))
    return victims


def _stage_ranks(topology, replica: int, stage: int) -> List[int]:
    if not (0 <= replica < topology.num_replicas and 0 <= stage < topology.pipeline_stages):
        raise ValueError(f"failure injection: replica {replica} stage {stage} is outside the layout "
                         f"({topology.num_replicas} replicas x {topology.pipeline_stages} stages)")
    return [topology.rank_of(replica, stage, d) for d in range(topology.data_parallel_size)]
