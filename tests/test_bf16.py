"""Every feature under DeepSpeed's ``"bf16": {"enabled": true}``, end to end on 2 gloo processes (tiny reference
model, 1 thread per rank): the paths fp32 runs never reach (bf16 model weights beside ZeRO's fp32 master
partitions, the low-precision refresh after NoLoCo writes the masters, Prefix Grouper's SDPA fallback for non-fp32
inputs, the journal's loss-scaler and partition state with bf16 weights).

- baseline ZeRO-1: the weights really are bf16 and the loss falls on a fixed batch;
- StreamBP (ZeRO-2) and Prefix Grouper (ZeRO-2, alone and with StreamBP): one SGD step moves ZeRO's fp32 master
  partition as stock DeepSpeed's bf16 step does, within bf16 rounding;
- NoLoCo (2 replicas, inner_steps 2, outer lr 1, momentum 0): after the outer step each replica's fp32 masters are
  the pair mean of both replicas' weights, and the bf16 model weights were refreshed from them;
- the journal: a run killed with SIGKILL mid-step resumes bit-identical to a run that never failed (in the fast
  tier; the others are marked slow).
"""
from __future__ import annotations

import os
import random
import signal

import pytest
import torch

from dist import run_distributed
from test_recovery import assert_same_state, micro_batch, state_of

TINY = dict(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128)
BF16 = {"enabled": True}
# Two bf16 computations of the same gradient that round differently (chunked vs whole-sequence attention and
# loss, grouped vs repeated prefix): bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3), and the rounding
# of activations compounds through 2 layers and the head: measured 3.6e-3 to 7.5e-3 on DeepSpeed 0.19.8 / torch 2.13
# CPU, so 5e-2 leaves room for other kernels. A wrong gradient (a chunk dropped, a mask off by one) is off by O(1).
BF16_RTOL = 5e-2
# anchor + (mean - anchor) differs from mean by a few fp32 ulps of the largest weight (< 4 here; ulp(4) = 4.8e-7).
ULP_ATOL = 2e-6

pytestmark = pytest.mark.timeout(300)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fp32_masters(engine) -> torch.Tensor:
    """This rank's flat fp32 master partition (ZeRO-1/2)."""
    return torch.cat([t.detach().reshape(-1).clone() for t in engine.optimizer.single_partition_of_fp32_groups])


def model():
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    torch.manual_seed(0)
    return LlamaForCausalLM(ModelConfig(**TINY))


def sgd_config(ext=None) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": 2}, "bf16": BF16}
    if ext is not None:
        cfg["ds_ext"] = ext
    return cfg


def _baseline_loss(rank: int) -> dict:
    import ds_ext
    m = model()
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
              "zero_optimization": {"stage": 1}, "bf16": BF16, "ds_ext": {}}
    engine, *_ = ds_ext.initialize(model=m, model_parameters=m.parameters(), config=config)
    x, y = micro_batch(rank, 0, 0)
    losses = []
    for _ in range(8):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return {"losses": losses, "dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
            "loss_dtype": str(loss.dtype)}


def _one_sgd_step(engine, forward) -> torch.Tensor:
    """The fp32 master partition's change in one step (SGD: lr x this rank's part of the reduced gradient)."""
    before = fp32_masters(engine)
    engine.backward(forward(engine))
    engine.step()
    return fp32_masters(engine) - before


def _streambp_deltas(rank: int) -> dict:
    import deepspeed
    import ds_ext
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(0, 256, (2, 31), generator=g)
    out = {}
    for mode in ("stock", "streambp"):
        m = model()
        if mode == "stock":
            engine, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=sgd_config())
        else:
            ext = {"streambp": {"enabled": True, "chunk_size": 7, "logits_chunk_size": 5}}
            engine, *_ = ds_ext.initialize(model=m, model_parameters=m.parameters(), config=sgd_config(ext))
            out["streamed_layers"] = engine.ds_ext_metrics()["streambp/streamed_layers"]
        out[mode] = _one_sgd_step(engine, lambda e: e(x[:, :-1], x[:, 1:]))
    return out


