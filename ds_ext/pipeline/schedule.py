"""The executor of ds_ext's pipeline schedules, and the two schedules (CheckFree+ swaps, NoLoCo routing).

Called once per training step from DeepSpeed's ``PipelineEngine.train_batch`` (``_deepspeed.install_schedule_seam``),
on every rank, before DeepSpeed's own gradient reduction and optimizer step. :meth:`PathSchedule.run_step`:

1. the first and last stage each load the step's ``M`` micro-batches from the engine's data iterator (as DeepSpeed's
   schedule does); every rank computes every micro-batch's :class:`~ds_ext.pipeline.paths.Route` (same on all ranks:
   no coordination message);
2. labels travel from the last stage of the micro-batch's own replica to the last stage its route ends at (routing
   only; local otherwise);
3. forward, GPipe order: routes in order, each route's segments in order; a rank runs its segments (layers through
   DeepSpeed's engine forward), receiving the input from the previous segment's rank and sending the output on; the
   last segment computes the loss (counted in the step's loss);
4. backward, routes in order, segments reversed: the last segment backpropagates its loss (DeepSpeed's scaling by
   1/M), the others the gradient received from the next segment; each sends its input's gradient back.

Every rank runs its events in that one global order, sends are non-blocking and receives block, so a receive always
has its send coming (the earliest pending receive's sender has finished everything before it): no deadlock, and no
collective. Activations of all M micro-batches are held until the backward (GPipe, not DeepSpeed's 1F1B).

Each rank logs what it ran in :attr:`PathSchedule.log`: ``(step, micro, origin, stage, from_rank, to_rank)`` per
segment (``-1``: data / loss), so tests check the executed path against the shared seed.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ds_ext import _deepspeed as ds
from ds_ext.pipeline import p2p
from ds_ext.pipeline.paths import (ALL, BODY, MIN_SWAP_STAGES, POST, PRE, Route, is_swapped, merge, routed_replicas,
                                   swap_stage_order)

log = logging.getLogger("ds_ext.pipeline")


def split_stage(funcs: Sequence, layer_class: str) -> Dict[str, list]:
    """This stage's layers by part: ``pre`` before the first ``layer_class`` layer, ``body`` those layers, ``post``
    after the last one; ``all`` the whole stage. ``ValueError`` if the stage has no such layer or they are not
    contiguous."""
    idx = [i for i, f in enumerate(funcs) if type(f).__name__ == layer_class]
    if not idx or idx != list(range(idx[0], idx[-1] + 1)):
        raise ValueError(f"this pipeline stage's layers {[type(f).__name__ for f in funcs]} do not hold one "
                         f"contiguous run of {layer_class!r} layers (CheckFree+ swaps stages' repeated layers)")
    return {PRE: list(funcs[:idx[0]]), BODY: list(funcs[idx[0]:idx[-1] + 1]), POST: list(funcs[idx[-1] + 1:]),
            ALL: list(funcs)}


class PathSchedule(ABC):
    """Runs a step's micro-batches along :meth:`routes` (subclasses say which). ``group``: the p2p group, every rank
    (built once, at construction: a collective)."""

    def __init__(self, topology, rank: int, group):
        self.topology, self.rank, self.group = topology, rank, group
        self.replica, self.stage, self.data = topology.coords(rank)
        self.stages = topology.pipeline_stages
        self.log: List[Tuple[int, int, int, int, int, int]] = []
        self.steps_run = 0

    @abstractmethod
    def routes(self, step: int, micro_batches: int) -> List[Route]:
        """The path of each of the step's ``micro_batches`` micro-batches."""

    def stage_parts(self, engine) -> Dict[str, list]:
        return {ALL: ds.pipeline_layers(engine.module)}

    def rank_at(self, replica: int, stage: int) -> int:
        return self.topology.rank_of(replica, stage, self.data)

    # -- one step ------------------------------------------------------------------------------------------------
    def run_step(self, engine) -> None:
        step, m_count = engine.global_steps, engine.gradient_accumulation_steps()
        parts = self.stage_parts(engine)
        loss_fn = engine.module.loss_fn
        first, last = self.stage == 0, self.stage == self.stages - 1
        batches = [ds.pipeline_next_batch(engine) if first or last else None for _ in range(m_count)]
        routes = self.routes(step, m_count)
        sends: list = []
        labels = self._move_labels(routes, batches, sends) if last else {}
        saved: Dict[Tuple[int, int], tuple] = {}
        for i, route in enumerate(routes):
            for j, seg in enumerate(route.segments):
                if seg.rank != self.rank:
                    continue
                src = route.segments[j - 1].rank if j else -1
                x = _detached(batches[route.micro][0]) if j == 0 else _as_input(p2p.recv(src, self.group))
                y = ds.pipeline_forward(engine, [f for part in seg.parts for f in parts[part]], x)
                if j == len(route.segments) - 1:
                    y = loss_fn(y, labels[i])
                    ds.pipeline_add_loss(engine, y)
                    dst = -1
                else:
                    dst = route.segments[j + 1].rank
                    sends += p2p.send(y, dst, self.group)
                saved[(i, j)] = (x, y)
                self.log.append((step, route.micro, route.origin, self.stage, src, dst))
        for i, route in enumerate(routes):
            for j in reversed(range(len(route.segments))):
                if route.segments[j].rank != self.rank:
                    continue
                x, y = saved.pop((i, j))
                if j == len(route.segments) - 1:
                    ds.pipeline_loss_backward(engine, y)
                else:
                    grads = p2p.recv(route.segments[j + 1].rank, self.group)
                    outs = [t for t in p2p.as_tuple(y) if t.is_floating_point()]
                    pairs = [(t, g) for t, g in zip(outs, grads) if t.requires_grad]
                    ds.pipeline_tensor_backward(engine, [t for t, _ in pairs], [g for _, g in pairs])
                if j > 0:
                    ins = [t for t in p2p.as_tuple(x) if t.is_floating_point()]
                    sends += p2p.send(tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in ins),
                                      route.segments[j - 1].rank, self.group)
        p2p.wait_all(sends)
        self.steps_run += 1

    def _move_labels(self, routes: List[Route], batches: list, sends: list) -> Dict[int, object]:
        """Labels to the last stage each route ends at, from the last stage of the route's own replica."""
        out = {}
        for i, route in enumerate(routes):
            src, dst = self.rank_at(route.origin, self.stages - 1), route.segments[-1].rank
            if self.rank == src and dst == src:
                out[i] = batches[route.micro][1]
            elif self.rank == src:
                sends += p2p.send(batches[route.micro][1], dst, self.group)
            elif self.rank == dst:
                got = p2p.recv(src, self.group)
                out[i] = got[0] if len(got) == 1 else got
        return out

    def metrics(self) -> Dict[str, float]:
        return {"schedule_steps": float(self.steps_run)}


