"""GRPO trainer on a ds_ext DeepSpeed engine, fed by the transfer queue.

Step ``V`` (call order): the slot's response/token totals (GRPO and Dr.GRPO need only counts known up front; DAPO
see below) -> for each of the ``gas`` micro-batches: take this rank's next complete
groups of slot ``V`` -> advantages per group -> forward (packed with Prefix Grouper when the engine has it, else
one row per response) -> GRPO token loss with global weights -> ``engine.backward`` / ``engine.step`` -> after the
last micro-batch, ``finish_slot(V)`` (rank 0) and the new weights go to the rollout workers (``on_weights``).

Streaming: a micro-batch is taken as soon as enough complete groups of slot ``V`` exist, so training overlaps the
rollout of the same step (with several trainer ranks through :mod:`ds_ext.asyncflow.scatter`). The step's metrics
count the micro-batches handed out before the slot's last group completed (``streamed_micro_batches`` of
``micro_batches``; at most ``gas - 1`` per step, the last micro-batch holding the slot's last group).

DAPO's token-mean (``loss_norm="dapo"``) divides by the step's response-token total ``T``, known only once the slot's
last group is complete. Streamed, each micro-batch is weighted with the fixed estimate ``T_est = responses x
max_new_tokens`` instead, and before the step's update the accumulated gradient is multiplied by ``T_est / T``
(``engine.ds_ext_scale_step_gradients``: ahead of the norm, clipping and update, so the step is DAPO's exactly, up to
fp32 rounding). That needs ZeRO-1/2 in fp32 or bf16 (``engine.ds_ext_can_scale_step_gradients``) and more than one
micro-batch per step; otherwise the trainer waits for ``T`` before the first micro-batch (nothing streams under DAPO
there; with one micro-batch nothing could).

Several updates per batch (``ppo_epochs`` or ``mini_batches`` > 1) and ``advantage_scale="batch"`` take the
rank's whole share of the step first (nothing streams): the advantages (the batch std over every trainer rank of the
replica, one all-reduce), for ``decoupled`` the proximal log-probs (one forward per micro-batch under the weights
before the first update) and for ``kl_coef > 0`` the reference's are computed once; then ``ppo_epochs`` passes,
each of ``mini_batches`` optimizer steps over consecutive ``1 / mini_batches`` of the share (``gas`` micro-batches
each), the loss normalised over that mini-batch on every rank (DAPO's token total: one all-reduce).

Log-probs are those of the rollout's sampling distribution (temperature, top_p:
:func:`ds_ext.grpo.loss.sampling_logprobs`), the policy's and the reference's alike. The step's metrics carry
the sampler-trainer mismatch (:func:`ds_ext.grpo.loss.mismatch_metrics`) at each sample's first forward.

Micro-batch tensors: prompts left-padded to ``[B, P]``, responses right-padded to ``[B, L]`` (``L``: the longest
response of the micro-batch); the response token
``j`` of row ``b`` is predicted by the logits at ``P - 1 + j``.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

import copy

import torch
import torch.distributed as dist

from ds_ext._deepspeed import engine_config_dict, engine_data_parallel_group
from ds_ext.asyncflow.config import AsyncFlowConfig
from ds_ext.asyncflow.ledger import SampleLedger
from ds_ext.grpo.loss import (GRPOTokenLoss, group_advantages, mismatch_metrics, sampling_logprobs,
                                   step_token_weights)
from ds_ext.prefix_grouper.apply import PrefixGrouperFeature


PAD = 0  # prompt padding: masked everywhere, so any id of the vocabulary (0 is in every vocabulary)


def collate(groups: List[dict]) -> Dict[str, torch.Tensor]:
    samples = [s for g in groups for s in g["samples"]]
    p = max(len(s["prompt_ids"]) for s in samples)
    prompt = torch.full((len(samples), p), PAD)
    prompt_mask = torch.zeros(len(samples), p, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s["prompt_ids"])
        prompt[i, p - n:], prompt_mask[i, p - n:] = s["prompt_ids"], True
    lengths = torch.tensor([s["response_len"] for s in samples])
    width = max(1, int(lengths.max()))  # responses arrive padded to max_new_tokens: cut to the longest
    response = torch.stack([s["response_ids"][:width] for s in samples])
    mask = torch.arange(response.shape[1])[None, :] < lengths[:, None]
    firsts = [g["samples"][0]["prompt_ids"] for g in groups]
    group_prompt = torch.full((len(groups), p), PAD)
    group_prompt_mask = torch.zeros(len(groups), p, dtype=torch.bool)
    for i, ids in enumerate(firsts):
        group_prompt[i, p - len(ids):], group_prompt_mask[i, p - len(ids):] = ids, True
    return {"prompt": prompt, "prompt_mask": prompt_mask, "response": response, "mask": mask,
            "group_prompt": group_prompt, "group_prompt_mask": group_prompt_mask,
            "group_sizes": [len(g["samples"]) for g in groups],
            "old_logprobs": torch.stack([s["logprobs"][:width] for s in samples]),
            "rewards": torch.tensor([float(s["reward"]) for s in samples]),
            "lag_versions": torch.tensor([s["version"] for s in samples]),
            "token_versions": torch.stack([s["token_versions"][:width] if "token_versions" in s
                                           else torch.full((width,), s["version"]) for s in samples])}


def response_logprobs(model, batch: Dict[str, torch.Tensor], temperature: float = 1.0,
                      top_p: float = 1.0) -> torch.Tensor:
    """Log-probs ``[B, L]`` of the response tokens under ``model``'s sampling distribution (one row per response)."""
    ids = torch.cat([batch["prompt"], batch["response"]], 1)
    keys = torch.cat([batch["prompt_mask"], torch.ones_like(batch["mask"])], 1)
    positions = (keys.long().cumsum(1) - 1).clamp(min=0)
    logits = model(ids, position_ids=positions, key_padding_mask=keys)
    p, length = batch["prompt"].shape[1], batch["response"].shape[1]
    return sampling_logprobs(logits[:, p - 1: p - 1 + length], batch["response"], temperature, top_p)


