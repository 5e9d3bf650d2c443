"""The journal's record format and directory handling, without processes: round trips, damage detection,
retention of bases and segments, and the config rules."""
import os

import pytest
import torch

from ds_ext.config import DsExtConfigError, parse_ext_config
from ds_ext.recovery import journal, records


def sample_state():
    return {"grads": {"0": torch.randn(1000), "1": torch.randn(3, 5).to(torch.bfloat16)}, "applied": True,
            "state": {"counters": {"global_steps": 7}, "hyper": [{"lr": 1e-3, "betas": [0.9, 0.95]}],
                      "scaler": {"cur_scale": 65536.0}, "rng": {"torch": torch.get_rng_state()}, "none": None},
            "empty": torch.empty(0), "scalar": torch.tensor(3.0)}


def write_frames(path, states):
    with open(path, "wb") as f:
        for step, state in states:
            f.writelines(records.encode(records.KIND_STEP, step, state))


def assert_same(a, b):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_is_exact_for_every_dtype_and_nesting(tmp_path):
    states = [(5, sample_state()), (6, sample_state())]
    write_frames(tmp_path / "wal", states)
    got = list(records.read_frames(str(tmp_path / "wal")))
    assert [r.step for _, r in got] == [5, 6]
    for (_, rec), (_, state) in zip(got, states):
        assert_same(rec.state, state)


@pytest.mark.parametrize("where", ["header", "meta", "payload", "last byte"])
def test_a_flipped_byte_anywhere_is_caught_and_earlier_frames_stay_usable(tmp_path, where):
    write_frames(tmp_path / "wal", [(1, sample_state()), (2, sample_state())])
    first_len = list(records.read_frames(str(tmp_path / "wal")))[1][0]
    size = os.path.getsize(tmp_path / "wal")
    offset = {"header": first_len + 10, "meta": first_len + 40, "payload": first_len + 2000,
              "last byte": size - 1}[where]
    data = bytearray((tmp_path / "wal").read_bytes())
    data[offset] ^= 0x01
    (tmp_path / "wal").write_bytes(bytes(data))
    seen = []
    with pytest.raises(records.RecordError) as err:
        for _, rec in records.read_frames(str(tmp_path / "wal")):
            seen.append(rec.step)
    assert seen == [1] and err.value.offset == first_len
    # a flip in a length field reads as a torn frame, anywhere else as a checksum mismatch
    assert any(w in str(err.value) for w in ("checksum mismatch", "torn", "magic")), str(err.value)


def test_a_torn_tail_is_reported_as_torn(tmp_path):
    write_frames(tmp_path / "wal", [(1, sample_state()), (2, sample_state())])
    os.truncate(tmp_path / "wal", os.path.getsize(tmp_path / "wal") - 3)
    with pytest.raises(records.RecordError, match="torn record for step 2"):
        list(records.read_frames(str(tmp_path / "wal")))


def test_state_with_objects_or_non_string_keys_is_refused():
    with pytest.raises(TypeError, match="cannot store a object"):
        records.encode(records.KIND_STEP, 1, {"x": object()})
    with pytest.raises(TypeError, match="keys must be strings"):
        records.encode(records.KIND_STEP, 1, {"x": {3: 1}})


def test_writer_keeps_the_newest_bases_and_only_the_segments_they_need(tmp_path):
    w = journal.JournalWriter(str(tmp_path), {"world_size": 1}, fsync="always", keep_bases=2)
    w.submit_base(0, {"w": torch.zeros(4)})
    w.start_segment(1)
    for step in range(1, 10):
        w.append(step, {"group": 0, "grad": torch.full((4,), float(step))}, records.KIND_GRAD)
        w.append(step, {"groups": [0], "applied": True})
        if step % 3 == 0:
            w.submit_base(step, {"w": torch.full((4,), float(step))})
            w.start_segment(step + 1)
    w.close()
    scan = journal.scan(str(tmp_path))
    assert scan.listed_bases == [6, 9] and scan.bases == [9] and not scan.damage  # older bases read when needed
    assert sorted(scan.records) == []  # nothing after base 9; segments before it are read only when needed
    assert scan.newest_reachable() == 9 and scan.plan(8) == (6, [7, 8])
    assert scan.bases == [9, 6] and sorted(scan.records) == [7, 8, 9]  # segments holding only steps <= 6 deleted
    assert torch.equal(scan.load_record(8).state["grads"]["0"], torch.full((4,), 8.0))
    assert sorted(os.listdir(tmp_path)) == ["MANIFEST.json", "base_000000000006.bin", "base_000000000009.bin",
                                            "wal_000000000007.log", "wal_000000000010.log"]
    assert w.stats.records == 9 and w.stats.fsyncs >= 9


