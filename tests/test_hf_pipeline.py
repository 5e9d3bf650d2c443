"""HF causal LMs (Llama, Qwen2; tiny, random init, written with ``save_pretrained``) as DeepSpeed pipeline stages:
the stage layers compute the HF model (packed rows too), names map both ways, a real 2-stage ``PipelineEngine``
with StreamBP gives the unpipelined model's gradients, and CheckFree rebuilds a stage whose rank was killed."""
import functools
import os
import signal

import pytest
import torch

from dist import run_distributed

transformers = pytest.importorskip("transformers", reason="transformers is the optional [hf] extra")

# fp32: the pipeline runs the same ops in the same order as the HF model except StreamBP's chunked sums and the
# all-reduce of tied gradients (one addition in another order); the project's exactness bar for fp32 is 1e-5.
FP32_RTOL = 1e-5
TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
FAMILIES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def tiny_model(family: str, tied: bool, seed: int = 0, **overrides):
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**TINY, **overrides}, tie_word_embeddings=tied)).float()


def save_tiny(path, family: str, tied: bool, **overrides) -> str:
    tiny_model(family, tied, **overrides).save_pretrained(str(path))
    return str(path)


def packed_batch(seed: int, batch: int = 2, length: int = 29, vocab: int = 300):
    """``input_ids, position_ids, labels`` ``[B, T]``: documents of random lengths packed per row (positions restart
    at 0), labels unshifted with -100 on the first token of every document and a few more."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    pos = torch.empty_like(ids)
    for row in range(batch):
        t = 0
        while t < length:
            n = int(torch.randint(3, 13, (1,), generator=g))
            pos[row, t:t + n] = torch.arange(min(n, length - t))
            t += n
    labels = ids.masked_fill((pos == 0) | (torch.rand(ids.shape, generator=g) < 0.1), -100)
    return ids, pos, labels


def chained(specs):
    """The layer specs run in order on one process, as ``PipelineModule`` runs them (a tied key built once)."""
    from deepspeed.pipe import TiedLayerSpec
    tied, funcs = {}, []
    for spec in specs:
        if isinstance(spec, TiedLayerSpec):
            module = tied.setdefault(spec.key, spec.build())
            funcs.append(functools.partial(spec.forward_fn, module) if spec.forward_fn else module)
        else:
            funcs.append(spec.build())

    def run(x):
        for f in funcs:
            x = f(x)
        return x
    return run


# -- in-process ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,tied", [("llama", True), ("qwen2", False)])
def test_stage_layers_compute_the_hf_model_on_packed_rows(family, tied):
    """The specs' modules chained on one process: logits, HF's loss and every gradient equal the HF model's own on
    packed rows (documents restart their positions; transformers builds the block-causal mask either way)."""
    from ds_ext.models.hf_pipeline import hf_causal_lm_loss, hf_layer_specs
    model = tiny_model(family, tied)
    run = chained(hf_layer_specs(model))
    ids, pos, labels = packed_batch(0)
    # use_cache=False as in training (HFCausalLM): with a KV cache transformers does not detect packed rows
    ref = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
    ref.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = run((ids, pos))
    loss = hf_causal_lm_loss(logits, labels)
    loss.backward()
    assert rel_err(logits, ref.logits) <= FP32_RTOL
    assert abs(loss.item() - ref.loss.item()) <= FP32_RTOL * ref.loss.item()
    for name, p in model.named_parameters():
        assert rel_err(p.grad, want[name]) <= FP32_RTOL, name
    other = packed_batch(0)[0]
    other[:, -5:] = (other[:, -5:] + 1) % 300  # a later document changes: an earlier one's logits must not
    first_doc = int((pos[0, 1:] == 0).nonzero()[0]) + 1
    with torch.no_grad():  # both without gradients: the same attention kernel
        assert torch.equal(run((other, pos))[0, :first_doc], run((ids, pos))[0, :first_doc])


def test_streamed_stage_layers_match_autograd_with_chunks_that_do_not_divide():
    """StreamBP streams the wrapped HF layers in place (chunk 5 of 29 positions): same gradients."""
    from ds_ext.models.hf_pipeline import hf_causal_lm_loss, hf_layer_specs
    from ds_ext.streambp.apply import stream_model
    from ds_ext.streambp.config import StreamBPConfig
    model = tiny_model("qwen2", True)
    ids, _, labels = packed_batch(1)
    pos = torch.arange(ids.shape[1]).expand_as(ids)  # unpacked: StreamBP's HF adapter streams causal rows
    model(input_ids=ids, position_ids=pos, labels=labels).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    feature = stream_model(model, StreamBPConfig(enabled=True, chunk_size=5))
    kinds = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda mod, args, out: kinds.append(type(out.grad_fn).__name__))
    hf_causal_lm_loss(chained(hf_layer_specs(model))((ids, pos)), labels).backward()
    feature.close()
    assert kinds == ["StreamedLayerFunctionBackward"] * 2
    for name, p in model.named_parameters():
        assert rel_err(p.grad, want[name]) <= FP32_RTOL, name


@pytest.mark.parametrize("tied", [False, True])
def test_names_map_both_ways_and_refuse_strangers(tied):
    from ds_ext.models.hf_pipeline import hf_to_pipeline_key, pipeline_to_hf_key
    model = tiny_model("llama", tied, num_hidden_layers=3)
    for name in model.state_dict():
        key = hf_to_pipeline_key(name, 3, tied)
        back = pipeline_to_hf_key(key, 3)
        assert back == name or (tied and name == "lm_head.weight" and back == "model.embed_tokens.weight"), name
    assert pipeline_to_hf_key("2.layer.mlp.up_proj.weight", 3) == "model.layers.1.mlp.up_proj.weight"
    for bad in ("4.layer.mlp.up_proj.weight", "5.norm.weight", "0.lm_head.weight", "tied_modules.x.weight"):
        with pytest.raises(ValueError, match="not a parameter name of an HF pipeline with 3 decoder layers"):
            pipeline_to_hf_key(bad, 3)
    with pytest.raises(ValueError, match="model.layers.3.mlp.up_proj.weight"):
        hf_to_pipeline_key("model.layers.3.mlp.up_proj.weight", 3, tied)


def test_a_model_that_is_not_a_llama_family_causal_lm_is_refused():
    from ds_ext.models.hf_pipeline import hf_layer_specs
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not a Llama/Qwen2-family causal LM"):
        hf_layer_specs(gpt2)
    model = tiny_model("llama", True)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match="tie_word_embeddings is true but lm_head.weight is not"):
        hf_layer_specs(model)


# -- a real 2-stage PipelineEngine ----------------------------------------------------------------------------------
def sgd_config(ext: dict, gas: int = 2) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "steps_per_print": 10 ** 9,
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_optimization": {"stage": 0}, "ds_ext": ext}


def _parity_body(dirs: dict):
    """Each family: 2 stages (ds_ext engine, StreamBP on), one optimizer step of 2 micro-batches; the gradients the
    optimizer sees on each stage vs the unpipelined HF model's on the same data (loaded from the same directory)."""
    import deepspeed
    import ds_ext
    from ds_ext.models.hf_pipeline import gather_hf_state_dict, hf_pipeline, pipeline_state_to_hf
    deepspeed.init_distributed(dist_backend="gloo")
    rank = deepspeed.comm.get_rank()
    out = {}
    for family, path in dirs.items():
        ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        config = sgd_config({"topology": {"pipeline_stages": 2},
                             "streambp": {"enabled": True, "chunk_size": 5, "logits_chunk_size": 7}})
        topo = ds_ext.build_topology(config)
        pipe = hf_pipeline(model, topo)
        engine, *_ = ds_ext.initialize(model=pipe, model_parameters=pipe.parameters(), config=config, topology=topo)
        named = {n: p for n, p in engine.module.named_parameters()}
        gathered = gather_hf_state_dict(engine.module, topo, model.config.num_hidden_layers,
                                        model.config.tie_word_embeddings)
        if gathered is not None:  # rank 0: the whole model under HF names, loadable strictly into a fresh model
            fresh = transformers.AutoModelForCausalLM.from_config(ref.config)
            fresh.load_state_dict(gathered, strict=True)
            gathered = {n: torch.equal(p, ref.state_dict()[n]) for n, p in fresh.state_dict().items()}
        grads = {}
        engine.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: grads.update({n: p.grad.clone() for n, p in named.items()}))
        batches = []
        for micro in range(2):
            ids, _, labels = packed_batch(10 + micro)
            pos = torch.arange(ids.shape[1]).expand_as(ids)  # StreamBP streams unpacked rows (packed: helper "packed")
            batches.append(((ids, pos), labels))
        loss = float(engine.train_batch(iter(batches)))
        ref_loss = sum(ref(input_ids=b[0][0], position_ids=b[0][1], labels=b[1]).loss for b in batches) / 2
        ref_loss.backward()
        ref_grads = dict(ref.named_parameters(remove_duplicate=False))  # tied: lm_head.weight too
        layers = model.model.layers
        out[family] = {
            "gathered": gathered, "loss": loss, "ref_loss": ref_loss.item(),
            "rel": {n: rel_err(g, ref_grads[n].grad) for n, g in pipeline_state_to_hf(
                grads, model.config.num_hidden_layers, model.config.tie_word_embeddings).items()},
            "streamed": engine.ds_ext_metrics()["streambp/streamed_layers"],
            "released": [layers[i].mlp.up_proj.weight.is_meta for i in range(len(layers))], "rank": rank}
        engine.ds_ext_close()
    return out


