"""GRPO exactness: :class:`GRPOTrainer` on a real DeepSpeed engine against a small plain-PyTorch reference written
here (token loops, its own nucleus and normalisation code, ``torch.optim.SGD``-free manual updates).

One batch of 4 groups x 4 responses goes through the transfer queue; the trainer's parameter change after
``train_step`` must equal the reference's, for: ``ppo_epochs`` 1 / 2, ``mini_batches`` 1 / 2, every ``off_policy``
(tis and mask at token and sequence level), temperature 0.7 and top_p 0.9, ``kl_coef > 0`` (the trainer builds the
frozen reference itself), ``advantage_scale`` group / batch / none and all three loss normalisations.
"""
import copy
import math

import pytest
import torch

from dist import run_distributed

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, max_seq_len=32,
            init_std=0.3)  # init_std 0.3: peaked next-token distributions, so a 0.9 nucleus drops most tokens
G, GROUPS, L_MAX, LR, GAS = 4, 4, 5, 0.05, 2


# -- the reference ------------------------------------------------------------------------------------------------
def ref_logprobs(model, sample, temperature, top_p):
    """Log-probs [n] of one response's tokens (unpadded sequence, positions from 0), keeping the graph."""
    prompt, n = sample["prompt_ids"], sample["response_len"]
    resp = sample["response_ids"][:n]
    logits = model(torch.cat([prompt, resp])[None])[0].float()
    out = []
    for t in range(n):
        z = logits[len(prompt) - 1 + t] / temperature
        tok = int(resp[t])
        keep = torch.ones_like(z, dtype=torch.bool)
        if top_p < 1:
            with torch.no_grad():
                p = torch.softmax(z, -1)
                keep = torch.zeros_like(keep)
                mass = 0.0
                for idx in torch.argsort(p, descending=True).tolist():  # most likely first, until the mass is reached
                    if mass >= top_p:
                        break
                    keep[idx] = True
                    mass += float(p[idx])
                keep[tok] = True
        out.append(z[tok] - torch.logsumexp(z[keep], 0))
    return torch.stack(out)


def ref_advantages(rewards, scale):
    r = rewards.view(-1, G).double()
    centred = r - r.mean(1, keepdim=True)
    if scale == "none":
        return centred.view(-1)
    std = r.std(1, keepdim=True) if scale == "group" else rewards.double().std()
    return (centred / (std + 1e-6)).view(-1)


def ref_update(model, samples, cfg):
    """The whole batch: advantages once, proximal/reference log-probs once, then epochs x mini-batches of SGD."""
    T, P = cfg.temperature, cfg.top_p
    adv = ref_advantages(torch.tensor([float(s["reward"]) for s in samples]), cfg.advantage_scale)
    init = copy.deepcopy(model)
    with torch.no_grad():
        prox = [ref_logprobs(init, s, T, P) for s in samples]
    per_mb = len(samples) // cfg.mini_batches
    for _ in range(cfg.ppo_epochs):
        for m in range(cfg.mini_batches):
            mb = list(range(m * per_mb, (m + 1) * per_mb))
            tokens = sum(samples[i]["response_len"] for i in mb)
            loss = 0.0
            for i in mb:
                s, a = samples[i], float(adv[i])
                lp = ref_logprobs(model, s, T, P)
                behav = s["logprobs"][:s["response_len"]]
                base = lp.detach() if cfg.off_policy in ("tis", "mask") else prox[i]
                log_w = base - behav
                if cfg.is_level == "sequence":
                    log_w = log_w.sum().expand_as(log_w)
                terms = []
                for t in range(len(lp)):
                    w = math.exp(float(log_w[t]))
                    if cfg.off_policy == "tis":
                        term = -min(w, cfg.is_cap) * a * lp[t]
                    elif cfg.off_policy == "mask":
                        term = -(w if w <= cfg.is_cap else 0.0) * a * lp[t]
                    else:
                        anchor = behav[t] if cfg.off_policy == "none" else prox[i][t]
                        rho = torch.exp(lp[t] - anchor)
                        term = -torch.minimum(rho * a, torch.clamp(rho, 1 - cfg.eps_low, 1 + cfg.eps_high) * a)
                        if cfg.off_policy == "decoupled":
                            term = term * (w if w <= cfg.is_cap else 0.0)
                    if cfg.kl_coef > 0:
                        d = prox[i][t] - lp[t]  # the reference is the initial policy: its log-probs are prox's
                        term = term + cfg.kl_coef * (torch.exp(d) - d - 1)
                    terms.append(term)
                s_sum = sum(terms)
                loss = loss + {"grpo": s_sum / len(terms) / len(mb), "dapo": s_sum / tokens,
                               "dr_grpo": s_sum / (len(mb) * L_MAX)}[cfg.loss_norm]
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= LR * p.grad


