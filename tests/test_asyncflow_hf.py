"""HF Llama policies for async GRPO: transformers' KV-cache sampler returns the behaviour log-probs the policy gives
the same tokens teacher-forced, and the byte tokenizer for TRL gives our ids."""
import pytest
import torch

pytest.importorskip("transformers")


def test_hf_sampler_logprobs_match_teacher_forcing_with_left_padding():
    from ds_ext.asyncflow.hf_policy import HFPolicy, generate_hf, tiny_llama
    from ds_ext.models import ByteTokenizer
    tok = ByteTokenizer()
    policy = HFPolicy(tiny_llama(hidden=64, layers=2)).eval()
    rows = [tok.encode("12+34=", bos=True), tok.encode("7+5=", bos=True)]
    width = max(map(len, rows))
    prompt = torch.tensor([[tok.PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    out = generate_hf(policy, prompt, mask, 8, 1.0, eos_id=tok.EOS, pad_id=tok.PAD,
                      generator=torch.Generator().manual_seed(0))
    ids = torch.cat([prompt, out.tokens], 1)
    keys = torch.cat([mask, torch.ones_like(out.tokens, dtype=torch.bool)], 1)
    positions = (keys.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = policy(ids, position_ids=positions, key_padding_mask=keys)
    lp = torch.log_softmax(logits[:, width - 1:-1].float(), -1).gather(-1, out.tokens[..., None]).squeeze(-1)
    live = torch.arange(out.tokens.shape[1])[None] < out.lengths[:, None]
    # tolerance: the cached and the full forward sum the same attention terms in a different order (fp32)
    assert (lp - out.logprobs)[live].abs().max() < 1e-5
    assert (out.logprobs[~live] == 0).all() and (out.tokens[~live] == tok.PAD).all()


def test_byte_tokenizer_for_trl_gives_the_same_ids():
    from ds_ext.asyncflow.hf_policy import byte_tokenizer_hf
    from ds_ext.models import ByteTokenizer
    hf = byte_tokenizer_hf()
    assert hf("<bos>12+34=", add_special_tokens=False)["input_ids"] == ByteTokenizer().encode("12+34=", bos=True)
    assert hf.decode([ord("4"), ord("6"), ByteTokenizer.EOS], skip_special_tokens=True) == "46"
    assert (hf.eos_token_id, hf.pad_token_id) == (ByteTokenizer.EOS, ByteTokenizer.PAD)


def test_a_new_rollout_worker_adopts_the_first_weights_it_is_sent():
    """Regression: a worker built with fresh (random) weights must generate version 0 with the trainer's version-0
    weights, not its own initialisation (it used to keep them until the first push, version 1)."""
    from ds_ext.asyncflow.config import AsyncFlowConfig
    from ds_ext.asyncflow.queue import TransferQueue
    from ds_ext.asyncflow.rollout import RolloutWorker
    from ds_ext.grpo.task import addition_task
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    cfg = AsyncFlowConfig(enabled=True, group_size=2, groups_per_step=1, max_new_tokens=2)
    tiny = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    torch.manual_seed(1)
    trainer_weights = {k: v.clone() for k, v in LlamaForCausalLM(tiny).state_dict().items()}
    worker = RolloutWorker("w", lambda: LlamaForCausalLM(tiny), addition_task(), cfg, TransferQueue(2, 1, 0))
    worker.set_weights(0, trainer_weights)
    assert worker.produce_one(timeout=1.0)
    assert worker.version == 0
    assert all(torch.equal(v, trainer_weights[k]) for k, v in worker.model.state_dict().items())
