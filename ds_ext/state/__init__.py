"""The training state a rank owns, as the journal, checkpoint-free recovery and NoLoCo read and write it.

* :mod:`tree`: plain helpers on state trees (``clone_tree``, optimizer ``hyperparameters``, RNG state).
* :mod:`partition`: the :class:`~ds_ext.state.partition.PartitionState` protocol and its DeepSpeed implementations
  (ZeRO-1/2 partitions, ZeRO-0 replicated params), plus the small :class:`~ds_ext.state.partition.FlatShards`
  read/write protocol NoLoCo's outer step uses.
* :mod:`megatron`: the same protocols on megatron-core's distributed optimizer (imports no megatron module).

Layer: below ``recovery``, ``checkfree``, ``noloco`` and ``megatron``; uses only :mod:`ds_ext._deepspeed` and torch.
"""
