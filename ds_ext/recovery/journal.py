"""One rank's journal directory on local disk: step records, base snapshots and an atomic manifest.

Layout of ``<journal_dir>/rank<R>/``::

    MANIFEST.json               committed bases and the run's layout; replaced atomically (write, fsync, rename)
    base_<step>.bin             full partition state after ``step`` (one frame, see :mod:`records`)
    wal_<first step>.log        append-only step records; a new segment starts after each base

Writes run on two background threads (``ThreadPoolExecutor`` with one worker each): records, which are small and
latency-sensitive, and bases, which are large; a base never delays the next record. The caller hands over tensors
it will not touch again (clones). ``wait_written(step)`` blocks until the record of ``step`` is in the operating
system (so a killed process loses nothing); the fsync that makes it survive a power loss follows the ``fsync``
policy. A base becomes visible only when the manifest naming it is replaced, so a base half written when the
process dies is never used. After each committed base the segments and bases older than the ``keep_bases`` newest
bases are deleted.

Reading (:func:`scan`) checks every frame's checksum and length: a torn or corrupt record ends its segment's usable
part, reported in ``JournalScan.damage``. A journal of another format version (``MANIFEST.json``'s ``version``,
:data:`records.VERSION`) is refused as a whole with :class:`RecoveryError`, never read as damage.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ds_ext.recovery import records
from ds_ext.recovery.records import KIND_BASE, KIND_GRAD, KIND_STEP, Record, RecordError

log = logging.getLogger("ds_ext.recovery")
MANIFEST = "MANIFEST.json"
SEGMENT_RE = re.compile(r"wal_(\d{12})\.log$")
BASE_RE = re.compile(r"base_(\d{12})\.bin$")


class RecoveryError(RuntimeError):
    """The journal cannot be used as it is; the message names the directory and what to do. Nothing is deleted."""


def rank_dir(journal_dir: str, rank: int) -> str:
    """Rank ``rank``'s journal directory inside ``journal_dir``."""
    return os.path.join(journal_dir, f"rank{rank:05d}")


def check_version(rank_dir: str, manifest: Dict[str, Any]) -> None:
    """Refuse a journal written in another format version (its frames would not be read as this version's)."""
    found = manifest.get("version")
    if found != records.VERSION:
        raise RecoveryError(
            f"the journal in {rank_dir} has format version {found}; this ds_ext reads version {records.VERSION} "
            f"only. Remove the journal directory {os.path.dirname(rank_dir) or rank_dir} (training then starts "
            "over, or from a DeepSpeed checkpoint), or resume it with the ds_ext version that wrote it (and "
            "export it there with python -m ds_ext.recovery export)")


def segment_name(first_step: int) -> str:
    return f"wal_{first_step:012d}.log"


def base_name(step: int) -> str:
    return f"base_{step:012d}.bin"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(rank_dir: str, manifest: Dict[str, Any]) -> None:
    tmp = os.path.join(rank_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(rank_dir, MANIFEST))
    _fsync_dir(rank_dir)


