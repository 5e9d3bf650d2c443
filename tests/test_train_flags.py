"""``examples/train.py`` as an HF Trainer user drives it: flags over the DeepSpeed JSON (``ds_ext.train_flags``),
the effective config, held-out ``--eval_data``, ``--no_packing``, periodic HF saves of the fp32 master weights, one
run directory per run, and refusals printed once.

Fast tests call the pieces in this process; the ``slow`` ones run ``ds-ext`` with 2 processes on a generated
Qwen2 directory (:mod:`hf_dirs`) and compare with the journal's ``export --hf`` and with an in-test forward.
"""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hf_dirs import CORPUS, make_model_dir

from ds_ext.config import load_config_file
from ds_ext.data import DataError, build_datasets, pack_examples
from ds_ext.models.hf import HFModelError, load_tokenizer
from ds_ext.train_flags import (FlagError, override_config, rotate_checkpoints, run_name, set_run_name,
                                set_total_steps, steps_for_epochs)

ROOT = Path(__file__).resolve().parents[1]


def train_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def warmup_lrs(scheduler: dict, lr: float, steps: int) -> list:
    """The learning rate each of the first ``steps`` optimizer steps uses under DeepSpeed's own scheduler class
    built from ``scheduler`` (the engine steps it after every optimizer step)."""
    from deepspeed.runtime import lr_schedules
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = getattr(lr_schedules, scheduler["type"])(opt, **scheduler["params"])
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# -- the effective config ---------------------------------------------------------------------------------------
def test_flags_override_the_json_keys():
    base = load_config_file(str(ROOT / "configs" / "baseline.json"))
    cfg = override_config({**base, "train_batch_size": 16}, lr=1e-3, warmup_steps=5, gradient_accumulation_steps=3)
    assert cfg["optimizer"]["params"]["lr"] == 1e-3 and cfg["gradient_accumulation_steps"] == 3
    assert "train_batch_size" not in cfg  # DeepSpeed derives it from micro x accumulation x ranks
    assert cfg["scheduler"]["params"] == {"warmup_min_lr": 1e-3 / 5, "warmup_max_lr": 1e-3, "warmup_num_steps": 5}
    assert base["optimizer"]["params"]["lr"] == 3e-3  # the loaded JSON itself is untouched
    assert warmup_lrs(cfg["scheduler"], 1e-3, 8)[0] > 0
    assert override_config(base) == base
    # no scheduler in the JSON: --warmup_steps adds a WarmupLR up to the optimizer's lr; 0 steps: lr from step 1
    plain = {k: v for k, v in base.items() if k != "scheduler"}
    assert override_config(plain, warmup_steps=4)["scheduler"]["params"]["warmup_max_lr"] == 3e-3
    assert set(warmup_lrs(override_config(base, lr=2e-3, warmup_steps=0)["scheduler"], 2e-3, 3)) == {2e-3}
    decay = {**base, "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}}}
    set_total_steps(decay, 77)
    assert decay["scheduler"]["params"]["total_num_steps"] == 77
    with pytest.raises(FlagError, match="scheduler.type 'OneCycle' sets its own"):
        override_config({**base, "scheduler": {"type": "OneCycle", "params": {}}}, lr=1e-3)
    with pytest.raises(FlagError, match="no 'optimizer' block"):
        override_config({"train_micro_batch_size_per_gpu": 1}, lr=1e-3)
    assert steps_for_epochs(1.5, rows=40, micro=2, shards=2, gas=2) == 8  # 10 micro-batches/shard, 5 steps/epoch
    with pytest.raises(FlagError, match="less than one optimizer step"):
        steps_for_epochs(1, rows=3, micro=2, shards=2, gas=1)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.json")), ids=lambda p: p.name)
def test_shipped_warmup_does_not_start_at_zero(path):
    cfg = load_config_file(str(path))
    if (cfg.get("scheduler") or {}).get("type") in ("WarmupLR", "WarmupDecayLR"):
        lrs = warmup_lrs(cfg["scheduler"], cfg["optimizer"]["params"]["lr"], 3)
        assert min(lrs) > 0, lrs


def test_help_shows_every_default_and_useless_flags_are_refused():
    script = train_script()
    parser = script.build_parser()
    text = parser.format_help()
    body = text[text.index("\noptions:"):]  # the flag list, after the usage line and the description
    for action in parser._actions:
        if action.dest == "help":
            continue
        entry = body[body.index("\n  " + action.option_strings[0]) + 3:]
        entry = entry[:entry.index("\n  -")] if "\n  -" in entry else entry
        assert "default:" in entry, entry

    def refused(argv, match):
        args = parser.parse_args(argv)
        with pytest.raises(FlagError, match=match):
            script.check_flags(args, script.given_flags(argv))
    refused(["--model", "m", "--layers", "2", "--hidden", "64"], "--layers, --hidden size the reference model")
    refused(["--no_packing"], "--no_packing need an HF model")
    refused(["--model", "m", "--epochs", "1", "--max_steps", "5"], "give one")
    refused(["--model", "m", "--save_hf_interval", "5"], "needs --save_hf DIR")
    script.check_flags(parser.parse_args(["--model", "m", "--epochs", "2"]), script.given_flags(["--model", "m",
                                                                                                "--epochs", "2"]))


def test_run_names_and_checkpoint_rotation(tmp_path):
    cfg = {"csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "job"},
           "tensorboard": {"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "job"}}
    first = set_run_name(dict(cfg, csv_monitor=dict(cfg["csv_monitor"])), run_name(cfg, now=0))
    for d in first:
        Path(d).mkdir(parents=True)
    second = run_name(cfg, now=0)  # the same second: a suffix, not the same directory
    assert second != Path(first[0]).name and second.startswith("job-")
    assert run_name(cfg, "mine") == "mine"
    assert run_name(cfg, reuse_latest=True) == Path(first[0]).name  # a torch-elastic restart continues its run
    for step in (5, 10, 15):
        (tmp_path / "hf" / f"checkpoint-{step}").mkdir(parents=True)
    assert [Path(p).name for p in rotate_checkpoints(str(tmp_path / "hf"), 2)] == ["checkpoint-5"]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["checkpoint-10", "checkpoint-15"]


# -- data: held-out file, no packing, messages --------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("qwen2"))


SENTENCES = [s.strip() for s in CORPUS.replace("\n", " ").split(".") if s.strip()]


def write_data(root: Path) -> tuple:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    (root / "eval.jsonl").write_text("".join(json.dumps({"prompt": s[:12], "completion": s[12:]}) + "\n"
                                             for s in SENTENCES[:8]))
    return root / "train.jsonl", root / "eval.jsonl"


def test_eval_data_and_no_packing_rows(tmp_path, model_dir):
    tokenizer = load_tokenizer(str(model_dir))
    train_file, eval_file = write_data(tmp_path)
    train, held = build_datasets(str(train_file), tokenizer, 32, 2, eval_path=str(eval_file))
    assert torch.equal(train.rows, pack_examples(str(train_file), tokenizer, 32))  # all of --data trains
    assert torch.equal(held.rows, pack_examples(str(eval_file), tokenizer, 32))
    rows = pack_examples(str(train_file), tokenizer, 128, packing=False)
    packed = pack_examples(str(train_file), tokenizer, 128)
    # one document per row: positions restart only at column 0 (padding is one more "document" at the end)
    for ids, labels, pos in rows:
        starts = (pos == 0).nonzero().flatten().tolist()
        assert starts[0] == 0 and (len(starts) == 1 or (labels[starts[1]:] == -100).all())
    assert len(rows) == len(SENTENCES) > len(packed)  # every sentence fits one 128-token row
    need = len(held) + 1
    with pytest.raises(DataError, match=f"--eval_data .*eval.jsonl: {len(held)} rows of --seq_len 32; at least {need}"):
        build_datasets(str(train_file), tokenizer, 32, need, eval_path=str(eval_file))


@pytest.mark.parametrize("case", ["empty_txt", "empty_jsonl", "two_forms", "empty_tokenizer"])
def test_bad_input_messages(tmp_path, model_dir, case):
    if case == "empty_tokenizer":
        (tmp_path / "tok").mkdir()
        with pytest.raises(HFModelError, match=r"--tokenizer .*tok: no tokenizer files in this directory") as e:
            load_tokenizer(str(tmp_path / "tok"))
        assert "pass --tokenizer" not in str(e.value)
        return
    from ds_ext.data import read_examples
    path = tmp_path / ("a.txt" if case == "empty_txt" else "a.jsonl")
    path.write_text({"empty_txt": "\n  \n", "empty_jsonl": "\n",
                     "two_forms": '{"text": "x"}\n{"text": "t", "prompt": "p", "completion": "c"}\n'}[case])
    message = {"empty_txt": r"a.txt: empty file \(no text\)", "empty_jsonl": r"a.jsonl: empty file \(no JSON line\)",
               "two_forms": r"a.jsonl:2: fields of 2 forms \('completion', 'prompt', 'text'\)"}[case]
    with pytest.raises(DataError, match=message):
        read_examples(str(path))


# -- end to end ---------------------------------------------------------------------------------------------------
BF16 = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 6,
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0, "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-4, "warmup_max_lr": 3e-3,
                                                     "warmup_num_steps": 30}}}


