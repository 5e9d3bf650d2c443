"""Continuous batching in a rollout worker: fixed slots with one KV cache, a finished response's slot refilled at
once; the behaviour log-probs are the policy's own (teacher-forced) and the decode batch stays full while work is
pending, where one-group-at-a-time decoding idles on the long tail."""
import random
from collections import Counter

import pytest
import torch

from ds_ext.asyncflow.config import AsyncFlowConfig
from ds_ext.asyncflow.continuous import LengthLog, percentile_lengths
from ds_ext.asyncflow.queue import TransferQueue
from ds_ext.grpo.rewards import RewardFn
from ds_ext.asyncflow.rollout import RolloutWorker
from ds_ext.grpo.task import AdditionPrompts, Task
from ds_ext.grpo.trainer import collate, response_logprobs
from ds_ext.models import LlamaForCausalLM, ModelConfig

VOCAB, EOS, PAD = 16, 3, 0


class TinyCodec:
    """Ids mod 16, so EOS (1 of 16 tokens) ends responses after ~16 tokens on average: lengths spread widely."""
    eos_id, pad_id = EOS, PAD

    def encode(self, text, add_special_tokens=True):
        return [4 + ord(c) % (VOCAB - 4) for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def run_slot_worker(model):
    """5 groups of 4 through a rollout worker with 3 slots; checks what every slot decoder must give (mixed lengths,
    the policy's own teacher-forced log-probs, a batch kept full until the drain) and returns (stats, lengths)."""
    cfg = AsyncFlowConfig(group_size=4, groups_per_step=5, max_new_tokens=24, rollout_slots=3, max_staleness=4)
    task = Task(AdditionPrompts(max_operand=999, instruction=""), TinyCodec(),
                RewardFn("ds_ext.grpo.rewards:exact_match"))
    queue = TransferQueue(4, 5, 4)
    worker = RolloutWorker("w", lambda: model, task, cfg, queue, seed=1)
    worker.set_weights(0, {k: v.clone() for k, v in model.state_dict().items()})
    stats = worker.run(max_groups=5)
    groups = queue.take("train", 0, 5, timeout=1.0)
    assert stats["groups"] == 5 and len(groups) == 5
    batch = collate(groups)
    lengths = batch["mask"].sum(1)
    assert len(set(lengths.tolist())) >= 5, lengths  # mixed lengths, some cut at max_new_tokens
    with torch.no_grad():
        teacher = response_logprobs(model, batch)
    # fp32: the slot cache and the full forward sum the same attention terms in a different order
    assert (teacher - batch["old_logprobs"])[batch["mask"]].abs().max() < 1e-5
    assert (batch["token_versions"] == 0).all()
    # every step before the drain (the last group reserved) ran all 3 slots: the batch stayed full
    assert stats["starved_steps"] == 0
    assert stats["busy_slot_steps"] == sum(lengths.tolist()) - 20  # each response's first token comes from the prefill
    assert stats["busy_slot_steps"] >= 3 * (stats["decode_steps"] - stats["drain_steps"])
    return stats, lengths


def test_slots_refill_at_once_and_keep_the_policy_logprobs():
    torch.manual_seed(0)
    tiny = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       num_kv_heads=1, max_seq_len=64)
    s, lengths = run_slot_worker(LlamaForCausalLM(tiny).eval())
    # one group at a time decodes each group until its longest response ends: its fill on the same lengths
    per_group = lengths.view(5, 4)
    one_at_a_time = float((per_group - 1).sum() / (4 * (per_group.max(1).values - 1).sum()))
    assert s["fill_fraction"] > one_at_a_time, (s["fill_fraction"], one_at_a_time)


def test_length_log_is_bounded_and_reports_the_trained_slots_exactly():
    """Per-slot histograms for the newest ``window`` slots, older ones folded: the report over ``[start, stop)``
    equals the plain sorted list's mean and percentiles, slots generated ahead of ``stop`` are left out, memory stays
    at ``window`` slots, and the child's increments (take_unsent) rebuild the same log on the rank."""
    rng = random.Random(0)
    log, rank_side = LengthLog(window=4, track_unsent=True), LengthLog(window=4)
    pairs = [(slot, rng.choice([1, 2, 3, 50, 300])) for slot in range(3, 23) for _ in range(rng.randint(1, 9))]
    for slot, n in pairs:
        log.add(slot, [n])
        if rng.random() < 0.3:
            rank_side.add_pairs(log.take_unsent())
    rank_side.add_pairs(log.take_unsent())
    assert len(log.recent) <= 4 and log.folded_max_slot == 18
    stop = 21  # slots 21 and 22: generated ahead of the run's end, not trained
    trained = sorted(n for slot, n in pairs if slot < stop)
    for got in (log.histogram(3, stop), rank_side.histogram(3, stop)):
        assert got == Counter(trained)
        assert percentile_lengths(got, (0.5, 0.99)) == [trained[len(trained) // 2],
                                                        trained[min(len(trained) - 1, int(0.99 * len(trained)))]]
    with pytest.raises(RuntimeError, match="was folded"):
        log.histogram(3, 18)
    assert LengthLog().take_unsent() == []
