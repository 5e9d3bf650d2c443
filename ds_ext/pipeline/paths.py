"""Pure path arithmetic of ds_ext's pipeline schedules: which rank runs which part of a stage for a micro-batch.

A stage's layers split into three parts: ``pre`` (the layers before its first repeated layer: the embedding on stage
0), ``body`` (the repeated layers) and ``post`` (the layers after the last one: final norm and head on the last
stage); :data:`ALL` is the whole stage. A micro-batch's path is a list of :class:`Segment` (rank, parts); consecutive
segments exchange activations forward and gradients backward.

CheckFree+ (``swap_end_stages``; reference code ``convergence_training_2.py`` swaps transformer stages 1<->2 and
5<->6 of 6, the two at each end of the stack): for ``S >= 4`` stages, an odd micro-batch (counted over the whole run:
``step * M + m``) runs ``pre(0) body(1) body(0) body(2) .. body(S-3) body(S-1) body(S-2) post(S-1)``; even ones the
plain order. Fewer than 4 stages would make the two swaps overlap, so they are refused.

NoLoCo routing (``random_routing``; reference ``dipaco_pipeline.py``): micro-batch ``m`` that started in replica
``o`` is at stage ``k`` in replica ``r_k`` with ``r_0 = o`` and ``r_{k+1} = perm_{step,m,k}[r_k]``; the permutation
is ``numpy.random.default_rng([seed, step, m, k]).permutation(R)``, the same on every rank from the shared seed
(the reference seeds with ``(step + idx) * PP + pp_rank``; any shared function of step, micro-batch and hop works).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

PRE, BODY, POST, ALL = "pre", "body", "post", "all"
MIN_SWAP_STAGES = 4


@dataclass(frozen=True)
class Segment:
    """``rank`` runs ``parts`` of its stage (in that order) on the micro-batch."""

    rank: int
    parts: Tuple[str, ...]


@dataclass(frozen=True)
class Route:
    """One micro-batch's path: ``micro`` index in the step, the replica ``origin`` whose data it carries (its first
    stage loaded the inputs, its last stage the labels), the replica at every stage and the segments."""

    micro: int
    origin: int
    replicas: Tuple[int, ...]
    segments: Tuple[Segment, ...]


def merge(hops: Sequence[Tuple[int, str]]) -> Tuple[Segment, ...]:
    """(rank, part) hops to segments: consecutive hops on one rank become one segment."""
    out: List[Segment] = []
    for rank, part in hops:
        if out and out[-1].rank == rank:
            out[-1] = Segment(rank, out[-1].parts + (part,))
        else:
            out.append(Segment(rank, (part,)))
    return tuple(out)


def swap_stage_order(stages: int, swapped: bool) -> List[Tuple[int, str]]:
    """(stage, part) in execution order for one micro-batch (see the module docstring)."""
    if stages < MIN_SWAP_STAGES:
        raise ValueError(f"swapping the end stages needs >= {MIN_SWAP_STAGES} pipeline stages, got {stages}")
    if not swapped:
        order = [0, 1] + list(range(2, stages - 2)) + [stages - 2, stages - 1]
    else:
        order = [1, 0] + list(range(2, stages - 2)) + [stages - 1, stages - 2]
    return [(0, PRE)] + [(s, BODY) for s in order] + [(stages - 1, POST)]


def is_swapped(step: int, micro: int, micro_batches: int) -> bool:
    """Odd micro-batches, counted over the run (so one micro-batch per step alternates too)."""
    return (step * micro_batches + micro) % 2 == 1


def route_permutation(seed: int, step: int, micro: int, hop: int, replicas: int) -> np.ndarray:
    """``perm_{step,micro,hop}``: where stage ``hop``'s replica ``r`` sends to at stage ``hop + 1``."""
    return np.random.default_rng([seed, step, micro, hop]).permutation(replicas)


def routed_replicas(seed: int, step: int, micro: int, origin: int, replicas: int, stages: int) -> Tuple[int, ...]:
    """The replica at every stage of the micro-batch that started in replica ``origin``."""
    path = [origin]
    for hop in range(stages - 1):
        path.append(int(route_permutation(seed, step, micro, hop, replicas)[path[-1]]))
    return tuple(path)
