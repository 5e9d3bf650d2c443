"""Your own HF model and data: loading and its refusals, the JSONL formats and their loss masks, packing, the
deterministic resumable order, HF-format output (``--save_hf``, ``export --hf``) and end-to-end ``ds-ext`` runs.

Model directories and tokenizers are made here (:mod:`hf_dirs`: a byte-level BPE trained on an embedded corpus, a
random-init Qwen2 written with ``save_pretrained``); nothing is downloaded.
"""
from __future__ import annotations

import json

import pytest
import torch

from hf_dirs import make_model_dir, make_tokenizer, qwen2_config

from ds_ext.data import DataError, build_datasets, encode, pack, read_examples
from ds_ext.data.sources import Example
from ds_ext.models import sharded_batches
from ds_ext.models.hf import (HFCausalLM, HFModelError, check_seq_len, load_config, load_hf_model, load_tokenizer)
from ds_ext.ops.losses import IGNORE_INDEX

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is 2+3?"},
        {"role": "assistant", "content": "five"}, {"role": "user", "content": "and 1+1?"},
        {"role": "assistant", "content": "two"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(str(model_dir))


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# -- loading and refusals -------------------------------------------------------------------------------------
def test_load_pretrained_and_random(model_dir):
    torch.manual_seed(0)
    hf = load_hf_model(str(model_dir))
    saved = load_hf_model(str(model_dir))
    assert all(torch.equal(a, b) for a, b in zip(hf.parameters(), saved.parameters()))
    assert next(hf.parameters()).dtype == torch.float32
    torch.manual_seed(1)  # make_model_dir wrote the seed-0 init
    random = load_hf_model(str(model_dir), init="random")
    assert not torch.equal(random.model.embed_tokens.weight, hf.model.embed_tokens.weight)


@pytest.mark.parametrize("case", ["hub_name", "file", "no_config", "no_weights", "family", "moe", "sliding",
                                  "vocab", "seq_len"])
def test_refusals_name_the_problem(case, tmp_path, model_dir):
    from transformers import GPT2Config, Qwen2MoeConfig
    if case == "hub_name":
        with pytest.raises(HFModelError, match="not a directory.*no internet"):
            load_hf_model("Qwen/Qwen2.5-0.5B")
    elif case == "file":
        (tmp_path / "f").write_text("x")
        with pytest.raises(HFModelError, match="hub names are not accepted"):
            load_hf_model(str(tmp_path / "f"))
    elif case == "no_config":
        with pytest.raises(HFModelError, match="no config.json"):
            load_hf_model(str(tmp_path))
    elif case == "no_weights":
        qwen2_config().save_pretrained(tmp_path)
        with pytest.raises(HFModelError, match=r"no weights.*--init random"):
            load_hf_model(str(tmp_path))
        assert load_hf_model(str(tmp_path), init="random").config.model_type == "qwen2"
    elif case == "family":
        GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
        with pytest.raises(HFModelError, match="model_type 'gpt2' is not supported.*llama, qwen2, qwen3, mistral"):
            load_hf_model(str(tmp_path), init="random")
    elif case == "moe":
        Qwen2MoeConfig(num_hidden_layers=1, hidden_size=32).save_pretrained(tmp_path)
        with pytest.raises(HFModelError, match="mixture-of-experts"):
            load_hf_model(str(tmp_path), init="random")
    elif case == "sliding":
        qwen2_config(use_sliding_window=True, sliding_window=16, max_window_layers=0).save_pretrained(tmp_path)
        load_hf_model(str(tmp_path), init="random")  # fine without StreamBP
        with pytest.raises(HFModelError, match="sliding-window.*streambp"):
            load_hf_model(str(tmp_path), init="random", streambp=True)
    elif case == "vocab":
        qwen2_config(vocab_size=300).save_pretrained(tmp_path)
        with pytest.raises(HFModelError, match="320 tokens.*vocab_size=300"):
            load_tokenizer(str(model_dir), load_config(str(tmp_path), "random"))
    elif case == "seq_len":
        config = load_config(str(model_dir))
        check_seq_len(config, 512, "m")
        with pytest.raises(HFModelError, match="--seq_len 513 exceeds max_position_embeddings=512.*no RoPE scaling"):
            check_seq_len(config, 513, "m")
        scaled = qwen2_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
        check_seq_len(scaled, 1024, "m")


# -- data: formats, masks, packing, order ---------------------------------------------------------------------
@pytest.mark.parametrize("line,message", [
    ("{not json", r"bad.jsonl:2: not JSON"),
    ({"txt": "a"}, r"bad.jsonl:2: no known field \(keys: txt\)"),
    ({"text": 3}, r"bad.jsonl:2: field 'text': expected a string, got int"),
    ({"prompt": "a"}, r"bad.jsonl:2: field 'completion': missing"),
    ({"messages": [{"role": "user", "content": 1}]}, r"bad.jsonl:2: field 'messages\[0\].content'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"bad.jsonl:2: field 'messages': no message with role "
                                                        "'assistant'"),
    ([1, 2], r"bad.jsonl:2: expected a JSON object"),
])
def test_bad_jsonl_names_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, line])
    with pytest.raises(DataError, match=message):
        read_examples(str(path))


