"""Continuous batching for transformers policies (ds_ext/asyncflow/hf_slots.py): slots in one DynamicCache decode
exactly what transformers' own ``generate`` decodes, slot by slot, while finished slots are refilled mid-run; in a
rollout worker the behaviour log-probs are the policy's own and the decode batch stays full; top-p sampling draws
from the nucleus only and reports the nucleus' log-probs."""
import math

import pytest
import torch

from ds_ext.asyncflow.config import AsyncFlowConfig
from ds_ext.asyncflow.hf_policy import HFPolicy
from ds_ext.asyncflow.hf_slots import HFSlotDecoder
from ds_ext.models.generate import sample

from hf_dirs import make_model_dir, qwen2_config
from test_asyncflow_continuous import VOCAB, run_slot_worker


def _llama_config(vocab_size=320):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False)


def _reference(model, prompt, n):
    """transformers' greedy ``generate`` of ``n`` tokens (no EOS) and each token's log-prob under the logits."""
    out = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    toks = out.sequences[0, len(prompt):]
    return toks.tolist(), [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, toks)]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_greedy_slots_match_generate_with_refill(tmp_path, family):
    from transformers import AutoModelForCausalLM
    config = qwen2_config() if family == "qwen2" else _llama_config()
    path = make_model_dir(tmp_path / family, config, tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(1)
    lengths_p, caps = (3, 9, 5, 14, 2, 7, 11), (12, 3, 20, 6, 1, 9, 4)  # mixed prompt and response lengths
    prompts = [torch.randint(1, 300, (n,)) for n in lengths_p]
    dec = HFSlotDecoder(model, slots=3, temperature=0)
    pending, slot_of = list(range(len(prompts))), [None] * 3
    got = {i: ([], []) for i in pending}
    steps = 0

    def record(s, tok, lp):
        i = slot_of[s]
        got[i][0].append(tok)
        got[i][1].append(lp)
        if len(got[i][0]) == caps[i]:
            dec.release(s)
            slot_of[s] = None

    while True:
        for s in range(3):
            while slot_of[s] is None and pending:  # refilled at once (a 1-token response frees it again)
                i = pending.pop(0)
                slot_of[s] = i
                record(s, *dec.admit(s, dec.prefill(prompts[i])))
        if all(x is None for x in slot_of):
            break
        toks, lps = dec.step()
        steps += 1
        for s in range(3):
            if slot_of[s] is not None:
                record(s, int(toks[s]), float(lps[s]))
    for i, p in enumerate(prompts):
        want_toks, want_lps = _reference(model, p, caps[i])
        assert got[i][0] == want_toks, (i, got[i][0], want_toks)
        # fp32: the slot batch attends over other slots' masked columns (exactly zero weight) with other matmul
        # shapes than generate's batch of one, so sums are reordered: ~2e-7 measured
        assert max(abs(a - b) for a, b in zip(got[i][1], want_lps)) < 1e-5
    assert steps < sum(caps) - len(caps)  # three slots at once: far fewer forwards than one response at a time
    assert dec.width <= max(lengths_p) + max(caps)  # columns no live slot uses are dropped


def test_rollout_worker_runs_hf_slots_with_policy_logprobs():
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    run_slot_worker(HFPolicy(LlamaForCausalLM(_llama_config(VOCAB))).eval())


def test_top_p_draws_from_the_nucleus_and_reports_its_logprobs():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log().expand(4000, -1)
    tok, lp = sample(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    # the nucleus of 0.7: tokens 0 and 1 (0.5 before token 1 is below 0.7; 0.75 before token 2 is not)
    assert set(tok.tolist()) == {0, 1}
    want = torch.where(tok == 0, torch.tensor(math.log(2 / 3)), torch.tensor(math.log(1 / 3)))
    assert (lp - want).abs().max() < 1e-6  # fp32 log-softmax of renormalised probabilities
    share = (tok == 0).float().mean().item()
    assert abs(share - 2 / 3) < 0.03  # 4000 draws: binomial std 0.0075, 4 sigma
    greedy_tok, greedy_lp = sample(logits[:1], 0, 1.0)
    assert greedy_tok.item() == 0 and abs(greedy_lp.item() - math.log(0.5)) < 1e-6


def test_top_p_below_one_needs_slots():
    with pytest.raises(ValueError, match="top_p=0.9 needs rollout_slots"):
        AsyncFlowConfig(top_p=0.9)
    assert AsyncFlowConfig(top_p=0.9, rollout_slots=4).top_p == 0.9
