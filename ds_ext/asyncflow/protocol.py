"""What AsyncFlow's queue, runtime and rollout workers need from the RL algorithm on top of them.

AsyncFlow (this package) moves groups of rollouts from rollout workers to trainers and weights back; it knows
nothing of a loss. The algorithm (``ds_ext.grpo``: loss, trainer, rewards, tasks) sits one layer above and hands
AsyncFlow two things:

* a task (:class:`RolloutTask`): prompt token ids, the EOS / pad ids and a scoring call; the workers call
  ``score`` on each finished group and stop the run on :class:`RewardError` (the user's reward failed);
* a trainer factory (:class:`TrainerFactory`), called by :mod:`ds_ext.asyncflow.runtime` with the feed it built
  (the queue, or a trainer rank's scattered view of it) as ``make_trainer(engine, feed, cfg, rank, world,
  on_weights=..., idle_work=..., replicas=...)``; the trainer it returns takes one optimizer step per
  ``train_step(version)`` and reports the seconds it waited on the feed (``idle_s``) and spent generating
  meanwhile (``idle_work_s``).
"""
from __future__ import annotations

from typing import Callable, List, Protocol


class RewardError(ValueError):
    """A reward spec that does not resolve, a record that lacks a field it needs, or a call that failed."""


class RolloutTask(Protocol):
    eos_id: int
    pad_id: int

    def prompt_ids(self, index: int):
        """The token ids of prompt ``index`` (the queue's slot index), a 1-D ``LongTensor``."""

    def score(self, index: int, responses, lengths: List[int]) -> List[float]:
        """One reward per response of prompt ``index`` (``responses``: ``[G, width]`` ids padded with
        ``pad_id``; ``lengths``: each response's length); raises :class:`RewardError`."""


class Trainer(Protocol):
    idle_s: float
    idle_work_s: float

    def train_step(self, version: int) -> dict:
        """One optimizer step on the groups the feed delivers for policy version ``version``; its metrics."""


TrainerFactory = Callable[..., Trainer]
