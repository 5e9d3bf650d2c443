"""``python -m ds_ext.recovery export`` of journals written with CheckFree on (pipeline stages, end-stage replicas,
an injected failure): every record holds a ``checkpoint_free`` payload; the exporter replays it as the feature
declares through the contract (``journal_export``), so the exported weights are the run's own at that step, in both
forms: the HF directory and the DeepSpeed pipeline checkpoint, which a stock ``PipelineEngine`` loads. A payload of a
feature that cannot be replayed stops the export, naming the feature; so does a pipeline journal without the
recorded layout the DeepSpeed form needs."""
import pytest
import torch

from dist import run_distributed

transformers = pytest.importorskip("transformers", reason="transformers is the optional [hf] extra")


def text_batch(step: int, micro: int, batch: int = 2, length: int = 16):
    """A batch ``((input_ids, position_ids), labels)`` of byte windows of a fixed text (vocabulary 320)."""
    g = torch.Generator().manual_seed(step * 101 + micro)
    ids = torch.randint(0, 320, (batch, length), generator=g)
    return (ids, torch.arange(length).expand_as(ids)), ids


def _ds_config(stages: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": stages,
            "steps_per_print": 10 ** 9, "zero_optimization": {"stage": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}}}


def _run_body(model_dir: str, stages: int, steps: int, runs: dict):
    """An HF model directory as ``stages`` pipeline stages (one process each; ZeRO-1, AdamW, fp32) with the journal
    and CheckFree, trained once per entry of ``runs`` (name -> (journal_dir, checkfree: the rest of its section,
    snapshot_at)), one after the other in the same processes (each run its own model, engine and journal). Per run:
    at each step of ``snapshot_at`` the whole model's weights under HF names, gathered as ``--save_hf`` gathers
    them (rank 0; None elsewhere), and the engine's metrics."""
    import deepspeed
    import ds_ext
    from ds_ext.models.hf import hf_export_meta
    from ds_ext.models.hf_pipeline import gather_hf_state_dict, hf_pipeline
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for name, (journal_dir, checkfree, snapshot_at) in runs.items():
        config = {**_ds_config(stages),
                  "ds_ext": {"topology": {"pipeline_stages": stages},
                             "recovery": {"journal_dir": journal_dir, "base_interval": 3,
                                          "checkpoint_free": {"enabled": True, **checkfree}}}}
        topo = ds_ext.build_topology(config)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        pipe = hf_pipeline(model, topo, hf_meta=hf_export_meta(model.config, model_dir, model_dir))
        engine, *_ = ds_ext.initialize(model=pipe, model_parameters=pipe.parameters(), config=config, topology=topo)
        snapshots = {}
        for step in range(1, steps + 1):
            engine.train_batch(iter([text_batch(step, m) for m in range(stages)]))
            if step in snapshot_at:
                snapshots[step] = gather_hf_state_dict(engine.module, topo, model.config.num_hidden_layers,
                                                       model.config.tie_word_embeddings)
        out[name] = {"snapshots": snapshots, "metrics": engine.ds_ext_metrics()}
        engine.ds_ext_close()
    return out


def _load_body(model_dir: str, stages: int, checkpoints: dict):
    """A stock DeepSpeed ``PipelineEngine`` of the same model and stage count (DeepSpeed's own pipe x data layout,
    no ds_ext) loads each exported checkpoint in turn (``checkpoints``: key -> directory, tag from its ``latest``),
    module weights and ZeRO optimizer partitions. Per key: the engine's step counter, this rank's module weights
    under HF names, and the fp32 masters as ``--save_hf`` gathers them (rank 0)."""
    import deepspeed
    from ds_ext.models.hf_pipeline import gather_hf_state_dict, hf_pipeline, pipeline_to_hf_key
    from ds_ext.topology import Topology
    deepspeed.init_distributed(dist_backend="gloo")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layers, tied = model.config.num_hidden_layers, model.config.tie_word_embeddings
    pipe = hf_pipeline(model, num_stages=stages)
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=pipe.parameters(), config=_ds_config(stages))
    out = {}
    for key, ckpt in checkpoints.items():
        path, _ = engine.load_checkpoint(ckpt)
        out[key] = {"path": path, "global_steps": engine.global_steps,
                    "params": {pipeline_to_hf_key(n, layers): p.detach().clone()
                               for n, p in engine.module.named_parameters()},
                    "masters": gather_hf_state_dict(engine.module, Topology(stages, stages, stages), layers, tied)}
    return out