@pytest.mark.slow
def test_two_stage_hf_pipeline_with_streambp_gives_the_unpipelined_gradients(tmp_path):
    """Llama (untied) and Qwen2 (tied embeddings: one TiedLayerSpec, gradients all-reduced between the stages) from
    ``save_pretrained`` directories, 2 stages on 2 processes, StreamBP chunks that do not divide the 29 positions:
    every parameter's gradient (fp32 rel err <= 1e-5) and the loss equal the unpipelined HF model's; the stages'
    parameters gathered under HF names load strictly into a fresh model and equal the directory's weights; each
    rank keeps only its own stage's layers."""
    dirs = {"llama": save_tiny(tmp_path / "llama", "llama", False), "qwen2": save_tiny(tmp_path / "qwen2", "qwen2", True)}
    ranks = run_distributed(_parity_body, world_size=2, args=(dirs,), timeout=400)
    for family, tied in (("llama", False), ("qwen2", True)):
        stage0, stage1 = (r[family] for r in ranks)
        expected = set(tiny_model(family, tied).state_dict())
        assert stage1["gathered"] is None and stage0["gathered"].keys() == expected
        assert all(stage0["gathered"].values()), stage0["gathered"]  # gathered = the from_pretrained weights
        assert abs(stage1["loss"] - stage1["ref_loss"]) <= FP32_RTOL * stage1["ref_loss"]
        for stage in (stage0, stage1):
            assert stage["streamed"] == 1  # one decoder layer per stage, streamed
            assert all(err <= FP32_RTOL for err in stage["rel"].values()), (family, stage["rel"])
        assert set(stage0["rel"]) | set(stage1["rel"]) == expected
        assert stage0["released"] == [False, True] and stage1["released"] == [True, False]
        if tied:  # the embedding's gradient includes the head's on both stages (DeepSpeed's tied all-reduce)
            assert "model.embed_tokens.weight" in stage0["rel"] and "lm_head.weight" in stage1["rel"]


