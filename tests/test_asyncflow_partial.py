"""Partial rollouts: new weights reach a rollout worker between decode steps and the sequences in flight continue
with them; every token records its policy version and behaviour log-prob, and the trainer's IS weights use them."""
import torch

from ds_ext.asyncflow.config import AsyncFlowConfig
from ds_ext.grpo.loss import GRPOTokenLoss, group_advantages
from ds_ext.asyncflow.queue import TransferQueue
from ds_ext.asyncflow.rollout import RolloutWorker
from ds_ext.grpo.task import addition_task
from ds_ext.grpo.trainer import collate, response_logprobs
from ds_ext.models import LlamaForCausalLM, ModelConfig

TINY = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
SWITCH_AFTER = 3  # tokens 0..2 from version 0, tokens 3.. from version 1


def two_versions():
    """Version 1 differs from version 0 in the LM head only: the KV cache (layers) is the same under both, so each
    token's behaviour log-prob is exactly the teacher-forced log-prob of the version that produced it."""
    torch.manual_seed(0)
    v0 = {k: v.clone() for k, v in LlamaForCausalLM(TINY).state_dict().items()}
    v1 = {k: v.clone() for k, v in v0.items()}
    v1["lm_head.weight"] = v1["lm_head.weight"] + 0.5 * torch.randn_like(v1["lm_head.weight"])
    return v0, v1


def run_group(partial: bool):
    v0, v1 = two_versions()
    cfg = AsyncFlowConfig(group_size=4, groups_per_step=1, max_new_tokens=6, partial_rollouts=partial,
                          off_policy="tis", is_cap=2.0)
    task, queue = addition_task(), TransferQueue(4, 1, 1)
    worker = RolloutWorker("w", lambda: LlamaForCausalLM(TINY), task, cfg, queue)
    worker.set_weights(0, v0)
    adopt, calls = worker._adopt_weights, [0]

    def trainer_pushes_mid_sequence():  # call 1: before the reservation; call 1 + t: after token t - 1
        calls[0] += 1
        if calls[0] == 1 + SWITCH_AFTER:
            worker.set_weights(1, v1)
        adopt()
    worker._adopt_weights = trainer_pushes_mid_sequence
    assert worker.produce_one(timeout=1.0)
    [group] = queue.take("train", 0, 1, timeout=1.0)
    return group, v0, v1, cfg


def teacher_forced(state, batch):
    model = LlamaForCausalLM(TINY)
    model.load_state_dict(state)
    with torch.no_grad():
        return response_logprobs(model, batch)


def test_weights_change_mid_sequence_per_token_versions_and_is_weights():
    group, v0, v1, cfg = run_group(partial=True)
    batch = collate([group])
    live = batch["mask"]
    assert live[:, :SWITCH_AFTER + 2].all(), "responses long enough to see the switch (EOS is 1 of 259 tokens)"
    made = int(live.sum(1).max())
    expected_versions = torch.tensor([0] * SWITCH_AFTER + [1] * (made - SWITCH_AFTER))
    for s in group["samples"]:
        assert torch.equal(s["token_versions"][:made], expected_versions)
        assert s["version"] == 0  # the oldest token: what max_staleness bounds
    lp0, lp1 = teacher_forced(v0, batch), teacher_forced(v1, batch)
    behav = batch["old_logprobs"]
    early, late = live.clone(), live.clone()
    early[:, SWITCH_AFTER:], late[:, :SWITCH_AFTER] = False, False
    # fp32: the cached decode and the full forward sum the same terms in a different order
    assert (behav - lp0)[early].abs().max() < 1e-5 and (behav - lp1)[late].abs().max() < 1e-5
    assert (behav - lp0)[late].abs().min() > 1e-3  # the late tokens really came from version 1
    # the trainer, now at version 1, weights each token by min(pi_1 / pi_behav, C): 1 for the tokens version 1
    # produced, pi_1 / pi_0 (truncated) for the older ones
    loss = GRPOTokenLoss(targets=batch["response"], mask=live, advantages=group_advantages(batch["rewards"], 4),
                         old_logprobs=behav, off_policy=cfg.off_policy, is_cap=cfg.is_cap)
    w = loss.is_weights(lp1)
    assert torch.allclose(w[late], torch.ones_like(w[late]), atol=1e-4)
    assert torch.allclose(w[early], torch.exp(lp1 - lp0)[early].clamp(max=cfg.is_cap), rtol=1e-4)
    assert (w[early] - 1).abs().max() > 1e-2


def test_without_partial_rollouts_a_group_keeps_one_version():
    group, v0, _, _ = run_group(partial=False)
    batch = collate([group])
    assert (batch["token_versions"] == 0).all()
    assert (batch["old_logprobs"] - teacher_forced(v0, batch))[batch["mask"]].abs().max() < 1e-5