def _detached(x):
    if isinstance(x, (tuple, list)):
        return tuple(t.clone().detach() for t in x)
    return x.clone().detach()


def _as_input(received: Tuple[torch.Tensor, ...]):
    for t in received:
        t.requires_grad_(t.is_floating_point())
    return received[0] if len(received) == 1 else received


def build_group(topology) -> Optional[object]:
    """The schedule's p2p group: every rank (collective; built once, when the schedule is made)."""
    return dist.new_group(ranks=list(range(topology.world_size)))


class SwapEndStagesSchedule(PathSchedule):
    """CheckFree+: odd micro-batches run the two stages at each end in swapped order (see
    :mod:`ds_ext.pipeline.paths`). Inside each replica; ``layer_class`` names the repeated layer."""

    def __init__(self, topology, rank: int, group, layer_class: str):
        if topology.pipeline_stages < MIN_SWAP_STAGES:
            raise ValueError(f"swap_end_stages needs >= {MIN_SWAP_STAGES} pipeline stages, got "
                             f"{topology.pipeline_stages}")
        super().__init__(topology, rank, group)
        self.layer_class = layer_class
        self.swapped = 0

    def stage_parts(self, engine) -> Dict[str, list]:
        return split_stage(ds.pipeline_layers(engine.module), self.layer_class)

    def routes(self, step: int, micro_batches: int) -> List[Route]:
        out = []
        for m in range(micro_batches):
            swapped = is_swapped(step, m, micro_batches)
            self.swapped += int(swapped)
            hops = [(self.rank_at(self.replica, s), part) for s, part in swap_stage_order(self.stages, swapped)]
            out.append(Route(m, self.replica, (self.replica,) * self.stages, merge(hops)))
        return out

    def metrics(self) -> Dict[str, float]:
        return {**super().metrics(), "swapped_micro_batches": float(self.swapped)}


class RandomRoutingSchedule(PathSchedule):
    """NoLoCo: micro-batch ``m`` of replica ``o`` hops to the replica ``perm_{step,m,k}`` gives at every stage
    boundary (see :mod:`ds_ext.pipeline.paths`); the ranks keep their data index."""

    def __init__(self, topology, rank: int, group, seed: int):
        super().__init__(topology, rank, group)
        self.seed = seed

    def routes(self, step: int, micro_batches: int) -> List[Route]:
        out = []
        for m in range(micro_batches):
            for origin in range(self.topology.num_replicas):
                reps = routed_replicas(self.seed, step, m, origin, self.topology.num_replicas, self.stages)
                segs = merge([(self.rank_at(r, s), ALL) for s, r in enumerate(reps)])
                out.append(Route(m, origin, reps, segs))
        return out
