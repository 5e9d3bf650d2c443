"""GRPO loss under DeepSpeed: all three normalisations against a small independent reference, with gradient
accumulation (2 micro-batches) on 2 data-parallel processes."""
import pytest
import torch

from dist import run_distributed
from ds_ext.grpo.loss import GRPOTokenLoss, group_advantages, step_token_weights

TINY = dict(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32)
N, T, P, L_MAX, EPS_LOW, EPS_HIGH, BETA = 8, 12, 4, 8, 0.2, 0.28, 0.1


def batch():
    """8 sequences: prompt of P tokens, responses of 1..L_MAX tokens; behaviour and reference log-probs near the
    model's own, so ratios spread around 1 and both clip sides are hit."""
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (N, T + 1), generator=g)
    lengths = torch.tensor([1, 8, 3, 5, 8, 2, 6, 4])
    mask = torch.zeros(N, T)
    for i, n in enumerate(lengths):
        mask[i, P - 1: P - 1 + n] = 1
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    noise = torch.randn(2, N, T, generator=g) * 0.3
    return x, mask, rewards, noise


def model_logprobs(model, x):
    logits = model(x[:, :-1]).float()
    return torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None]).squeeze(-1)


def reference_grads(norm):
    """Plain loops over responses and tokens, whole batch on one process, no DeepSpeed."""
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**TINY))
    x, mask, rewards, noise = batch()
    lp = model_logprobs(model, x)
    old, ref = lp.detach() + noise[0], lp.detach() + noise[1]
    adv = group_advantages(rewards, 4)
    total_tokens = int(mask.sum())
    loss = 0.0
    for i in range(N):
        terms = []
        for t in range(T):
            if mask[i, t]:
                rho = torch.exp(lp[i, t] - old[i, t])
                surrogate = torch.minimum(rho * adv[i], torch.clamp(rho, 1 - EPS_LOW, 1 + EPS_HIGH) * adv[i])
                d = ref[i, t] - lp[i, t]
                terms.append(-surrogate + BETA * (torch.exp(d) - d - 1))
        s = sum(terms)
        loss = loss + {"grpo": s / len(terms) / N, "dapo": s / total_tokens, "dr_grpo": s / (N * L_MAX)}[norm]
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _ds_body(norm):
    import deepspeed
    import ds_ext
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    gas, dp, micro = 2, 2, 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**TINY))
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
              "steps_per_print": 10 ** 9, "zero_optimization": {"stage": 0},
              "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=config)
    rank = deepspeed.comm.get_rank()
    x, mask, rewards, noise = batch()
    with torch.no_grad():
        lp0 = model_logprobs(engine.module, x)
    old, ref = lp0 + noise[0], lp0 + noise[1]
    adv = group_advantages(rewards, 4)
    mine = list(range(rank * 4, rank * 4 + 4))
    for k in range(gas):
        idx = mine[k * micro:(k + 1) * micro]
        weights = step_token_weights(mask[idx], norm, N, int(mask.sum()), L_MAX, gas, dp)
        loss_fn = GRPOTokenLoss(targets=x[idx, 1:], mask=mask[idx], advantages=adv[idx], old_logprobs=old[idx],
                                ref_logprobs=ref[idx], eps_low=EPS_LOW, eps_high=EPS_HIGH, kl_coef=BETA,
                                weights=weights)
        logits = engine(x[idx, :-1]).float()
        lp = torch.log_softmax(logits, -1).gather(-1, x[idx, 1:, None]).squeeze(-1)
        engine.backward(loss_fn.from_logprobs(lp))
        if k < gas - 1:
            engine.step()
    # the gradients of the step, averaged over the data-parallel ranks, before the optimizer uses them
    return {n: p.grad.clone() for n, p in engine.module.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["grpo", "dapo", "dr_grpo"])
def test_global_normalisation_under_accumulation_and_data_parallel_matches_the_reference(norm):
    expected = reference_grads(norm)
    for grads in run_distributed(_ds_body, world_size=2, args=(norm,), timeout=300):
        for name, g in grads.items():
            ref = expected[name]
            # fp32; summation order differs (micro-batches, the data-parallel all-reduce, loop vs vector)
            assert (g - ref).norm() <= 1e-5 * ref.norm() + 1e-12, (norm, name)


def test_advantages_are_group_relative_with_unbiased_std_and_zero_for_constant_groups():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4)
    assert torch.allclose(a[:4], (r[:4] - 0.5) / (r[:4].std() + 1e-6))
    assert torch.equal(a[4:], torch.zeros(4))
    assert torch.allclose(group_advantages(r, 4, scale="none")[:4], r[:4] - 0.5)


