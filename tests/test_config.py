"""The "ds_ext" config block: parsing, error messages that name the JSON path, cross-feature rules, the CLI."""
import json
import subprocess
import sys

import pytest

from ds_ext.config import (DsExtConfig, DsExtConfigError, check_file, parse_ext_config, parse_megatron_config,
                           validate_compat)


def problems_of(cfg) -> list:
    with pytest.raises(DsExtConfigError) as info:
        parse_ext_config(cfg)
    return info.value.problems


def test_missing_or_empty_block_means_every_feature_off():
    for cfg in ({}, {"ds_ext": {}}, {"train_batch_size": 8}):
        ext = parse_ext_config(cfg)
        assert ext.topology.ranks_per_replica is None and ext.topology.pipeline_stages == 1
        assert not ext.any_feature_enabled


@pytest.mark.parametrize("section", ["noloco", "streambp", "prefix_grouper", "asyncflow"])
def test_any_feature_enabled_sees_every_section(section):
    assert parse_ext_config({"zero_optimization": {"stage": 1}, "ds_ext": {section: {"enabled": True}}}
                            ).any_feature_enabled


def test_rollout_workers_key_parses_and_refuses_a_negative_count():
    assert parse_ext_config({"ds_ext": {"asyncflow": {"rollout_workers": 2}}}).asyncflow.rollout_workers == 2
    assert parse_ext_config({"ds_ext": {}}).asyncflow.rollout_workers is None  # the process count decides
    [(path, message)] = problems_of({"ds_ext": {"asyncflow": {"rollout_workers": -1}}})
    assert path == "ds_ext.asyncflow.rollout_workers" and "-1" in message


@pytest.mark.parametrize("block, path, fragment", [
    ({"topolgy": {}}, "ds_ext.topolgy", "unknown key 'topolgy'; allowed keys: asyncflow, noloco, prefix_grouper, recovery, streambp, topology"),
    ({"topology": {"stages": 2}}, "ds_ext.topology.stages", "allowed keys: pipeline_stages, ranks_per_replica"),
    ({"topology": {"ranks_per_replica": "2"}}, "ds_ext.topology.ranks_per_replica", 'got "2"'),
    ({"topology": {"ranks_per_replica": 1.5}}, "ds_ext.topology.ranks_per_replica", "valid integer"),
    ({"topology": {"ranks_per_replica": 0}}, "ds_ext.topology.ranks_per_replica", "greater than or equal to 1"),
    ({"topology": {"pipeline_stages": -1}}, "ds_ext.topology.pipeline_stages", "got -1"),
    ({"topology": []}, "ds_ext.topology", "got []"),
])
def test_bad_values_name_path_value_and_what_is_allowed(block, path, fragment):
    problems = problems_of({"ds_ext": block})
    assert [p for p, _ in problems] == [path]
    assert fragment in problems[0][1]


def test_every_problem_is_reported_at_once():
    problems = problems_of({"ds_ext": {"topology": {"ranks_per_replica": 0, "pipeline_stages": "x", "z": 1}}})
    assert sorted(p for p, _ in problems) == ["ds_ext.topology.pipeline_stages", "ds_ext.topology.ranks_per_replica",
                                               "ds_ext.topology.z"]


def test_block_must_be_an_object():
    assert problems_of({"ds_ext": 3}) == [("ds_ext", "got 3: must be a JSON object")]


@pytest.mark.parametrize("ds_config, ext_block, path", [
    ({"zero_optimization": {"stage": 2}}, {"topology": {"pipeline_stages": 2}}, "ds_ext.topology.pipeline_stages"),
    ({"zero_optimization": {"stage": 3}}, {"topology": {"pipeline_stages": 4}}, "ds_ext.topology.pipeline_stages"),
    ({}, {"topology": {"pipeline_stages": 2, "ranks_per_replica": 3}}, "ds_ext.topology.ranks_per_replica"),
    # a PipelineModule's forward has no per-call attention_fn (used to fail at attach time with a plain ValueError)
    ({"zero_optimization": {"stage": 1}}, {"prefix_grouper": {"enabled": True}, "topology": {"pipeline_stages": 2}},
     "ds_ext.prefix_grouper.enabled"),
    # ZeRO-3 shards the parameters too; checkpoint-free rebuilds cover ZeRO-0/1/2 only (used to take ZeRO-0's path)
    ({"zero_optimization": {"stage": 3}}, {"recovery": {"checkpoint_free": {"enabled": True}}},
     "ds_ext.recovery.checkpoint_free.enabled"),
])
def test_validate_compat_refuses_incompatible_combinations(ds_config, ext_block, path):
    ext = DsExtConfig(**ext_block)
    assert [p for p, _ in validate_compat(ds_config, ext)] == [path]
    assert [p for p, _ in problems_of(dict(ds_config, ds_ext=ext_block))] == [path]


