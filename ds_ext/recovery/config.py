"""``"ds_ext": {"recovery": {...}}``: the per-rank journal of ZeRO partitions for bit-exact, zero-loss resume."""
from typing import Literal, Optional

from pydantic import Field

from ds_ext.checkfree.config import CheckpointFreeConfig
from ds_ext.config.base import ExtSection


class RecoveryConfig(ExtSection):
    """Journal each rank's ZeRO-1/2 partition to local disk: a record per optimizer step (the reduced, clipped fp32
    partition gradient plus step counters, LR, loss scale and RNG) and a base snapshot every ``base_interval``
    steps. On start with a journal present the engine resumes by itself at the newest step every rank can reach.
    """

    journal_dir: Optional[str] = None
    """Directory on fast local disk (NVMe) for the journal; each rank writes ``<journal_dir>/rank<R>/``. Setting it
    turns the journal on (``enabled`` may be left out)."""

    enabled: Optional[bool] = None
    """``null``: on exactly when ``journal_dir`` is set. ``false`` turns a configured journal off."""

    base_interval: int = Field(200, ge=1)
    """Optimizer steps between base snapshots (full fp32 partition + optimizer state, written in the background)."""

    keep_bases: int = Field(2, ge=1)
    """Bases kept on disk; older bases and the records only they need are deleted."""

    fsync: Literal["always", "interval", "never"] = "interval"
    """When records are forced to the device. Every record reaches the OS before the next forward (a killed
    process loses nothing); ``fsync`` decides what a power loss can take: ``always`` nothing (the next forward
    also waits for the device), ``interval`` up to ``fsync_interval`` steps (fsync on a background thread),
    ``never`` whatever the OS had not flushed. Bases are always fsynced."""

    fsync_interval: int = Field(10, ge=1)
    """Records between fsyncs with ``fsync: "interval"``."""

    resume: bool = True
    """Resume from the journal found in ``journal_dir`` at start. ``false``: refuse to start over an existing
    journal (an error naming the directory), so nothing is overwritten by accident."""

    checkpoint_free: CheckpointFreeConfig = Field(default_factory=CheckpointFreeConfig)
    """Rebuild a rank whose journal is gone too from a surviving replica or its neighbouring pipeline stages
    (see :class:`ds_ext.checkfree.config.CheckpointFreeConfig`). Works with or without ``journal_dir``."""

    @property
    def active(self) -> bool:
        return self.journal_dir is not None if self.enabled is None else bool(self.enabled)