# -- the data and the trainer -------------------------------------------------------------------------------------
def make_samples(model, temperature, top_p):
    """4 groups of 4: prompts of 2..4 tokens, responses of 1..5 tokens, behaviour log-probs = the initial
    policy's (sampling distribution) + noise, so ratios spread on both sides of the clip and the cap."""
    g = torch.Generator().manual_seed(11)
    samples = []
    for k in range(GROUPS):
        prompt = torch.randint(1, 200, (2 + k % 3,), generator=g)
        for j in range(G):
            n = 1 + (k * G + j) % L_MAX
            resp = torch.zeros(L_MAX, dtype=torch.long)
            resp[:n] = torch.randint(1, 200, (n,), generator=g)
            s = {"prompt_ids": prompt, "response_ids": resp, "response_len": n, "prompt_index": k,
                 "reward": float(torch.rand((), generator=g) < 0.5) + 0.1 * j, "version": 0,
                 "token_versions": torch.zeros(L_MAX, dtype=torch.long)}
            with torch.no_grad():
                lp = ref_logprobs(model, s, temperature, top_p)
            logprobs = torch.zeros(L_MAX)
            logprobs[:n] = lp + 0.4 * torch.randn(n, generator=g)
            s["logprobs"] = logprobs
            samples.append(s)
    return samples


def run_trainer(model, samples, cfg):
    import ds_ext
    from ds_ext.asyncflow.queue import TransferQueue
    from ds_ext.asyncflow.rollout import COLUMNS
    from ds_ext.grpo.trainer import GRPOTrainer
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": GAS, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "SGD", "params": {"lr": LR}}, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0}
    engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=config)
    queue = TransferQueue(G, GROUPS, max_staleness=1)
    for k in range(GROUPS):
        meta = queue.reserve("w", 0)
        queue.put_group(meta.group_id, samples[k * G:(k + 1) * G], COLUMNS)
    trainer = GRPOTrainer(engine, queue, cfg)
    metrics = trainer.train_step(0)
    return metrics, engine.global_steps


CASES = [  # (ppo_epochs, mini_batches, off_policy, is_level, temperature, top_p, kl_coef, advantage_scale, norm)
    (1, 1, "none", "token", 1.0, 1.0, 0.0, "group", "grpo"),
    (1, 1, "none", "token", 0.7, 1.0, 0.0, "group", "dapo"),
    (1, 2, "tis", "token", 0.7, 1.0, 0.0, "group", "dr_grpo"),
    (2, 1, "tis", "sequence", 1.0, 0.9, 0.0, "none", "grpo"),
    (2, 2, "mask", "token", 0.7, 0.9, 0.0, "group", "dapo"),
    (1, 2, "mask", "sequence", 0.7, 1.0, 0.1, "batch", "grpo"),
    (2, 2, "decoupled", "token", 0.7, 0.9, 0.1, "group", "dr_grpo"),
    (2, 1, "decoupled", "sequence", 0.7, 1.0, 0.0, "batch", "dapo"),
    (1, 1, "none", "token", 0.7, 0.9, 0.1, "batch", "dr_grpo"),
]
# decoupled against tis with a cap no weight reaches: the same update at one epoch, a different one at two
VERSUS = [(e, 1, mode, "token", 0.7, 1.0, 0.0, "group", "grpo") for e in (1, 2) for mode in ("tis", "decoupled")]


