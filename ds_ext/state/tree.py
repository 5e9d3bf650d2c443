"""Plain helpers on the state trees the journal and the rebuilds move: clone, optimizer hyperparameters, RNG."""
from __future__ import annotations

import random
from typing import Any, Dict

import torch

_PLAIN = (int, float, bool, str, tuple, type(None))


def clone_tree(tree: Any) -> Any:
    """A copy of a nest of dicts, lists and tuples whose tensors are detached clones (lists come back for tuples);
    other leaves are shared. For state handed to a background writer while training keeps changing it."""
    if torch.is_tensor(tree):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [clone_tree(v) for v in tree]
    return tree


def hyperparameters(group: Dict[str, Any]) -> Dict[str, Any]:
    """A torch optimizer param group's plain settings (``lr``, ``betas`` as a list, ``weight_decay``, ... and
    ``None`` values), without ``params`` or anything that is not a plain value."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()
            if k != "params" and isinstance(v, _PLAIN)}


def restore_hyperparameters(group: Dict[str, Any], hyper: Dict[str, Any]) -> None:
    """Put :func:`hyperparameters` back into ``group``; a setting the group holds as a tuple gets a tuple again."""
    group.update({k: (tuple(v) if isinstance(group.get(k), tuple) else v) for k, v in hyper.items()})


def rng_state() -> Dict[str, Any]:
    """torch's CPU (and CUDA, if present) and Python's RNG states as plain values and tensors."""
    version, internal, gauss = random.getstate()  # one copy of the 625-word state per step, not three
    state = {"torch": torch.get_rng_state(), "python": list(internal), "python_version": version,
             "python_gauss": gauss}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