def test_loss_masks_completion_and_assistant_only(tokenizer):
    ids, labels = encode(tokenizer, Example("prompt_completion", {"prompt": "Q: sky?", "completion": " blue"}, "x"))
    n_prompt = len(tokenizer("Q: sky?")["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == " blue"

    ids, labels = encode(tokenizer, Example("messages", {"messages": CHAT}, "x"))
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    learned = tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert learned == "five<|im_end|>\ntwo<|im_end|>\n"
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))

    ids, labels = encode(tokenizer, Example("text", {"text": "the fox"}, "x"))
    assert labels == ids and ids[-1] == tokenizer.eos_token_id


def test_packing_restarts_positions_per_document_and_pads():
    docs = [([1, 2, 3], [1, 2, 3]), ([4, 5], [-100, 5]), ([6, 7, 8, 9, 10, 11, 12], list(range(6, 13)))]
    rows = pack(docs, seq_len=6, pad_id=0)
    ids, labels, pos = rows[:, 0].tolist(), rows[:, 1].tolist(), rows[:, 2].tolist()
    # row 0: doc 1 + doc 2 + one pad; the 7-token doc is cut into 6 + 1 tokens, and a 1-token piece is dropped
    assert ids == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 11]]
    assert pos == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    assert labels == [[-100, 2, 3, -100, 5, -100], [-100, 7, 8, 9, 10, 11]]


def test_build_datasets_order_is_deterministic_sharded_and_resumable(tmp_path, tokenizer):
    lines = [{"text": f"document {i} " + "the quick brown fox " * (i % 5)} for i in range(40)]
    lines += [{"prompt": "what is 2+3?", "completion": " five"}, {"messages": CHAT}]
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", lines)
    (tmp_path / "d" / "b.txt").write_text("a plain text document " * 20)
    train, held = build_datasets(str(tmp_path / "d"), tokenizer, seq_len=32, min_rows=2)
    again, _ = build_datasets(str(tmp_path / "d"), tokenizer, seq_len=32, min_rows=2)
    assert torch.equal(train.rows, again.rows) and len(held) >= 2
    full = sharded_batches(train, 2, (0, 2), seed=3)
    first = [next(full) for _ in range(7)]
    resumed = sharded_batches(train, 2, (0, 2), seed=3, start_batch=4)
    for want in first[4:]:
        got = next(resumed)
        assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))
    other = next(sharded_batches(train, 2, (1, 2), seed=3))
    assert not torch.equal(other[0], first[0][0])  # the other data shard reads other rows
    with pytest.raises(DataError, match="rows of --seq_len 32; training needs at least"):
        build_datasets(str(tmp_path / "d"), tokenizer, seq_len=32, min_rows=len(train.rows))


def test_hf_causal_lm_loss_is_hf_own_loss(model_dir):
    """Chunked head + CE (chunks that do not divide T) = transformers' own shifted loss, fp32 (rounding only)."""
    torch.manual_seed(0)
    hf = load_hf_model(str(model_dir))
    model = HFCausalLM(hf, logits_chunk_size=7)
    ids = torch.randint(0, 320, (2, 20))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    ours = model(ids, labels)
    theirs = hf(input_ids=ids, labels=labels).loss
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)  # fp32 sums in another order
    ours.backward()
    got = {n: p.grad.clone() for n, p in hf.named_parameters()}
    hf.zero_grad()
    theirs.backward()
    for n, p in hf.named_parameters():
        assert torch.allclose(got[n], p.grad, rtol=1e-5, atol=1e-7), n  # fp32 rel err <= 1e-5 (the project's bound)