def test_clipping_zeroes_the_gradient_only_on_the_clipped_side():
    def grad_at(ratio, adv):
        lp = torch.tensor([[0.0]], requires_grad=True)
        old = torch.tensor([[-torch.log(torch.tensor(ratio))]])
        GRPOTokenLoss(targets=torch.zeros(1, 1, dtype=torch.long), mask=torch.ones(1, 1),
                      advantages=torch.tensor([adv]), old_logprobs=old, eps_high=0.28).from_logprobs(lp).backward()
        return lp.grad.item()
    assert grad_at(1.5, 1.0) == 0.0        # A > 0, ratio above 1 + eps_high: clipped, no gradient
    assert grad_at(1.1, 1.0) == pytest.approx(-1.1)
    assert grad_at(1.5, -1.0) == pytest.approx(1.5)   # A < 0: the unclipped term is the min, gradient flows
    assert grad_at(0.5, 1.0) == pytest.approx(-0.5)   # below 1 - eps with A > 0: min picks the ratio term


def test_grouped_and_plain_response_logprobs_agree():
    """The trainer's Prefix Grouper path gives the per-response log-probs of the plain path (fp32, 1e-5)."""
    from ds_ext.grpo.task import addition_task
    from ds_ext.grpo.trainer import collate, grouped_response_logprobs, response_logprobs
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    from ds_ext.prefix_grouper.apply import prefix_group_model
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**TINY))
    task, g = addition_task(), torch.Generator().manual_seed(0)
    groups = []
    for idx in (3, 11):
        lengths = torch.randint(1, 6, (4,), generator=g)
        resp = torch.randint(0, 256, (4, 6), generator=g)
        groups.append({"samples": [{"prompt_ids": task.prompt_ids(idx), "response_ids": resp[i],
                                    "response_len": int(lengths[i]), "logprobs": torch.zeros(6), "reward": 0.0,
                                    "version": 0} for i in range(4)]})
    batch = collate(groups)
    plain = response_logprobs(model, batch)
    prefix_group_model(model)
    grouped = grouped_response_logprobs(model, batch)
    m = batch["mask"]
    assert (plain[m] - grouped[m]).abs().max() <= 1e-5 * plain[m].abs().max()


@pytest.mark.parametrize("norm", ["grpo", "dapo", "dr_grpo"])
def test_local_and_step_weights_are_one_function_with_the_config_defaults(norm):
    """The loss's own batch normalisation is the step normalisation with the batch as the step (gas = dp = 1), and
    the clip defaults are the async config's (eps_high 0.28, DAPO's clip-higher)."""
    from ds_ext.asyncflow.config import AsyncFlowConfig
    _, mask, _, _ = batch()
    z = torch.zeros(N, T)
    loss = GRPOTokenLoss(targets=z.long(), mask=mask, advantages=torch.zeros(N), old_logprobs=z, norm=norm,
                         max_len=L_MAX)
    step = step_token_weights(mask, norm, N, int(mask.sum()), L_MAX, gas=1, dp=1)
    assert torch.allclose(loss.weights, step, rtol=1e-6, atol=0)  # fp32: one division order vs another
    assert (loss.eps_low, loss.eps_high) == (AsyncFlowConfig().eps_low, AsyncFlowConfig().eps_high) == (0.2, 0.28)


def _dapo_step(norm_tokens, factor, stage, bf16, clip):
    """One ZeRO step of the DAPO loss on 2 ranks x 2 micro-batches (SGD, clipping at ``clip``; lr 1e4 so
    that the change, read as a difference of parameters, is larger than the parameters' own rounding):
    token weights with ``norm_tokens`` as the denominator, then ``factor`` applied to the step's gradients
    (``None``: a plain step). Returns the parameter change and the engine's gradient norm."""
    import deepspeed
    import ds_ext
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    gas, dp, micro = 2, 2, 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**TINY))
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
              "steps_per_print": 10 ** 9, "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
              "optimizer": {"type": "SGD", "params": {"lr": 1e4}}, "zero_allow_untested_optimizer": True}
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=config)
    rank = deepspeed.comm.get_rank()
    x, mask, rewards, noise = batch()
    with torch.no_grad():
        lp0 = model_logprobs(engine.module, x)
    old = lp0.float() + noise[0]
    adv = group_advantages(rewards, 4)
    mine = list(range(rank * 4, rank * 4 + 4))
    for k in range(gas):
        idx = mine[k * micro:(k + 1) * micro]
        weights = step_token_weights(mask[idx], "dapo", N, norm_tokens, L_MAX, gas, dp)
        loss_fn = GRPOTokenLoss(targets=x[idx, 1:], mask=mask[idx], advantages=adv[idx], old_logprobs=old[idx],
                                eps_low=EPS_LOW, eps_high=EPS_HIGH, weights=weights)
        logits = engine(x[idx, :-1]).float()
        lp = torch.log_softmax(logits, -1).gather(-1, x[idx, 1:, None]).squeeze(-1)
        engine.backward(loss_fn.from_logprobs(lp))
        if k == gas - 1 and factor is not None:
            engine.ds_ext_scale_step_gradients(factor)
        engine.step()
    change = {n: (p.detach().float() - before[n], before[n].norm()) for n, p in engine.module.named_parameters()}
    scale = engine.optimizer.loss_scaler.cur_scale
    return change, float(engine.get_global_grad_norm()), scale


