"""The rollout engine behind one interface: :func:`make_worker` builds the rollout worker of
``asyncflow.rollout.engine`` (``vllm``: :class:`~ds_ext.asyncflow.vllm_engine.VLLMRolloutWorker`; ``hf``: our
decoders, :class:`~ds_ext.asyncflow.rollout.RolloutWorker`). Both have ``set_weights(version, weights)``,
``run(max_groups)``, ``request_stop()`` and ``stats``."""
from __future__ import annotations

from typing import Optional

from ds_ext.asyncflow.config import AsyncFlowConfig
from ds_ext.asyncflow.rollout import RolloutWorker
from ds_ext.asyncflow.protocol import RolloutTask


def make_worker(name: str, model_factory, task: RolloutTask, cfg: AsyncFlowConfig, queue,
                threads: Optional[int] = None, seed: int = 0):
    """``auto`` must already be resolved (:func:`ds_ext.asyncflow.vllm_engine.resolve_engine`)."""
    if cfg.rollout.engine == "vllm":
        from ds_ext.asyncflow.vllm_engine import VLLMRolloutWorker
        return VLLMRolloutWorker(name, model_factory, task, cfg, queue, threads, seed)
    return RolloutWorker(name, model_factory, task, cfg, queue, threads, seed)
