"""The one place ds_ext touches DeepSpeed internals (private methods, internal attributes, module globals).

Every use of a DeepSpeed name that is not part of DeepSpeed's public API goes through a function here, and each such
name is listed in :data:`INTERNALS` (checked on classes and modules) or :data:`INSTANCE_INTERNALS` (checked on a
built ZeRO engine and its optimizer). ``tests/test_deepspeed_adapter.py`` asserts that every listed name exists on
the installed DeepSpeed (so an upgrade fails in that one test, with one message naming what moved) and that none of
the names appears anywhere else in ``ds_ext/``. ``setup.py`` pins the DeepSpeed version this was checked against.
"""
from __future__ import annotations

from typing import List, Tuple

# (importable object path, attribute): checked with hasattr on the imported class or module.
INTERNALS: List[Tuple[str, str]] = []
# (what, attribute): what is "engine", "zero_optimizer", "pipeline_engine" or "pipeline_module"; checked on built
# objects by the test.
INSTANCE_INTERNALS: List[Tuple[str, str]] = []

# ---------------------------------------------------------------------------------------------------------------
# Section A: engine classes, initialize, pipeline grid and topology, ZeRO gradient flags, comm backend
# (the feature contract / engine work adds its functions here)
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Section B: ZeRO partitions, loss scaler, engine counters, pipeline layers, checkpoint config
# (the partition-state / journal work adds its functions here)
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Section C: ZeRO's per-parameter gradient-ready flag (StreamBP)
# ---------------------------------------------------------------------------------------------------------------

INSTANCE_INTERNALS += [("zero_param", "ds_grad_is_ready")]


def set_grad_ready(params, ready: bool) -> None:
    """Mark parameters' gradients ready (or not) for ZeRO-1/2's reduction.

    ZeRO-1/2's per-parameter gradient hook reduces a gradient only when ``param.ds_grad_is_ready`` is true (read
    with ``getattr(param, "ds_grad_is_ready", True)``, ``deepspeed/runtime/zero/stage_1_and_2.py``). StreamBP runs
    one inner backward per sequence chunk: it marks its layer's parameters not ready for every chunk but the last,
    so each gradient is reduced once per backward, as without StreamBP. Outside ZeRO the attribute is inert.
    """
    for p in params:
        p.ds_grad_is_ready = ready
