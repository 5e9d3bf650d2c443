"""Prefix Grouper against the baseline that repeats the prompt for every response (reference model, fp32)."""
import pytest
import torch

import ds_ext.ops.attention_kernels as attention_op
from ds_ext.grpo.loss import GRPOTokenLoss
from ds_ext.models import LlamaForCausalLM, ModelConfig
from ds_ext.prefix_grouper.apply import prefix_group_model
from ds_ext.prefix_grouper.attention import GroupedAttention, prefix_grouped_attention
from ds_ext.prefix_grouper.layout import grouped_attention_mask, pack

TINY = dict(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128)
# fp32: the grouped path sums attention over two key parts and reorders reductions; 1e-5 relative is the bar.
FP32_RTOL = 1e-5


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def grpo_batch(seed=0):
    """3 groups with G = 2, 4, 3; prompts left padded (lengths 5, 9, 7), completions right padded (1..8 tokens)."""
    g = torch.Generator().manual_seed(seed)
    group_sizes, prompt_lens = [2, 4, 3], [5, 9, 7]
    prompts = torch.zeros(3, 9, dtype=torch.long)
    prompt_mask = torch.zeros(3, 9, dtype=torch.bool)
    for n, p in enumerate(prompt_lens):
        prompts[n, 9 - p:] = torch.randint(0, 256, (p,), generator=g)
        prompt_mask[n, 9 - p:] = True
    lens = torch.randint(1, 9, (sum(group_sizes),), generator=g)
    completions = torch.randint(0, 256, (len(lens), 8), generator=g)
    completion_mask = torch.arange(8)[None, :] < lens[:, None]
    return prompts, prompt_mask, completions, completion_mask, group_sizes


def baseline_logprobs(model, prompts, prompt_mask, completions, completion_mask, group_sizes):
    """Each response as its own row [prompt; response], right padded; log-probs of the response tokens."""
    rows, starts = [], []
    for n, g in enumerate(group_sizes):
        for r in range(sum(group_sizes[:n]), sum(group_sizes[:n + 1])):
            prompt = prompts[n][prompt_mask[n]]
            rows.append(torch.cat([prompt, completions[r][completion_mask[r]]]))
            starts.append(len(prompt))
    length = max(len(x) for x in rows)
    ids = torch.stack([torch.nn.functional.pad(x, (0, length - len(x))) for x in rows])
    padding = torch.stack([torch.arange(length) < len(x) for x in rows])
    logits = model(ids, key_padding_mask=padding)
    logp = torch.log_softmax(logits.float(), -1)
    out = torch.zeros(completions.shape)
    for r, p in enumerate(starts):
        k = torch.arange(completions.shape[1])
        pos = (p - 1 + k).clamp(max=length - 1)
        out[r] = logp[r, pos].gather(-1, completions[r].clamp(min=0)[:, None])[:, 0]
    return out


def assert_same_logprobs_and_grads(grouped, base, cmask, grouped_model, base_model):
    """Grouped vs baseline completion log-probs, then every parameter gradient of ``sum(logp * adv)``."""
    assert rel_err(grouped[cmask], base[cmask]) <= FP32_RTOL
    adv = torch.randn(cmask.shape[0], 1)
    (grouped * adv * cmask).sum().backward()
    (base * adv * cmask).sum().backward()
    for (name, p), q in zip(base_model.named_parameters(), grouped_model.parameters()):
        assert rel_err(q.grad, p.grad) <= FP32_RTOL, name


def test_pack_layout_positions_and_predictors():
    prompts, pmask, comps, cmask, sizes = grpo_batch()
    b = pack(prompts, pmask, comps, cmask, sizes)
    assert b.prefix_lens == [5, 9, 7] and [len(x) for x in b.suffix_lens] == sizes
    p, s1 = 5, b.suffix_lens[0][0]
    assert b.position_ids[0, :p + s1].tolist() == list(range(p + s1))
    assert b.position_ids[0, p + s1: p + s1 + b.suffix_lens[0][1]].tolist() == list(range(p, p + b.suffix_lens[0][1]))
    assert b.segment_ids[0, :p].eq(0).all() and b.predictor_index[0, 0].item() == p - 1
    assert b.predictor_index[1, 0].item() == p - 1 and b.predictor_index[1, 1].item() == p + s1