def _grouped_deltas(rank: int) -> dict:
    import deepspeed
    import ds_ext
    from ds_ext.prefix_grouper.layout import pack
    from ds_ext.grpo.loss import GRPOTokenLoss
    from test_prefix_grouper import baseline_logprobs, grpo_batch
    prompts, pmask, comps, cmask, sizes = grpo_batch(10 + rank)
    adv = torch.randn(comps.shape[0], generator=torch.Generator().manual_seed(5))
    out = {}
    for mode in ("baseline", "grouped", "grouped_streambp"):
        m = model()
        if mode == "baseline":
            engine, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=sgd_config())

            def logprobs(e):
                return baseline_logprobs(e, prompts, pmask, comps, cmask, sizes)
        else:
            ext = {"prefix_grouper": {"enabled": True}}
            if mode == "grouped_streambp":
                ext["streambp"] = {"enabled": True, "chunk_size": 5}
            engine, *_ = ds_ext.initialize(model=m, model_parameters=m.parameters(), config=sgd_config(ext))
            batch = pack(prompts, pmask, comps, cmask, sizes)

            def logprobs(e):
                return batch.completion_logprobs(e(batch), comps)

        def loss(e):
            logp = logprobs(e)
            old = logp.detach() + 0.1  # behaviour policy off by a little: ratios inside the clip range
            return GRPOTokenLoss(comps, cmask, adv, old, norm="grpo").from_logprobs(logp)

        out[mode] = _one_sgd_step(engine, loss)
    return out


def _zero_features_body() -> dict:
    """Baseline, StreamBP and Prefix Grouper in one pair of processes (process start-up dominates their time)."""
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    rank = deepspeed.comm.get_rank()
    return {"baseline": _baseline_loss(rank), "streambp": _streambp_deltas(rank), "grouped": _grouped_deltas(rank)}


@pytest.fixture(scope="module")
def zero_runs():
    return run_distributed(_zero_features_body, world_size=2, timeout=280)


@pytest.mark.slow
def test_bf16_baseline_zero1_weights_are_bf16_and_loss_falls(zero_runs):
    for r in zero_runs:
        b = r["baseline"]
        assert b["dtypes"] == ["torch.bfloat16"], b["dtypes"]
        # 8 AdamW steps on one fixed batch from ln(259) = 5.56: memorising it drops the loss by far more than 0.5
        assert b["losses"][-1] < b["losses"][0] - 0.5, b["losses"]


@pytest.mark.slow
def test_bf16_streambp_zero2_step_matches_stock_within_bf16_rounding(zero_runs):
    for r in zero_runs:
        s = r["streambp"]
        assert s["streamed_layers"] == TINY["num_layers"]
        assert s["stock"].abs().max() > 0
        assert rel_err(s["streambp"], s["stock"]) <= BF16_RTOL, rel_err(s["streambp"], s["stock"])


@pytest.mark.slow
def test_bf16_prefix_grouper_zero2_step_matches_repeated_prefix_within_bf16_rounding(zero_runs):
    """bf16 inputs take the grouped attention's SDPA fallback (the fp32 tests take the flash op)."""
    for r in zero_runs:
        g = r["grouped"]
        assert g["baseline"].abs().max() > 0
        for mode in ("grouped", "grouped_streambp"):
            assert rel_err(g[mode], g["baseline"]) <= BF16_RTOL, (mode, rel_err(g[mode], g["baseline"]))


def _noloco_body() -> dict:
    """Two runs from the same start: inner_steps 4 (no outer step yet after 2 steps: the pre-outer-step weights)
    and inner_steps 2 (the outer step runs inside step 2)."""
    import deepspeed
    import ds_ext
    out = {}
    for inner in (4, 2):
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                  "zero_optimization": {"stage": 1}, "bf16": BF16,
                  "ds_ext": {"noloco": {"enabled": True, "inner_steps": inner, "outer_lr": 1.0,
                                        "outer_momentum": 0.0, "ranks_per_replica": 1}}}
        m = model()
        engine, *_ = ds_ext.initialize(model=m, model_parameters=m.parameters(), config=config)
        rank = deepspeed.comm.get_rank()
        for step in range(1, 3):
            x, y = micro_batch(rank, step, 0)  # each replica its own data: the replicas diverge
            engine.backward(engine(x, y))
            engine.step()
        out[inner] = {"fp32": fp32_masters(engine),
                      "bf16": torch.cat([p.detach().reshape(-1).clone() for p in engine.module.parameters()]),
                      "metrics": engine.ds_ext_metrics()}
        engine.ds_ext_close()
    return out