def read_manifest(rank_dir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(rank_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _lower_thread_priority(nice: int) -> None:
    """Lower this writer thread's scheduling priority (Linux: per-thread nice), so on a busy CPU the training
    threads run first and the writers fill the gaps (communication waits); elsewhere a no-op."""
    import threading
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass


@dataclass
class WriterStats:
    """Counters of the background writers (seconds are spent on the writer threads, not in the step)."""

    records: int = 0
    record_bytes: int = 0
    record_write_s: float = 0.0
    fsyncs: int = 0
    fsync_s: float = 0.0
    bases: int = 0
    base_bytes: int = 0
    base_write_s: float = 0.0
    wait_s: float = 0.0


class JournalWriter:
    """Appends records and commits bases for one rank (see the module docstring). Not thread-safe for callers:
    one training thread calls it."""

    def __init__(self, rank_dir: str, layout: Dict[str, Any], fsync: str = "interval", fsync_interval: int = 10,
                 keep_bases: int = 2, nice: int = 10):
        self.rank_dir, self.layout = rank_dir, layout
        self.fsync, self.fsync_interval, self.keep_bases = fsync, fsync_interval, keep_bases
        os.makedirs(rank_dir, exist_ok=True)
        self.stats = WriterStats()
        pool = dict(max_workers=1, initializer=_lower_thread_priority, initargs=(nice,))
        self._records = ThreadPoolExecutor(thread_name_prefix="ds_ext-journal", **pool)
        self._bases = ThreadPoolExecutor(thread_name_prefix="ds_ext-base", **pool)
        # fsync on a thread of its own: a slow device delays durability, never the next record or step
        self._syncs = ThreadPoolExecutor(thread_name_prefix="ds_ext-fsync", **pool)
        self._sync_future: Optional[Future] = None
        self._segment = None
        self._pending: List[Tuple[int, Future]] = []
        self._base_future: Optional[Future] = None
        manifest = read_manifest(rank_dir)
        self._committed: List[int] = list(manifest["bases"]) if manifest else []

    # -- records ----------------------------------------------------------------------------------------------
    def start_segment(self, first_step: int) -> None:
        """Records from ``first_step`` on go to a new segment file (called after a base or a resume)."""
        self._records.submit(self._open_segment, first_step)

    def append(self, step: int, state: Dict[str, Any], kind: int = KIND_STEP) -> None:
        """Queue a frame: a step's gradient frames (``KIND_GRAD``) first, then its commit frame (``KIND_STEP``,
        whose ``groups`` lists the gradient frames it needs). Tensors must stay unmodified until written."""
        self._pending.append((step, self._records.submit(self._write_record, step, state, kind)))

    def wait_written(self, step: Optional[int] = None) -> None:
        """Block until every record up to ``step`` (default: all) is written; re-raise a writer error."""
        t = time.perf_counter()
        while self._pending and (step is None or self._pending[0][0] <= step):
            self._pending.pop(0)[1].result()
        self.stats.wait_s += time.perf_counter() - t

    def _open_segment(self, first_step: int) -> None:
        if self._segment is not None:
            if self._sync_future is not None:
                self._sync_future.result()
            self._sync(self._segment)
            self._segment.close()
        self._segment = open(os.path.join(self.rank_dir, segment_name(first_step)), "ab")
        _fsync_dir(self.rank_dir)

    def _write_record(self, step: int, state: Dict[str, Any], kind: int) -> None:
        t = time.perf_counter()
        buffers = records.encode(kind, step, state)
        self._segment.writelines(buffers)
        self._segment.flush()  # into the OS page cache: survives the death of this process
        self.stats.records += kind == KIND_STEP
        self.stats.record_bytes += sum(b.nbytes for b in buffers)
        self.stats.record_write_s += time.perf_counter() - t
        if self.fsync == "always":  # durable before the next forward: that step waits for the device
            self._sync(self._segment)
        elif self.fsync == "interval" and kind == KIND_STEP and self.stats.records % self.fsync_interval == 0:
            if self._sync_future is None or self._sync_future.done():
                self._sync_future = self._syncs.submit(self._sync, self._segment)

    def _sync(self, f) -> None:
        if self.fsync == "never":
            return
        t = time.perf_counter()
        os.fsync(f.fileno())
        self.stats.fsyncs += 1
        self.stats.fsync_s += time.perf_counter() - t

    # -- bases ------------------------------------------------------------------------------------------------
    def submit_base(self, step: int, state: Dict[str, Any]) -> None:
        """Write the base of ``step`` in the background; waits first if the previous base is still being written."""
        if self._base_future is not None:
            t = time.perf_counter()
            self._base_future.result()
            self.stats.wait_s += time.perf_counter() - t
        # done once the record thread has run everything queued before this base (it is one FIFO worker), so the
        # pruning after the base sees every segment opened before it, however far the record thread lags behind
        records_before = self._records.submit(lambda: None)
        self._base_future = self._bases.submit(self._base_then_prune, step, state, records_before)

    def _base_then_prune(self, step: int, state: Dict[str, Any], records_before: Future) -> None:
        self._write_base(step, state)
        records_before.result()
        self._prune()

    def _write_base(self, step: int, state: Dict[str, Any]) -> None:
        t = time.perf_counter()
        path = os.path.join(self.rank_dir, base_name(step))
        buffers = records.encode(KIND_BASE, step, state)
        with open(path + ".tmp", "wb") as f:
            f.writelines(buffers)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        self._committed = sorted(set(self._committed) | {step})[-self.keep_bases:]
        self._write_manifest()
        self.stats.bases += 1
        self.stats.base_bytes += sum(b.nbytes for b in buffers)
        self.stats.base_write_s += time.perf_counter() - t

    def _prune(self) -> None:
        """Drop bases older than the ``keep_bases`` newest and every segment holding only steps before them."""
        oldest = self._committed[0]
        for name in os.listdir(self.rank_dir):
            m = BASE_RE.match(name)
            if m and int(m.group(1)) < oldest:
                os.remove(os.path.join(self.rank_dir, name))
        starts = sorted(int(SEGMENT_RE.match(n).group(1)) for n in os.listdir(self.rank_dir) if SEGMENT_RE.match(n))
        for first, nxt in zip(starts, starts[1:]):
            if nxt - 1 <= oldest:
                os.remove(os.path.join(self.rank_dir, segment_name(first)))

    def truncate_after(self, step: int, scan_result: "JournalScan") -> None:
        """Make ``step`` the journal's end before writing resumes: records after it (a timeline the other ranks
        did not reach, or a damaged tail) are cut off, later bases dropped from the manifest, and new records go to
        a segment of their own."""
        if step in scan_result.records:
            where = scan_result.records[step]
            with open(where.path, "r+b") as f:
                f.truncate(where.commit_end)
        for name in os.listdir(self.rank_dir):
            m = SEGMENT_RE.match(name)
            if m and int(m.group(1)) > step:
                os.remove(os.path.join(self.rank_dir, name))
        self._committed = [b for b in self._committed if b <= step]
        self._write_manifest()
        self.start_segment(step + 1)

    def _write_manifest(self) -> None:
        write_manifest(self.rank_dir, {"version": records.VERSION, "layout": self.layout, "bases": self._committed})

    def flush(self) -> None:
        """Wait for every queued record and base."""
        self.wait_written()
        if self._base_future is not None:
            self._base_future.result()

    def close(self) -> None:
        self.flush()
        self._records.submit(self._close_segment).result()
        for pool in (self._records, self._bases, self._syncs):
            pool.shutdown()

    def _close_segment(self) -> None:
        if self._segment is not None:
            if self._sync_future is not None:
                self._sync_future.result()
            self._sync(self._segment)
            self._segment.close()
            self._segment = None


@dataclass
class StepFrames:
    """Where one step's frames are: its commit frame and one gradient frame per ZeRO parameter group."""

    path: str
    commit_offset: int
    commit_end: int
    grads: Dict[int, int]


@dataclass
class JournalScan:
    """What one rank's journal can reconstruct: verified bases, the good steps, and every damage found.

    Lazy: only the newest verifiable base is read at scan time, and only the segments after it; older bases and
    segments are read when :meth:`plan` needs them (a target older than the newest base)."""

    rank_dir: str
    layout: Optional[Dict[str, Any]]
    listed_bases: List[int]
    bases: List[int] = field(default_factory=list)
    records: Dict[int, StepFrames] = field(default_factory=dict)
    damage: List[RecordError] = field(default_factory=list)
    _base_cache: Dict[int, Record] = field(default_factory=dict)
    _read_segments: set = field(default_factory=set)

    def chain_end(self, base: int) -> int:
        """The newest step reachable from ``base`` through contiguous good records."""
        step = base
        while step + 1 in self.records:
            step += 1
        return step

    def newest_reachable(self) -> int:
        """The newest step this rank can reconstruct (-1: none)."""
        return max((self.chain_end(b) for b in self.bases), default=-1)

    def plan(self, target: int) -> Tuple[int, List[int]]:
        """``(base, steps to replay)`` reaching ``target``: the newest base at or before it with a full chain."""
        if not any(b <= target for b in self.bases):
            self._verify_bases(below=target + 1)
            self._read_segments_after(min(self.bases, default=target))
        for base in sorted(self.bases, reverse=True):
            if base <= target <= self.chain_end(base):
                return base, list(range(base + 1, target + 1))
        raise ValueError(f"{self.rank_dir}: step {target} cannot be reconstructed from bases {self.bases}")

    def load_base(self, step: int) -> Record:
        if step in self._base_cache:
            return self._base_cache.pop(step)
        path = os.path.join(self.rank_dir, base_name(step))
        for _, rec in records.read_frames(path):
            return rec
        raise RecordError(path, 0, "empty base file")

    def load_commit(self, step: int) -> Record:
        """The step's commit frame alone (applied flag, step state, feature payloads; no gradients)."""
        where = self.records[step]
        with open(where.path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(where.commit_offset)
            return records.read_frame(f, where.path, where.commit_offset, size)

    def load_record(self, step: int) -> Record:
        """The step's commit frame, with ``state["grads"]`` filled from its gradient frames."""
        where = self.records[step]
        commit = self.load_commit(step)
        with open(where.path, "rb") as f:
            size = f.seek(0, 2)
            grads = {}
            for group, offset in sorted(where.grads.items()):
                f.seek(offset)
                grads[str(group)] = records.read_frame(f, where.path, offset, size).state["grad"]
        commit.state["grads"] = grads
        return commit

    def _verify_bases(self, below: int = None) -> None:
        """Verify listed bases newest first (below ``below``) until one is good; damaged ones go to ``damage``."""
        for step in sorted(self.listed_bases, reverse=True):
            if step in self.bases or (below is not None and step >= below):
                continue
            try:
                self._base_cache[step] = self.load_base(step)
                self.bases.append(step)
                return
            except (OSError, RecordError) as exc:
                self.damage.append(exc if isinstance(exc, RecordError) else RecordError(self.rank_dir, 0, str(exc)))
                self.listed_bases.remove(step)

    def _read_segments_after(self, step: int) -> None:
        """Read every segment that can hold steps after ``step``."""
        starts = sorted(int(m.group(1)) for m in map(SEGMENT_RE.match, os.listdir(self.rank_dir)) if m)
        for first, nxt in zip(starts, starts[1:] + [None]):
            if (nxt is None or nxt - 1 > step) and first not in self._read_segments:
                self._read_segments.add(first)
                self._read_segment(os.path.join(self.rank_dir, segment_name(first)))

    def _read_segment(self, path: str) -> None:
        grads: Dict[int, Dict[int, int]] = {}
        try:
            for offset, rec in records.read_frames(path):
                if rec.kind == KIND_GRAD:
                    grads.setdefault(rec.step, {})[int(rec.state["group"])] = offset
                elif rec.kind == KIND_STEP and rec.step not in self.records:
                    have = grads.pop(rec.step, {})
                    if set(have) == set(rec.state["groups"]):
                        self.records[rec.step] = StepFrames(path, offset, offset + rec.nbytes, have)
        except RecordError as exc:
            self.damage.append(exc)


def scan(rank_dir: str) -> JournalScan:
    """Read a rank's journal, verifying the checksums of what it reads; damage is reported and skipped. Raises
    :class:`RecoveryError` for a journal of another format version."""
    manifest = read_manifest(rank_dir) if os.path.isdir(rank_dir) else None
    if manifest is not None:
        check_version(rank_dir, manifest)
    result = JournalScan(rank_dir, manifest and manifest.get("layout"), list(manifest["bases"]) if manifest else [])
    if manifest is None:
        return result
    result._verify_bases()
    result._read_segments_after(max(result.bases, default=-1))
    return result