@pytest.mark.parametrize("ds_config, ext_block", [
    ({"zero_optimization": {"stage": 1}}, {"topology": {"pipeline_stages": 2}}),
    ({"zero_optimization": {"stage": 2}}, {"topology": {"ranks_per_replica": 2}}),
    ({}, {"topology": {"pipeline_stages": 2, "ranks_per_replica": 4}}),
    ({"zero_optimization": {"stage": 1}}, {"prefix_grouper": {"enabled": True}, "streambp": {"enabled": True}}),
    ({"zero_optimization": {"stage": 2}}, {"recovery": {"checkpoint_free": {"enabled": True}}}),
    ({}, {"recovery": {"checkpoint_free": {"enabled": True}}, "topology": {"pipeline_stages": 4}}),
])
def test_validate_compat_allows_compatible_combinations(ds_config, ext_block):
    assert validate_compat(ds_config, DsExtConfig(**ext_block)) == []


def test_file_errors_are_config_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"ds_ext": {"topology": {}},}')
    with pytest.raises(DsExtConfigError, match="malformed JSON at line 1"):
        check_file(bad)
    with pytest.raises(DsExtConfigError, match="cannot read file"):
        check_file(tmp_path / "missing.json")


def given_values(block: dict, model, path: str = "ds_ext") -> list:
    """``(json path, value in the file, value the parsed model holds)`` for every leaf the file sets."""
    out = []
    for key, value in block.items():
        held = getattr(model, key)
        if isinstance(value, dict):
            out += given_values(value, held, f"{path}.{key}")
        else:
            if isinstance(value, list) and value and isinstance(value[0], dict):  # a list of sections: its items
                for i, (item, model_item) in enumerate(zip(value, held)):
                    out += given_values(item, model_item, f"{path}.{key}[{i}]")
                out.append((f"{path}.{key}.length", len(value), len(held)))
            else:
                out.append((f"{path}.{key}", value, held))
    return out


def test_shipped_configs_parse_to_the_values_they_set(repo_root):
    """Every shipped config passes the check, and the parsed block holds each value the file sets (a key read
    from the wrong place, or dropped, fails); the megatron configs by the megatron rules."""
    files = sorted((repo_root / "configs").glob("*.json"))
    assert {f.name for f in files} >= {"baseline.json", "noloco.json", "all.json", "checkfree.json"}
    for f in files:
        parsed = check_file(f)
        block = json.loads(f.read_text())["ds_ext"]
        wrong = [(k, v, h) for k, v, h in given_values(block, parsed) if v != h]
        assert wrong == [], f"{f.name}: (path, file value, parsed value)"
        assert given_values(block, parsed) or f.name in ("baseline.json", "zero2.json"), \
            f"{f.name} sets no ds_ext key (only the stock configs have an empty block)"