# -- CheckFree: a stage rank killed (kill -9, its disk gone), rebuilt from its neighbour at relaunch ------------------
def text_batch(step: int, micro: int, batch: int = 2, length: int = 32):
    """A learnable batch ``((input_ids, position_ids), labels)``: windows of the shipped corpus (bytes < 300)."""
    from ds_ext.data.corpus import load_corpus
    tokens = load_corpus(max_bytes=1 << 16)
    g = torch.Generator().manual_seed(step * 101 + micro)
    starts = torch.randint(0, tokens.numel() - length, (batch,), generator=g).tolist()
    ids = torch.stack([tokens[s:s + length] for s in starts]).long()
    return (ids, torch.arange(length).expand_as(ids)), ids


def _checkfree_body(path: str, journal_dir: str, steps: int, kill=None):
    """A Llama HF model as 2 stages (ZeRO-1, AdamW, StreamBP, journal, CheckFree with end replicas every step);
    ``kill = (rank, step)``: that rank dies by SIGKILL at the start of that step."""
    import deepspeed
    import ds_ext
    from ds_ext.models.hf_pipeline import hf_pipeline
    deepspeed.init_distributed(dist_backend="gloo")
    rank = deepspeed.comm.get_rank()
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 10 ** 9,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
              "ds_ext": {"topology": {"pipeline_stages": 2},
                         "streambp": {"enabled": True, "chunk_size": 12, "logits_chunk_size": 12},
                         "recovery": {"journal_dir": journal_dir, "base_interval": 3,
                                      "checkpoint_free": {"enabled": True, "replicate_ends_interval": 1}}}}
    topo = ds_ext.build_topology(config)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pipe = hf_pipeline(model, topo)
    engine, *_ = ds_ext.initialize(model=pipe, model_parameters=pipe.parameters(), config=config, topology=topo)
    features = {f.name: f for f in engine.ds_ext_features}
    cf = features["checkpoint_free"]
    start = engine.global_steps
    at_start = {"body": cf.state.body_state(), "ends": cf.state.end_state(), "replicas": dict(cf.end_replicas)}
    losses = []
    for step in range(start + 1, steps + 1):
        if kill and kill == (rank, step):
            features["recovery"].writer.wait_written()
            os.kill(os.getpid(), signal.SIGKILL)
        losses.append(float(engine.train_batch(iter([text_batch(step, m) for m in range(2)]))))
    out = {"start": start, "at_start": at_start, "losses": losses, "metrics": engine.ds_ext_metrics()}
    engine.ds_ext_close()
    return out