def _export(journal, step, hf_out, ds_out):
    """Both forms of one step from one replay (``export JOURNAL OUT --hf DIR``)."""
    from ds_ext.recovery.__main__ import main
    assert main(["export", str(journal), str(ds_out), "--hf", str(hf_out), "--step", str(step)]) == 0


def _assert_equal(got, expected, what):
    assert got.keys() <= expected.keys() and got, (what, sorted(got), sorted(expected))
    for name, w in got.items():  # fp32 masters replayed with the run's own updates: bit for bit
        assert torch.equal(w, expected[name]), (what, name, (w - expected[name]).abs().max())


def _assert_exported(out, expected, what):
    from safetensors.torch import load_file
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)  # every export loads
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == expected.keys(), what
    _assert_equal(exported, expected, what)
    assert loaded.config.num_hidden_layers == len({k.split(".")[2] for k in expected if ".layers." in k})


def _assert_pipeline_checkpoint(ckpt, step: int, stages: int, layers: int):
    """DeepSpeed's pipeline layout: a file per layer (embedding, decoders, norm, head), per stage the engine's
    state and the ZeRO partitions (one data-parallel rank), ``latest`` naming the step's tag."""
    tag = f"global_step{step}"
    assert (ckpt / "latest").read_text().strip() == tag
    files = sorted(p.name for p in (ckpt / tag).iterdir())
    expected = [f"layer_{i:02d}-model_states.pt" for i in range(layers + 3)]
    expected += [f"mp_rank_{s:02d}_model_states.pt" for s in range(stages)]
    expected += [f"zero_pp_rank_0_mp_rank_{s:02d}_optim_states.pt" for s in range(stages)]
    # besides them DeepSpeed copies its recovery scripts (zero_to_fp32.py, ...) next to ZeRO partitions
    assert set(expected) <= set(files) and all(f.endswith(".py") for f in set(files) - set(expected)), files


# Per stage count, two runs: without a failure (end replicas every step; the 2-stage report) and with one
# stage failing after step 2 (end replicas every 2 steps). With 4 stages the failing stage 1 is a middle stage:
# CheckFree's neighbour average. With 2 stages both stages are end stages, so the failure is an end stage's:
# stage 0 is rebuilt CheckFree+-style from its one neighbour (stage 1's layers plus the replica of the embedding
# stage 1 keeps; rules.plan_rebuilds' "partner"). That is what CheckFree supports with 2 stages; refused by design
# are both stages failing at once (no live neighbour) and swap_end_stages (needs >= 4 stages). Each run exports
# its last step and an earlier one (every record holds a checkpoint_free payload; after a failure the earlier step
# is one the rebuilt stage trained at lr_scale x lr).
# name -> (checkfree section, the stage that fails or None, the rebuild counter it bumps, export steps)
CASES = {2: {"no_failure": ({"replicate_ends_interval": 1}, None, None, (2, 5)),
             "failure": ({"replicate_ends_interval": 2, "inject": {"at": [{"step": 2, "stage": 0}]}}, 0, "partner",
                         (4, 5))},
         4: {"no_failure": ({"replicate_ends_interval": 1}, None, None, (2, 5)),
             "failure": ({"replicate_ends_interval": 2, "inject": {"at": [{"step": 2, "stage": 1}]}}, 1,
                         "neighbours", (4, 5))}}
STEPS = 5


