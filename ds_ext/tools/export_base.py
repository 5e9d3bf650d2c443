"""What every form of ``python -m ds_ext.recovery export`` shares: the journal's rank directories, the step to
export and the payload checks (:func:`export_step`), the parameters-only module (:class:`ShapeOnlyModule`), the
features' replay objects (:func:`export_features`) and the replay of one rank's journal into a stock DeepSpeed engine
(:func:`replay_into`, :func:`replayed_engine`). The forms: :mod:`ds_ext.tools.export` (a DeepSpeed checkpoint),
:mod:`ds_ext.tools.export_hf` (an HF model directory), :mod:`ds_ext.tools.export_pipe` (pipeline-engine journals).

Feature payloads in the records are handled as each feature declares through the contract
(:class:`ds_ext.contract.ExportRule`; the classes come from ``feature_types``, name -> class, which the CLI takes
from :func:`ds_ext.features.feature_types`): ``REPLAY`` ones are replayed by the feature's ``export_replayer``
(NoLoCo's outer steps, CheckFree's learning-rate scaling of rebuilt stages), ``SKIP`` ones are passed over, and any
other payload stops the export before anything is written (:func:`check_payloads`), naming the feature.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ds_ext.contract import ExportRule
from ds_ext.recovery import journal, records
from ds_ext.recovery.meta import read_export_meta
from ds_ext.recovery.resume import replay_journal
from ds_ext.state.partition import ZeroPartitionState


class ShapeOnlyModule(nn.Module):
    """Parameters (zeros) and buffers under the journal's dotted names; no forward. Only for loading and saving."""

    def __init__(self, shapes: Dict[str, list], buffers: Dict[str, torch.Tensor]):
        super().__init__()
        for name, (shape, dtype) in shapes.items():
            owner, leaf = self._owner(name)
            owner.register_parameter(leaf, nn.Parameter(torch.zeros(shape, dtype=records.DTYPES[dtype])))
        for name, value in buffers.items():
            owner, leaf = self._owner(name)
            owner.register_buffer(leaf, value.clone())

    def _owner(self, name: str):
        module, *path = [self] + name.split(".")
        for part in path[:-1]:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        return module, path[-1]


def journal_ranks(journal_dir: str) -> List[str]:
    dirs = sorted(d for d in os.listdir(journal_dir) if d.startswith("rank") and d[4:].isdigit())
    if not dirs:
        raise SystemExit(f"ds_ext.recovery export: no rank<R> journal directories in {journal_dir}")
    return [os.path.join(journal_dir, d) for d in dirs]


def replica_rank_dirs(journal_dir: str, rank_dirs: List[str], topo: Dict, replica: int,
                      command: str) -> Tuple[int, List[str]]:
    """The global rank of replica ``replica``'s first rank and that replica's rank journals, after checking that
    ``journal_dir`` holds every rank of the run (``topo``: EXPORT.bin's topology) and has that replica; else a
    ``SystemExit`` naming ``command`` (the refusing command line)."""
    if topo["world_size"] != len(rank_dirs):
        raise SystemExit(f"{command}: {journal_dir} holds {len(rank_dirs)} rank journals but the run had "
                         f"{topo['world_size']} ranks")
    replicas = topo["world_size"] // topo["ranks_per_replica"]
    if not 0 <= replica < replicas:
        raise SystemExit(f"{command}: --replica {replica}: this journal has {replicas} replica(s), "
                         f"0..{replicas - 1}")
    first = replica * topo["ranks_per_replica"]
    return first, rank_dirs[first:first + topo["ranks_per_replica"]]


def export_step(rank_dirs: List[str], step: Optional[int] = None,
                feature_types: Optional[Dict[str, type]] = None) -> int:
    """The step to export: ``step``, or the newest every rank of ``rank_dirs`` reaches; refuses (``SystemExit``) a
    step some rank cannot reconstruct, and a journal holding a payload the exporter cannot replay
    (:func:`check_payloads`)."""
    scans = [journal.scan(d) for d in rank_dirs]
    for s in scans:
        for damage in s.damage:
            print(f"ds_ext.recovery export: {damage} (not used)")
    newest = min(s.newest_reachable() for s in scans)
    if newest < 0:
        raise SystemExit(f"ds_ext.recovery export: some rank in {os.path.dirname(rank_dirs[0])} has no usable base")
    target = newest if step is None else step
    for s in scans:
        try:
            s.plan(target)
        except ValueError:
            raise SystemExit(f"ds_ext.recovery export: --step {target}: {s.rank_dir} reaches steps "
                             f"{min(s.bases, default=-1)}..{s.newest_reachable()} only (bases {sorted(s.bases)}); "
                             f"every rank reaches step {newest}") from None
    check_payloads(scans, target, feature_types or {})
    return target