def test_grouped_attention_equals_block_mask_attention():
    prompts, pmask, comps, cmask, sizes = grpo_batch(1)
    b = pack(prompts, pmask, comps, cmask, sizes)
    torch.manual_seed(0)
    n, length = b.input_ids.shape
    q = torch.randn(n, 4, length, 8, requires_grad=True)
    k, v = (torch.randn(n, 2, length, 8, requires_grad=True) for _ in range(2))
    real = (b.segment_ids >= 0)[:, None, :, None]
    out = prefix_grouped_attention(q, k, v, b.prefix_lens, b.suffix_lens, b.segment_ids) * real
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=grouped_attention_mask(b.segment_ids),
                                                           enable_gqa=True) * real
    g = torch.randn_like(ref)
    assert rel_err(out, ref) <= FP32_RTOL
    for a, e in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert rel_err(a, e) <= FP32_RTOL


def test_grouped_model_matches_repeated_prefix_baseline():
    """Completion log-probs and every parameter gradient of a GRPO-style loss, grouped vs repeated prompts: several
    groups, G = 2..4, varying response lengths, left-padded prompts, right-padded responses."""
    prompts, pmask, comps, cmask, sizes = grpo_batch(2)
    torch.manual_seed(0)
    grouped_model = LlamaForCausalLM(ModelConfig(**TINY))
    base_model = LlamaForCausalLM(ModelConfig(**TINY))
    base_model.load_state_dict(grouped_model.state_dict())
    b = pack(prompts, pmask, comps, cmask, sizes)
    logits = grouped_model(b.input_ids, position_ids=b.position_ids, attention_fn=GroupedAttention(b))
    grouped = b.completion_logprobs(logits, comps)
    base = baseline_logprobs(base_model, prompts, pmask, comps, cmask, sizes)
    assert_same_logprobs_and_grads(grouped, base, cmask, grouped_model, base_model)
    # the grouped batch runs the projections and MLP on fewer tokens than the repeated one
    assert b.input_ids.numel() < sum(int(pmask[n].sum()) * g for n, g in enumerate(sizes)) + int(cmask.sum()) + 1


def test_pack_checks_group_sizes():
    prompts, pmask, comps, cmask, _ = grpo_batch()
    with pytest.raises(ValueError, match="do not match"):
        pack(prompts, pmask, comps, cmask, [2, 2, 2])


def _zero2_body():
    import deepspeed
    import ds_ext
    deepspeed.init_distributed(dist_backend="gloo")
    prompts, pmask, comps, cmask, sizes = grpo_batch(10 + deepspeed.comm.get_rank())
    adv = torch.randn(comps.shape[0], 1, generator=torch.Generator().manual_seed(5))
    deltas = {}
    for mode in ("baseline", "grouped", "grouped_streambp"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(ModelConfig(**TINY))
        before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
                  "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": 2}}
        if mode == "baseline":
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
            logp = baseline_logprobs(engine, prompts, pmask, comps, cmask, sizes)
        else:
            config["ds_ext"] = {"prefix_grouper": {"enabled": True}}
            if mode == "grouped_streambp":
                config["ds_ext"]["streambp"] = {"enabled": True, "chunk_size": 5}
            engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=config)
            batch = pack(prompts, pmask, comps, cmask, sizes)
            logp = batch.completion_logprobs(engine(batch), comps)
        old = logp.detach() + 0.1  # behaviour policy off by a little: ratios inside the clip range
        loss = GRPOTokenLoss(comps, cmask, adv[:, 0], old, norm="grpo").from_logprobs(logp)
        engine.backward(loss)
        engine.step()
        deltas[mode] = torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()]) - before
    return deltas


def test_grouped_engine_under_zero2_matches_repeated_baseline():
    """2 processes, ZeRO-2, SGD, GRPO token loss on the completion log-probs: one step through the ds_ext engine with
    Prefix Grouper on (engine(grouped_batch)), alone and together with StreamBP, moves the weights as stock DeepSpeed
    does on the repeated-prompt batch."""
    from dist import run_distributed
    for r in run_distributed(_zero2_body, world_size=2):
        assert rel_err(r["grouped"], r["baseline"]) <= FP32_RTOL
        assert rel_err(r["grouped_streambp"], r["baseline"]) <= FP32_RTOL