def grouped_response_logprobs(engine, batch: Dict[str, torch.Tensor], temperature: float = 1.0,
                              top_p: float = 1.0) -> torch.Tensor:
    """The same ``[B, L]`` log-probs with Prefix Grouper: each group's prompt is encoded once and its responses
    attend to it (the engine takes a packed :class:`GroupedBatch`)."""
    from ds_ext.prefix_grouper.layout import pack
    packed = pack(batch["group_prompt"], batch["group_prompt_mask"], batch["response"], batch["mask"],
                  batch["group_sizes"], pad_id=PAD)
    logits = engine(packed)
    picked = logits[packed.row_of_response[:, None], packed.predictor_index]  # [R, L, V]
    return sampling_logprobs(picked, batch["response"], temperature, top_p)


def frozen_reference(engine) -> torch.nn.Module:
    """The KL reference: a frozen copy of the engine's module as it is now (the initial policy), on this rank.
    Under ZeRO-1/2 every rank holds the whole module, so the copy is replicated as the policy's parameters are;
    ZeRO-3 (partitioned parameters: a copy would hold empty placeholders) is refused."""
    try:
        stage = int(engine_config_dict(engine).get("zero_optimization", {}).get("stage", 0))
    except AttributeError:  # not a DeepSpeed engine (a plain module in a test): nothing is partitioned
        stage = 0
    if stage == 3:
        raise ValueError("ds_ext.asyncflow.kl_coef > 0 with zero_optimization.stage 3: the frozen reference model "
                         "is a copy of the module, which ZeRO-3 partitions; use stage 0-2 or kl_coef 0")
    ref = copy.deepcopy(engine.module).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class GRPOTrainer:
    def __init__(self, engine, queue, cfg: AsyncFlowConfig, dp_rank: int = 0, dp_size: int = 1,
                 ref_model: Optional[torch.nn.Module] = None, on_weights: Optional[Callable] = None,
                 idle_work: Optional[Callable[[], bool]] = None, replicas: int = 1):
        self.engine, self.cfg, self.dp_rank, self.dp_size = engine, cfg, dp_rank, dp_size
        # NoLoCo replicas each learn from their own share of the step: the loss is normalised per replica, over
        # the ranks that average gradients (the replica's ZeRO group)
        self.replicas = replicas
        self.queue = queue.rpc_sync() if hasattr(queue, "rpc_sync") else queue
        self.ref_model, self.on_weights = ref_model, on_weights
        # called instead of blocking while the queue has nothing for this rank (generate a group here); returns
        # False when it could not do anything useful, and the trainer then waits briefly
        self.idle_work = idle_work
        self.gas = engine.gradient_accumulation_steps()
        share = cfg.groups_per_step // dp_size
        if share * dp_size != cfg.groups_per_step or share % (self.gas * cfg.mini_batches):
            raise ValueError(f"groups_per_step={cfg.groups_per_step} must split evenly over {dp_size} data-parallel "
                             f"ranks x {cfg.mini_batches} mini-batches x {self.gas} micro-batches")
        self.groups_per_micro = share // (self.gas * cfg.mini_batches)
        # the whole share first: several updates per batch, or the step's reward std before the first micro-batch
        self.whole_batch = cfg.ppo_epochs * cfg.mini_batches > 1 or cfg.advantage_scale == "batch"
        if cfg.kl_coef > 0 and self.ref_model is None:
            self.ref_model = frozen_reference(engine)
        self.idle_s = 0.0       # waiting on the queue (including time spent on idle_work)
        self.idle_work_s = 0.0  # of which spent in idle_work
        # Prefix Grouper on the engine: encode each group's shared prompt once
        # features found by type (engine.ds_ext_feature); an engine built without ds_ext has none
        find = getattr(engine, "ds_ext_feature", lambda cls: None)
        self.grouped = find(PrefixGrouperFeature) is not None
        # DAPO streams where the engine can correct the step's gradient by the true token total (an engine built by
        # deepspeed.initialize without ds_ext cannot) and a step has several micro-batches
        can_scale = getattr(engine, "ds_ext_can_scale_step_gradients", lambda: False)
        self.stream_dapo = cfg.loss_norm == "dapo" and self.gas > 1 and can_scale()
        self.ledger = find(SampleLedger)  # journals which prompts each step trained

    def _take(self, version: int, n: int) -> List[dict]:
        got: List[dict] = []
        t = time.perf_counter()
        while len(got) < n:
            timeout = 600 if self.idle_work is None else 0.0
            more = self.queue.take("train", version, n - len(got), self.dp_rank, self.dp_size, timeout=timeout)
            if more is None and self.idle_work is not None:
                self._idle(lambda: self.queue.take("train", version, 0, self.dp_rank, self.dp_size, timeout=0.05))
                continue
            if not more:
                raise RuntimeError(f"slot {version}: the queue ran out before this rank's share was taken")
            got += more
        self.idle_s += time.perf_counter() - t
        return got

    def _idle(self, brief_wait: Callable) -> None:
        t = time.perf_counter()
        if not self.idle_work():
            brief_wait()
        self.idle_work_s += time.perf_counter() - t

    def _slot_tokens(self, version: int) -> int:
        t = time.perf_counter()
        while True:
            tokens = self.queue.slot_tokens(version, wait=self.idle_work is None)
            if tokens is not None:
                break
            self._idle(lambda: time.sleep(0.05))
        self.idle_s += time.perf_counter() - t
        return tokens

    def _streamed(self, version: int) -> bool:
        """Whether the micro-batch just taken was handed out before slot ``version``'s last group completed."""
        known = getattr(self.queue, "last_streamed", None)
        if isinstance(known, bool):  # ScatteredQueue: rank 0 looked when it scattered
            return known
        return self.queue.slot_tokens(version, wait=False) is None

    # -- shared pieces ------------------------------------------------------------------------------------------
    def _logprobs(self, batch) -> torch.Tensor:
        fn = grouped_response_logprobs if self.grouped else response_logprobs
        return fn(self.engine, batch, self.cfg.temperature, self.cfg.top_p)

    def _ref_logprobs(self, batch) -> Optional[torch.Tensor]:
        if self.cfg.kl_coef <= 0:
            return None
        with torch.no_grad():
            return response_logprobs(self.ref_model, batch, self.cfg.temperature, self.cfg.top_p)

    def _all_sum(self, values: List[float]) -> List[float]:
        """Sum over the trainer ranks that average gradients (the replica's data-parallel group)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.dp_size // self.replicas > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, group=engine_data_parallel_group(self.engine))
        return t.tolist()

    def _advantages(self, batches: List[dict]) -> List[torch.Tensor]:
        """Per micro-batch advantages; ``batch`` scale: centred per group, divided by the unbiased std of every
        reward of the step (all micro-batches, all ranks of the replica; two all-reduces: mean, then squares)."""
        cfg = self.cfg
        if cfg.advantage_scale != "batch":
            return [group_advantages(b["rewards"], cfg.group_size, cfg.advantage_scale) for b in batches]
        r = torch.cat([b["rewards"] for b in batches]).double()
        n, total = self._all_sum([r.numel(), float(r.sum())])
        (squares,) = self._all_sum([float(((r - total / n) ** 2).sum())])
        std = (squares / max(1.0, n - 1)) ** 0.5
        out = []
        for b in batches:
            centred = group_advantages(b["rewards"], cfg.group_size, "none")
            out.append((centred.double() / (std + 1e-6)).float())
        return out

    def _loss_fn(self, batch, adv, weights, ref, prox=None) -> GRPOTokenLoss:
        cfg = self.cfg
        return GRPOTokenLoss(targets=batch["response"], mask=batch["mask"], advantages=adv,
                             old_logprobs=batch["old_logprobs"], ref_logprobs=ref, eps_low=cfg.eps_low,
                             eps_high=cfg.eps_high, kl_coef=cfg.kl_coef, weights=weights,
                             off_policy=cfg.off_policy, is_cap=cfg.is_cap, prox_logprobs=prox,
                             is_level=cfg.is_level)

    def train_step(self, version: int) -> Dict[str, float]:
        if self.whole_batch:
            return self._train_whole_batch(version)
        return self._train_streamed(version)

    def _finish(self, version: int, rewards, lags, is_w, token_lags, mismatch, streamed: int) -> Dict[str, float]:
        cfg = self.cfg
        if self.dp_rank == 0:
            self.queue.finish_slot(version)
        if self.on_weights is not None:
            self.on_weights(version + 1, self.engine.module)
        r, lag, w, tok_lag = torch.cat(rewards), torch.cat(lags), torch.cat(is_w), torch.cat(token_lags)
        if int(lag.max()) > cfg.max_staleness:  # the queue's admission control guarantees this: a bug if not
            raise RuntimeError(f"step {version}: a sample's oldest token is {int(lag.max())} versions old > "
                               f"max_staleness {cfg.max_staleness}")
        tokens = sum(m["tokens"] for m in mismatch)
        per_token = lambda key: sum(m[key] * m["tokens"] for m in mismatch) / max(1, tokens)
        return {"reward": r.mean().item(), "max_lag": int(lag.max()), "mean_lag": lag.float().mean().item(),
                "streamed_micro_batches": streamed, "micro_batches": self.gas,
                "updates": cfg.ppo_epochs * cfg.mini_batches,
                "mean_token_lag": tok_lag.float().mean().item() if tok_lag.numel() else 0.0,
                "logprob_abs_diff": per_token("logprob_abs_diff"), "mismatch_kl": per_token("mismatch_kl"),
                "is_weight_mean": w.mean().item() if w.numel() else 1.0,
                "is_weight_max": w.max().item() if w.numel() else 1.0,
                # tis: weights truncated at the cap; mask / decoupled: tokens dropped (weight 0)
                "is_truncated_fraction": ((w >= cfg.is_cap) if cfg.off_policy == "tis" else (w == 0)).float()
                .mean().item() if w.numel() and cfg.off_policy != "none" else 0.0}

    def _train_whole_batch(self, version: int) -> Dict[str, float]:
        """``ppo_epochs`` passes of ``mini_batches`` optimizer steps over the rank's whole share (module docstring)."""
        cfg = self.cfg
        self._slot_tokens(version)  # the slot is complete (a ScatteredQueue then hands each rank its whole share)
        groups = self._take(version, self.groups_per_micro * self.gas * cfg.mini_batches)
        k = self.groups_per_micro
        batches = [collate(groups[i * k:(i + 1) * k]) for i in range(self.gas * cfg.mini_batches)]
        advs = self._advantages(batches)
        refs = [self._ref_logprobs(b) for b in batches]
        prox = [None] * len(batches)
        if cfg.off_policy == "decoupled":  # pi_prox: the weights before this batch's first update, computed once
            with torch.no_grad():
                prox = [self._logprobs(b).float() for b in batches]
        responses = cfg.groups_per_step * cfg.group_size // (self.replicas * cfg.mini_batches)
        mb_tokens = self._all_sum([sum(int(b["mask"].sum()) for b in batches[m * self.gas:(m + 1) * self.gas])
                                   for m in range(cfg.mini_batches)])
        trained = [[g["samples"][0]["prompt_index"], g["meta"].version] for g in groups]
        is_w, mismatch = [], []
        for epoch in range(cfg.ppo_epochs):
            for m in range(cfg.mini_batches):
                for j in range(self.gas):
                    i = m * self.gas + j
                    b = batches[i]
                    weights = step_token_weights(b["mask"], cfg.loss_norm, responses, int(mb_tokens[m]),
                                                 cfg.max_new_tokens, self.gas, self.dp_size // self.replicas)
                    loss_fn = self._loss_fn(b, advs[i], weights, refs[i], prox[i])
                    logprobs = self._logprobs(b)
                    self.engine.backward(loss_fn.from_logprobs(logprobs))
                    if epoch == 0:  # each sample's first forward
                        mismatch.append(mismatch_metrics(logprobs, b["old_logprobs"], b["mask"]))
                        is_w.append(loss_fn.is_weights(logprobs)[b["mask"]])
                    last = epoch == cfg.ppo_epochs - 1 and m == cfg.mini_batches - 1 and j == self.gas - 1
                    if last and self.ledger is not None:
                        rewards = torch.cat([x["rewards"] for x in batches])
                        self.ledger.set_step(self.engine.global_steps + 1, trained, rewards.mean().item())
                    self.engine.step()
        return self._finish(version, [b["rewards"] for b in batches], [version - b["lag_versions"] for b in batches],
                            is_w, [version - b["token_versions"][b["mask"]] for b in batches], mismatch, 0)

    def _train_streamed(self, version: int) -> Dict[str, float]:
        cfg = self.cfg
        responses = cfg.groups_per_step * cfg.group_size // self.replicas
        stream_dapo = self.stream_dapo
        # DAPO's denominator: the estimate while streaming (corrected before the update), else the slot's total
        step_tokens = ((responses * cfg.max_new_tokens if stream_dapo else self._slot_tokens(version))
                       if cfg.loss_norm == "dapo" else 0)
        rewards, lags, trained, is_w, token_lags, mismatch = [], [], [], [], [], []
        streamed = 0
        for micro in range(self.gas):
            groups = self._take(version, self.groups_per_micro)
            streamed += self._streamed(version)
            trained += [[g["samples"][0]["prompt_index"], g["meta"].version] for g in groups]
            batch = collate(groups)
            adv = group_advantages(batch["rewards"], cfg.group_size, cfg.advantage_scale)
            weights = step_token_weights(batch["mask"], cfg.loss_norm, responses, step_tokens, cfg.max_new_tokens,
                                         self.gas, self.dp_size // self.replicas)
            loss_fn = self._loss_fn(batch, adv, weights, self._ref_logprobs(batch))
            logprobs = self._logprobs(batch)
            loss = loss_fn.from_logprobs(logprobs)
            self.engine.backward(loss)
            is_w.append(loss_fn.is_weights(logprobs)[batch["mask"]])
            mismatch.append(mismatch_metrics(logprobs, batch["old_logprobs"], batch["mask"]))
            rewards.append(batch["rewards"])
            if micro == self.gas - 1 and stream_dapo:  # every group of the slot is in now: T is known
                self.engine.ds_ext_scale_step_gradients(step_tokens / max(1, self._slot_tokens(version)))
            if micro == self.gas - 1 and self.ledger is not None:
                self.ledger.set_step(self.engine.global_steps + 1, trained, torch.cat(rewards).mean().item())
            self.engine.step()
            lags.append(version - batch["lag_versions"])
            token_lags.append(version - batch["token_versions"][batch["mask"]])
        return self._finish(version, rewards, lags, is_w, token_lags, mismatch, streamed)
