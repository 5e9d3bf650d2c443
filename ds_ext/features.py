"""Which feature attaches to a freshly built ds_ext engine. One place, so the engine stays thin.

Every feature is built by its ``apply_<feature>(engine, cfg, topology, ...)`` (which prepares it and never attaches
it), attached with :meth:`DsExtEngineMixin.attach_feature` (which orders features by :class:`ds_ext.contract.Phase`),
and, once all are attached, started in phase order by :meth:`DsExtEngineMixin.ds_ext_start` (see
:mod:`ds_ext.contract` for the hooks and their call order). Recovery gets the checkpoint-free rebuilder injected.
"""
from __future__ import annotations

from typing import Dict, List

from ds_ext.asyncflow.ledger import SampleLedger, apply_asyncflow
from ds_ext.checkfree.feature import CheckFreeFeature, apply_checkfree
from ds_ext.config import DsExtConfig
from ds_ext.contract import Feature
from ds_ext.noloco.feature import NoLoCoFeature, apply_noloco
from ds_ext.prefix_grouper.apply import PrefixGrouperFeature, apply_prefix_grouper
from ds_ext.recovery.feature import RecoveryFeature, apply_recovery
from ds_ext.streambp.apply import StreamBPFeature, apply_streambp
from ds_ext.topology import Topology


def feature_types() -> Dict[str, type]:
    """Every built-in feature class by its ``name`` (the key of its journal payloads): the journal exporter asks each
    one how its payloads are exported (``journal_export``, ``export_replayer``; :mod:`ds_ext.contract`)."""
    return {cls.name: cls for cls in (StreamBPFeature, PrefixGrouperFeature, NoLoCoFeature, SampleLedger,
                                      CheckFreeFeature, RecoveryFeature)}


def build_features(engine, ext: DsExtConfig, topology: Topology) -> List[Feature]:
    """Build every enabled feature (collective: the apply functions create process groups and sync replicas).

    Build order = phase order: StreamBP and Prefix Grouper (MODEL: they patch the model's forward/backward), NoLoCo
    and the AsyncFlow sample ledger (STEP), checkpoint-free recovery (REBUILD), the recovery journal last (JOURNAL:
    its record holds the step's final state; it is handed the checkpoint-free feature to rebuild ranks whose
    journal is gone).
    """
    built: List[Feature] = []
    if ext.streambp.enabled:
        built.append(apply_streambp(engine, ext.streambp, topology))
    if ext.prefix_grouper.enabled:
        built.append(apply_prefix_grouper(engine, ext.prefix_grouper, topology))
    if ext.noloco.enabled:
        built.append(apply_noloco(engine, ext.noloco, topology))
    if ext.asyncflow.enabled:
        built.append(apply_asyncflow(engine, ext.asyncflow, topology))
    rebuilder = None
    if ext.recovery.checkpoint_free.enabled:
        rebuilder = apply_checkfree(engine, ext.recovery.checkpoint_free, topology)
        built.append(rebuilder)
    if ext.recovery.active:
        built.append(apply_recovery(engine, ext.recovery, topology, rebuilder=rebuilder))
    return built


def attach_features(engine, ext: DsExtConfig, topology: Topology) -> List[Feature]:
    """Build, attach and start every enabled feature (collective: all ranks call it right after the engine is built;
    the journal resumes in its ``start``). With every feature off nothing is attached and the engine trains as
    stock DeepSpeed; features a user attaches later are started at once. Returns the engine's features."""
    for feature in build_features(engine, ext, topology):
        engine.attach_feature(feature)
    engine.ds_ext_start()
    return list(engine.ds_ext_features)
