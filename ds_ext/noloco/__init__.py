"""NoLoCo (arXiv 2506.10911): gossip outer steps between replicas in place of the data-parallel all-reduce.

Inner steps are stock DeepSpeed ZeRO-1/2 inside a replica (the topology's ``mpu``); every ``inner_steps`` optimizer
steps :class:`ds_ext.noloco.feature.NoLoCoFeature` runs the outer step on this rank's fp32 shard. The mechanism
lives in ``outer.py`` (update rules), ``gossip.py`` (pairing and exchange), ``accounting.py`` (collective counters,
opt-in: ``count_collectives``) and ``feature.py`` (the engine seam, ``apply_noloco``). Import those modules directly:
this package file stays light because the config block imports ``ds_ext.noloco.config``.
"""