def test_prefix_grouper_needs_a_model_that_takes_attention_fn():
    with pytest.raises(ValueError, match="position_ids and attention_fn"):
        prefix_group_model(torch.nn.Linear(2, 2))


def test_prefix_grouper_refuses_a_pipeline_module_naming_the_setting():
    import deepspeed.pipe
    from ds_ext.config import DsExtConfigError
    stage = torch.nn.Module()
    stage.__class__ = type("P", (deepspeed.pipe.PipelineModule,), {})
    with pytest.raises(DsExtConfigError, match="PipelineModule") as info:
        prefix_group_model(stage)
    assert info.value.problems[0][0] == "ds_ext.prefix_grouper.enabled"


def test_close_removes_the_input_hook():
    """close() removes the pre-hook (idempotent): a grouped batch is no longer translated, plain inputs unchanged."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**TINY))
    feature = prefix_group_model(model)
    prompts, pmask, comps, cmask, sizes = grpo_batch()
    batch = pack(prompts, pmask, comps, cmask, sizes)
    assert model(batch).shape[:2] == batch.input_ids.shape
    feature.close()
    feature.close()
    assert not model._forward_pre_hooks and feature.metrics() == {"enabled": 0}
    with pytest.raises(AttributeError, match="'GroupedBatch' object has no attribute 'shape'"):
        model(batch)  # the model's own forward reads input_ids.shape: no hook translated the batch


def test_masked_fallback_matches_the_repeated_prefix_baseline(monkeypatch, caplog):
    """The SDPA fallback (the path on CUDA and for non-fp32 inputs), forced on CPU by removing the flash kernel
    handle: log-probs and every parameter gradient equal the ungrouped model's; the fallback says why, once."""
    import logging
    monkeypatch.setattr(attention_op, "CPU_FLASH_FORWARD", None)
    monkeypatch.setattr(attention_op, "_logged_reasons", set())
    prompts, pmask, comps, cmask, sizes = grpo_batch(5)
    torch.manual_seed(0)
    grouped_model, base_model = LlamaForCausalLM(ModelConfig(**TINY)), LlamaForCausalLM(ModelConfig(**TINY))
    base_model.load_state_dict(grouped_model.state_dict())
    b = pack(prompts, pmask, comps, cmask, sizes)
    with caplog.at_level(logging.INFO, logger="ds_ext.ops.attention"):
        logits = grouped_model(b.input_ids, position_ids=b.position_ids, attention_fn=GroupedAttention(b))
    fallbacks = [r.getMessage() for r in caplog.records if "prefix-grouped attention" in r.getMessage()]
    assert len(fallbacks) == 1 and "no CPU flash attention kernels" in fallbacks[0]  # 2 layers, logged once
    grouped = b.completion_logprobs(logits, comps)
    base = baseline_logprobs(base_model, prompts, pmask, comps, cmask, sizes)
    assert_same_logprobs_and_grads(grouped, base, cmask, grouped_model, base_model)


def bf16_error(model_logp, ref, cmask, model, ref_grads) -> tuple:
    """(log-prob, gradient) relative errors of a bf16 model's GRPO-style loss against the fp32 reference."""
    adv = torch.randn(cmask.shape[0], 1, generator=torch.Generator().manual_seed(9))
    (model_logp * adv * cmask).sum().backward()
    grads = torch.cat([p.grad.float().reshape(-1) for p in model.parameters()])
    return rel_err(model_logp[cmask], ref[cmask]), rel_err(grads, ref_grads)


