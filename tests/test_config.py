"""The "ds_ext" config block: parsing, error messages that name the JSON path, cross-feature rules, the CLI."""
import json
import subprocess
import sys

import pytest

from ds_ext.config import DsExtConfig, DsExtConfigError, check_file, parse_ext_config, validate_compat


def problems_of(cfg) -> list:
    with pytest.raises(DsExtConfigError) as info:
        parse_ext_config(cfg)
    return info.value.problems


def test_missing_or_empty_block_means_every_feature_off():
    for cfg in ({}, {"ds_ext": {}}, {"train_batch_size": 8}):
        ext = parse_ext_config(cfg)
        assert ext.topology.ranks_per_replica is None and ext.topology.pipeline_stages == 1
        assert not ext.any_feature_enabled


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
])
def test_validate_compat_refuses_incompatible_combinations(ds_config, ext_block, path):
    ext = DsExtConfig(**ext_block)
    assert [p for p, _ in validate_compat(ds_config, ext)] == [path]
    assert [p for p, _ in problems_of(dict(ds_config, ds_ext=ext_block))] == [path]


@pytest.mark.parametrize("ds_config, ext_block", [
    ({"zero_optimization": {"stage": 1}}, {"topology": {"pipeline_stages": 2}}),
    ({"zero_optimization": {"stage": 2}}, {"topology": {"ranks_per_replica": 2}}),
    ({}, {"topology": {"pipeline_stages": 2, "ranks_per_replica": 4}}),
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


def test_shipped_configs_are_valid(repo_root):
    files = sorted((repo_root / "configs").glob("*.json"))
    assert len(files) >= 4
    for f in files:
        config = json.loads(f.read_text())
        if "megatron" in config:  # examples/megatron_train.py: megatron's distributed optimizer stands for ZeRO-1
            from ds_ext.megatron.model import parse_ds_ext
            parse_ds_ext(f)
        else:
            check_file(f)
        assert "ds_ext" in config, f"{f.name} should show where the ds_ext block goes"


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