@pytest.mark.slow
@pytest.mark.parametrize("stages", sorted(CASES))
def test_checkfree_journals_export_the_runs_own_weights(tmp_path, stages):
    """Two runs of ``stages`` pipeline stages with CheckFree on (see :data:`CASES`), without and with an injected
    failure; a rebuilt stage's journal starts over from a base and it trains at lr_scale x lr from then on, which
    the export must replay. A 2-stage failure is an end stage's (both stages are end stages): rebuilt from its one
    neighbour's layers and replica (CheckFree+), as CheckFree allows with 2 stages (both failing at once has no
    live neighbour and is refused by design). Each journal exported at its last step and at an earlier one (both
    replay records holding CheckFree payloads), as an HF directory and as a DeepSpeed pipeline checkpoint from the
    same replay: the HF weights equal ``--save_hf``'s gathering of the run at that step, exactly, and a stock
    PipelineEngine with the same stage count loads the checkpoint (its step counter, module weights and fp32
    masters: the run's, exactly). Without the recorded layout (older journals) the 2-stage no-failure journal's
    ``--hf`` still equals the run's weights. Both runs of a stage count share their processes (one after the
    other), and one stock engine loads all their checkpoints: each process start costs seconds on 2 cores."""
    from hf_dirs import make_model_dir, qwen2_config
    model_dir = make_model_dir(tmp_path / "model", qwen2_config(num_hidden_layers=stages))
    runs = {name: (str(tmp_path / f"journal_{name}"), checkfree, at)
            for name, (checkfree, _, _, at) in CASES[stages].items()}
    ranks = run_distributed(_run_body, stages, args=(str(model_dir), stages, STEPS, runs), timeout=400)
    checkpoints = {}
    for name, (_, victim, rebuilt_by, at) in CASES[stages].items():
        metrics = [r[name]["metrics"] for r in ranks]
        assert all(m["checkpoint_free/failures"] == (victim is not None) for m in metrics), (name, metrics)
        if victim is not None:  # the victim was rebuilt the way this stage count allows, by its neighbour(s)
            assert metrics[victim][f"checkpoint_free/{rebuilt_by}"] == 1, (name, metrics[victim])
            assert metrics[victim]["checkpoint_free/lr_scaled"] == 1.0, (name, metrics[victim])
        snapshots = ranks[0][name]["snapshots"]
        for step in at:
            hf_out, checkpoints[name, step] = tmp_path / f"hf_{name}_{step}", tmp_path / f"ds_{name}_{step}"
            _export(tmp_path / f"journal_{name}", step, hf_out, checkpoints[name, step])
            _assert_exported(hf_out, snapshots[step], f"{stages} stages, {name}, step {step}, --hf")
            _assert_pipeline_checkpoint(checkpoints[name, step], step, stages, stages)
    loaded = run_distributed(_load_body, stages, args=(str(model_dir), stages,
                                                       {k: str(v) for k, v in checkpoints.items()}), timeout=300)
    for (name, step) in checkpoints:
        what, expected = f"{stages} stages, {name}, step {step}, DeepSpeed checkpoint", ranks[0][name]["snapshots"]
        got = loaded[0][name, step]
        assert got["path"] and all(r[name, step]["global_steps"] == step for r in loaded), what
        assert got["masters"].keys() == expected[step].keys(), what
        _assert_equal(got["masters"], expected[step], what + " (fp32 masters)")
        for rank, r in enumerate(loaded):  # each stage's module weights, loaded from the layer files
            _assert_equal(r[name, step]["params"], expected[step], f"{what} (stage {rank} weights)")
    if stages == 2:
        _old_layout_exports_hf_only(tmp_path, tmp_path / "journal_no_failure", ranks[0]["no_failure"]["snapshots"])


def _old_layout_exports_hf_only(tmp_path, journal, snapshots) -> None:
    """The 2-stage journal as an older ds_ext wrote it (no recorded layout): the DeepSpeed form is refused, nothing
    written; ``--hf`` alone replays stage by stage and still gives the run's weights."""
    from ds_ext.recovery.__main__ import main
    _drop_layouts(journal)
    both = [str(tmp_path / "ds_old"), "--hf", str(tmp_path / "hf_old")]
    assert main(["export", str(journal), *both]) == 2  # the DeepSpeed form needs the layout: refused, nothing written
    assert not (tmp_path / "ds_old").exists() and not (tmp_path / "hf_old").exists()
    step = min(snapshots)
    assert main(["export", str(journal), "--hf", str(tmp_path / "hf_old"), "--step", str(step)]) == 0
    _assert_exported(tmp_path / "hf_old", snapshots[step], "2 stages, no recorded layout, --hf")


