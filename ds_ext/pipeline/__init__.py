"""ds_ext's own pipeline schedules on DeepSpeed's ``PipelineEngine``: micro-batches that do not take the plain
stage-0-to-stage-(S-1) path.

* :class:`~ds_ext.pipeline.schedule.SwapEndStagesSchedule` (CheckFree+, ``recovery.checkpoint_free.swap_end_stages``):
  on odd micro-batches the two stages at each end run their layers in swapped order.
* :class:`~ds_ext.pipeline.schedule.RandomRoutingSchedule` (NoLoCo, ``noloco.random_routing``): every micro-batch
  hops to a replica drawn from a shared seed at each stage boundary.

:mod:`ds_ext.pipeline.paths` holds the pure path arithmetic, :mod:`ds_ext.pipeline.p2p` the point-to-point transfer,
:mod:`ds_ext.pipeline.schedule` the executor; DeepSpeed is reached only through :mod:`ds_ext._deepspeed`.
"""
