"""The sample ledger: which prompts each trainer rank trained at which step, journaled with the step.

Built by :func:`apply_asyncflow` and attached by :mod:`ds_ext.features` as a STEP-phase feature, so it runs before
the recovery journal. The trainer hands it the step's groups before the
step's last ``engine.step()`` (:meth:`SampleLedger.set_step`); the journal's commit frame of that step carries them
(``journal_payload``) and a resume replays them (``journal_replay``), so after a crash the ledger holds exactly the
steps the engine's state holds, and the queue restarts at the slot after them: no sample is trained twice or
skipped. Entries are ``[prompt_index, policy_version]`` per group; the group's samples are its ``group_size``
responses to that prompt.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from ds_ext.asyncflow.config import AsyncFlowConfig
from ds_ext.contract import ExportRule, FeatureBase, Phase
from ds_ext.topology import Topology


class SampleLedger(FeatureBase):
    """This trainer rank's record of trained prompts, per optimizer step.

    Attributes:
        steps: ``{step: [[prompt_index, policy_version], ...]}``, the groups this rank trained at each step.
        rewards: ``{step: mean reward of this rank's samples}``.

    The record is this rank's own (each rank trains other prompts), so checkpoint-free recovery does not copy it
    from a peer (``state_from_peer = False``); the journal restores it.
    """

    name = "asyncflow"
    phase = Phase.STEP
    state_from_peer = False
    journal_export = ExportRule.SKIP  # which prompts were trained: no weight depends on the record

    def __init__(self):
        self.steps: Dict[int, List[List[int]]] = {}
        self.rewards: Dict[int, float] = {}  # mean reward of this rank's samples per step
        self._step_payload: Optional[dict] = None  # the step set_step announced, for the journal

    def set_step(self, step: int, groups: List[List[int]], reward: float = 0.0) -> None:
        """Call before the step's last ``engine.step()``: ``groups`` = ``[prompt_index, version]`` per trained group."""
        self._step_payload = {"step": int(step), "groups": [list(map(int, g)) for g in groups], "reward": float(reward)}

    def after_optimizer_step(self, engine) -> None:
        if self._step_payload is not None:
            self._apply(self._step_payload)

    def _apply(self, payload: dict) -> None:
        self.steps[int(payload["step"])] = payload["groups"]
        self.rewards[int(payload["step"])] = float(payload.get("reward", 0.0))

    def journal_payload(self) -> Optional[dict]:
        payload, self._step_payload = self._step_payload, None
        return payload

    def journal_replay(self, payload: dict) -> None:
        self._apply(payload)

    def state_dict(self) -> dict:
        return {"steps": {str(k): v for k, v in self.steps.items()},
                "rewards": {str(k): v for k, v in self.rewards.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.steps = {int(k): v for k, v in sd["steps"].items()}
        self.rewards = {int(k): float(v) for k, v in sd.get("rewards", {}).items()}

    def trained_prompts(self) -> List[int]:
        return [g[0] for step in sorted(self.steps) for g in self.steps[step]]

    def metrics(self) -> Dict[str, float]:
        return {"steps": len(self.steps), "groups": sum(len(v) for v in self.steps.values())}


def apply_asyncflow(engine, cfg: AsyncFlowConfig, topology: Topology) -> SampleLedger:
    """Build the sample ledger of an AsyncFlow run (local: no communication). The GRPO trainer finds it among the
    engine's features by its name. Does not attach it (:mod:`ds_ext.features` does)."""
    return SampleLedger()
