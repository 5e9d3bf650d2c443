"""Recovery: a per-rank journal of ZeRO partitions for bit-exact, zero-loss resume and a converter to a standard
DeepSpeed checkpoint (``python -m ds_ext.recovery``).

Layers, bottom to top: ``records`` (frames) -> ``journal`` (one rank's directory: writer, scan, format version)
-> ``meta`` (``EXPORT.bin``) -> ``resume`` (the lifecycle shared with megatron: resume, record, base, replay) ->
``feature`` (the DeepSpeed engine feature) and ``export`` (the offline exporter). The partition state the journal
reads and writes is :mod:`ds_ext.state`."""
