"""The layers of ``ds_ext``, bottom first. A module imports only from its own layer or a lower one
(``tests/test_layering.py`` walks every import statement, module-level and lazy, and fails on an upward edge).

Inside the ``features`` layer one more rule holds: a feature package imports no other feature package (a shared
piece moves down into ``ops``, ``state`` or ``core``); its section model is in the ``config`` layer, so reading
another feature's config is allowed.

A module belongs to the first layer one of whose patterns matches it: a pattern names a module and everything
under it (``ds_ext.ops`` covers ``ds_ext.ops.attention``), and ``*`` matches one name (``ds_ext.*.config``).
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import List, Optional, Tuple

LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    # DeepSpeed internals (one adapter), the config base, process-group start-up (and the run secret), the math
    # every feature shares
    ("base", ("ds_ext._deepspeed", "ds_ext._deepspeed_launcher", "ds_ext.config.base", "ds_ext.distributed", "ds_ext.ops", "ds_ext.layers",
              "ds_ext.secret")),
    # each feature's section model, and the whole "ds_ext" block built from them
    ("config", ("ds_ext.*.config", "ds_ext.config")),
    # the feature contract, the replica x stage x ZeRO layout, a rank's partition state, the pipeline schedules
    ("core", ("ds_ext.contract", "ds_ext.topology", "ds_ext.state", "ds_ext.pipeline")),
    # models (reference and HF) and the data path
    ("models", ("ds_ext.models", "ds_ext.data")),
    # the features attached to an engine through the contract
    ("features", ("ds_ext.streambp", "ds_ext.prefix_grouper", "ds_ext.noloco", "ds_ext.checkfree",
                  "ds_ext.recovery")),
    # applications built from features and models: AsyncFlow (queue, runtime, rollout workers and their engines),
    # the exporters, the training script's flags
    ("applications", ("ds_ext.asyncflow", "ds_ext.tools", "ds_ext.train_flags")),
    # RL algorithms on AsyncFlow: GRPO (loss, trainer, rewards, tasks) hands the runtime its task and trainer factory
    ("algorithms", ("ds_ext.grpo",)),
    # what wires features into engines and processes
    ("integration", ("ds_ext.engine", "ds_ext.features", "ds_ext.megatron", "ds_ext.launch")),
    # the package's face, and every command-line entry point (nothing imports a __main__; ds_ext.grpo.cli is the
    # GRPO command line behind examples/grpo.py and python -m ds_ext.grpo)
    ("api", ("ds_ext", "ds_ext.*.__main__", "ds_ext.grpo.cli")),
]
FEATURE_LAYER = "features"


def _matches(module: str, pattern: str) -> bool:
    parts, pat = module.split("."), pattern.split(".")
    return len(parts) >= len(pat) and all(fnmatchcase(p, q) for p, q in zip(parts, pat))


def layer_of(module: str) -> Optional[int]:
    """Index into :data:`LAYERS` of ``module`` (the most specific matching pattern wins), or None."""
    best = None  # (pattern length, layer index)
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if _matches(module, pattern) and (best is None or len(pattern.split(".")) > best[0]):
                best = (len(pattern.split(".")), index)
    return None if best is None else best[1]


def feature_package(module: str) -> Optional[str]:
    """``ds_ext.<feature>`` for a module of the features layer (not its config section), else None."""
    index = layer_of(module)
    if index is None or LAYERS[index][0] != FEATURE_LAYER:
        return None
    return ".".join(module.split(".")[:2])


def upward_edges(edges: dict) -> List[str]:
    """``importer -> imported (file:line): why`` for every edge that breaks the layer order."""
    bad = []
    for importer, targets in sorted(edges.items()):
        low = layer_of(importer)
        for target, where in sorted(targets.items()):
            high = layer_of(target)
            if low is None or high is None:
                bad.append(f"{importer} -> {target} ({where}): module in no layer of ds_ext.layers.LAYERS")
            elif high > low:
                bad.append(f"{importer} -> {target} ({where}): layer {LAYERS[low][0]} imports layer "
                           f"{LAYERS[high][0]}")
            elif feature_package(importer) and feature_package(target) \
                    and feature_package(importer) != feature_package(target):
                bad.append(f"{importer} -> {target} ({where}): a feature imports another feature")
    return bad
