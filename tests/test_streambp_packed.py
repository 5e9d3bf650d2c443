"""StreamBP on packed documents in HF Llama/Qwen2 models: exact packing, parity with autograd, bf16, no T x T tensor,
and the refusals (sliding window, MoE).

Packed rows follow the project's contract: ``position_ids`` restart at 0 at every document, no ``attention_mask``,
``use_cache=False`` (transformers detects packing only without a KV cache, and its models default to one),
labels unshifted with -100 at each document's first token (``DataCollatorWithFlattening``'s convention), so no
position is scored on the next document's token. Models are tiny random inits written with ``save_pretrained``
and loaded back with ``AutoModelForCausalLM.from_pretrained`` (no download).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ds_ext.ops.attention_kernels as attention_op
from ds_ext.config import DsExtConfigError
from ds_ext.ops.losses import IGNORE_INDEX
from ds_ext.streambp.apply import stream_model
from ds_ext.streambp.config import StreamBPConfig
from ds_ext.streambp.layer import streamed_calls

transformers = pytest.importorskip("transformers", reason="transformers is the optional [hf] extra")
from ds_ext.streambp.hf import ATTENTION, causal_lm_loss, streambp_refusal  # noqa: E402

# fp32: chunked sums and per-document kernel calls reorder additions; the project's fp32 exactness bar is 1e-5.
FP32_RTOL = 1e-5
VOCAB = 128
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """One tiny random-init model directory per family (``save_pretrained``), weights fixed by the seed."""
    dirs = {}
    for family, cls, cfg in (("llama", transformers.LlamaForCausalLM, transformers.LlamaConfig),
                             ("qwen2", transformers.Qwen2ForCausalLM, transformers.Qwen2Config)):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(family)
        cls(cfg(**TINY)).save_pretrained(path)
        dirs[family] = path
    return dirs


def load(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")


def packed(rows, seed=0):
    """``rows``: document lengths per row (each row's lengths sum to T) -> ``input_ids, position_ids, labels`` [B, T].
    Labels are the tokens (HF shifts), -100 at each document's first token."""
    g = torch.Generator().manual_seed(seed)
    t = sum(rows[0])
    ids = torch.randint(0, VOCAB, (len(rows), t), generator=g)
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in rows])
    labels = ids.masked_fill(pos == 0, IGNORE_INDEX)
    return ids, pos, labels


def streamed_copy(path, chunk, logits_chunk=5, dtype=torch.float32):
    model = load(path, dtype)
    feature = stream_model(model, StreamBPConfig(enabled=True, chunk_size=chunk, logits_chunk_size=logits_chunk))
    kinds = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda mod, args, out: kinds.append(type(out.grad_fn).__name__))
    return model, feature, kinds


def doc_mask(labels, row, a, z):
    """Labels of document ``[a, z)`` of ``row`` only (-100 elsewhere)."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[row, a:z] = labels[row, a:z]
    return out


@pytest.mark.parametrize("streamed", [False, True], ids=["hf", "streambp"])
def test_packing_is_exact(model_dirs, streamed):
    """Row 0 packs documents A (9), B (11), C (7); changing B's tokens leaves A's and C's logits, their losses and
    (StreamBP) the parameter gradients of A's loss unchanged, and each document's logits equal the document run
    alone at positions 0.. (so RoPE restarts per document). Without StreamBP this is transformers' own packed path
    (its T x T mask from position_ids); with StreamBP the streamed layers' forward and backward."""
    model = (streamed_copy(model_dirs["qwen2"], chunk=4)[0] if streamed else load(model_dirs["qwen2"]))
    spans = [(0, 9), (9, 20), (20, 27)]
    ids, pos, labels = packed([[9, 11, 7], [27]])
    other = ids.clone()
    other[0, 9:20] = (ids[0, 9:20] + 1 + torch.arange(11)) % VOCAB  # document B only, same length

    def run(x):
        model.zero_grad()
        logits = model(input_ids=x, position_ids=pos, use_cache=False).logits
        loss_a = causal_lm_loss(model, x, doc_mask(labels, 0, 0, 9), position_ids=pos, logits_chunk_size=5)
        loss_c = causal_lm_loss(model, x, doc_mask(labels, 0, 20, 27), position_ids=pos, logits_chunk_size=5)
        loss_a.backward()
        return logits.detach(), loss_a.item(), loss_c.item(), [p.grad.clone() for p in model.parameters()]

    logits, loss_a, loss_c, grads = run(ids)
    logits2, loss_a2, loss_c2, grads2 = run(other)
    if streamed:  # the streamed function ran in every layer for each of run()'s 3 forwards, in both runs
        assert [streamed_calls(layer) for layer in model.model.layers] == [6] * len(model.model.layers)
    for a, z in (spans[0], spans[2]):
        assert rel_err(logits2[0, a:z], logits[0, a:z]) <= FP32_RTOL
    assert rel_err(logits2[0, 9:20], logits[0, 9:20]) > 0.01  # B's change is visible in B
    assert abs(loss_a2 - loss_a) <= FP32_RTOL * loss_a and abs(loss_c2 - loss_c) <= FP32_RTOL * loss_c
    for g, g2 in zip(grads, grads2):
        assert rel_err(g2, g) <= FP32_RTOL
    with torch.no_grad():
        for a, z in spans:
            alone = model(input_ids=ids[:1, a:z], use_cache=False).logits
            assert rel_err(logits[0, a:z], alone[0]) <= FP32_RTOL
        one_document = model(input_ids=ids[1:], use_cache=False).logits[0]  # row 1: plain causal
        assert rel_err(logits[1], one_document) <= FP32_RTOL


