"""``"ds_ext": {"noloco": {...}}``: NoLoCo (arXiv 2506.10911) or DiLoCo outer steps between replicas."""
from typing import Literal, Optional

from pydantic import Field

from ds_ext.config.base import ExtSection

MODE_DEFAULTS = {"noloco": {"outer_lr": 0.7, "outer_momentum": 0.5}, "diloco": {"outer_lr": 0.7, "outer_momentum": 0.9}}


class NoLoCoConfig(ExtSection):
    """Replicas train locally for ``inner_steps`` optimizer steps, then meet in an outer step.

    ``mode="noloco"``: each rank averages its ZeRO shard with the same shard of one random partner replica
    (point-to-point, no collective) and applies the NoLoCo heavy-ball update. ``mode="diloco"``: the
    pseudo-gradients are all-reduced over all replicas and applied with Nesterov SGD (the DiLoCo baseline).
    """

    enabled: bool = False
    """Turn the outer step on. Off: one replica, plain ZeRO all-reduce over all ranks."""

    mode: Literal["noloco", "diloco"] = "noloco"
    """``noloco``: pairwise gossip; ``diloco``: all-reduce of pseudo-gradients across replicas (baseline)."""

    inner_steps: int = Field(50, ge=1)
    """H: optimizer steps between outer steps (the NoLoCo paper uses 50)."""

    outer_lr: Optional[float] = Field(None, gt=0)
    """Outer learning rate alpha. ``null``: 0.7 (both modes, as in the papers)."""

    outer_momentum: Optional[float] = Field(None, ge=0, lt=1)
    """Outer momentum beta. ``null``: 0.5 for noloco (heavy-ball), 0.9 for diloco (Nesterov)."""

    ranks_per_replica: Optional[int] = Field(None, ge=1)
    """Ranks in one replica (ZeRO shards inside it); the same as ``ds_ext.topology.ranks_per_replica`` (give one or
    both equal). ``null``: take the topology's value; with neither set, every rank is its own replica."""

    exchange_timeout_s: float = Field(60.0, gt=0)
    """Seconds to wait for the partner in an outer step; past it the rank skips this mixing (logged, counted)."""

    seed: int = 0
    """Shared seed of the random pairing; all ranks derive the same pairs from it and the outer-step number."""

    random_routing: bool = False
    """NoLoCo's random pipeline routing (pipelines only, >= 2 replicas x >= 2 stages): at every stage boundary a
    micro-batch's activations go from stage k of replica r to stage k+1 of replica ``perm[r]``, the permutation
    drawn per (step, micro-batch, k) from ``seed`` (every rank draws the same: no coordination message); gradients
    return along the same path, evaluation keeps the fixed path. Mixes the replicas between outer steps; costs the
    cross-replica activation traffic and a GPipe-order schedule (all forwards, then all backwards)."""

    count_collectives: bool = False
    """Count this rank's communication by kind and span (``noloco/calls/<kind>/<span>``, ``.../bytes/...``,
    ``sent_bytes``, ``cross_replica_collectives`` metrics: the check that NoLoCo makes no collective across
    replicas). Off: those metrics are absent and nothing is wrapped. On: every ``torch.distributed`` communication
    function of the process (and the two DeepSpeed's backend binds) is replaced by a wrapper that binds the call's
    arguments (``inspect.Signature.bind_partial``) and updates three dicts per call, until the feature is closed."""

    @property
    def lr(self) -> float:
        return self.outer_lr if self.outer_lr is not None else MODE_DEFAULTS[self.mode]["outer_lr"]

    @property
    def momentum(self) -> float:
        return self.outer_momentum if self.outer_momentum is not None else MODE_DEFAULTS[self.mode]["outer_momentum"]