def test_bf16_grouped_is_as_close_to_fp32_as_the_bf16_baseline():
    """bf16 (masked SDPA path: the merged flash path is fp32 only): the grouped model's log-probs and gradients are
    as close to the fp32 model's as the repeated-prompt bf16 baseline's are, within 1.5x (the grouped row computes
    the same terms in another order; a wrong mask or position gives errors of order 1)."""
    prompts, pmask, comps, cmask, sizes = grpo_batch(6)
    torch.manual_seed(0)
    ref_model = LlamaForCausalLM(ModelConfig(**TINY))
    ref = baseline_logprobs(ref_model, prompts, pmask, comps, cmask, sizes)
    adv = torch.randn(cmask.shape[0], 1, generator=torch.Generator().manual_seed(9))
    (ref * adv * cmask).sum().backward()
    ref_grads = torch.cat([p.grad.reshape(-1) for p in ref_model.parameters()])
    grouped_model, base_model = (LlamaForCausalLM(ModelConfig(**TINY)).to(torch.bfloat16) for _ in range(2))
    for m in (grouped_model, base_model):
        m.load_state_dict(ref_model.state_dict())
    b = pack(prompts, pmask, comps, cmask, sizes)
    grouped = b.completion_logprobs(grouped_model(b.input_ids, position_ids=b.position_ids,
                                                  attention_fn=GroupedAttention(b)), comps)
    base = baseline_logprobs(base_model, prompts, pmask, comps, cmask, sizes)
    (err_g_logp, err_g_grad), (err_b_logp, err_b_grad) = (
        bf16_error(grouped, ref.detach(), cmask, grouped_model, ref_grads),
        bf16_error(base, ref.detach(), cmask, base_model, ref_grads))
    # measured (torch 2.13 CPU): log-probs 1.61e-4 vs 1.60e-4 (1.01x), gradients 6.60e-3 vs 6.53e-3 (1.01x)
    assert err_b_grad < 0.05  # bf16: 8 mantissa bits
    assert err_g_logp <= 1.5 * err_b_logp, (err_g_logp, err_b_logp)
    assert err_g_grad <= 1.5 * err_b_grad, (err_g_grad, err_b_grad)


def test_hf_llama_grouped_matches_repeated_baseline():
    """An unmodified HF LlamaForCausalLM (tiny, random): the grouped attention registered with transformers gives the
    repeated-prompt baseline's response log-probs and parameter gradients."""
    transformers = pytest.importorskip("transformers", reason="transformers is the optional [hf] extra")
    from ds_ext.prefix_grouper.hf import enable_hf_prefix_grouper, hf_grouped_logits
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    import copy
    base_model = transformers.LlamaForCausalLM(config)
    grouped_model = transformers.LlamaForCausalLM(copy.deepcopy(config))  # set_attn_implementation edits the config
    grouped_model.load_state_dict(base_model.state_dict())
    enable_hf_prefix_grouper(grouped_model)
    prompts, pmask, comps, cmask, sizes = grpo_batch(3)
    b = pack(prompts, pmask, comps, cmask, sizes)
    grouped = b.completion_logprobs(hf_grouped_logits(grouped_model, b), comps)

    class Adapter(torch.nn.Module):  # the baseline helper calls model(ids, key_padding_mask=...)
        def forward(self, ids, key_padding_mask):
            return base_model(input_ids=ids, attention_mask=key_padding_mask.long(), use_cache=False).logits
    base = baseline_logprobs(Adapter(), prompts, pmask, comps, cmask, sizes)
    assert_same_logprobs_and_grads(grouped, base, cmask, grouped_model, base_model)


@pytest.mark.parametrize("chunk", [3, 10, 64])
def test_grouped_and_streamed_matches_repeated_baseline(chunk):
    """Prefix Grouper with StreamBP on the same layers: packed rows streamed in chunks that cut across prefix and
    suffixes (chunk 3, 10) or cover the row (64); prefix gradients gather over every suffix and chunk before they
    flow into the prefix. Log-probs and all parameter gradients equal the repeated-prompt baseline."""
    from ds_ext.streambp.apply import stream_model
    from ds_ext.streambp.config import StreamBPConfig
    prompts, pmask, comps, cmask, sizes = grpo_batch(4)
    torch.manual_seed(0)
    model, base_model = LlamaForCausalLM(ModelConfig(**TINY)), LlamaForCausalLM(ModelConfig(**TINY))
    base_model.load_state_dict(model.state_dict())
    stream_model(model, StreamBPConfig(enabled=True, chunk_size=chunk))
    b = pack(prompts, pmask, comps, cmask, sizes)
    kinds = []
    model.layers[0].register_forward_hook(lambda mod, args, out: kinds.append(type(out.grad_fn).__name__))
    grouped = b.completion_logprobs(model(b.input_ids, position_ids=b.position_ids, attention_fn=GroupedAttention(b)),
                                    comps)
    base = baseline_logprobs(base_model, prompts, pmask, comps, cmask, sizes)
    assert kinds == ["StreamedLayerFunctionBackward"]
    assert_same_logprobs_and_grads(grouped, base, cmask, model, base_model)