def check_payloads(scans: List[journal.JournalScan], target: int, feature_types: Dict[str, type]) -> None:
    """Refuse (``SystemExit``) before anything runs when a record to replay up to ``target`` holds a payload of a
    feature whose class (``feature_types[name]``) does not declare ``journal_export`` REPLAY or SKIP."""
    for s in scans:
        for step in s.plan(target)[1]:
            for name in s.load_commit(step).state["features"]:
                rule = getattr(feature_types.get(name), "journal_export", None)
                if rule in (ExportRule.REPLAY, ExportRule.SKIP):
                    continue
                why = (f"feature {name!r} declares journal_export={rule.value}" if rule is not None else
                       f"no known feature is named {name!r}; a feature of your own needs journal_export = "
                       "ExportRule.REPLAY (with export_replayer) or SKIP, passed in feature_types")
                raise SystemExit(f"ds_ext.recovery export: {s.rank_dir}: step {step} holds {name!r} data, which "
                                 f"the exporter cannot replay ({why}). Export a step before it with --step, or "
                                 "resume the job with that feature on and save there (save_checkpoint, --save_hf)")


class _Skipped:
    """Stands for a feature declaring ``journal_export = SKIP``: its payloads and base state are passed over."""

    def journal_replay(self, payload) -> None:
        pass

    def load_state_dict(self, sd) -> None:
        pass

    def close(self) -> None:
        pass


def export_features(meta: Dict, engine, global_rank: int, feature_types: Dict[str, type]) -> Dict[str, object]:
    """Name -> replay-only object for every feature class of ``feature_types`` whose payloads the exporter handles
    (the run's features as the contract declares them): ``export_replayer(meta, engine, global_rank)`` for REPLAY
    (left out when the run had the feature off), a pass-over for SKIP."""
    out: Dict[str, object] = {}
    for name, cls in feature_types.items():
        if cls.journal_export == ExportRule.SKIP:
            out[name] = _Skipped()
        elif cls.journal_export == ExportRule.REPLAY:
            replayer = cls.export_replayer(meta, engine, global_rank)
            if replayer is not None:
                out[name] = replayer
    return out


def start_exporters(fn, args: tuple, nprocs: int) -> None:
    """Run ``fn(local_rank, *args)`` on ``nprocs`` local processes and wait for all; one that raises fails the call
    with its traceback. The processes are forked by multiprocessing's fork server, not spawned: in a process that
    already runs one with torch and DeepSpeed preloaded (the test suite's, ``tests/dist.py``) they start without
    importing them again (a few CPU-seconds per process); otherwise they import them as spawned processes do. Each
    process sets its own environment (:func:`exporter_process`)."""
    import torch.multiprocessing as mp
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver")


def exporter_process(rank: int, world_size: int, port: int) -> None:
    """The environment of local rank ``rank`` of an exporter group (gloo on CPU, one torch thread per process)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(1)


def param_groups(module: nn.Module, meta: Dict) -> List[Dict]:
    """The run's optimizer parameter groups over ``module``'s parameters (names and hyperparameters from the
    journal's EXPORT.bin, in ZeRO's group order, so ZeRO partitions them as the run did)."""
    params = dict(module.named_parameters())
    return [{"params": [params[n] for n in names], **hyper} for names, hyper in zip(meta["groups"], meta["hyper"])]


def replay_into(engine, meta: Dict, rank_dir: str, target: int, global_rank: int,
                feature_types: Dict[str, type]) -> None:
    """Replay ``rank_dir``'s journal up to ``target`` into ``engine`` (built with the run's config over a module
    with the run's parameter names) exactly as a resume does, the features' payloads as they declare
    (:func:`export_features`; ``global_rank``: the run's rank of this journal). Collective in the ZeRO group."""
    features = export_features(meta, engine, global_rank, feature_types)
    replay_journal(ZeroPartitionState(engine), journal.scan(rank_dir), target, features,
                   cannot_replay="the run had that feature on? the exporter rebuilds only what the journal's "
                   "EXPORT.bin enables")
    for feature in features.values():
        feature.close()


def replayed_engine(rank: int, rank_dirs: List[str], target: int, port: int, global_rank: int = None,
                    feature_types: Optional[Dict[str, type]] = None):
    """Local rank ``rank`` of one exporter group (one process per journal of ``rank_dirs``, gloo, CPU): a
    parameters-only module under the journal's names, a stock DeepSpeed engine with the run's config (so ZeRO
    partitions identically) and the journal replayed into it up to ``target`` (:func:`replay_into`;
    ``global_rank``: the run's rank of this journal, default ``rank``). Returns ``(engine, module)``."""
    exporter_process(rank, len(rank_dirs), port)
    import deepspeed
    meta = read_export_meta(rank_dirs[rank])
    module = ShapeOnlyModule(meta["shapes"], meta["buffers"])
    engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, meta),
                                      config=meta["ds_config"])
    replay_into(engine, meta, rank_dirs[rank], target, rank if global_rank is None else global_rank,
                feature_types or {})
    return engine, module
