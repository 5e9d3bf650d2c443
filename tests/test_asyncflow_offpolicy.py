"""Off-policy correction of the GRPO token loss (``off_policy``: none / tis / mask / decoupled, token and sequence
level, ``is_cap``) against a small
independent implementation (plain loops over responses and tokens), for all three loss normalisations, with the
step split into 2 micro-batches as the trainer does (DeepSpeed divides each micro-batch loss by ``gas``)."""
import math

import pytest
import torch

from ds_ext.grpo.loss import GRPOTokenLoss, group_advantages, step_token_weights

N, T, L_MAX, EPS_LOW, EPS_HIGH, BETA, CAP = 8, 6, 6, 0.2, 0.28, 0.05, 1.5


def data():
    """Current, behaviour, proximal and reference log-probs whose ratios spread on both clip sides and past the
    cap; responses of 1..6 tokens; two groups of 4."""
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(N, T, generator=g) * 3
    behav = lp + torch.randn(N, T, generator=g) * 0.5
    prox = lp + torch.randn(N, T, generator=g) * 0.3
    ref = lp + torch.randn(N, T, generator=g) * 0.2
    lengths = [1, 6, 3, 5, 6, 2, 4, 3]
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths], dtype=torch.float)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0])
    return lp, behav, prox, ref, mask, rewards


def reference_grad(mode, norm, lp0, behav, prox, ref, mask, adv, level="token"):
    """d loss / d logprobs, loss written token by token from the formulas (independent of GRPOTokenLoss)."""
    lp = lp0.clone().requires_grad_(True)
    tokens = int(mask.sum())
    loss = 0.0
    for i in range(N):
        n = int(mask[i].sum())
        base = lp0 if mode in ("tis", "mask") else prox
        seq = math.exp(sum(float(base[i, t] - behav[i, t]) for t in range(n)))  # product of the ratios
        for t in range(n):
            a = float(adv[i])
            rho = seq if level == "sequence" else math.exp(float(base[i, t] - behav[i, t]))
            w = min(rho, CAP) if mode == "tis" else (rho if rho <= CAP else 0.0)
            if mode in ("tis", "mask"):
                term = -w * a * lp[i, t]  # gradient -w A d log pi
            else:
                anchor = behav[i, t] if mode == "none" else prox[i, t]
                rho = torch.exp(lp[i, t] - anchor)
                clipped = torch.clamp(rho, 1 - EPS_LOW, 1 + EPS_HIGH)
                term = -torch.minimum(rho * a, clipped * a)
                if mode == "decoupled":
                    term = term * w
            d = ref[i, t] - lp[i, t]
            term = term + BETA * (torch.exp(d) - d - 1)
            loss = loss + term * {"grpo": 1 / (n * N), "dapo": 1 / tokens, "dr_grpo": 1 / (N * L_MAX)}[norm]
    loss.backward()
    return lp.grad


@pytest.mark.parametrize("mode,level", [("none", "token"), ("tis", "token"), ("tis", "sequence"), ("mask", "token"),
                                        ("mask", "sequence"), ("decoupled", "token"), ("decoupled", "sequence")])
@pytest.mark.parametrize("norm", ["grpo", "dapo", "dr_grpo"])
def test_off_policy_losses_match_the_reference_under_accumulation(mode, level, norm):
    lp0, behav, prox, ref, mask, rewards = data()
    adv = group_advantages(rewards, 4)
    expected = reference_grad(mode, norm, lp0, behav, prox, ref, mask, adv, level)
    lp = lp0.clone().requires_grad_(True)
    gas = 2
    for k in range(gas):
        rows = slice(k * N // gas, (k + 1) * N // gas)
        weights = step_token_weights(mask[rows], norm, N, int(mask.sum()), L_MAX, gas, 1)
        loss = GRPOTokenLoss(targets=torch.zeros(N // gas, T, dtype=torch.long), mask=mask[rows],
                             advantages=adv[rows], old_logprobs=behav[rows], ref_logprobs=ref[rows],
                             eps_low=EPS_LOW, eps_high=EPS_HIGH, kl_coef=BETA, weights=weights, off_policy=mode,
                             is_cap=CAP, prox_logprobs=prox[rows] if mode == "decoupled" else None,
                             is_level=level)
        (loss.from_logprobs(lp[rows]) / gas).backward()  # DeepSpeed's division by the accumulation steps
    assert lp.grad is not None
    # fp32; the two sides sum the same terms in a different order
    assert torch.allclose(lp.grad, expected, rtol=1e-5, atol=1e-7), (mode, norm, (lp.grad - expected).abs().max())
    assert (lp.grad[mask == 0] == 0).all()


def _loss(mode, lp, behav, mask, adv, prox=None, cap=CAP):
    return GRPOTokenLoss(targets=torch.zeros_like(mask, dtype=torch.long), mask=mask, advantages=adv,
                         old_logprobs=behav, off_policy=mode, is_cap=cap, prox_logprobs=prox)


def test_decoupled_is_ppo_when_proximal_is_behaviour_and_the_default_proximal_is_the_forward_detached():
    lp0, behav, prox, _, mask, rewards = data()
    adv = group_advantages(rewards, 4)
    grads = []
    for mode, p, cap in (("none", None, CAP), ("decoupled", behav, 1e9), ("decoupled", None, CAP),
                         ("decoupled", lp0, CAP)):
        lp = lp0.clone().requires_grad_(True)
        _loss(mode, lp, behav, mask, adv, p, cap).from_logprobs(lp).backward()
        grads.append(lp.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=0)  # w = 1, clip against behaviour: PPO
    assert torch.equal(grads[2], grads[3])  # None: the trainer's weights at the step start = this forward's


def test_is_weights_are_truncated_or_masked_at_the_cap():
    lp0, behav, prox, _, mask, rewards = data()
    adv = group_advantages(rewards, 4)
    rho = torch.exp(lp0 - behav)
    assert (rho > CAP).any() and (rho < 1).any()  # the data reach both sides of the cap
    assert torch.allclose(_loss("tis", lp0, behav, mask, adv).is_weights(lp0), rho.clamp(max=CAP))
    w = torch.exp(prox - behav)
    assert torch.allclose(_loss("decoupled", lp0, behav, mask, adv, prox).is_weights(lp0),
                          torch.where(w > CAP, torch.zeros_like(w), w))  # AReaL: tokens above the cap dropped
    assert torch.allclose(_loss("mask", lp0, behav, mask, adv).is_weights(lp0),
                          torch.where(rho > CAP, torch.zeros_like(rho), rho))
    assert torch.equal(_loss("none", lp0, behav, mask, adv).is_weights(lp0), torch.ones(N, T))
    with pytest.raises(ValueError, match="off_policy='dual'"):
        _loss("dual", lp0, behav, mask, adv)
