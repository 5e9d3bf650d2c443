"""DeepSpeed's monitors (``wandb``, ``comet``, ``tensorboard`` blocks with ``"enabled": true``) need a package
DeepSpeed imports only inside the engine, on rank 0, after the job started: without it rank 0 dies in DeepSpeed's
traceback and the other ranks in a rendezvous error. :func:`monitor_problems` finds that before anything starts
(``importlib.util.find_spec``: the package is located, never imported). ``csv_monitor`` needs nothing."""
from __future__ import annotations

import importlib.util
from typing import Any, Dict, List

# monitor block -> (the package DeepSpeed imports for it, the pip distribution that provides it)
MONITOR_PACKAGES = {"wandb": ("wandb", "wandb"), "comet": ("comet_ml", "comet_ml"),
                    "tensorboard": ("tensorboard", "tensorboard")}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def monitor_problems(ds_config: Dict[str, Any]) -> List[tuple]:
    """``(json_path, message)`` for every enabled monitor whose package is not installed."""
    problems = []
    for key, (module, dist) in MONITOR_PACKAGES.items():
        block = ds_config.get(key)
        if isinstance(block, dict) and block.get("enabled") is True and not _installed(module):
            problems.append((f"{key}.enabled", f"the {key} monitor is on but its package {module!r} is not "
                             f"installed: pip install {dist}, or set {key}.enabled to false"))
    return problems
