"""Rollout worker: generates GRPO groups with its current weights and writes them into the transfer queue.

Loop: adopt newer weights if the trainer sent some (:meth:`set_weights` only drops them in a mailbox; the copy into
the model happens in the generating thread, so generation stops for the copy only) -> reserve a group (admission
control may make it wait, re-checking the mailbox) -> sample ``group_size`` responses to the prompt the
reservation names, with a KV cache -> score -> write the columns -> mark the group complete.

Partial rollouts (``partial_rollouts``): the mailbox is also checked between decode steps; newer weights are copied
in there and the group's sequences continue with them (the KV cache of earlier positions stays as computed, as in
PipelineRL's in-flight updates). Column ``token_versions [L]``: the version of the weights that gave each token's
distribution (and its behaviour log-prob in ``logprobs``); ``version`` = the oldest, ``token_versions[0]``.

``queue`` is a :class:`TransferQueue` or, in another process, a :class:`~ds_ext.asyncflow.remote.RemoteQueue`
(every call is then one authenticated msgpack frame to trainer rank 0, which owns the queue; a rollout rank's
generator child, :mod:`ds_ext.asyncflow.isolated`).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Optional

import torch

from ds_ext.asyncflow.config import AsyncFlowConfig
from ds_ext.asyncflow.protocol import RewardError, RolloutTask
from ds_ext.models.generate import generate


def new_stats() -> Dict[str, Any]:
    """A rollout worker's counters at start (the in-process worker, the isolated one's rank-side mirror, and the
    stand-in for a rank that died all report these keys)."""
    return {"groups": 0, "responses": 0, "generate_s": 0.0, "wait_s": 0.0, "weight_copies": 0, "late_discarded": 0}

COLUMNS = ("prompt_ids", "response_ids", "response_len", "logprobs", "token_versions", "reward", "prompt_index")


def _hf_sampler():
    from ds_ext.asyncflow.hf_policy import generate_hf  # transformers only when an HF policy is used
    return generate_hf


class RolloutWorker:
    COLUMNS = COLUMNS

    def __init__(self, name: str, model_factory: Callable[[], torch.nn.Module], task: RolloutTask,
                 cfg: AsyncFlowConfig, queue, threads: Optional[int] = None, seed: int = 0, shared: bool = False):
        if threads:
            torch.set_num_threads(threads)
        self.name, self.task, self.cfg = name, task, cfg
        # shared: the trainer's own module (generation between its steps); its train/eval mode is left alone
        self.model = model_factory() if shared else model_factory().eval()
        self.version = -1  # nothing adopted yet: the first weights set (version 0 or a resumed step) are taken
        self.queue = queue.rpc_sync() if hasattr(queue, "rpc_sync") else queue
        self._mailbox = None
        self._lock = threading.Lock()
        self.generator = torch.Generator().manual_seed(seed)
        self.stats = new_stats()
        self.stop = False

    def set_weights(self, version: int, state: Dict[str, torch.Tensor]) -> None:
        with self._lock:
            if self._mailbox is None or version > self._mailbox[0]:
                self._mailbox = (version, state)

    def _adopt_weights(self) -> None:
        with self._lock:
            box, self._mailbox = self._mailbox, None
        if box is not None and box[0] > self.version:
            self.model.load_state_dict(box[1])
            self.version = box[0]
            self.stats["weight_copies"] += 1

    def generate_group(self, prompt_index: int) -> list:
        """``group_size`` samples (dicts of :data:`COLUMNS` plus ``version``) for one prompt."""
        g, cfg = self.cfg.group_size, self.cfg
        task = self.task
        prompt = task.prompt_ids(prompt_index)
        sampler = generate if not hasattr(self.model, "hf") else _hf_sampler()
        versions = [self.version]  # versions[t]: the weights that computed token t's distribution

        def between_decode_steps():
            if cfg.partial_rollouts:
                self._adopt_weights()
            versions.append(self.version)

        out = sampler(self.model, prompt.expand(g, -1), torch.ones(g, len(prompt), dtype=torch.bool),
                       cfg.max_new_tokens, cfg.temperature, eos_id=task.eos_id, pad_id=task.pad_id,
                       generator=self.generator, step_hook=between_decode_steps)
        width, made = cfg.max_new_tokens, out.tokens.shape[1]
        resp = torch.full((g, width), task.pad_id)
        logp = torch.zeros(g, width)
        resp[:, :made], logp[:, :made] = out.tokens, out.logprobs
        token_versions = torch.full((width,), versions[made - 1], dtype=torch.long)
        token_versions[:made] = torch.tensor(versions[:made])
        rewards = task.score(prompt_index, resp, out.lengths.tolist())
        return [{"prompt_ids": prompt, "response_ids": resp[i], "response_len": int(out.lengths[i]),
                 "logprobs": logp[i], "token_versions": token_versions.clone(), "reward": rewards[i],
                 "prompt_index": prompt_index, "version": versions[0]} for i in range(g)]

    def produce_one(self, timeout: float = 0.2) -> bool:
        """Reserve, generate and deliver one group; ``False`` if admission said no within ``timeout``."""
        self._adopt_weights()
        t = time.perf_counter()
        meta = self.queue.reserve(self.name, self.version, timeout)
        self.stats["wait_s"] += time.perf_counter() - t
        if meta is None:
            return False
        t = time.perf_counter()
        try:
            samples = self.generate_group(meta.slot * self.cfg.groups_per_step + meta.index_in_slot)
        except RewardError as exc:  # the user's reward failed: stop the run with its message, do not hang it
            self.queue.fail(f"rollout worker {self.name}: {exc}")
            raise
        self.stats["generate_s"] += time.perf_counter() - t
        # the oldest token of the group is at least the reservation's version (weights only move forward), so the
        # queue's admission bound on the reservation bounds every token
        assert all(int(s["token_versions"][0]) >= meta.version for s in samples)
        if self.queue.put_group(meta.group_id, samples, COLUMNS) is False:  # its lease expired: discarded
            self.stats["late_discarded"] += 1
            return True
        self.stats["groups"] += 1
        self.stats["responses"] += len(samples)
        return True

    def run(self, max_groups: Optional[int] = None) -> Dict[str, Any]:
        """Produce until stopped (``request_stop``), the queue closes, or ``max_groups`` groups are delivered;
        with ``rollout_slots > 0`` through continuous batching (:mod:`ds_ext.asyncflow.continuous`)."""
        if self.cfg.rollout_slots > 0:
            from ds_ext.asyncflow.continuous import ContinuousBatcher
            return ContinuousBatcher(self).run(max_groups)
        while not self.stop and (max_groups is None or self.stats["groups"] < max_groups):
            if not self.produce_one() and getattr(self.queue, "closed", False) is True:
                break
        return dict(self.stats)

    def request_stop(self) -> None:
        self.stop = True

