"""StreamBP: streamed layer backward, chunked LM head and losses, and their attachment, against plain autograd."""
import pytest
import torch
import torch.nn.functional as F

import ds_ext.ops.attention_kernels as attention_op
from dist import run_distributed
from ds_ext.grpo.loss import GRPOTokenLoss
from ds_ext.models import LlamaForCausalLM, ModelConfig
from ds_ext.models.llama import ReferenceLayerAdapter
from ds_ext.ops.attention import chunk_attention, chunk_mask
from ds_ext.streambp.apply import stream_model
from ds_ext.streambp.config import StreamBPConfig
from ds_ext.streambp.layer import stream_layer, streamed_calls
from ds_ext.ops.chunked_loss import TokenCrossEntropy, chunked_lm_loss

TINY = dict(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
# fp32: chunked sums reorder additions; the project's exactness bar for fp32 is a relative error of 1e-5.
FP32_RTOL = 1e-5


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def pair(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY, **overrides})
    plain, streamed = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    streamed.load_state_dict(plain.state_dict())
    return plain, streamed


def test_chunk_mask_is_causal_bottom_right_without_a_full_square():
    m = chunk_mask(4, 7, None, "cpu")[0, 0]
    assert m.shape == (3, 7)
    assert m.tolist() == [[k <= q for k in range(7)] for q in range(4, 7)]


@pytest.mark.parametrize("s, c", [(0, 5), (3, 1), (7, 9), (20, 4)])
def test_split_attention_matches_masked_sdpa(s, c):
    """The log-sum-exp merge of the unmasked prefix and the causal diagonal block equals one masked softmax, in
    value and in the gradients of q, k and v (GQA: 4 query heads over 2 key/value heads)."""
    torch.manual_seed(s)
    q = torch.randn(2, 4, c, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, s + c, 8, requires_grad=True) for _ in range(2))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=chunk_mask(s, s + c, None, "cpu"), enable_gqa=True)
    out = chunk_attention(q, k, v, s, scale=8 ** -0.5)
    g = torch.randn_like(ref)
    assert rel_err(out, ref) <= FP32_RTOL
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert rel_err(a, b) <= FP32_RTOL


