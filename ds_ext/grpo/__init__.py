"""GRPO on AsyncFlow: the algorithm above the transport.

* :mod:`ds_ext.grpo.loss` -- group advantages and the clipped / off-policy-corrected token loss;
* :mod:`ds_ext.grpo.trainer` -- :class:`~ds_ext.grpo.trainer.GRPOTrainer`, one optimizer step per batch of groups
  on a ds_ext DeepSpeed engine (the trainer factory :mod:`ds_ext.asyncflow.runtime` is given);
* :mod:`ds_ext.grpo.rewards` -- the user's ``module:function`` rewards and the built-in verifiers;
* :mod:`ds_ext.grpo.task` -- prompts (JSONL, addition, reverse) with their reward: the task AsyncFlow's rollout
  workers generate for (:class:`~ds_ext.asyncflow.protocol.RolloutTask`);
* :mod:`ds_ext.grpo.cli` -- the command line (``examples/grpo.py``, ``python -m ds_ext.grpo``).

AsyncFlow (:mod:`ds_ext.asyncflow`: queue, runtime, rollout workers, engines, weight sync) sits one layer below and
imports nothing from here.
"""
