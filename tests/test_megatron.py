"""megatron-core hooks: prefix-grouped core attention, StreamBP on megatron layers, NoLoCo with megatron DDP and its
distributed optimizer (2 real gloo processes), all on CPU through ds_ext.megatron.shims.cpu_shims."""
import math

import pytest
import torch

pytest.importorskip("megatron.core")

from dist import run_distributed  # noqa: E402

# fp32 throughout: the grouped and the streamed computations add the same terms in another order (log-sum-exp merges,
# per-chunk sums), so they agree to a few ulps times the depth, far below 1e-5 relative (the bound).
REL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _init_megatron():
    import torch.distributed as dist
    from megatron.core import parallel_state
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(1, 1)


def _groups(vocab: int, seed: int = 1):
    """Two GRPO groups (3 and 2 responses), one prompt left-padded, responses of uneven lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, vocab, (2, 7), generator=g)
    pmask = torch.ones(2, 7, dtype=torch.long)
    pmask[1, :2] = 0
    comp = torch.randint(1, vocab, (5, 6), generator=g)
    cmask = torch.ones(5, 6, dtype=torch.long)
    cmask[1, 4:] = 0
    cmask[3, 2:] = 0
    weights = torch.rand(5, 6, generator=g) * cmask
    return prompt, pmask, comp, cmask, [3, 2], weights


# ---------------------------------------------------------------------------------------------- core attention, no dist


def _attention_module(heads=4, groups=2, hidden=32):
    from ds_ext.megatron.attention import PrefixGroupedCoreAttention
    from ds_ext.megatron.model import tiny_transformer_config
    from megatron.core.transformer.enums import AttnMaskType
    cfg = tiny_transformer_config(hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups)
    return PrefixGroupedCoreAttention(cfg, 1, AttnMaskType.causal, "self")


def _explicit_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(D) + mask) v on [s, b, H, D] inputs with K/V heads repeated: the textbook formula."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v).flatten(2)


def test_core_attention_matches_the_textbook_formula_causal_and_grouped():
    from ds_ext.megatron.attention import GroupedMask
    from ds_ext.prefix_grouper.layout import grouped_attention_mask, pack
    attn = _attention_module()
    prompt, pmask, comp, cmask, sizes, _ = _groups(64)
    batch = pack(prompt, pmask, comp, cmask, sizes)
    s, b = batch.input_ids.shape[1], batch.input_ids.shape[0]
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(s, b, 4, 8, generator=g), torch.randn(s, b, 2, 8, generator=g), torch.randn(s, b, 2, 8,
                                                                                                      generator=g)
    causal = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    assert rel_err(attn(q, k, v, None), _explicit_attention(q, k, v, causal)) <= REL
    grouped = grouped_attention_mask(batch.segment_ids)  # [b, 1, s, s]
    real = (batch.segment_ids >= 0).t()[:, :, None]      # padding rows are unused values
    out = attn(q, k, v, GroupedMask(batch)) * real
    assert rel_err(out, _explicit_attention(q, k, v, grouped) * real) <= REL
    assert out.shape == (s, b, 32)


def test_core_attention_refuses_dropout():
    from ds_ext.megatron.attention import PrefixGroupedCoreAttention
    from ds_ext.megatron.model import tiny_transformer_config
    from megatron.core.transformer.enums import AttnMaskType
    cfg = tiny_transformer_config(attention_dropout=0.1)
    with pytest.raises(ValueError, match="attention_dropout"):
        PrefixGroupedCoreAttention(cfg, 1, AttnMaskType.causal, "self")


# ------------------------------------------------------------------------------------- GPTModel: Prefix Grouper + StreamBP


def _ungrouped(model, prompt, pmask, comp, cmask, sizes, weights):
    """Each response run alone after its prompt (ordinary causal model call): per-response logits and the loss."""
    logits, loss, r = [], 0.0, 0
    for n, size in enumerate(sizes):
        p = prompt[n][pmask[n].bool()]
        for _ in range(size):
            c = comp[r][cmask[r].bool()]
            seq = torch.cat([p, c])[None]
            out = model(seq, None, None)[0]  # [P + S, V]
            logits.append(out)
            logp = torch.log_softmax(out[len(p) - 1: len(p) - 1 + len(c)], -1).gather(-1, c[:, None])[:, 0]
            loss = loss + (logp * weights[r, :len(c)]).sum()
            r += 1
    return logits, loss


def _grouped_logits_per_response(logits, batch, comp, cmask):
    """Packed logits [N, L, V] -> per response [P + S, V] (prefix rows shared by the group)."""
    out, r = [], 0
    for n, lens in enumerate(batch.suffix_lens):
        p, offset = batch.prefix_lens[n], batch.prefix_lens[n]
        for s in lens:
            out.append(torch.cat([logits[n, :p], logits[n, offset: offset + s]]))
            offset += s
            r += 1
    return out


def _prefix_grouper_body():
    from ds_ext.megatron.attention import grouped_forward
    from ds_ext.megatron.model import parse_ds_ext, tiny_gpt
    from ds_ext.megatron.shims import cpu_shims
    from ds_ext.prefix_grouper.layout import pack
    _init_megatron()
    ext = parse_ds_ext({"ds_ext": {"prefix_grouper": {"enabled": True}}})
    prompt, pmask, comp, cmask, sizes, weights = _groups(64)
    batch = pack(prompt, pmask, comp, cmask, sizes)
    with cpu_shims():
        model = tiny_gpt(ext)
        logits = grouped_forward(model, batch)
        (batch.completion_logprobs(logits, comp) * weights).sum().backward()
        grouped_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        ref_logits, ref_loss = _ungrouped(model, prompt, pmask, comp, cmask, sizes, weights)
        ref_loss.backward()
        per_response = _grouped_logits_per_response(logits.detach(), batch, comp, cmask)
        # negative control: the packed row with plain causal attention and positions 0..L-1 is another model
        real = (batch.segment_ids >= 0)[..., None]
        wrong = model(batch.input_ids, None, None).detach() * real
    return {"logits": max(rel_err(a, b.detach()) for a, b in zip(per_response, ref_logits)),
            "grads": {n: rel_err(grouped_grads[n], p.grad) for n, p in model.named_parameters()},
            "control": rel_err(wrong, logits.detach() * real)}


@pytest.mark.slow
def test_gpt_model_prefix_grouped_matches_ungrouped():
    """A tiny GPTModel whose spec uses the prefix-grouped core attention: the packed forward's logits at every prompt
    and response position, and every parameter gradient of a weighted log-prob loss, equal the ungrouped model's
    (each response after its own copy of the prompt)."""
    r = run_distributed(_prefix_grouper_body, world_size=1, timeout=120)[0]
    assert r["logits"] <= REL, r["logits"]
    assert max(r["grads"].values()) <= REL, r["grads"]
    assert len(r["grads"]) >= 10  # embeddings, every layer's qkv/proj/mlp/norms, head
    assert r["control"] > 1e-2  # the comparison can fail: a causal packed row gives other logits


def _streambp_body():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    import ds_ext.streambp.layer as sbp
    from ds_ext.megatron.attention import grouped_forward
    from ds_ext.megatron.model import parse_ds_ext, tiny_gpt
    from ds_ext.megatron.shims import cpu_shims
    from ds_ext.megatron.streambp import streambp_layers
    from ds_ext.prefix_grouper.layout import pack
    _init_megatron()
    calls = {"chunks": 0}
    original = sbp._chunk_backward

    def counted(*args, **kwargs):
        calls["chunks"] += 1
        return original(*args, **kwargs)
    sbp._chunk_backward = counted
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (2, 23), generator=g)
    labels = torch.roll(ids, -1, 1)
    prompt, pmask, comp, cmask, sizes, weights = _groups(64)
    batch = pack(prompt, pmask, comp, cmask, sizes)
    out = {}
    with cpu_shims():
        ref = tiny_gpt(None, seed=5)
        ref(ids, None, None, labels=labels).mean().backward()
        ref_grads = [p.grad.clone() for p in ref.parameters()]
        ref.zero_grad()
        (batch.completion_logprobs(grouped_forward(ref, batch), comp) * weights).sum().backward()
        ref_grouped = [p.grad.clone() for p in ref.parameters()]
        for chunk in (5, 1, 64):  # uneven last chunk; one token per chunk; one chunk for everything
            model = tiny_gpt(None, seed=5)
            ext = parse_ds_ext({"ds_ext": {"streambp": {"enabled": True, "chunk_size": chunk}}})
            streamed = streambp_layers(model, ext.streambp)
            calls["chunks"] = 0
            model(ids, None, None, labels=labels).mean().backward()
            out[chunk] = {"grads": max(rel_err(p.grad, q) for p, q in zip(model.parameters(), ref_grads)),
                          "chunk_calls": calls["chunks"], "layers": len(streamed)}
            model.zero_grad()
            (batch.completion_logprobs(grouped_forward(model, batch), comp) * weights).sum().backward()
            out[chunk]["grouped"] = max(rel_err(p.grad, q) for p, q in zip(model.parameters(), ref_grouped))
        # under megatron DDP: every chunk's grad lands in main_grad through DDP's hooks
        model = tiny_gpt(None, seed=5)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        streambp_layers(ddp, parse_ds_ext({"ds_ext": {"streambp": {"enabled": True, "chunk_size": 4}}}).streambp)
        ddp(ids, None, None, labels=labels).mean().backward()
        ddp.finish_grad_sync()
        out["ddp"] = max(rel_err(p.main_grad, q) for p, q in zip(model.parameters(), ref_grads))
    return out


def test_streambp_on_megatron_layers_matches_autograd():
    """StreamBP on a tiny GPTModel's TransformerLayers: every parameter gradient equals plain autograd's for an LM
    loss and for a prefix-grouped loss, at chunk sizes 5 (23 tokens: uneven last chunk), 1 and 64 (one chunk); the
    chunked path really ran (ceil(23/5) - 1 = 4 chunk backwards per layer); megatron DDP's main_grad agrees."""
    r = run_distributed(_streambp_body, world_size=1, timeout=150)[0]
    for chunk in (5, 1, 64):
        assert r[chunk]["grads"] <= REL, (chunk, r[chunk])
        assert r[chunk]["grouped"] <= REL, (chunk, r[chunk])
        assert r[chunk]["layers"] == 2
    assert r[5]["chunk_calls"] == 2 * (math.ceil(23 / 5) - 1)
    assert r[1]["chunk_calls"] == 2 * 22 and r[64]["chunk_calls"] == 0
    assert r["ddp"] <= REL, r["ddp"]


