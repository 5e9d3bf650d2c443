"""The sample ledger: which prompts each trainer rank trained at which step, journaled with the step.

Attached to the engine as a feature (before the recovery journal). The trainer hands it the step's groups before the
step's last ``engine.step()`` (:meth:`SampleLedger.set_step`); the journal's commit frame of that step carries them
(``journal_payload``) and a resume replays them (``journal_replay``), so after a crash the ledger holds exactly the
steps the engine's state holds, and the queue restarts at the slot after them: no sample is trained twice or
skipped. Entries are ``[prompt_index, policy_version]`` per group; the group's samples are its ``group_size``
responses to that prompt.
"""
from __future__ import annotations

from typing import Dict, List, Optional


class SampleLedger:
    name = "asyncflow"
    state_from_peer = False  # which samples this rank trained is its own, not its shard's

    def __init__(self):
        self.steps: Dict[int, List[List[int]]] = {}
        self.rewards: Dict[int, float] = {}  # mean reward of this rank's samples per step
        self._pending: Optional[dict] = None

    def set_step(self, step: int, groups: List[List[int]], reward: float = 0.0) -> None:
        """Call before the step's last ``engine.step()``: ``groups`` = ``[prompt_index, version]`` per trained group."""
        self._pending = {"step": int(step), "groups": [list(map(int, g)) for g in groups], "reward": float(reward)}

    def after_optimizer_step(self, engine) -> None:
        if self._pending is not None:
            self._apply(self._pending)

    def _apply(self, payload: dict) -> None:
        self.steps[int(payload["step"])] = payload["groups"]
        self.rewards[int(payload["step"])] = float(payload.get("reward", 0.0))

    def journal_payload(self) -> Optional[dict]:
        payload, self._pending = self._pending, None
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