def test_truncate_after_cuts_the_timeline_the_other_ranks_did_not_reach(tmp_path):
    w = journal.JournalWriter(str(tmp_path), {}, keep_bases=2)
    w.submit_base(0, {"w": torch.zeros(2)})
    w.start_segment(1)
    for step in range(1, 6):
        w.append(step, {"group": 0, "grad": torch.ones(2)}, records.KIND_GRAD)
        w.append(step, {"groups": [0]})
    w.append(6, {"group": 0, "grad": torch.ones(2)}, records.KIND_GRAD)  # a step whose commit never came
    w.flush()
    scan = journal.scan(str(tmp_path))
    assert sorted(scan.records) == [1, 2, 3, 4, 5]
    w.truncate_after(3, scan)
    w.append(4, {"group": 0, "grad": torch.zeros(2)}, records.KIND_GRAD)
    w.append(4, {"groups": [0]})
    w.close()
    again = journal.scan(str(tmp_path))
    assert sorted(again.records) == [1, 2, 3, 4] and not again.damage
    assert torch.equal(again.load_record(4).state["grads"]["0"], torch.zeros(2))


@pytest.mark.parametrize("block,path,words", [
    ({"recovery": {"enabled": True}}, "ds_ext.recovery.journal_dir", "give a directory"),
    ({"recovery": {"journal_dir": "/j", "fsync": "sometimes"}}, "ds_ext.recovery.fsync", "'always'"),
    ({"recovery": {"journal_dir": "/j", "base_interval": 0}}, "ds_ext.recovery.base_interval", "greater than"),
    ({"recovery": {"journal_dir": 5}}, "ds_ext.recovery.journal_dir", "valid string"),
])
def test_bad_recovery_config_names_the_path(block, path, words):
    with pytest.raises(DsExtConfigError) as err:
        parse_ext_config({"zero_optimization": {"stage": 1}, "ds_ext": block})
    assert any(p == path and words in m for p, m in err.value.problems), err.value.problems


def test_recovery_needs_zero_1_or_2_without_offload():
    for zero in ({"stage": 0}, {"stage": 3}, {"stage": 2, "offload_optimizer": {"device": "cpu"}}):
        with pytest.raises(DsExtConfigError, match="ds_ext.recovery"):
            parse_ext_config({"zero_optimization": zero, "ds_ext": {"recovery": {"journal_dir": "/j"}}})
    ext = parse_ext_config({"zero_optimization": {"stage": 2}, "ds_ext": {"recovery": {"journal_dir": "/j"}}})
    assert ext.recovery.active and ext.any_feature_enabled
    off = parse_ext_config({"ds_ext": {"recovery": {"journal_dir": "/j", "enabled": False}}})
    assert not off.recovery.active


def test_shipped_recovery_config_is_valid(repo_root):
    from ds_ext.config import check_file
    assert check_file(repo_root / "configs" / "recovery.json").recovery.active


def test_a_journal_of_an_older_format_version_is_refused_with_what_to_do(tmp_path):
    """Format version 2 changed the commit frame (one layout for DeepSpeed and megatron): a version-1 journal is
    refused as a whole, naming the directory, both versions and the two ways out, and nothing in it is touched."""
    import json
    w = journal.JournalWriter(str(tmp_path / "rank00000"), {"world_size": 1}, keep_bases=2)
    w.submit_base(0, {"w": torch.zeros(2)})
    w.close()
    manifest = tmp_path / "rank00000" / "MANIFEST.json"
    assert json.loads(manifest.read_text())["version"] == records.VERSION == 2
    old = json.loads(manifest.read_text())
    old["version"] = 1
    manifest.write_text(json.dumps(old))
    before = sorted(os.listdir(tmp_path / "rank00000"))
    with pytest.raises(journal.RecoveryError) as err:
        journal.scan(str(tmp_path / "rank00000"))
    message = str(err.value)
    for words in (str(tmp_path / "rank00000"), "format version 1", "reads version 2", "Remove the journal directory",
                  "the ds_ext version that wrote it"):
        assert words in message, (words, message)
    assert sorted(os.listdir(tmp_path / "rank00000")) == before


def test_a_frame_of_another_format_version_names_both_versions(tmp_path):
    buffers = records.encode(records.KIND_STEP, 3, {"x": torch.ones(2)})
    head = bytearray(bytes(buffers[0]))
    head[4:6] = (1).to_bytes(2, "little")  # the version field, as version 1 wrote it
    (tmp_path / "wal").write_bytes(bytes(head) + b"".join(bytes(b) for b in buffers[1:]))
    with pytest.raises(records.RecordError, match="format version 1; this ds_ext reads version 2"):
        list(records.read_frames(str(tmp_path / "wal")))


# -- golden journal: the on-disk format of version 2, checked in ---------------------------------------------------
GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "journal_v2", "rank00000")


