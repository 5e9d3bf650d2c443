"""Megatron-core features through the Feature contract: :class:`MegatronRunner` holds them in phase order and runs
their hooks, as the DeepSpeed engine does for its features (:mod:`ds_ext.contract`).

A megatron user writes their own step loop; the runner is what the engine is on the DeepSpeed path: it starts the
features once (the journal resumes there and replays the others' payloads), runs ``after_optimizer_step`` after
each ``optimizer.step()`` in phase order (NoLoCo's outer step, phase ``STEP``, before the journal's commit, phase
``JOURNAL``), and closes them in reverse order. Call order::

    runner = MegatronRunner([noloco, journal])   # any order: kept sorted by phase
    runner.start()                               # collective; runner.steps = steps already done (a resume)
    for step in range(runner.steps + 1, last + 1):
        ...forward, backward, finalize_model_grads, optimizer.step()...
        runner.after_step()
    runner.close()
"""
from __future__ import annotations

from typing import Dict, List, Optional, Type, TypeVar

from ds_ext.contract import Feature, Phase

F = TypeVar("F")


class MegatronRunner:
    """The feature host of a megatron-core training loop (see the module docstring).

    Args:
        features: :class:`ds_ext.contract.Feature` objects (``None`` entries, features that are off, are skipped).
    """

    def __init__(self, features: List[Optional[Feature]]):
        given = [f for f in features if f is not None]
        bad = [type(f).__name__ for f in given if not isinstance(f, Feature)]
        if bad:
            raise TypeError(f"MegatronRunner: {bad} do not satisfy ds_ext.contract.Feature (subclass FeatureBase)")
        # stable sort: attach order inside a phase, as DsExtEngineMixin.attach_feature keeps it
        self.ds_ext_features: List[Feature] = sorted(given, key=lambda f: Phase(f.phase))
        self.steps = 0

    def feature(self, cls: Type[F]) -> Optional[F]:
        """The held feature that is a ``cls``, or None."""
        return next((f for f in self.ds_ext_features if isinstance(f, cls)), None)

    def start(self) -> int:
        """Start every feature in phase order (collective); returns the optimizer steps already done."""
        for f in self.ds_ext_features:
            f.start(self)
        from ds_ext.megatron.journal import MegatronJournal
        journal = self.feature(MegatronJournal)
        self.steps = journal.step if journal is not None else 0
        return self.steps

    def after_step(self) -> None:
        """After each ``optimizer.step()``: every feature's ``after_optimizer_step``, in phase order."""
        self.steps += 1
        for f in self.ds_ext_features:
            f.after_optimizer_step(self)

    def metrics(self) -> Dict[str, float]:
        return {f"{f.name}/{k}": v for f in self.ds_ext_features for k, v in f.metrics().items()}

    def close(self) -> None:
        """Close every feature, the last phase first. Idempotent (each feature's close is)."""
        for f in reversed(self.ds_ext_features):
            f.close()