def test_streambp_refuses_overlapped_grad_reduce():
    from types import SimpleNamespace

    from ds_ext.megatron.streambp import streambp_layers
    from ds_ext.streambp.config import StreamBPConfig
    ddp = SimpleNamespace(ddp_config=SimpleNamespace(overlap_grad_reduce=True))  # what streambp_layers reads
    with pytest.raises(ValueError, match="overlap_grad_reduce"):
        streambp_layers(ddp, StreamBPConfig(enabled=True))


# ------------------------------------------------------------------------------------- NoLoCo: 2 processes, megatron DDP


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _train(ddp, opt, steps, seed, finalize, after=None):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 8, (2, 12), generator=g)  # one fixed micro-batch per rank: the loss must fall on it
    losses = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(data, None, None, labels=torch.roll(data, -1, 1)).mean()
        loss.backward()
        finalize([ddp])
        opt.step()
        losses.append(loss.item())
        if after is not None:
            after()
    return losses


def _noloco_body():
    import torch.distributed as dist
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ds_ext.megatron.model import parse_ds_ext, tiny_gpt
    from ds_ext.megatron.noloco import install_megatron_accounting, noloco_setup, replica_groups
    from ds_ext.megatron.shims import cpu_shims
    from ds_ext.noloco.accounting import CommAccounting
    _init_megatron()
    rank = dist.get_rank()
    ddp_cfg = dict(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    opt_cfg = OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True, clip_grad=1.0)
    out = {}
    with cpu_shims():
        # control: stock megatron DDP over the whole world does make cross-replica collectives, and the counter sees
        # them (so the NoLoCo assertion below can fail)
        model = tiny_gpt(None, seed=0)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(**ddp_cfg), model)
        opt = get_megatron_optimizer(opt_cfg, [ddp])
        acc = install_megatron_accounting(CommAccounting(rank, lambda r: r))  # every rank its own replica
        _train(ddp, opt, 2, rank, finalize_model_grads)
        acc.uninstall()
        out["control"] = acc.summary()

        ext = parse_ds_ext({"ds_ext": {"noloco": {"enabled": True, "inner_steps": 4, "outer_lr": 1.0,
                                                  "outer_momentum": 0.0, "count_collectives": True}}})
        groups = replica_groups(ext.noloco.ranks_per_replica)
        model = tiny_gpt(ext, seed=10 + rank)  # replicas start apart; noloco_setup syncs them to replica 0
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(**ddp_cfg), model,
                                      pg_collection=groups.pg_collection)
        opt = get_megatron_optimizer(opt_cfg, [ddp], pg_collection=groups.pg_collection,
                                     use_gloo_process_groups=False)
        noloco = noloco_setup([ddp], opt, ext.noloco, groups)
        out["start"] = _flat(model)
        snapshots = {}

        def after():
            snapshots.setdefault("before", None)
            if (noloco.steps + 1) % ext.noloco.inner_steps == 0 and "before_outer" not in snapshots:
                snapshots["before_outer"] = _flat(model)
            if noloco.after_step() and "after_outer" not in snapshots:
                snapshots["after_outer"] = _flat(model)
        out["losses"] = _train(ddp, opt, 12, 100 + rank, model.config.finalize_model_grads_func, after)
        out.update(snapshots)
        out["metrics"] = noloco.metrics()
        out["steps"] = noloco.steps  # the feature's own counter, shared with the DeepSpeed path
        noloco.restore_steps(2)  # what the journal calls on resume: the next after_step is step 3, no outer step
        out["after_restore"] = (noloco.after_step(), noloco.after_step(), noloco.steps)
        out["cross_ops"] = list(noloco.accounting.cross_replica_ops)
        out["dp_size"] = ddp.dp_cp_group.size()
        noloco.close()
    return out