def _golden_steps():
    """Three steps of a 2-tensor state in the commit-frame layout of format version 2 (what JournalLifecycle.record
    writes): gradient frames, then {applied, groups, state, features}; bases at 0 and 2 (base_interval 2)."""
    def step_state(step):
        return {"counters": {"global_steps": step, "global_samples": 4 * step, "micro_steps": 2 * step,
                             "skipped_steps": 0}, "hyper": [{"lr": 0.5, "betas": [0.9, 0.99], "foreach": None}],
                "scaler": {}, "lr_scheduler": None, "rng": {"torch": torch.arange(4, dtype=torch.uint8) + step}}
    grads = {step: [torch.full((3,), float(step)), torch.tensor([[step, -step]], dtype=torch.float32)]
             for step in (1, 2, 3)}
    payloads = {1: {}, 2: {}, 3: {"noloco": {"outer_step": 1, "received": torch.ones(2, dtype=torch.bfloat16)}}}
    return step_state, grads, payloads


def _golden_base(step, fp32, step_state):
    return {"fp32": [t.clone() for t in fp32], "optim": [{"step": torch.tensor(float(step))}, {}], **step_state(step),
            "features": {"noloco": {"outer_step": int(step >= 2)}}}


def write_golden(rank_dir):
    """The fixture, written by this ds_ext's writer (deterministic bytes: fixed tensors, no time or randomness)."""
    step_state, grads, payloads = _golden_steps()
    fp32 = [torch.zeros(3), torch.zeros(1, 2)]
    w = journal.JournalWriter(rank_dir, {"zero_stage": 1, "partition_numel": [3, 2], "world_size": 1},
                              fsync="never", keep_bases=2)
    w.submit_base(0, _golden_base(0, fp32, step_state))
    w.start_segment(1)
    for step in (1, 2, 3):
        for g, grad in enumerate(grads[step]):
            w.append(step, {"group": g, "grad": grad}, records.KIND_GRAD)
            fp32[g] = fp32[g] - 0.5 * grad
        w.append(step, {"applied": True, "groups": [0, 1], "state": step_state(step), "features": payloads[step]})
        if step % 2 == 0:
            w.flush()
            w.submit_base(step, _golden_base(step, fp32, step_state))
            w.start_segment(step + 1)
    w.close()
    return fp32


class _SgdState:
    """A JournaledState on two plain tensors whose update is ``t -= lr * grad`` (enough to replay the fixture)."""

    def __init__(self):
        self.tensors = [torch.full((3,), float("nan")), torch.full((1, 2), float("nan"))]
        self.lr, self.steps, self.refreshed = None, None, False

    def restore(self, base):
        for t, saved in zip(self.tensors, base["fp32"]):
            t.copy_(saved)
        self.restore_step_state(base)

    def restore_step_state(self, state):
        self.lr, self.steps = state["hyper"][0]["lr"], state["counters"]["global_steps"]

    def replay(self, grads):
        for key, grad in grads.items():
            self.tensors[int(key)].sub_(self.lr * grad)

    def refresh(self):
        self.refreshed = True


class _Feature:
    def __init__(self):
        self.state, self.replayed = None, []

    def load_state_dict(self, sd):
        self.state = sd

    def journal_replay(self, payload):
        self.replayed.append(payload)


def test_the_golden_journal_is_read_and_replayed_and_written_byte_for_byte(tmp_path):
    """A checked-in version-2 journal (``tests/fixtures/journal_v2``; regenerate with ``WRITE_FIXTURE=1`` only when
    VERSION is bumped): this ds_ext reads it, replays it to the same tensors, and writes the same bytes for it, so a
    change of the on-disk format without a new VERSION fails here."""
    from ds_ext.recovery.resume import replay_journal
    if os.environ.get("WRITE_FIXTURE"):
        import shutil
        shutil.rmtree(GOLDEN, ignore_errors=True)
        write_golden(GOLDEN)
    expected = write_golden(str(tmp_path / "rank00000"))
    assert sorted(os.listdir(GOLDEN)) == sorted(os.listdir(tmp_path / "rank00000")) == [
        "MANIFEST.json", "base_000000000000.bin", "base_000000000002.bin", "wal_000000000001.log",
        "wal_000000000003.log"]
    for name in os.listdir(GOLDEN):
        with open(os.path.join(GOLDEN, name), "rb") as a, open(tmp_path / "rank00000" / name, "rb") as b:
            assert a.read() == b.read(), f"{name}: this ds_ext writes other bytes than format version 2 did"
    scan = journal.scan(GOLDEN)
    assert scan.newest_reachable() == 3 and not scan.damage and scan.plan(3) == (2, [3])
    state, feature = _SgdState(), _Feature()
    replay_journal(state, scan, 3, {"noloco": feature})
    assert state.steps == 3 and state.refreshed and feature.state == {"outer_step": 1}
    assert len(feature.replayed) == 1 and torch.equal(feature.replayed[0]["received"], torch.ones(2).bfloat16())
    for t, e in zip(state.tensors, expected):
        assert torch.equal(t, e)
    state, feature = _SgdState(), _Feature()
    replay_journal(state, journal.scan(GOLDEN), 1, {"noloco": feature}, refresh=False)  # base 0 + record 1
    assert state.steps == 1 and not state.refreshed and feature.state == {"outer_step": 0} and not feature.replayed
    assert torch.equal(state.tensors[0], torch.full((3,), -0.5))  # 0 - 0.5 * 1