def launch(tmp_path, config: dict, argv: list):
    from conftest import ds_ext_run
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.json')))}.json"
    path.write_text(json.dumps(config))
    return ds_ext_run(["--config", path, ROOT / "examples" / "train.py"] + argv, timeout=400)


def read_csv(run_dir: Path, name: str) -> dict:
    with open(run_dir / f"{name}.csv") as f:
        return {int(row[0]): float(row[1]) for row in list(csv.reader(f))[1:]}


def weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_flags_in_a_bf16_run_and_hf_saves_equal_the_journal_export(tmp_path, model_dir):
    """bf16 ZeRO-1 on 2 processes, 12 steps with ``--lr --warmup_steps --gradient_accumulation_steps --eval_data
    --eval_interval 4 --save_hf_interval 5``: the effective config (printed, saved in the run directory) holds each
    flag; the learning rate of every step is DeepSpeed's WarmupLR of those values (the CSV monitor); eval loss is
    measured at steps 4, 8, 12 on the held-out file's rows; ``checkpoint-5``, ``checkpoint-10`` and the final
    directory load with ``from_pretrained``, say float32, and equal the journal's fp32 export of the same step bit
    for bit (the fp32 master weights, not their bf16 copies)."""
    from transformers import AutoModelForCausalLM
    train_file, eval_file = write_data(tmp_path / "data")
    config = {**BF16, "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "flags"},
              "ds_ext": {"recovery": {"journal_dir": str(tmp_path / "journal"), "base_interval": 4,
                                      "keep_bases": 8}}}  # every base kept: steps 5 and 10 stay exportable
    proc = launch(tmp_path, config, [
        "--model", model_dir, "--data", train_file, "--eval_data", eval_file, "--seq_len", 32, "--max_steps", 12,
        "--lr", 2e-3, "--warmup_steps", 4, "--gradient_accumulation_steps", 2, "--eval_interval", 4,
        "--save_hf", tmp_path / "hf", "--save_hf_interval", 5, "--save_hf_total_limit", 2])
    from conftest import run_summary
    summary = run_summary(proc)
    run_dir = Path(summary["run_dirs"][0])
    assert run_dir.parent == tmp_path / "csv" and run_dir.name.startswith("flags-")
    assert proc.stdout.count("effective config (in ") == 1
    effective = json.loads((run_dir / "effective_config.json").read_text())
    ds = effective["deepspeed_config"]
    assert ds["optimizer"]["params"]["lr"] == 2e-3 and ds["gradient_accumulation_steps"] == 2
    assert ds["scheduler"]["params"] == {"warmup_min_lr": 2e-3 / 4, "warmup_max_lr": 2e-3, "warmup_num_steps": 4}
    want = warmup_lrs(ds["scheduler"], 2e-3, 12)
    got = read_csv(run_dir, "Train_lr")
    assert [got[k] for k in range(1, 13)] == pytest.approx(want, rel=1e-12)  # the same float math; CSV text
    assert want[0] > 0 and want[-1] == 2e-3
    assert sorted(read_csv(run_dir, "Eval_loss")) == [4, 8, 12]
    assert summary["eval_rows"] == len(pack_examples(str(eval_file), load_tokenizer(str(model_dir)), 32))
    # 2 accumulation steps: each step consumed 2 micro-batches of 2 rows per rank (the journal's own step count)
    assert summary["steps"] == 12 and summary["recovery/records"] == 12
    assert sorted(p.name for p in (tmp_path / "hf").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    for step, saved in ((5, tmp_path / "hf" / "checkpoint-5"), (10, tmp_path / "hf" / "checkpoint-10"),
                        (12, tmp_path / "hf")):
        assert json.loads((saved / "config.json").read_text())["dtype"] == "float32"
        AutoModelForCausalLM.from_pretrained(saved)
        from ds_ext.recovery.__main__ import main as recovery_main
        assert recovery_main(["export", str(tmp_path / "journal"), "--hf", str(tmp_path / f"export{step}"),
                              "--step", str(step)]) == 0
        a, b = weights(saved), weights(tmp_path / f"export{step}")
        assert a.keys() == b.keys() and all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a), step
    bf16_copy = weights(tmp_path / "hf")["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(bf16_copy, bf16_copy.to(torch.bfloat16).float())  # masters, not bf16-rounded


@pytest.mark.slow
def test_two_runs_same_config_two_run_dirs_no_packing_epochs_eval_file(tmp_path, model_dir):
    """fp32, 2 processes, the same config twice with ``--no_packing --epochs 1 --eval_data``: two run
    directories; one training row per document; the steps of one epoch; the first eval loss is the initial
    model's mean loss on the held-out file (one micro-batch of its rows, computed here)."""
    from ds_ext.models.hf import HFCausalLM, load_hf_model
    from conftest import run_summary
    train_file, eval_file = write_data(tmp_path / "data")
    tokenizer = load_tokenizer(str(model_dir))
    (tmp_path / "eval2.jsonl").write_text("".join(eval_file.read_text().splitlines(True)[:2]))  # 2 rows = 1 batch
    config = {**BF16, "bf16": {"enabled": False},
              "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "same"}}
    argv = ["--model", model_dir, "--data", train_file, "--eval_data", tmp_path / "eval2.jsonl", "--seq_len", 128,
            "--no_packing", "--epochs", 1, "--eval_interval", 1000]
    runs = [run_summary(launch(tmp_path, config, argv)) for _ in range(2)]
    dirs = {r["run_dirs"][0] for r in runs}
    assert len(dirs) == 2 and all((Path(d) / "Train_loss.csv").is_file() for d in dirs)
    rows = pack_examples(str(train_file), tokenizer, 128, packing=False)
    assert runs[0]["train_rows"] == len(rows) == len(SENTENCES)  # every sentence fits one 128-token row
    assert len(pack_examples(str(train_file), tokenizer, 128)) < len(rows)  # packing would have shared rows
    assert runs[0]["steps"] == runs[0]["max_steps"] == len(rows) // 2 // 2  # rows / shards / micro, gas 1
    model = HFCausalLM(load_hf_model(str(model_dir)))
    held = pack_examples(str(tmp_path / "eval2.jsonl"), tokenizer, 128, packing=False)
    assert len(held) == 2
    with torch.no_grad():
        want = model(held[:, 0], held[:, 1], held[:, 2]).item()
    assert runs[0]["eval_loss_start"] == pytest.approx(want, rel=1e-5)  # fp32, other summation order only
