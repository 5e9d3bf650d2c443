"""StreamBP with Ulysses sequence parallelism (``streambp.sequence_parallel``) on 2 real gloo processes: exact
against sp=1 StreamBP in the same process (fp32 gradients summed over the group, rel err <= 1e-5)."""
import copy

import pytest
import torch

from dist import run_distributed


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _ulysses_body(length: int, chunk: int):
    import deepspeed
    import torch.distributed as dist
    import transformers
    from hf_dirs import qwen2_config
    from ds_ext._deepspeed import ulysses_sequence_group
    from ds_ext.streambp.apply import stream_model
    from ds_ext.streambp.config import StreamBPConfig
    from ds_ext.streambp.hf import causal_lm_loss
    from ds_ext.streambp.layer import streamed_calls
    from ds_ext.streambp.ulysses import causal_lm_shard_loss, shard_positions

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    group = ulysses_sequence_group(2)
    out = {}
    # (4 query, 2 KV heads): one KV head per rank; (4, 1): the KV head is repeated for the exchange (MQA)
    for kv_heads in (2, 1):
        torch.manual_seed(0)
        config = qwen2_config(vocab_size=96, num_key_value_heads=kv_heads, attn_implementation="sdpa")
        plain = transformers.Qwen2ForCausalLM(config).float().train()
        ids = torch.randint(0, 96, (1, length), generator=torch.Generator().manual_seed(1))
        ref = copy.deepcopy(plain)
        stream_model(ref, StreamBPConfig(enabled=True, chunk_size=chunk, logits_chunk_size=16))
        ref_loss = causal_lm_loss(ref, ids, ids, logits_chunk_size=16)
        ref_loss.backward()
        sp = copy.deepcopy(plain)
        stream_model(sp, StreamBPConfig(enabled=True, chunk_size=chunk, logits_chunk_size=16, sequence_parallel=2),
                     sequence_group=group)
        loss = causal_lm_shard_loss(sp, ids, ids, group, logits_chunk_size=16)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        grads, ref_grads = _grads(sp), _grads(ref)
        for g in grads.values():
            dist.all_reduce(g, group=group)
        assert grads.keys() == ref_grads.keys()
        out[kv_heads] = {
            "loss_err": abs(total.item() - ref_loss.item()) / abs(ref_loss.item()),
            "grad_err": max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in grads),
            "streamed": [streamed_calls(layer) for layer in sp.model.layers]}
        with torch.no_grad():  # without gradients the layers still run sharded (their own forward would not)
            full = plain.model(input_ids=ids, use_cache=False).last_hidden_state
            shard = sp.model(input_ids=ids[:, dist.get_rank() * length // 2:(dist.get_rank() + 1) * length // 2],
                             position_ids=shard_positions(length, group), use_cache=False).last_hidden_state
            rows = slice(dist.get_rank() * length // 2, (dist.get_rank() + 1) * length // 2)
            out[kv_heads]["eval_err"] = ((shard - full[:, rows]).norm() / full[:, rows].norm()).item()
    # packed documents (positions restarting inside the shard) are refused by name
    try:
        restart = shard_positions(length, group).clone()
        restart[:, length // 4:] = torch.arange(length // 2 - length // 4)  # a second document from T/4 on
        sp.model(input_ids=ids[:, :length // 2], position_ids=restart, use_cache=False).last_hidden_state.sum()
        out["refusal"] = None
    except ValueError as e:
        out["refusal"] = str(e)
    return out


@pytest.mark.slow
def test_streambp_ulysses_sp2_is_exact_against_sp1():
    # T = 64 over 2 ranks: shards of 32, chunks of 8 (4 chunks per shard, so the chunk order matters)
    results = run_distributed(_ulysses_body, world_size=2, args=(64, 8), timeout=240)
    for rank, out in enumerate(results):
        for kv_heads in (2, 1):
            r = out[kv_heads]
            # fp32: the same terms summed in another order (chunks, ranks); 1e-5 is the bound
            assert r["grad_err"] <= 1e-5 and r["loss_err"] <= 1e-5, (rank, kv_heads, r)
            assert r["eval_err"] <= 1e-5, (rank, kv_heads, r)
            # the sharded streamed path ran (the call with gradients; the eval call is checked by its values)
            assert r["streamed"] == [1, 1], r
        assert out["refusal"] and "packed documents" in out["refusal"], out["refusal"]


# -- the engine path: ds-ext + examples/train.py with "sequence_parallel": 2 ------------------------------------
def _sp_config(sp: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "steps_per_print": 10 ** 6, "zero_optimization": {"stage": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0, "torch_adam": True}},
            "ds_ext": {"streambp": {"enabled": True, "chunk_size": 8, "logits_chunk_size": 16,
                                    "sequence_parallel": sp}}}


def _train_sp1_body(argv):
    from workers.observed_train import observed_main
    return observed_main([str(a) for a in argv])


@pytest.mark.slow
def test_ds_ext_train_sp2_steps_equal_sp1(tmp_path, monkeypatch):
    """``ds-ext`` with 2 processes and ``sequence_parallel: 2`` (one sequence group: both ranks read the same
    micro-batch, each streams 16 of its 32 tokens) runs ``examples/train.py`` (through
    ``tests/workers/observed_train.py``, which records each rank's step and eval losses and sharded layer calls) on
    a generated Qwen2 directory, fp32, ZeRO-1 with gradient clipping, ``--no_packing`` rows; the reference is the
    same ``main()`` on 1 process with sp=1 StreamBP, same data and config. Every step's loss, and the eval loss
    after the last step (so the last update too), equal sp=1's; both ranks report the same (whole-sequence) loss;
    every layer call of both ranks ran sharded."""
    import json
    from pathlib import Path

    from conftest import ds_ext_run
    from hf_dirs import CORPUS, make_model_dir
    model = make_model_dir(tmp_path / "model")
    sentences = [s.strip() for s in CORPUS.replace("\n", " ").split(".") if s.strip()]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    steps = 4
    args = ["--model", model, "--data", data, "--seq_len", 32, "--no_packing", "--max_steps", steps,
            "--eval_interval", 1000, "--eval_batches", 1]
    for sp in (2, 1):
        (tmp_path / f"sp{sp}.json").write_text(json.dumps(_sp_config(sp)))
    monkeypatch.setenv("OBSERVE_DIR", str(tmp_path))
    proc = ds_ext_run(["--num_procs", 2, "--config", tmp_path / "sp2.json",
                       Path(__file__).resolve().parent / "workers" / "observed_train.py"] + args, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["streambp/sequence_parallel"] == 2 and summary["world_size"] == 2, summary
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    (ref,) = run_distributed(_train_sp1_body, world_size=1,
                             args=(args + ["--deepspeed_config", tmp_path / "sp1.json"],), timeout=240)
    got, want = ranks[0]["losses"] + ranks[0]["evals"], ref["losses"] + ref["evals"]
    errors = [abs(a - b) / abs(b) for a, b in zip(got, want)]
    print(f"sp=2 vs sp=1 per-step (then eval) loss rel err: {errors}")
    # fp32: the same sums in another order (two shards and an all-reduce vs one pass), then 3 AdamW steps on
    # gradients that differ by that rounding only; the bound is 1e-5
    assert len(ref["losses"]) == steps and len(got) == len(want) == steps + 2, (got, want)
    assert max(errors) <= 1e-5, (got, want)
    assert ranks[0]["losses"] == ranks[1]["losses"] and ranks[0]["evals"] == ranks[1]["evals"]  # one group's loss
    # every layer call ran sharded (an unsharded fallback would not pass the runner, or not as [2, 16, 32]):
    # 2 layers x (4 training forwards + 2 evals)
    for r in ranks:
        assert r["shapes"] == [[2, 16, 32]] * 2 * (steps + 2), r["shapes"]
    assert ref["shapes"] == [] and ranks[0]["evals"][1] < ranks[0]["evals"][0]  # the steps trained


def test_sequence_parallel_refusals_name_key_and_value():
    """What ``sequence_parallel: N > 1`` cannot train is refused before training, naming the key and value: a world
    size it does not divide (``examples/train.py`` exits 2 with it), pipeline stages / NoLoCo / Prefix Grouper
    (``ds-ext`` refuses the config before starting workers), the reference model, a ``--seq_len`` not divisible
    by N and packed rows (train.py's flag check); the sharded forward refuses rows of packed documents but takes
    ``--no_packing`` rows (one document, then an unlabelled padding tail whose positions restart)."""
    from ds_ext.config import DsExtConfigError, parse_ext_config
    from ds_ext.streambp.ulysses import one_document_problem
    from ds_ext.topology import Topology
    from ds_ext.train_flags import FlagError, check_sequence_parallel
    sp = {"enabled": True, "sequence_parallel": 2}
    with pytest.raises(DsExtConfigError, match=r"ds_ext\.streambp\.sequence_parallel.*got 2 with world size 3"):
        Topology.from_config(parse_ext_config({"ds_ext": {"streambp": sp}}), 3)
    assert Topology.from_config(parse_ext_config({"ds_ext": {"streambp": sp}}), 4).data_shard(3) == (1, 2)
    for other, named in (({"topology": {"pipeline_stages": 2}}, "pipeline_stages=2"),
                         ({"noloco": {"enabled": True}}, "noloco"),
                         ({"prefix_grouper": {"enabled": True}}, "prefix_grouper")):
        with pytest.raises(DsExtConfigError, match=rf"ds_ext\.streambp\.sequence_parallel.*got 2 with .*{named}"):
            parse_ext_config({"zero_optimization": {"stage": 1}, "ds_ext": {"streambp": sp, **other}})
    for args, message in (((False, 32, False), "HF model"), ((True, 33, False), "--seq_len 33 is not divisible"),
                          ((True, 32, True), "--no_packing")):
        with pytest.raises(FlagError, match=rf"ds_ext\.streambp\.sequence_parallel=2.*{message}"):
            check_sequence_parallel(2, *args)
    check_sequence_parallel(2, True, 32, False)
    check_sequence_parallel(1, False, 33, True)
    labels = torch.tensor([[-100, 5, 6, 7, -100, -100]])
    padded = torch.tensor([[0, 1, 2, 3, 0, 1]])  # --no_packing: one document, then the pad document
    assert one_document_problem(padded, labels) is None and one_document_problem(None, labels) is None
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert "packed documents" in one_document_problem(packed, torch.tensor([[-100, 5, 6, -100, 8, 9]]))