CASES = ((1, False, 0.01), (1, False, 100.0), (2, False, 100.0), (1, True, 100.0))  # ZeRO stage, bf16, clip


def _dapo_stream_body():
    out = {}
    total = int(batch()[1].sum())
    estimate = N * L_MAX  # the trainer's estimate: responses x max_new_tokens
    for case in CASES:
        out[case] = (_dapo_step(total, None, *case), _dapo_step(estimate, estimate / total, *case))
    return out


@pytest.mark.slow
def test_a_streamed_dapo_step_corrected_at_the_end_is_the_whole_step_dapo_update():
    """Streamed DAPO: micro-batches weighted by the estimate N x L_MAX, the step's gradient multiplied by
    estimate / total before the norm, clipping and update, gives the update of weights by the true total."""
    for result in run_distributed(_dapo_stream_body, world_size=2, timeout=300):
        for (stage, bf16, clip), ((exact, exact_norm, s0), (streamed, streamed_norm, s1)) in result.items():
            assert s0 == s1 == 1.0, "the loss scale is restored after the step"
            # clip 0.01 binds (the update's size is the clip's, so only the norm shows the factor); clip 100 does not
            assert (exact_norm > clip) == (clip < 1), (exact_norm, clip)
            # fp32: one extra rounding of the gradient (x factor) and another summation scale -> 1e-6, plus the
            # change being read as a difference of parameters: one rounding of the parameter (fp32 eps 1.2e-7 x
            # |p|). bf16: the micro-batch gradients are rounded to bf16 (8-bit mantissa, 2^-8 = 0.4 %) at another
            # magnitude, and so are the updated parameters (eps 7.8e-3 x |p|) -> 2e-2 and 1e-2.
            tol, eps = (2e-2, 1e-2) if bf16 else (1e-6, 1.2e-7)
            assert abs(streamed_norm - exact_norm) <= tol * exact_norm, (stage, bf16)
            for name, (d, p_norm) in exact.items():
                assert (streamed[name][0] - d).norm() <= tol * d.norm() + eps * p_norm, (stage, bf16, name)


def _refusal_body():
    import ds_ext
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    out = {}
    # fp16 (also refused) cannot be built on DeepSpeed's CPU accelerator ("Type fp16 is not supported")
    for stage in (0, 1):
        model = LlamaForCausalLM(ModelConfig(**TINY))
        config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10 ** 9,
                  "zero_allow_untested_optimizer": True, "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
                  "zero_optimization": {"stage": stage}}
        engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=config)
        if stage == 1:
            out["zero1"] = engine.ds_ext_can_scale_step_gradients()
            next(engine.module.parameters()).use_muon = True  # how DeepSpeed marks a Muon-updated parameter
        try:
            engine.ds_ext_scale_step_gradients(0.5)
            out[stage] = (engine.ds_ext_can_scale_step_gradients(), None)
        except ValueError as e:
            out[stage] = (engine.ds_ext_can_scale_step_gradients(), str(e))
    return out


def test_the_step_gradient_factor_is_refused_outside_zero_1_and_2_and_with_muon():
    """ZeRO-0 has no ZeRO step to scale; ZeRO re-multiplies Muon updates by the loss scale (the trainer then waits
    for DAPO's total instead)."""
    out = run_distributed(_refusal_body, world_size=1, timeout=120)[0]
    assert out.pop("zero1") is True
    for name, (can, message) in out.items():
        assert can is False and message is not None and "ZeRO stage 1 or 2" in message, (name, message)
