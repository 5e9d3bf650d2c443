"""Recovery: a per-rank journal of ZeRO partitions for bit-exact, zero-loss resume (``journal``, ``records``,
``zero_state``, ``feature``) and a converter to a standard DeepSpeed checkpoint (``python -m ds_ext.recovery``)."""