@pytest.mark.parametrize("family, chunk, flash", [("llama", 5, True), ("qwen2", 8, True), ("qwen2", 6, False)],
                         ids=["llama-5", "qwen2-8", "qwen2-6-masked"])
def test_streamed_packed_rows_match_autograd(model_dirs, family, chunk, flash, monkeypatch):
    """StreamBP vs transformers' own forward/backward on the same packed rows (T = 37, two rows with different
    boundaries, documents straddling chunk boundaries, chunk sizes that do not divide T): loss and every
    parameter's gradient within fp32 rel err 1e-5. ``flash=False`` forces the masked fallback (per-chunk
    ``[B, 1, c, e]`` masks from segment ids). close() restores the model's attention implementation."""
    if not flash:
        monkeypatch.setattr(attention_op, "CPU_FLASH_FORWARD", None)
    plain = load(model_dirs[family])
    streamed, feature, kinds = streamed_copy(model_dirs[family], chunk)
    assert streamed.config._attn_implementation == ATTENTION
    ids, pos, labels = packed([[3, 12, 1, 9, 12], [20, 17]], seed=1)
    ref = plain(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss
    out = causal_lm_loss(streamed, ids, labels, position_ids=pos, logits_chunk_size=5)
    ref.backward()
    out.backward()
    assert abs(out.item() - ref.item()) <= FP32_RTOL * ref.item()
    assert kinds == ["StreamedLayerFunctionBackward"] * 2  # really streamed
    for (name, p), q in zip(plain.named_parameters(), streamed.parameters()):
        assert rel_err(q.grad, p.grad) <= FP32_RTOL, name
    feature.close()
    assert streamed.config._attn_implementation == "sdpa"


def test_bf16_streamed_packed_gradients_are_as_close_to_fp32_as_plain_bf16(model_dirs):
    """bf16 on packed rows of HF Qwen2: StreamBP sums chunk gradients in bf16 and takes the masked chunk path (the
    merged flash path is fp32 only), plain bf16 autograd sums once. StreamBP's gradient error against the fp32
    reference must stay within 1.5x plain bf16's (bf16 has 8 mantissa bits; a lost or wrong term gives errors of
    order 1)."""
    path = model_dirs["qwen2"]
    ids, pos, labels = packed([[10, 25, 13, 16], [30, 34]], seed=2)
    fp32 = load(path)
    fp32(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss.backward()
    ref = torch.cat([p.grad.reshape(-1) for p in fp32.parameters()])

    def error(model, loss):
        loss.backward()
        return rel_err(torch.cat([p.grad.float().reshape(-1) for p in model.parameters()]), ref)
    plain = load(path, torch.bfloat16)
    err_plain = error(plain, plain(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss)
    streamed, _, kinds = streamed_copy(path, chunk=12, logits_chunk=16, dtype=torch.bfloat16)
    err_streamed = error(streamed, causal_lm_loss(streamed, ids, labels, position_ids=pos, logits_chunk_size=16))
    assert kinds == ["StreamedLayerFunctionBackward"] * 2
    # the bound is the contract; the measured errors and their ratio are printed (pytest -s) and in the message
    print(f"bf16 packed grad rel err: streamed {err_streamed:.4g}, plain {err_plain:.4g}, "
          f"ratio {err_streamed / err_plain:.4g}")
    assert err_plain < 0.05
    assert err_streamed <= 1.5 * err_plain, (err_streamed, err_plain, err_streamed / err_plain)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op creates or reads."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        for t in tensors:
            if t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def test_a_4096_token_packed_row_streams_without_a_t_by_t_tensor(model_dirs):
    """Forward and backward of StreamBP on one 4096-token packed row (documents of 700-1500 tokens straddling
    512-token chunks): no aten op creates or reads a tensor of >= T x T elements (HF's own path would build a
    ``[1, 1, T, T]`` mask: the same probe sees it, so it does see masks)."""
    t = 4096
    ids, pos, labels = packed([[700, 1300, 500, 1500, 96]], seed=3)
    model, _, kinds = streamed_copy(model_dirs["llama"], chunk=512, logits_chunk=512)
    with LargestTensor() as probe:
        causal_lm_loss(model, ids, labels, position_ids=pos, logits_chunk_size=512).backward()
    assert kinds == ["StreamedLayerFunctionBackward"] * 2
    assert probe.largest < t * t, (probe.largest, probe.op)
    plain = load(model_dirs["llama"])
    plain.model.layers = plain.model.layers[:1]  # one layer is enough to see the mask
    with LargestTensor() as probe_plain, torch.no_grad():
        plain.model(input_ids=ids, position_ids=pos, use_cache=False)
    assert probe_plain.largest >= t * t, probe_plain.largest


def tiny(cls_config, **overrides):
    return cls_config(**{**TINY, "max_position_embeddings": 64, **overrides})


@pytest.mark.parametrize("make, fragment", [
    (lambda: transformers.MistralForCausalLM(tiny(transformers.MistralConfig, sliding_window=16)),
     'sliding-window attention \\(config.json "sliding_window": 16\\)'),
    (lambda: transformers.Qwen2ForCausalLM(tiny(transformers.Qwen2Config, use_sliding_window=True,
                                                sliding_window=16, max_window_layers=1)),
     r"layer_types \['sliding_attention'\]"),
    (lambda: transformers.Qwen2MoeForCausalLM(tiny(transformers.Qwen2MoeConfig, num_experts=4,
                                                   moe_intermediate_size=16, shared_expert_intermediate_size=16)),
     "MoE layers \\(num_experts=4\\)"),
], ids=["mistral-sliding", "qwen2-sliding-layers", "qwen2-moe"])
def test_sliding_window_and_moe_are_refused(make, fragment):
    """Refused when StreamBP attaches (before training), naming the model, the setting and its value; nothing is
    streamed and the attention implementation is unchanged."""
    torch.manual_seed(0)
    model = make()
    own = model.config._attn_implementation
    with pytest.raises(DsExtConfigError, match=fragment) as info:
        stream_model(model, StreamBPConfig(enabled=True))
    assert info.value.problems[0][0] == "ds_ext.streambp.enabled"
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    assert model.config._attn_implementation == own != ATTENTION


def test_dense_families_are_accepted():
    """Mistral without a sliding window, Qwen2/Qwen3 with ``use_sliding_window=False`` (their default), Llama: no
    refusal; Mixtral's and Qwen3-MoE's configs are refused as MoE."""
    for config in (tiny(transformers.MistralConfig, sliding_window=None), tiny(transformers.Qwen3Config),
                   tiny(transformers.Qwen2Config), tiny(transformers.LlamaConfig)):
        assert streambp_refusal(config) is None, type(config).__name__
    for config in (tiny(transformers.MixtralConfig, num_local_experts=4), tiny(transformers.Qwen3MoeConfig)):
        assert "MoE layers" in streambp_refusal(config), type(config).__name__
    torch.manual_seed(0)
    qwen3 = transformers.Qwen3ForCausalLM(tiny(transformers.Qwen3Config))  # q_norm / k_norm per head
    assert len(stream_model(qwen3, StreamBPConfig(enabled=True, chunk_size=4)).layers) == 2