@pytest.mark.slow
def test_noloco_two_replicas_megatron_ddp_no_cross_replica_collective():
    """2 processes = 2 replicas of megatron DDP + distributed optimizer (Adam, clipping). The replicas start from
    replica 0's weights, train on different data, and after the outer step (outer_lr 1, momentum 0) hold the exact
    mean of both replicas' weights. No collective spans replicas (only point-to-point exchanges); the same counter
    sees megatron's stock DDP cross replicas. The loss falls."""
    r = run_distributed(_noloco_body, world_size=2, timeout=200)
    assert torch.equal(r[0]["start"], r[1]["start"])  # synced at setup
    assert not torch.equal(r[0]["before_outer"], r[1]["before_outer"])  # replicas diverged in the inner steps
    pair_mean = (r[0]["before_outer"] + r[1]["before_outer"]) / 2
    for x in r:
        assert x["dp_size"] == 1
        # anchor + (mean - anchor): a few fp32 ulps of weights < 4 in magnitude (ulp(4) = 4.8e-7)
        assert (x["after_outer"] - pair_mean).abs().max().item() <= 2e-6
        m = x["metrics"]
        assert x["cross_ops"] == [] and m["cross_replica_collectives"] == 0
        assert m["outer_step"] == 3 and m["mixed"] == 3 and m["skipped"] == 0
        assert x["steps"] == 12 and x["after_restore"] == (False, True, 4)  # step 4 of H=4: an outer step
        assert m["calls/p2p/cross_replica"] == 2 * 3  # isend + irecv per outer step
        assert m.get("calls/reduce_scatter/self", 0) > 0  # megatron's DDP did reduce, inside the replica
        assert x["control"]["cross_replica_collectives"] > 0
        assert x["losses"][-1] < 0.8 * x["losses"][0], x["losses"]
    assert torch.equal(r[0]["after_outer"], r[1]["after_outer"])