@pytest.mark.slow
def test_check_cli_exit_codes(tmp_path, repo_root):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ds_ext": {"topology": {"ranks_per_replica": "two"}}}))
    cmd = [sys.executable, "-m", "ds_ext.config", "check"]
    ok = subprocess.run(cmd + [str(repo_root / "configs" / "baseline.json")], capture_output=True, text=True)
    assert ok.returncode == 0 and "baseline.json: ok" in ok.stdout
    res = subprocess.run(cmd + [str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert 'ds_ext.topology.ranks_per_replica: got "two"' in res.stderr


def test_an_enabled_monitor_without_its_package_is_refused_and_one_with_it_passes(tmp_path, capsys):
    """DeepSpeed imports a monitor's package only inside the engine on rank 0 (wandb: ``import wandb``); the check
    finds it missing before anything starts. wandb is not installed here, tensorboard is (a dependency of the
    test environment); csv needs nothing; a disabled monitor is never asked for."""
    import importlib.util
    from ds_ext.config.__main__ import main
    assert importlib.util.find_spec("wandb") is None and importlib.util.find_spec("tensorboard") is not None
    bad, good = tmp_path / "wandb.json", tmp_path / "tb.json"
    bad.write_text(json.dumps({"wandb": {"enabled": True, "project": "p"}, "comet": {"enabled": False}}))
    good.write_text(json.dumps({"tensorboard": {"enabled": True, "output_path": str(tmp_path / "tb")},
                                "csv_monitor": {"enabled": True}, "wandb": {"enabled": False}}))
    with pytest.raises(DsExtConfigError) as info:
        check_file(bad)
    assert [p for p, _ in info.value.problems] == ["wandb.enabled"]
    assert main(["check", str(bad), str(good)]) == 2
    err = capsys.readouterr()
    assert f"{good}: ok" in err.out and str(bad) in err.err
    assert "the wandb monitor is on but its package 'wandb' is not installed: pip install wandb, or set " \
           "wandb.enabled to false" in err.err
    assert not (tmp_path / "tb").exists()  # checking creates nothing


# -- megatron configs: a "megatron" section next to "ds_ext", no DeepSpeed keys -----------------------------------

def test_megatron_config_with_a_journal_passes_check(repo_root):
    """Regression: check_file read a megatron config as a DeepSpeed config without zero_optimization (ZeRO-0) and
    refused its journal; the megatron rules see the distributed optimizer as ZeRO-1."""
    ext = check_file(repo_root / "configs" / "megatron_recovery.json")
    assert ext.recovery.active and ext.noloco.enabled


def test_megatron_check_does_not_import_megatron_core(repo_root):
    code = ("import sys; from ds_ext.config import check_file; check_file('configs/megatron_recovery.json'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron' or m.startswith('ds_ext.megatron')))")
    res = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("block, path", [
    ({"recovery": {"checkpoint_free": {"enabled": True}}}, "ds_ext.recovery.checkpoint_free.enabled"),
    ({"asyncflow": {"enabled": True}}, "ds_ext.asyncflow.enabled"),
    ({"topology": {"pipeline_stages": 2, "ranks_per_replica": 2}}, "ds_ext.topology.pipeline_stages"),
])
def test_megatron_refuses_what_it_would_ignore(block, path):
    with pytest.raises(DsExtConfigError) as info:
        parse_megatron_config({"megatron": {}, "ds_ext": block}, "m.json")
    [(got_path, message)] = info.value.problems
    assert got_path == path and "not supported on megatron-core" in message and info.value.source == "m.json"
    parse_ext_config({"zero_optimization": {"stage": 1}, "ds_ext": block})  # the DeepSpeed path accepts each one


def test_megatron_config_keeps_the_cross_feature_rules():
    with pytest.raises(DsExtConfigError) as info:  # the same rules as a DeepSpeed config, at megatron's ZeRO-1
        parse_megatron_config({"megatron": {}, "ds_ext": {"noloco": {"enabled": True, "inner_steps": 0}}})
    assert [p for p, _ in info.value.problems] == ["ds_ext.noloco.inner_steps"]


def test_megatron_config_refuses_deepspeed_keys(tmp_path):
    bad = tmp_path / "mixed.json"
    bad.write_text(json.dumps({"megatron": {"lr": 0.1}, "zero_optimization": {"stage": 2}, "ds_ext": {}}))
    with pytest.raises(DsExtConfigError) as info:
        check_file(bad)
    [(path, message)] = info.value.problems
    assert path == "zero_optimization" and 'holds only "megatron" and "ds_ext"' in message


# -- the docs against the code ----------------------------------------------------------------------------------

def test_config_reference_page_is_generated_from_the_models(repo_root):
    """docs/config.md is ``python -m ds_ext.config docs``'s output: a field added, removed or re-documented in a
    model without regenerating the page fails here."""
    from ds_ext.config.reference import render
    page = (repo_root / "docs" / "config.md").read_text(encoding="utf-8")
    assert page == render(), "docs/config.md is stale: run `python -m ds_ext.config docs`"


def test_every_config_key_is_documented_with_type_and_default():
    from ds_ext.config import DsExtConfig
    from ds_ext.config.reference import rows
    table = list(rows(DsExtConfig))
    assert len(table) >= 50, "the walk lost sections"
    assert [key for key, _, _, meaning in table if not meaning] == [], "config fields without a docstring"
    by_key = {key: (kind, default) for key, kind, default, _ in table}
    # values read back from the models themselves: bounds, nullability, literals, list items, required fields
    assert by_key["ds_ext.noloco.inner_steps"] == ("int >= 1", "`50`")
    assert by_key["ds_ext.noloco.outer_momentum"] == ("float >= 0 and < 1 or null", "`null`")
    assert by_key["ds_ext.noloco.mode"] == ('`"noloco"` or `"diloco"`', '`"noloco"`')
    assert by_key["ds_ext.recovery.checkpoint_free.inject.at[].step"][1] == "required"
    assert by_key["ds_ext.recovery.checkpoint_free.inject.at"] == ("list of objects", "`[]`")


def test_shipped_config_list_is_the_configs_directory_and_each_passes_check(repo_root):
    import re
    readme = (repo_root / "docs" / "configs.md").read_text(encoding="utf-8")
    start = readme.index("Shipped configs")
    end = readme.find("\n\n", start)
    paragraph = readme[start:end if end >= 0 else len(readme)]
    listed = set(re.findall(r"`([\w.-]+\.json)`", paragraph))
    files = sorted(f.name for f in (repo_root / "configs").glob("*.json"))
    assert sorted(listed) == files
    res = subprocess.run([sys.executable, "-m", "ds_ext.config", "check", *files], cwd=repo_root / "configs",
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [line for line in res.stdout.splitlines() if line.endswith(": ok")] == [f"{f}: ok" for f in files]