# -- HF-format output: the writer behind --save_hf and export --hf gives the module's logits ---------------------
def packed_probe():
    """Two packed rows (documents of 5 + 11 and 16 tokens) for logits comparisons."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 320, (2, 16), generator=g)
    pos = torch.tensor([list(range(5)) + list(range(11)), list(range(16))])
    return ids, pos


def hf_logits(path):
    """``from_pretrained`` logits on the packed probe (``use_cache=False``: with a cache transformers does not
    detect packed rows and would let the second document attend to the first)."""
    from transformers import AutoModelForCausalLM
    ids, pos = packed_probe()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits


def test_hf_writer_round_trip_gives_the_module_logits(tmp_path, model_dir):
    """Trained a few steps, gathered (:func:`gather_fp32_state`: without ZeRO the params themselves) and written
    (:func:`save_hf_state`, what ``--save_hf`` and ``export --hf`` call): ``from_pretrained`` gives the module's
    logits on packed rows, fp32 (max abs diff <= 1e-6; the same fp32 weights, so in practice 0). That ZeRO's
    gathered masters are the engine's weights is checked bit for bit end to end below."""
    from ds_ext.models.hf import gather_fp32_state, save_hf_state
    torch.manual_seed(0)
    model = HFCausalLM(load_hf_model(str(model_dir)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, pos = packed_probe()
    for _ in range(2):
        opt.zero_grad()
        model(ids, ids, pos).backward()
        opt.step()
    out = tmp_path / "out"
    save_hf_state(gather_fp32_state(model), model.export_meta()["config"], load_tokenizer(str(model_dir)), str(out))
    assert (out / "model.safetensors").is_file() and load_tokenizer(str(out)).chat_template is not None
    with torch.no_grad():
        mine = model(ids, position_ids=pos)
    assert (hf_logits(out) - mine).abs().max().item() <= 1e-6


# -- end to end through ds-ext, bf16 ---------------------------------------------------------------------------
BF16_BASE = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
             "steps_per_print": 10 ** 6, "bf16": {"enabled": True},
             "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0, "torch_adam": True}},
             "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3,
                                                          "warmup_num_steps": 4}},
             "zero_optimization": {"stage": 1}}


def e2e_data(root):
    """A directory with JSONL of all three forms and a plain text file."""
    from hf_dirs import CORPUS
    sentences = [s.strip() for s in CORPUS.replace("\n", " ").split(".") if s.strip()]
    lines = [{"text": s} for s in sentences]
    lines += [{"prompt": f"Q{i}: {s}?", "completion": f" {s[::-1]}"} for i, s in enumerate(sentences[:8])]
    lines += [{"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": s.upper()}]}
              for s in sentences[:8]]
    root.mkdir()
    write_jsonl(root / "mixed.jsonl", lines)
    (root / "notes.txt").write_text(CORPUS)
    return root


def ds_ext_train(tmp_path, name, config, extra, max_restarts=0):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "ds_ext.launch", "--config", str(tmp_path / f"{name}.json")]
    cmd += ["--max_restarts", str(max_restarts)] if max_restarts else []
    proc = subprocess.run(cmd + [str(root / "examples" / "train.py")] + extra, capture_output=True, text=True,
                          timeout=400, cwd=tmp_path)
    return proc


