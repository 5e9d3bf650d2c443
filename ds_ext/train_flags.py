"""The training script's flags over the DeepSpeed JSON: the effective config, the run directory, HF checkpoints.

Overrides (``examples/train.py`` flag -> DeepSpeed JSON key; the JSON's value where the flag is not given):

=================================  ==============================================================================
``--lr LR``                        ``optimizer.params.lr``; ``scheduler.params.warmup_max_lr`` (WarmupLR,
                                   WarmupDecayLR)
``--warmup_steps W``               ``scheduler.params.warmup_num_steps`` (a ``WarmupLR`` is added when the JSON
                                   has no scheduler)
``--gradient_accumulation_steps``  ``gradient_accumulation_steps`` (a ``train_batch_size`` in the JSON is dropped:
                                   DeepSpeed derives it as micro x accumulation x data-parallel ranks)
``--max_steps N`` / ``--epochs``   ``scheduler.params.total_num_steps`` (WarmupDecayLR, WarmupCosineLR)
=================================  ==============================================================================

Warm-up never starts at a learning rate of 0. DeepSpeed's warm-up schedulers set ``warmup_min_lr`` before step 1
and step after each optimizer step, so steps 1 and 2 both train at ``warmup_min_lr`` (the shipped configs had 0
there: two steps that changed nothing). With ``--lr`` or ``--warmup_steps`` the warm-up's floor is
``lr / warmup_steps`` (``warmup_min_lr``; WarmupCosineLR: ``warmup_min_ratio = 1 / warmup_steps``), the rule the
shipped configs follow too (3e-3 / 30 = 1e-4); ``--warmup_steps 0`` trains at ``lr`` from step 1.

Every other scheduler type (OneCycle, LRRangeTest) sets its own learning-rate range: ``--lr``/``--warmup_steps``
with it are refused (:class:`FlagError`), as is ``--lr`` without an ``optimizer`` block.

The run directory: DeepSpeed's CSV and TensorBoard monitors write to ``<output_path>/<job_name>``; unless
``--run_name`` names one, the job name becomes ``<job_name>-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... when that
directory exists), so runs with the same config no longer append to one set of files.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from typing import Any, Dict, List, Optional

WARMUP_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
TOTAL_STEPS_SCHEDULERS = ("WarmupDecayLR", "WarmupCosineLR")
MONITORS = ("csv_monitor", "tensorboard")
EFFECTIVE_CONFIG = "effective_config.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class FlagError(ValueError):
    """A flag that cannot be applied to this config or model; the message names the flag and the JSON key."""


def override_config(ds_config: Dict[str, Any], lr: Optional[float] = None, warmup_steps: Optional[int] = None,
                    gradient_accumulation_steps: Optional[int] = None) -> Dict[str, Any]:
    """A copy of ``ds_config`` with the flags that were given written in (module docstring)."""
    cfg = copy.deepcopy(ds_config)
    if gradient_accumulation_steps is not None:
        cfg["gradient_accumulation_steps"] = gradient_accumulation_steps
        cfg.pop("train_batch_size", None)
    if lr is None and warmup_steps is None:
        return cfg
    optimizer = cfg.get("optimizer")
    if lr is not None:
        if not isinstance(optimizer, dict):
            raise FlagError("--lr sets optimizer.params.lr, but the DeepSpeed config has no 'optimizer' block")
        optimizer.setdefault("params", {})["lr"] = lr
    peak = lr if lr is not None else ((optimizer or {}).get("params") or {}).get("lr")
    scheduler = cfg.get("scheduler")
    if scheduler is None:
        if warmup_steps is None:
            return cfg
        if peak is None:
            raise FlagError("--warmup_steps adds a WarmupLR up to optimizer.params.lr, but the DeepSpeed config sets "
                            "no optimizer lr; add --lr")
        scheduler = cfg["scheduler"] = {"type": "WarmupLR", "params": {}}
    kind = scheduler.get("type")
    if kind not in WARMUP_SCHEDULERS:
        flags = " and ".join(f for f, v in (("--lr", lr), ("--warmup_steps", warmup_steps)) if v is not None)
        raise FlagError(f"{flags}: scheduler.type {kind!r} sets its own learning-rate range; these flags work with "
                        f"{', '.join(WARMUP_SCHEDULERS)} (or no scheduler)")
    params = scheduler.setdefault("params", {})
    steps = warmup_steps if warmup_steps is not None else int(params.get("warmup_num_steps", 1000))
    params["warmup_num_steps"] = max(1, steps)
    if kind == "WarmupCosineLR":  # ratios of optimizer.params.lr
        params["warmup_min_ratio"] = 1.0 / steps if steps else 1.0
        return cfg
    top = peak if lr is not None else params.get("warmup_max_lr", peak)
    params["warmup_max_lr"] = top
    params["warmup_min_lr"] = top / steps if steps else top
    return cfg


def set_total_steps(cfg: Dict[str, Any], max_steps: int) -> None:
    """``scheduler.params.total_num_steps = max_steps`` for the schedulers that decay to the end of training."""
    scheduler = cfg.get("scheduler") or {}
    if scheduler.get("type") in TOTAL_STEPS_SCHEDULERS:
        scheduler.setdefault("params", {})["total_num_steps"] = max_steps


def check_sequence_parallel(sequence_parallel: int, hf_model: bool, seq_len: int, packing: bool) -> None:
    """What ``ds_ext.streambp.sequence_parallel: N > 1`` cannot train, refused before training (:class:`FlagError`
    naming the key and value): the reference model (the engine shards HF causal LMs only), a ``--seq_len`` not
    divisible by ``N`` (equal shards), packed rows (the sharded attention is causal over a whole row: one document
    per row, ``--no_packing``)."""
    if sequence_parallel == 1:
        return
    key = f"ds_ext.streambp.sequence_parallel={sequence_parallel}"
    if not hf_model:
        raise FlagError(f"{key} shards the rows of an HF model (--model DIR); the reference model trains unsharded: "
                        "use sequence_parallel 1")
    if seq_len % sequence_parallel:
        raise FlagError(f"{key}: --seq_len {seq_len} is not divisible by {sequence_parallel} (each rank of a "
                        f"sequence group streams seq_len / {sequence_parallel} tokens)")
    if packing:
        raise FlagError(f"{key} streams one document per row (causal attention over the whole row), and packed rows "
                        "hold several: add --no_packing")


def steps_for_epochs(epochs: float, rows: int, micro: int, shards: int, gas: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``rows`` training rows (HF Trainer's count: whole micro-batches
    per data shard per epoch, divided by the accumulation steps, times the epochs, rounded up)."""
    per_epoch = (rows // shards // micro) // gas
    if per_epoch < 1:
        raise FlagError(f"--epochs: one epoch of {rows} training rows is less than one optimizer step "
                        f"({micro} rows per micro-batch x {gas} accumulation steps x {shards} data shards)")
    return math.ceil(epochs * per_epoch)


def monitor_roots(cfg: Dict[str, Any]) -> List[str]:
    """``output_path`` of each enabled CSV/TensorBoard monitor."""
    return [cfg[m].get("output_path") or "" for m in MONITORS
            if isinstance(cfg.get(m), dict) and cfg[m].get("enabled")]


def run_name(cfg: Dict[str, Any], given: Optional[str] = None, now: Optional[float] = None,
             reuse_latest: bool = False) -> str:
    """``given``, else ``<job_name>-<YYYYmmdd-HHMMSS>`` made unique among the monitors' existing directories.
    ``reuse_latest`` (a relaunch of the same run, e.g. a torch-elastic restart): the newest existing
    ``<job_name>-<time>`` directory, so the restarted run continues its own files."""
    if given:
        return given
    job = next((cfg[m].get("job_name") for m in MONITORS if isinstance(cfg.get(m), dict)
                and cfg[m].get("job_name")), None) or "run"
    if reuse_latest:
        pattern = re.compile(re.escape(job) + r"-\d{8}-\d{6}(-\d+)?$")
        found = [os.path.join(root, d) for root in monitor_roots(cfg) if os.path.isdir(root)
                 for d in os.listdir(root) if pattern.match(d)]
        if found:
            return os.path.basename(max(found, key=os.path.getmtime))
    base = f"{job}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    name, n = base, 1
    while any(os.path.exists(os.path.join(root, name)) for root in monitor_roots(cfg)):
        n += 1
        name = f"{base}-{n}"
    return name


def set_run_name(cfg: Dict[str, Any], name: str) -> List[str]:
    """Point every enabled CSV/TensorBoard monitor at ``<output_path>/<name>``; returns those run directories."""
    for m in MONITORS:
        if isinstance(cfg.get(m), dict) and cfg[m].get("enabled"):
            cfg[m]["job_name"] = name
    return [os.path.join(root, name) for root in monitor_roots(cfg)]


def write_effective(effective: Dict[str, Any], dirs: List[str]) -> None:
    """``effective_config.json`` in each of ``dirs`` (created)."""
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, EFFECTIVE_CONFIG), "w") as f:
            json.dump(effective, f, indent=1, default=str)


def checkpoint_dir(root: str, step: int) -> str:
    return os.path.join(root, f"checkpoint-{step}")


def rotate_checkpoints(root: str, keep: Optional[int]) -> List[str]:
    """Remove all but the ``keep`` newest ``checkpoint-<step>`` directories of ``root`` (``None``: keep all);
    returns the removed paths."""
    if keep is None or not os.path.isdir(root):
        return []
    steps = sorted(int(m.group(1)) for m in map(CHECKPOINT.match, os.listdir(root)) if m)
    gone = [checkpoint_dir(root, s) for s in steps[:max(0, len(steps) - keep)]]
    for path in gone:
        shutil.rmtree(path)
    return gone