def _cfg(case):
    from ds_ext.asyncflow.config import AsyncFlowConfig
    epochs, mbs, mode, level, temp, top_p, kl, scale, norm = case
    return AsyncFlowConfig(group_size=G, groups_per_step=GROUPS, max_new_tokens=L_MAX, rollout_slots=1,
                           temperature=temp, top_p=top_p, ppo_epochs=epochs, mini_batches=mbs, off_policy=mode,
                           is_level=level, is_cap=1.5 if (case not in VERSUS) else 1e9, kl_coef=kl,
                           advantage_scale=scale, loss_norm=norm)


def _body(cases):
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    torch.set_num_threads(1)
    out = {}
    for case in cases:
        cfg = _cfg(case)
        torch.manual_seed(0)
        model = LlamaForCausalLM(ModelConfig(**TINY))
        samples = make_samples(model, cfg.temperature, cfg.top_p)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        reference = copy.deepcopy(model)
        ref_update(reference, samples, cfg)
        metrics, steps = run_trainer(model, samples, cfg)
        out[case] = {"steps": steps, "metrics": metrics,
                     "ds": {n: p.detach() - before[n] for n, p in model.named_parameters()},
                     "ref": {n: p.detach() - before[n] for n, p in reference.named_parameters()},
                     "norm": {n: before[n].norm() for n in before}}
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_body, world_size=1, args=(CASES + VERSUS,), timeout=600)[0]


def _close(a):
    """Parameter changes equal up to fp32: the trainer left-pads and masks where the reference runs unpadded rows,
    and the two sum in other orders (1e-6 relative per op, grown over <= 4 updates -> 1e-4 of the change), plus the
    change being read as a difference of parameters (one rounding of |p|: fp32 eps 1.2e-7)."""
    return all((a["ds"][n] - a["ref"][n]).norm() <= 1e-4 * a["ref"][n].norm() + 1.2e-7 * a["norm"][n] for n in a["ds"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_trainer_update_equals_the_plain_pytorch_reference(results, case):
    r = results[case]
    assert r["steps"] == case[0] * case[1]  # ppo_epochs x mini_batches optimizer steps
    moved = sum(float(d.norm()) for d in r["ref"].values())
    assert moved > 1e-3  # the update is far above the comparison's rounding allowance
    worst = max(float((r["ds"][n] - r["ref"][n]).norm() / r["ref"][n].norm()) for n in r["ds"])
    assert _close(r), (case, worst)
    m = r["metrics"]
    assert m["updates"] == case[0] * case[1] and m["logprob_abs_diff"] > 0.1 and m["mismatch_kl"] > 0


def test_decoupled_differs_from_tis_only_with_several_updates(results):
    one_tis, one_dec, two_tis, two_dec = (results[c] for c in VERSUS)
    for r in (one_tis, one_dec, two_tis, two_dec):
        assert _close(r)
    # one update: pi_prox is the current policy, rho_p = 1 and the weight is pi_theta / pi_behav, as tis's
    assert all((one_tis["ds"][n] - one_dec["ds"][n]).norm() <= 1e-5 * one_tis["ds"][n].norm() + 1e-9
               for n in one_tis["ds"])
    # two epochs: tis re-weights by the moved policy without a clip; decoupled clips against the frozen pi_prox
    diff = sum(float((two_tis["ds"][n] - two_dec["ds"][n]).norm()) for n in two_tis["ds"])
    total = sum(float(two_tis["ds"][n].norm()) for n in two_tis["ds"])
    assert diff > 1e-3 * total, (diff, total)


def test_trainer_logprobs_are_the_samplers_distribution():
    """The sampler's log-prob of a drawn token (temperature 0.7, top_p 0.9) equals the trainer's on the same logits;
    without the temperature division (or the nucleus) they differ."""
    from ds_ext.grpo.loss import sampling_logprobs
    from ds_ext.models.generate import sample
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 100, generator=g) * 3
    for temp, top_p in ((0.7, 0.9), (0.7, 1.0), (1.3, 0.5)):
        tok, lp = sample(logits, temp, top_p, generator=g)
        assert torch.equal(sampling_logprobs(logits, tok, temp, top_p), lp)  # the same ops on the same logits
        assert not torch.allclose(sampling_logprobs(logits, tok, 1.0, top_p), lp, atol=1e-3)
        if top_p < 1:
            assert not torch.allclose(sampling_logprobs(logits, tok, temp, 1.0), lp, atol=1e-3)
