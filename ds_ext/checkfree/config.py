"""``"ds_ext": {"recovery": {"checkpoint_free": {...}}}``: rebuild lost ranks without any checkpoint."""
from typing import List, Optional

from pydantic import Field, model_validator

from ds_ext.config.base import ExtSection


class FailureEvent(ExtSection):
    """One injected failure: at the end of optimizer step ``step``, ``rank`` (one process) or ``stage`` (every
    data-parallel rank of that pipeline stage in ``replica``) loses its memory and its local disk."""

    step: int = Field(ge=1)
    """Optimizer step after which the failure happens."""

    rank: Optional[int] = Field(None, ge=0)
    """Global rank that fails (give ``rank`` or ``stage``)."""

    stage: Optional[int] = Field(None, ge=0)
    """Pipeline stage that fails, on every data-parallel rank of ``replica``."""

    replica: int = Field(0, ge=0)
    """Replica of the failing ``stage``."""

    @model_validator(mode="after")
    def _one_target(self):
        if (self.rank is None) == (self.stage is None):
            raise ValueError(f"give exactly one of rank or stage (got rank={self.rank}, stage={self.stage})")
        return self


class FailureInjection(ExtSection):
    """Failures injected into a running job, reproducible from ``seed`` (tests and benchmarks). Each failure wipes
    the victim's parameters, optimizer state and counters in place (NaN, so nothing survives by accident) and the
    job rebuilds it exactly as it would a replaced node with an empty disk."""

    at: List[FailureEvent] = Field(default_factory=list)
    """Failures at given steps."""

    stage_failure_rate_per_hour: float = Field(0.0, ge=0.0, lt=1.0)
    """Probability that a given stage fails within an hour (CheckFree's 5/10/16 %), turned into a per-step
    probability ``1 - (1 - rate) ** (nominal_step_time_s / 3600)`` for every stage of every replica."""

    nominal_step_time_s: float = Field(10.0, gt=0.0)
    """Seconds one optimizer step stands for when the hourly rate is scaled to steps."""

    seed: int = 0
    """Seed of the random failures (the same on every rank: no coordination needed)."""


class CheckpointFreeConfig(ExtSection):
    """When a rank has lost its state and its journal, rebuild it from live ranks instead of a checkpoint, in this
    order of preference: its own journal (``recovery.journal_dir``), a copy of the same shard from a surviving
    replica (data-parallel ZeRO-0 ranks, or NoLoCo/DiLoCo replicas), the CheckFree rebuild from the neighbouring
    pipeline stages. The choice is automatic and logged."""

    enabled: bool = False
    """Turn checkpoint-free rebuilds on."""

    lr_scale: float = Field(1.1, gt=0.0)
    """A stage rebuilt from its neighbours trains from then on at ``lr_scale`` times the scheduled learning rate
    (CheckFree: 1.1 for 124M and 1.5B models, 1.2 for 500M)."""

    norm_eps: float = Field(1e-4, gt=0.0)
    """``eps`` in the CheckFree weights ``a = |g_next| + eps``, ``b = |g_prev| + eps``."""

    replicate_ends_interval: int = Field(10, ge=1)
    """Every this many steps the first stage copies its non-layer parts (embedding) to stage 1 and the last stage
    its (final norm, LM head) to the stage before it (CheckFree+), so that a lost end stage can be rebuilt."""

    swap_end_stages: bool = False
    """CheckFree+'s out-of-order micro-batches: on odd micro-batches the two stages at each end of the pipeline run
    their layers in swapped order (stage 1's before stage 0's, stage S-1's before stage S-2's; the embedding and
    the head stay first and last), so each learns its partner's role and a lost stage 0, 1, S-2 or S-1 is rebuilt
    by a plain copy of its partner (plus the neighbour's replica of the embedding or head). Needs a PipelineModule
    of >= 4 stages; costs two extra activation hops per odd micro-batch at each end."""

    layer_class: Optional[str] = None
    """Class name of the repeated transformer layer (the layers matched between stages). ``null``: taken from the
    PipelineModule's ``partition_method="type:<Class>"``."""

    inject: FailureInjection = Field(default_factory=FailureInjection)
    """Failure injection for tests and benchmarks (off by default)."""
