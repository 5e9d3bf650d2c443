"""Which feature attaches to a freshly built ds_ext engine, in which order. One place, so the engine stays thin."""
from __future__ import annotations

from typing import List

from ds_ext.config import DsExtConfig
from ds_ext.topology import Topology


def attach_features(engine, ext: DsExtConfig, topology: Topology) -> List[object]:
    """Attach every enabled feature (collective: all ranks call it right after the engine is built).

    Order: StreamBP (changes the model's backward), Prefix Grouper (its input hook), then NoLoCo (its outer step runs after the inner optimizer
    step), then checkpoint-free recovery (it may rebuild the step's state), then Recovery last (its record holds the step's final state, and it resumes every feature's state, asking checkpoint-free recovery for ranks whose journal is gone). With every feature off nothing is attached and the engine is stock DeepSpeed.
    """
    attached = []
    if ext.streambp.enabled:
        from ds_ext.streambp.apply import apply_streambp
        feature = apply_streambp(engine, ext.streambp, topology)
        engine.attach_feature(feature)
        attached.append(feature)
    if ext.prefix_grouper.enabled:
        from ds_ext.prefix_grouper.apply import apply_prefix_grouper
        feature = apply_prefix_grouper(engine, ext.prefix_grouper, topology)
        engine.attach_feature(feature)
        attached.append(feature)
    if ext.noloco.enabled:
        from ds_ext.noloco.feature import apply_noloco
        attached.append(apply_noloco(engine, ext.noloco, topology))
    if ext.asyncflow.enabled:
        from ds_ext.asyncflow.ledger import SampleLedger
        feature = SampleLedger()
        engine.attach_feature(feature)
        attached.append(feature)
    rebuilder = None
    if ext.recovery.checkpoint_free.enabled:
        from ds_ext.checkfree.feature import apply_checkfree
        rebuilder = apply_checkfree(engine, ext.recovery.checkpoint_free, topology)
        engine.attach_feature(rebuilder)
        attached.append(rebuilder)
    if ext.recovery.active:
        from ds_ext.recovery.feature import apply_recovery
        feature = apply_recovery(engine, ext.recovery, topology, rebuilder=rebuilder)
        engine.attach_feature(feature)
        attached.append(feature)
    for feature in attached:  # collective, in attach order: checkpoint-free's first replicas, then the resume
        if feature.name in ("checkpoint_free", "recovery"):
            feature.start(engine)
    return attached