def _drop_layouts(journal) -> None:
    """Remove ``pipeline_layout`` from every EXPORT.bin of ``journal`` (what journals of older versions hold)."""
    from ds_ext.recovery.meta import read_export_meta, write_export_meta
    for rank_dir in sorted(journal.glob("rank*")):
        meta = read_export_meta(str(rank_dir))
        assert meta.pop("pipeline_layout")["num_stages"] == 2
        write_export_meta(str(rank_dir), meta)


def _journal_with_payload(rank_dir, name: str) -> None:
    """A one-rank journal (base at step 0, records 1 and 2; record 2 holds a payload of feature ``name``) and its
    EXPORT.bin, written by the journal's own writer: enough for the exporter's checks, which run before any
    engine exists."""
    from ds_ext.recovery import journal
    from ds_ext.recovery.meta import write_export_meta
    writer = journal.JournalWriter(str(rank_dir), {"test": 1})
    writer.submit_base(0, {"fp32": {}})
    writer.start_segment(1)
    writer.append(1, {"applied": True, "groups": [], "state": {}, "features": {}})
    writer.append(2, {"applied": True, "groups": [], "state": {}, "features": {name: {"x": 1}}})
    writer.close()
    write_export_meta(str(rank_dir), {"pipeline": False, "dp_world_size": 1, "hf": None, "topology": None})


def test_a_payload_the_exporter_cannot_replay_stops_the_export_naming_the_feature(tmp_path, capsys):
    """A record holding the payload of a feature the exporter cannot replay (no feature of that name; a feature
    declaring the contract's default REFUSE) stops the export with exit 2 before any process starts, naming the
    rank, the step, the feature and what to do; a step before the payload passes the checks."""
    from ds_ext.contract import FeatureBase
    from ds_ext.recovery.__main__ import main
    from ds_ext.tools.export import export_step
    _journal_with_payload(tmp_path / "journal" / "rank00000", "mine")
    out = tmp_path / "ckpt"
    assert main(["export", str(tmp_path / "journal"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "rank00000: step 2 holds 'mine' data, which the exporter cannot replay (no known feature is named " \
           "'mine'" in err, err
    assert "Export a step before it with --step, or resume the job with that feature on" in err
    assert not out.exists()

    class Mine(FeatureBase):
        name = "mine"
    with pytest.raises(SystemExit, match="declares journal_export=refuse"):
        export_step([str(tmp_path / "journal" / "rank00000")], None, {"mine": Mine})
    assert export_step([str(tmp_path / "journal" / "rank00000")], 1, {}) == 1  # before the payload: allowed


def test_a_pipeline_journal_without_its_layout_is_refused_naming_what_is_missing(tmp_path, capsys):
    """A pipeline journal written before the layout was recorded: the DeepSpeed form stops with exit 2 before any
    process starts, naming the file, the missing ``pipeline_layout`` and what to do; nothing is written."""
    from ds_ext.recovery.__main__ import main
    from ds_ext.recovery.meta import read_export_meta, write_export_meta
    rank_dir = tmp_path / "journal" / "rank00000"
    _journal_with_payload(rank_dir, "checkpoint_free")
    meta = read_export_meta(str(rank_dir))
    meta.update(pipeline=True, topology={"world_size": 1, "ranks_per_replica": 1, "pipeline_stages": 1})
    write_export_meta(str(rank_dir), meta)
    out = tmp_path / "ckpt"
    assert main(["export", str(tmp_path / "journal"), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{rank_dir}/EXPORT.bin of this pipeline journal records no pipeline_layout" in err, err
    assert "Export it with --hf DIR" in err and not out.exists()


def test_a_replay_feature_without_a_replayer_is_refused_when_defined():
    """REPLAY promises the exporter a replayer: a class that declares it without one fails at definition."""
    import pytest
    from ds_ext.contract import ExportRule, FeatureBase

    with pytest.raises(TypeError, match="does not define export_replayer"):
        class Broken(FeatureBase):  # noqa: F841
            journal_export = ExportRule.REPLAY

    class Fine(FeatureBase):
        journal_export = ExportRule.REPLAY

        @classmethod
        def export_replayer(cls, meta, engine, global_rank):
            return "replayer"
    assert Fine.export_replayer({}, None, 0) == "replayer"