def explicit_chunk_attention(q, k, v, s, padding):
    """Textbook masked softmax (K/V heads repeated, mask built here from its definition): query ``s + i`` sees key
    ``j`` when ``j <= s + i`` and the key is real, and always sees itself."""
    c, e = q.shape[2], k.shape[2]
    kr, vr = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    allowed = torch.tensor([[j <= s + i for j in range(e)] for i in range(c)])[None, None] & padding[:, None, None, :]
    allowed = allowed | torch.tensor([[j == s + i for j in range(e)] for i in range(c)])
    scores = (q @ kr.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vr


@pytest.mark.parametrize("block", [False, True])
@pytest.mark.parametrize("path", ["merged", "key_padding", "no_flash_kernels"])
@pytest.mark.parametrize("s, c", [(0, 5), (3, 1), (7, 9)])
def test_chunk_attention_matches_explicit_softmax(path, block, s, c, monkeypatch):
    """Chunk attention on the merged path and on the masked SDPA path (taken with key padding, or when the flash
    kernels are missing), in value and in the q, k, v gradients, against an explicit masked softmax; row 1 has
    padded keys. ``block``: the chunk's own keys/values passed as separate tensors (StreamBP's backward)."""
    torch.manual_seed(s + c)
    q = torch.randn(2, 4, c, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, s + c, 8, requires_grad=True) for _ in range(2))
    padding = torch.ones(2, s + c, dtype=torch.bool)
    if path == "key_padding":
        padding[1, (s + c) // 2:] = False
    elif path == "no_flash_kernels":
        monkeypatch.setattr(attention_op, "CPU_FLASH_FORWARD", None)
    given = padding if path == "key_padding" else None
    if block:
        out = chunk_attention(q, k[:, :, :s], v[:, :, :s], s, given, block=(k[:, :, s:], v[:, :, s:]))
    else:
        out = chunk_attention(q, k, v, s, given)
    ref = explicit_chunk_attention(q, k, v, s, padding)
    g = torch.randn_like(ref)
    assert rel_err(out, ref) <= FP32_RTOL
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert rel_err(a, b) <= FP32_RTOL


@pytest.mark.parametrize("chunk", [1, 5, 7, 16, 29, 64])
def test_streamed_model_matches_autograd(chunk):
    """Whole model (every layer streamed, chunked head) vs plain backprop; chunk sizes dividing T=29 or not, longer
    than T, with right padding in one row and GQA (4 query heads, 2 KV heads)."""
    plain, streamed = pair()
    stream_model(streamed, StreamBPConfig(enabled=True, chunk_size=chunk, logits_chunk_size=max(1, chunk // 2)))
    kinds = []
    for layer in streamed.layers:
        layer.register_forward_hook(lambda mod, args, out: kinds.append(type(out.grad_fn).__name__))
    ids = torch.randint(0, 256, (3, 29))
    labels = torch.randint(0, 256, (3, 29))
    mask = torch.ones(3, 29, dtype=torch.bool)
    mask[1, 21:] = False
    labels[1, 21:] = -100
    losses = [m(ids, labels, key_padding_mask=mask) for m in (plain, streamed)]
    for loss in losses:
        loss.backward()
    assert abs(losses[1].item() - losses[0].item()) <= FP32_RTOL * abs(losses[0].item())
    assert kinds == ["StreamedLayerFunctionBackward"] * 2 and losses[1].grad_fn.name() == "ChunkedLMHeadLossBackward"
    g_plain, g_streamed = grads(plain), grads(streamed)
    assert g_plain.keys() == g_streamed.keys()
    for name in g_plain:
        assert rel_err(g_streamed[name], g_plain[name]) <= FP32_RTOL, name


def test_streamed_layer_input_gradient_and_forward_are_exact():
    plain, streamed = pair(seed=1)
    layer_p, layer_s = plain.layers[0], streamed.layers[0]
    stream_layer(layer_s, ReferenceLayerAdapter(layer_s), 6)
    x = torch.randn(2, 20, 64)
    pos = torch.arange(20).expand(2, 20) + 3  # positions need not start at 0
    xp, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, ys = layer_p(xp, pos), layer_s(xs, pos)
    assert rel_err(ys, yp) <= FP32_RTOL  # forward streamed chunk by chunk (T=20 > chunk 6), as the backward does
    g = torch.randn_like(yp)
    yp.backward(g)
    ys.backward(g)
    assert rel_err(xs.grad, xp.grad) <= FP32_RTOL
    with pytest.raises(ValueError, match="already streamed"):
        stream_layer(layer_s, ReferenceLayerAdapter(layer_s), 6)


@pytest.mark.parametrize("chunk, scale", [(1, 1.0), (4, 1.0), (9, 3.0), (40, 1.0)])
def test_chunked_cross_entropy_matches_full_logits(chunk, scale):
    """The fused in-place cross-entropy gradient (ignored rows, batch 3) against autograd on full logits; scale 3:
    an incoming gradient other than 1 (the buffers are scaled, not handed over)."""
    torch.manual_seed(0)
    h = torch.randn(3, 23, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 23))
    labels[0, :5] = -100
    ref = F.cross_entropy((h @ w.t()).reshape(-1, 50), labels.reshape(-1), ignore_index=-100)
    out = chunked_lm_loss(h, w, TokenCrossEntropy(labels), chunk)
    assert abs(out.item() - ref.item()) <= FP32_RTOL * ref.item()
    for a, b in zip(torch.autograd.grad(scale * out, (h, w)), torch.autograd.grad(scale * ref, (h, w))):
        assert rel_err(a, b) <= FP32_RTOL


def test_logits_chunk_is_capped_in_bytes(monkeypatch):
    """A large vocabulary shortens the logits chunk to the byte cap (here 2 x 50 x 4 bytes x 3 positions)."""
    import ds_ext.ops.chunked_loss as loss_mod
    monkeypatch.setattr(loss_mod, "MAX_LOGITS_CHUNK_BYTES", 2 * 50 * 4 * 3)
    seen = []

    class Recording(TokenCrossEntropy):
        def value_and_grad_(self, logits, s, e):
            seen.append(logits.shape[1])
            return super().value_and_grad_(logits, s, e)
    torch.manual_seed(0)
    h, w = torch.randn(2, 10, 8, requires_grad=True), torch.randn(50, 8)
    labels = torch.randint(0, 50, (2, 10))
    out = chunked_lm_loss(h, w, Recording(labels), 256)
    ref = F.cross_entropy((h @ w.t()).reshape(-1, 50), labels.reshape(-1))
    assert seen == [3, 3, 3, 1] and abs(out.item() - ref.item()) <= FP32_RTOL * ref.item()


def test_chunked_loss_without_gradients_is_the_same_value():
    torch.manual_seed(0)
    h, w = torch.randn(2, 11, 8), torch.randn(30, 8)
    labels = torch.randint(0, 30, (2, 11))
    ref = F.cross_entropy((h @ w.t()).reshape(-1, 30), labels.reshape(-1))
    with torch.no_grad():
        out = chunked_lm_loss(h, w, TokenCrossEntropy(labels), 4)
    assert out.grad_fn is None and abs(out.item() - ref.item()) <= FP32_RTOL * ref.item()


def grpo_reference(logits, targets, mask, adv, old, ref, eps_low, eps_high, kl, norm):
    """Independent full-sequence GRPO loss (the textbook form, per sequence then per batch)."""
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    ratio = torch.exp(logp - old)
    per_token = -torch.minimum(ratio * adv[:, None], ratio.clamp(1 - eps_low, 1 + eps_high) * adv[:, None])
    per_token = per_token + kl * (torch.exp(ref - logp) - (ref - logp) - 1)
    m = mask.float()
    if norm == "grpo":
        return ((per_token * m).sum(1) / m.sum(1)).mean()
    if norm == "dapo":
        return (per_token * m).sum() / m.sum()
    return (per_token * m).sum() / (m.shape[0] * m.shape[1])


@pytest.mark.parametrize("norm", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("chunk", [3, 8, 30])
def test_chunked_grpo_loss_matches_full_sequence(norm, chunk):
    torch.manual_seed(1)
    b, t, c, v = 4, 19, 16, 40
    h = torch.randn(b, t, c, requires_grad=True)
    w = torch.randn(v, c, requires_grad=True)
    targets = torch.randint(0, v, (b, t))
    mask = torch.rand(b, t) > 0.3
    mask[:, 0] = True
    adv = torch.randn(b)
    with torch.no_grad():
        logp = torch.log_softmax(h @ w.t(), -1).gather(-1, targets[..., None])[..., 0]
    old = logp + 0.3 * torch.randn(b, t)  # ratios on both sides of the clip range
    ref = logp + 0.2 * torch.randn(b, t)
    kw = dict(eps_low=0.2, eps_high=0.28, kl=0.05, norm=norm)
    expected = grpo_reference(h @ w.t(), targets, mask, adv, old, ref, **kw)
    objective = GRPOTokenLoss(targets, mask, adv, old, ref, eps_low=0.2, eps_high=0.28, kl_coef=0.05, norm=norm)
    out = chunked_lm_loss(h, w, objective, chunk)
    assert abs(out.item() - expected.item()) <= FP32_RTOL * abs(expected.item())
    for a, e in zip(torch.autograd.grad(out, (h, w)), torch.autograd.grad(expected, (h, w))):
        assert rel_err(a, e) <= FP32_RTOL


def test_grpo_loss_input_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        GRPOTokenLoss(z.long(), z.bool(), torch.zeros(2), z, kl_coef=0.1)
    with pytest.raises(ValueError, match="allowed grpo, dapo, dr_grpo"):
        GRPOTokenLoss(z.long(), z.bool(), torch.zeros(2), z, norm="mean")


def test_streambp_config_rules():
    from ds_ext.config import DsExtConfigError, parse_ext_config
    on = {"streambp": {"enabled": True, "chunk_size": 128}}
    assert parse_ext_config({"ds_ext": on}).streambp.chunk_size == 128
    for ds, fragment in (({"activation_checkpointing": {"partition_activations": True}}, "activation_checkpointing"),
                         ({"zero_optimization": {"stage": 3}}, "stage=3")):
        with pytest.raises(DsExtConfigError, match=fragment) as info:
            parse_ext_config(dict(ds, ds_ext=on))
        assert info.value.problems[0][0] == "ds_ext.streambp.enabled"
    with pytest.raises(DsExtConfigError, match="ds_ext.streambp.chunk_size"):
        parse_ext_config({"ds_ext": {"streambp": {"chunk_size": 0}}})


def sgd_config(stage: int, ext=None, gas: int = 2) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": stage}}
    if ext is not None:
        cfg["ds_ext"] = ext
    return cfg


def flat_params(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def _zero_body(stage: int):
    import deepspeed
    import ds_ext
    deltas = {}
    for mode in ("stock", "streambp"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(ModelConfig(**TINY))
        before = flat_params(model)
        if mode == "stock":
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=sgd_config(stage))
        else:
            ext = {"streambp": {"enabled": True, "chunk_size": 7, "logits_chunk_size": 5}}
            engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(),
                                           config=sgd_config(stage, ext))
        g = torch.Generator().manual_seed(deepspeed.comm.get_rank())
        for _ in range(2):  # one optimizer step of 2 micro-batches
            x = torch.randint(0, 256, (2, 31), generator=g)
            engine.backward(engine(x[:, :-1], x[:, 1:]))
            engine.step()
        deltas[mode] = flat_params(engine.module) - before
        if mode == "streambp":  # how many calls of each layer ran the streamed function (a fallback would be 0)
            deltas["streamed_calls"] = [streamed_calls(layer) for layer in engine.module.layers]
    return deltas


@pytest.mark.parametrize("stage", [1, 2])
def test_streambp_under_zero_matches_stock_deepspeed(stage):
    """2 processes, ZeRO-1/2, SGD (so the weight change is lr x the reduced gradient): StreamBP's update equals
    stock DeepSpeed's. Under ZeRO-2 a gradient reduced twice would trip DeepSpeed's own assertion."""
    for r in run_distributed(_zero_body, world_size=2, args=(stage,)):
        assert r["streamed_calls"] == [2] * TINY["num_layers"]  # both micro-batches streamed in every layer
        assert rel_err(r["streambp"], r["stock"]) <= FP32_RTOL


def _pipeline_body():
    import itertools

    import deepspeed
    import ds_ext
    from ds_ext.models import llama_pipeline
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = ModelConfig(**TINY)
    out = {}
    g = torch.Generator().manual_seed(0)
    data = [(x[:, :-1], x[:, 1:]) for x in (torch.randint(0, 256, (2, 27), generator=g) for _ in range(2))]
    for mode in ("stock", "streambp"):
        torch.manual_seed(0)
        config = sgd_config(1)
        if mode == "stock":
            model = llama_pipeline(cfg, num_stages=2)
            before = flat_params(model)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        else:
            config["ds_ext"] = {"topology": {"pipeline_stages": 2},
                                "streambp": {"enabled": True, "chunk_size": 6, "logits_chunk_size": 4}}
            topo = ds_ext.build_topology(config)
            model = llama_pipeline(cfg, topology=topo.process_topology())
            before = flat_params(model)
            engine, *_ = ds_ext.initialize(model=model, model_parameters=model.parameters(), config=config,
                                           topology=topo)
        loss = engine.train_batch(itertools.cycle(data)).item()
        out[mode] = {"loss": loss, "delta": flat_params(engine.module) - before,
                     "streamed": engine.ds_ext_metrics()["streambp/streamed_layers"] if mode == "streambp" else 0}
    return out


@pytest.mark.slow
def test_streambp_in_a_two_stage_pipeline_matches_stock():
    """2-stage PipelineModule under the ds_ext engine (2 processes): each stage streams its own decoder layers, the
    last stage chunks the head; loss and per-stage updates equal the stock PipelineEngine's."""
    for r in run_distributed(_pipeline_body, world_size=2):
        assert abs(r["streambp"]["loss"] - r["stock"]["loss"]) <= FP32_RTOL * r["stock"]["loss"]
        assert rel_err(r["streambp"]["delta"], r["stock"]["delta"]) <= FP32_RTOL
        assert r["streambp"]["streamed"] == 1  # 2 decoder layers, one per stage


def test_streambp_refuses_a_checkpointing_pipeline():
    from ds_ext.config import DsExtConfigError

    class FakePipe(torch.nn.Module):
        activation_checkpoint_interval = 1

    import deepspeed.pipe
    fake = FakePipe()
    fake.__class__ = type("P", (deepspeed.pipe.PipelineModule,), {})
    fake.activation_checkpoint_interval = 1
    with pytest.raises(DsExtConfigError, match="activation_checkpoint_interval=1"):
        stream_model(fake, StreamBPConfig(enabled=True))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_decoder_layers_stream_exactly(family):
    """An unmodified HF transformers model (tiny, random weights, no download): decoder layers streamed, head
    chunked; loss and every parameter's gradient match HF's own forward/backward, with right padding."""
    transformers = pytest.importorskip("transformers", reason="transformers is the optional [hf] extra")
    from ds_ext.streambp.hf import causal_lm_loss
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa")
    config = (transformers.LlamaConfig(**kw) if family == "llama" else transformers.Qwen2Config(**kw))
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    plain = cls(config)
    streamed = cls(config)
    streamed.load_state_dict(plain.state_dict())
    feature = stream_model(streamed, StreamBPConfig(enabled=True, chunk_size=7, logits_chunk_size=5))
    assert len(feature.layers) == 2
    backward_kinds = []
    for layer in streamed.model.layers:
        layer.register_forward_hook(lambda mod, args, out: backward_kinds.append(type(out.grad_fn).__name__))
    ids = torch.randint(0, 300, (2, 26))
    mask = torch.ones(2, 26, dtype=torch.long)
    mask[1, 19:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ref = plain(input_ids=ids, attention_mask=mask, labels=labels).loss
    out = causal_lm_loss(streamed, ids, labels, attention_mask=mask, logits_chunk_size=5)
    ref.backward()
    out.backward()
    assert abs(out.item() - ref.item()) <= FP32_RTOL * ref.item()
    assert backward_kinds == ["StreamedLayerFunctionBackward"] * 2  # really streamed, not the layers' own path
    for (name, p), q in zip(plain.named_parameters(), streamed.parameters()):
        assert rel_err(q.grad, p.grad) <= FP32_RTOL, name


def test_hf_mask_other_than_causal_padding_is_refused():
    from ds_ext.streambp.hf import key_padding_from_mask
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    assert key_padding_from_mask(causal, 5).tolist() == [[True] * 5]
    window = causal & ~torch.ones(5, 5, dtype=torch.bool).tril(-3)[None, None]  # sliding window of 3
    with pytest.raises(ValueError, match="causal attention with key padding only"):
        key_padding_from_mask(window, 5)


def saved_bytes(fn):
    """``fn()`` and the bytes autograd saved for backward while it ran (every tensor packed by the hook)."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(sizes)


def test_streamed_layer_saves_only_its_input():
    """StreamBP's memory claim: a streamed layer keeps only its input x for backward (what activation checkpointing
    keeps); norms, keys/values, attention and MLP activations are recomputed chunk by chunk in backward. The plain
    layer, measured the same way, keeps many times more, so the hook does see activations."""
    plain, streamed = pair(seed=2)
    stream_model(streamed, StreamBPConfig(enabled=True, chunk_size=8))
    x = torch.randn(2, 40, 64, requires_grad=True)
    pos = torch.arange(40).expand(2, 40)
    y_plain, plain_bytes = saved_bytes(lambda: plain.layers[0](x, pos))
    y_streamed, streamed_bytes = saved_bytes(lambda: streamed.layers[0](x, pos))
    assert streamed_bytes == x.numel() * x.element_size()  # exactly x: [2, 40, 64] fp32 = 20480 bytes
    assert plain_bytes >= 10 * streamed_bytes, plain_bytes  # measured: 740352 bytes (36x)
    assert rel_err(y_streamed, y_plain) <= FP32_RTOL  # streamed forward (chunks of 8): the same function


def peak_live_bytes(fn) -> int:
    """``fn()``'s peak of bytes allocated and not yet freed (the profiler's CPU memory events summed in order)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted((e for e in prof.events() if e.name == "[memory]"), key=lambda e: e.time_range.start):
        live += event.cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_streamed_layer_working_set_is_keys_values_and_their_gradients():
    """Issue 19's working set: one streamed layer's forward + backward holds, beside x and G, its output, K/V,
    their gradient buffers, dx, the kernel's prefix-key gradients and one chunk: about 5 u (u = T x C fp32; K+V is
    C floats per token with 2 of 4 KV heads). No full-length normed input, queries, MLP activations or their
    gradients: the plain layer, measured the same way, holds several times more."""
    plain, streamed = pair(seed=4, max_seq_len=2048)
    layer_p, layer_s = plain.layers[0], streamed.layers[0]
    stream_layer(layer_s, ReferenceLayerAdapter(layer_s), 128)
    x = torch.randn(1, 2048, 64, requires_grad=True)
    pos, g = torch.arange(2048)[None], torch.randn(1, 2048, 64)
    u = x.numel() * x.element_size()
    streamed_peak = peak_live_bytes(lambda: layer_s(x, pos).backward(g))
    x.grad = None
    plain_peak = peak_live_bytes(lambda: layer_p(x, pos).backward(g))
    assert streamed_peak <= 5.5 * u, streamed_peak / u
    assert plain_peak >= 3 * streamed_peak, (plain_peak / u, streamed_peak / u)


def bf16_grad_error(model, ref_grads, ids, labels, mask) -> float:
    """Relative error of all parameter gradients together (bf16 model, in fp32) against the fp32 reference."""
    model(ids, labels, key_padding_mask=mask).backward()
    got = torch.cat([p.grad.float().reshape(-1) for p in model.parameters()])
    return rel_err(got, ref_grads)


def test_bf16_streamed_gradients_are_as_close_to_fp32_as_plain_bf16():
    """bf16: StreamBP sums chunk gradients (in bf16 param.grad and buffers) where plain autograd sums once, and its
    attention takes the masked SDPA path (the merged flash path is fp32 only). Its gradient error against the fp32
    model must stay within 1.5x of plain bf16 autograd's own error (measured here: see the assertion message); a
    real defect (a wrong chunk, a lost term) gives errors of order 1."""
    plain, _ = pair(seed=3)
    ids, labels = torch.randint(0, 256, (2, 48)), torch.randint(0, 256, (2, 48))
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[1, 40:] = False
    labels[1, 40:] = -100
    plain(ids, labels, key_padding_mask=mask).backward()
    ref = torch.cat([p.grad.reshape(-1) for p in plain.parameters()])
    plain_bf16, streamed_bf16 = (LlamaForCausalLM(ModelConfig(**TINY)).to(torch.bfloat16) for _ in range(2))
    for m in (plain_bf16, streamed_bf16):
        m.load_state_dict(plain.state_dict())
    stream_model(streamed_bf16, StreamBPConfig(enabled=True, chunk_size=12, logits_chunk_size=16))
    err_plain = bf16_grad_error(plain_bf16, ref, ids, labels, mask)
    err_streamed = bf16_grad_error(streamed_bf16, ref, ids, labels, mask)
    # measured (torch 2.13 CPU): 7.24e-3 vs 7.05e-3 (1.03x); chunk 1 (48 chunks) would give 1.34x
    assert err_plain < 0.05  # bf16 has 8 mantissa bits: gradients of order 1e-2 relative error
    assert err_streamed <= 1.5 * err_plain, (err_streamed, err_plain, err_streamed / err_plain)


def test_close_restores_plain_behaviour():
    """close() undoes every change (layers' forward, the head seam; for a pipeline stage its head flag and loss_fn)
    and is idempotent: the model then computes exactly as one never streamed."""
    import deepspeed.pipe
    from ds_ext.models.llama import causal_lm_loss
    from ds_ext.models.pipeline import DecoderLayerPipe, HeadPipe
    plain, streamed = pair(seed=4)
    feature = stream_model(streamed, StreamBPConfig(enabled=True, chunk_size=5))
    feature.close()
    feature.close()
    assert all("forward" not in layer.__dict__ for layer in streamed.layers) and streamed.lm_loss_fn is None
    kinds = []
    for layer in streamed.layers:
        layer.register_forward_hook(lambda mod, args, out: kinds.append(type(out.grad_fn).__name__))
    ids = torch.randint(0, 256, (2, 17))
    losses = [m(ids, ids) for m in (plain, streamed)]
    assert torch.equal(losses[0], losses[1]) and "Streamed" not in "".join(kinds)
    assert losses[1].grad_fn.name() != "ChunkedLMHeadLossBackward"

    layer, head = DecoderLayerPipe(ModelConfig(**TINY)), HeadPipe(ModelConfig(**TINY))
    stage = torch.nn.Sequential(layer, head)  # a last pipeline stage, as PipelineModule builds it
    stage.__class__ = type("P", (deepspeed.pipe.PipelineModule,), {})
    stage.activation_checkpoint_interval, stage.loss_fn = 0, causal_lm_loss
    feature = stream_model(stage, StreamBPConfig(enabled=True))
    assert head.emit_hidden and stage.loss_fn is not causal_lm_loss and "forward" in layer.__dict__
    feature.close()
    assert not head.emit_hidden and stage.loss_fn is causal_lm_loss and "forward" not in layer.__dict__


def test_a_per_call_attention_without_chunk_masks_is_refused():
    _, streamed = pair()
    stream_model(streamed, StreamBPConfig(enabled=True))
    ids = torch.randint(0, 256, (1, 6))
    with pytest.raises(ValueError, match="chunk_mask"):
        streamed(ids, attention_fn=lambda q, k, v, key_padding_mask=None: q)