@pytest.mark.slow
def test_bf16_noloco_outer_step_is_the_pair_mean_and_refreshes_bf16_weights():
    r = run_distributed(_noloco_body, world_size=2, timeout=280)
    before = [x[4] for x in r]
    after = [x[2] for x in r]
    assert rel_err(before[0]["fp32"], before[1]["fp32"]) > 1e-3, "the replicas did not diverge: the test is void"
    pair_mean = (before[0]["fp32"] + before[1]["fp32"]) / 2
    for rank, a in enumerate(after):
        m = a["metrics"]
        assert m["noloco/outer_step"] == 1 and m["noloco/mixed"] == 1, m
        assert (a["fp32"] - pair_mean).abs().max().item() <= ULP_ATOL, f"rank {rank}: fp32 masters != pair mean"
        assert before[rank]["metrics"]["noloco/outer_step"] == 0
    # The bf16 model weights are the refreshed copy of the masters: the replicas' copies now agree up to one bf16
    # rounding of values a few fp32 ulps apart (before the outer step they differ by whole Adam steps).
    spread_before = (before[0]["bf16"].float() - before[1]["bf16"].float()).abs()
    spread_after = (after[0]["bf16"].float() - after[1]["bf16"].float()).abs()
    ulp = after[0]["bf16"].float().abs().clamp(min=1e-30) * 2 ** -7  # one bf16 ulp is <= |x| * 2^-7
    assert (spread_before > ulp).float().mean() > 0.5, "the replicas' bf16 weights did not diverge: test void"
    assert bool((spread_after <= ulp).all()), "bf16 weights were not refreshed from the mixed fp32 masters"


def _journal_body(journal_dir, steps: int, kill=None) -> dict:
    """Train ZeRO-2 bf16 to ``steps`` with the journal (resuming if it holds steps); ``kill=(victim, step)``: the
    victim kills itself with SIGKILL inside that step's second micro-batch."""
    import ds_ext
    from test_recovery import ds_config
    rank = int(os.environ["RANK"])
    m = model()
    config = dict(ds_config(2, journal_dir), bf16=BF16)
    engine, *_ = ds_ext.initialize(model=m, model_parameters=m.parameters(), config=config)
    start = engine.global_steps
    for step in range(start + 1, steps + 1):
        for micro in range(engine.gradient_accumulation_steps()):
            if kill and kill == (rank, step) and micro == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            x, y = micro_batch(rank, step, micro)
            engine.backward(engine(x, y))
            engine.step()
    out = state_of(engine)
    out["start"] = start
    out["dtypes"] = sorted({str(p.dtype) for p in engine.module.parameters()})
    engine.ds_ext_close()
    return out


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bf16_journal_kill_9_resumes_bit_identical(tmp_path):
    """In the fast tier (~25 s): the one end-to-end journal run there (kill -9 mid-step, relaunch, bit-identical)."""
    steps = 7
    kill_step, victim = random.Random(16).randint(3, steps - 1), random.Random(2).randrange(2)
    journal_dir = str(tmp_path / "journal")
    reference = run_distributed(_journal_body, 2, args=(None, steps), timeout=280)
    run_distributed(_journal_body, 2, args=(journal_dir, steps, (victim, kill_step)), timeout=280,
                    may_die=(0, 1), group_dies_with=True)
    resumed = run_distributed(_journal_body, 2, args=(journal_dir, steps), timeout=280)
    for rank in range(2):
        assert resumed[rank]["dtypes"] == ["torch.bfloat16"]
        assert resumed[rank]["start"] == kill_step - 1, f"lost steps: resumed at {resumed[rank]['start']}"
        assert_same_state(resumed[rank], reference[rank], f"rank {rank} (killed rank {victim} at {kill_step})")