@pytest.mark.slow
def test_killed_hf_stage_is_rebuilt_from_its_neighbour_and_the_loss_falls_after(tmp_path):
    """Rank 1 (the last stage: decoder layer 1, final norm, head) is killed at step 6 and its journal deleted. The
    relaunch resumes rank 0 from its journal at step 5 and rebuilds rank 1 without a checkpoint (CheckFree+, end
    stage): its decoder layer is a copy of stage 0's, its norm and head stage 0's replica of them; training goes on
    and the loss falls after the rebuild."""
    import shutil
    from ds_ext.recovery.journal import rank_dir
    path, journal_dir = save_tiny(tmp_path / "llama", "llama", False), str(tmp_path / "journal")
    run_distributed(_checkfree_body, 2, args=(path, journal_dir, 8, (1, 6)), timeout=400, may_die=(0, 1),
                    group_dies_with=True)
    shutil.rmtree(rank_dir(journal_dir, 1))
    first, last = run_distributed(_checkfree_body, 2, args=(path, journal_dir, 20), timeout=400)
    assert first["start"] == last["start"] == 5, (first["start"], last["start"])
    assert last["metrics"]["checkpoint_free/partner"] == 1, last["metrics"]
    assert first["metrics"]["checkpoint_free/partner"] == 0, first["metrics"]
    assert first["at_start"]["body"].keys() == last["at_start"]["body"].keys()
    for key, w in first["at_start"]["body"].items():
        assert torch.equal(last["at_start"]["body"][key], w), key
    assert set(last["at_start"]["ends"]) == {"3.norm.weight", "4.lm_head.weight"}
    for name, w in last["at_start"]["ends"].items():
        assert torch.equal(w, first["at_start"]["replicas"][name]), name
    losses = last["losses"]
    print('losses after the rebuild', [round(x, 3) for x in losses])
    assert all(torch.isfinite(torch.tensor(losses))), losses
    # After the rebuild the last stage's layer is stage 0's: the loss jumps, then must fall below where it restarted.
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