def summary_of(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def export(journal, out, *extra):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "ds_ext.recovery", "export", str(journal), "--hf", str(out), *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def weights(path):
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_ds_ext_bf16_baseline_noloco_and_kill_9_resume(tmp_path, model_dir):
    """Three bf16 runs of a generated Qwen2 directory on 2 processes (``--data``: JSONL of all three forms + a text
    file, packed): (1) ZeRO-1 with the journal: loss falls, ``--save_hf`` loads; (2) the same run with rank 1
    killed by SIGKILL in step 9 and relaunched by ``ds-ext --max_restarts 1``: it resumes at step 8 and its final
    weights are bit-identical to (1)'s; (3) NoLoCo, 2 replicas x ZeRO-2: loss falls, and ``export --hf --replica
    1`` of its journal loads with weights that differ from replica 0's (``--save_hf``)."""
    from transformers import AutoModelForCausalLM
    data = str(e2e_data(tmp_path / "data"))
    common = ["--model", str(model_dir), "--data", data, "--seq_len", "64", "--max_steps", "14",
              "--eval_interval", "1000", "--eval_batches", "2"]
    journaled = {**BF16_BASE, "ds_ext": {"recovery": {"journal_dir": str(tmp_path / "j_straight"),
                                                       "base_interval": 4}}}
    straight = summary_of(ds_ext_train(tmp_path, "straight", journaled, common + ["--save_hf", "straight_hf"]))
    assert straight["last_loss"] < straight["first_loss"] - 0.5, straight
    assert straight["eval_loss_end"] < straight["eval_loss_start"], straight
    export(tmp_path / "j_straight", tmp_path / "straight_export")  # 2 ZeRO-1 partitions gathered from the journal
    a, b = weights(tmp_path / "straight_hf"), weights(tmp_path / "straight_export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    AutoModelForCausalLM.from_pretrained(tmp_path / "straight_export")

    killed_cfg = {**BF16_BASE, "ds_ext": {"recovery": {"journal_dir": str(tmp_path / "j_killed"),
                                                        "base_interval": 4}}}
    killed = summary_of(ds_ext_train(tmp_path, "killed", killed_cfg, common + ["--save_hf", "killed_hf",
                                                                                "--fault_inject", "1:9"], 1))
    assert killed["start_step"] == 8 and killed["recovery/resumed_step"] == 8, killed
    assert killed["last_loss"] == straight["last_loss"]
    a, b = weights(tmp_path / "straight_hf"), weights(tmp_path / "killed_hf")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    noloco_cfg = {**BF16_BASE, "zero_optimization": {"stage": 2},
                  "ds_ext": {"noloco": {"enabled": True, "inner_steps": 4, "ranks_per_replica": 1},
                             "recovery": {"journal_dir": str(tmp_path / "j_noloco"), "base_interval": 4}}}
    noloco = summary_of(ds_ext_train(tmp_path, "noloco", noloco_cfg, common + ["--save_hf", "noloco_hf"]))
    assert noloco["replicas"] == 2 and noloco["noloco/outer_step"] == 3, noloco
    assert noloco["last_loss"] < noloco["first_loss"] - 0.5, noloco
    export(tmp_path / "j_noloco", tmp_path / "replica1", "--replica", "1")
    r0, r1 = weights(tmp_path / "noloco_hf"), weights(tmp_path / "replica1")
    assert r0.keys() == r1.keys() and any(not torch.equal(r0[k], r1[k]) for k in r0)  # 2 steps past an outer step
    AutoModelForCausalLM.from_pretrained(tmp_path / "replica1")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["model", "jsonl", "size_flag", "flag_value"])
def test_bad_input_exits_2_before_training_writing_nothing(tmp_path, model_dir, case):
    """``ds-ext`` with 2 processes: each refusal exits 2, is printed once (by rank 0; the launcher's own line
    about the failed worker is not the message), and nothing is written (no HF dir, journal or monitor files).
    One case per place a refusal comes from in ``examples/train.py``: the HF model/tokenizer/data loading
    (``model``: an HFModelError, ``jsonl``: a DataError; both leave through the same ``refuse``), the flag check
    (``size_flag``) and argparse (``flag_value``). The other messages of that same path are checked in this
    process, ~12 s of CI each saved: a ``--seq_len`` beyond the positions by
    ``test_refusals_name_the_problem[seq_len]``; two forms in one line, an empty text file and an empty
    tokenizer directory by ``test_train_flags.py::test_bad_input_messages``."""
    from conftest import ds_ext_run
    data = e2e_data(tmp_path / "data")
    args = ["--model", str(model_dir), "--data", str(data), "--seq_len", "64", "--save_hf", str(tmp_path / "out")]
    if case == "model":
        args[1], message = "Qwen/Qwen2.5-0.5B", "not a directory"
    elif case == "jsonl":
        line = len((data / "mixed.jsonl").read_text().splitlines()) + 1
        with open(data / "mixed.jsonl", "a") as f:
            f.write(json.dumps({"txt": "no known field"}) + "\n")
        message = f"mixed.jsonl:{line}: no known field (keys: txt)"
    elif case == "size_flag":
        args += ["--layers", "2"]
        message = "--layers size the reference model and have no effect with --model DIR"
    else:
        args += ["--lr", "-1"]
        message = "argument --lr: must be > 0, got -1"
    journal = tmp_path / "journal"
    cfg = {**BF16_BASE, "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "x"},
           "ds_ext": {"recovery": {"journal_dir": str(journal)}}}
    (tmp_path / "bad.json").write_text(json.dumps(cfg))
    from pathlib import Path
    proc = ds_ext_run(["--num_procs", "2", "--config", tmp_path / "bad.json",
                       Path(__file__).resolve().parents[1] / "examples" / "train.py"] + args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and out.count(message) == 1, (proc.returncode, message, out[-3000:])
    assert not (tmp_path / "out").exists() and not journal.exists() and not (tmp_path / "csv").exists()


@pytest.mark.slow
def test_ds_ext_bf16_two_stage_pipeline_streambp_on_4096_token_packed_rows(tmp_path):
    """#17's pipeline run through ``ds-ext``: a generated Qwen2 directory (positions up to 4096) as a 2-stage
    ``PipelineModule`` with StreamBP in each stage, bf16, ``--seq_len 4096`` rows packed from JSONL + text
    documents (each row holds many documents: the chunks cross document boundaries), with the journal and
    CheckFree: stage 1 fails after step 4 (memory and disk wiped) and is rebuilt from its partner stage 0 and the
    replica of its norm and head. The loss still falls; the ``--save_hf`` output (gathered from both stages) loads with ``from_pretrained``; ``export --hf`` of
    the pipeline journal (each stage replayed, names mapped to HF) gives exactly the weights ``--save_hf`` wrote:
    the fp32 masters (each stage's gathered from its bf16 optimizer), not their bf16 copies."""
    from transformers import AutoModelForCausalLM
    model = make_model_dir(tmp_path / "model", qwen2_config(max_position_embeddings=4096))
    data = e2e_data(tmp_path / "data")
    config = {**BF16_BASE, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "ds_ext": {"topology": {"pipeline_stages": 2}, "streambp": {"enabled": True, "chunk_size": 512},
                         "recovery": {"journal_dir": str(tmp_path / "j_pipe"), "base_interval": 4,
                                      "checkpoint_free": {"enabled": True, "replicate_ends_interval": 1,
                                                          "inject": {"at": [{"step": 4, "stage": 1}]}}}}}
    proc = ds_ext_train(tmp_path, "pipe", config, [
        "--model", str(model), "--data", str(data), "--seq_len", "4096", "--max_steps", "8", "--eval_interval",
        "1000", "--eval_batches", "1", "--save_hf", "pipe_hf"])
    s = summary_of(proc)
    assert s["streambp/streamed_layers"] == 1, s  # 2 decoder layers, one per stage
    assert s["checkpoint_free/failures"] == 1, s
    assert "checkpoint_free rank 1 rebuilt by partner from rank(s) [0]" in proc.stdout + proc.stderr
    # 8 steps at lr 3e-3 on a repeated corpus: the first step's loss is ~ln(320) = 5.8; a fall of 0.3 is well
    # outside step-to-step noise (~0.05 on these packed rows)
    assert s["last_loss"] < s["first_loss"] - 0.3, s
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pipe_hf")
    assert loaded.config.num_hidden_layers == 2
    export(tmp_path / "j_pipe", tmp_path / "pipe_export")
    saved, exported = weights(tmp_path / "pipe_hf"), weights(tmp_path / "pipe_export")
    assert saved.keys() == exported.keys()
    assert json.loads((tmp_path / "pipe_hf" / "config.json").read_text())["dtype"] == "float32"
    for name in saved:
        assert torch.equal(exported[name], saved[name]), name
    head = saved["lm_head.weight"]
    assert not torch.equal(head, head.to(torch.bfloat16).float())  # masters, not the bf16 copies