# ------------------------------------------------------------------------------------------------------------- GPU only


def _gpu_reference_body():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ds_ext.megatron.attention import grouped_forward
    from ds_ext.megatron.model import parse_ds_ext, tiny_gpt
    from ds_ext.prefix_grouper.layout import pack
    _init_megatron()
    model_parallel_cuda_manual_seed(0)
    ext = parse_ds_ext({"ds_ext": {"prefix_grouper": {"enabled": True}}})
    ours = tiny_gpt(ext).cuda()
    torch.manual_seed(0)
    stock = GPTModel(ours.config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=64,
                     max_sequence_length=256, position_embedding_type="rope",
                     share_embeddings_and_output_weights=False).cuda()
    stock.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(0)).cuda()
    causal = torch.ones(19, 19, dtype=torch.bool, device="cuda").triu(1)[None, None]  # megatron: True = masked
    out = {"stock_vs_ours": rel_err(ours(ids, None, causal), stock(ids, None, causal))}
    prompt, pmask, comp, cmask, sizes, weights = _groups(64)
    batch = pack(prompt, pmask, comp, cmask, sizes)
    batch.input_ids, batch.position_ids, batch.segment_ids = (t.cuda() for t in (batch.input_ids, batch.position_ids,
                                                                                 batch.segment_ids))
    logits = grouped_forward(ours, batch)
    ref_logits, _ = _ungrouped(stock, prompt.cuda(), pmask.cuda(), comp.cuda(), cmask.cuda(), sizes, weights.cuda())
    per_response = _grouped_logits_per_response(logits.detach(), batch, comp, cmask)
    out["grouped_vs_stock"] = max(rel_err(a, b.detach()) for a, b in zip(per_response, ref_logits))
    return out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="megatron's DotProductAttention needs CUDA (its memory "
                                                          "buffer and CUDA RNG tracker)")
def test_gpu_core_attention_matches_megatron_dot_product_attention():
    """On a GPU: the model with PrefixGroupedCoreAttention equals the one with megatron's own DotProductAttention
    (same weights), causally and, for a grouped batch, against the stock model run per response."""
    r = run_distributed(_gpu_reference_body, world_size=1, timeout=200)[0]
    # fp32 on CUDA: SDPA vs megatron's baddbmm + softmax (TF32 off by default for matmuls in torch >= 1.12)
    assert r["stock_vs_ours"] <= REL, r
    assert r["grouped_vs_stock"] <= REL, r
