"""Reward functions of a GRPO task: the user's ``module:function`` and the built-in verifiers.

A reward is called as ``fn(prompt, completion, **metadata) -> float`` once per response (``prompt``: the prompt text
as the model saw it, a chat template already applied; ``completion``: the decoded response up to, not including, its
EOS; ``metadata``: every other field of the prompt's JSONL record). A function with the attribute ``batched = True``
(:func:`batched`) is called once per group instead, as ``fn(prompts, completions, **metadata) -> list of floats``
with every argument a list of the group's values (TRL's reward-function convention).

:class:`RewardFn` resolves a spec (``"module:function"`` with ``module`` importable from the working directory or
``PYTHONPATH``, or ``"path/to/file.py:function"``) and checks what can be checked before a run: the spec imports and
names a callable, and every metadata field the function requires (a parameter after the first two with no default)
is in every prompt record. A call that raises or returns anything but a finite real number raises
:class:`RewardError` naming the spec, the prompt index, its origin (``file:line``) and the user's traceback.

Built-in verifiers (``ds_ext.grpo.rewards:<name>``), each 1.0 or 0.0:

* :func:`exact_match` -- the completion, stripped, equals ``answer`` (stripped, as a string);
* :func:`last_number` -- the last number in the completion (``-12``, ``3.5``, ``1,024``) equals ``answer``
  numerically (rel. tolerance 1e-9);
* :func:`regex` -- ``re.search(pattern, completion)`` finds a match (``pattern``: a metadata field).

Graded (in [0, 1]): :func:`prefix_match` -- the length of the longest common prefix of the completion and ``answer``
over the longer of the two (1.0 only for an exact match; a partly right answer earns partial credit, so a policy
that cannot yet solve a long instance still gets a learning signal).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import os
import re
import sys
import threading
import traceback
from typing import Any, Callable, List, Optional, Sequence

# AsyncFlow's rollout workers stop a run on it, so it lives in the layer below (re-exported here)
from ds_ext.asyncflow.protocol import RewardError

BUILTIN_MODULE = __name__


__all__ = ["RewardError", "RewardFn", "batched", "exact_match", "last_number", "prefix_match", "regex", "resolve",
           "required_fields"]


def batched(fn: Callable) -> Callable:
    """Mark ``fn`` as the batched form (called once per group with lists; see the module docstring)."""
    fn.batched = True
    return fn


def exact_match(prompt: str, completion: str, answer: Any, **_) -> float:
    return float(completion.strip() == str(answer).strip())


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(prompt: str, completion: str, answer: Any, **_) -> float:
    found = _NUMBER.findall(completion)
    if not found:
        return 0.0
    try:
        got, want = float(found[-1].replace(",", "")), float(str(answer).replace(",", ""))
    except ValueError:
        return 0.0
    return float(math.isclose(got, want, rel_tol=1e-9, abs_tol=0.0))


def regex(prompt: str, completion: str, pattern: str, **_) -> float:
    return float(re.search(pattern, completion) is not None)


def prefix_match(prompt: str, completion: str, answer: Any, **_) -> float:
    want = str(answer)
    longest = max(len(want), len(completion))
    if longest == 0:
        return 1.0
    common = 0
    for a, b in zip(completion, want):
        if a != b:
            break
        common += 1
    return common / longest


def _import_module(name: str, spec: str):
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise RewardError(f"reward {spec!r}: no such file {name}")
        mod_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(name))[0], name)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:  # like `python -m`: a module next to where the user runs the command
        sys.path.append(os.getcwd())
    return importlib.import_module(name)


def resolve(spec: str) -> Callable:
    """``"module:function"`` or ``"file.py:function"`` -> the callable (:class:`RewardError` naming what failed)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward {spec!r}: expected 'module:function' (e.g. my_rewards:exact_answer or "
                          f"{BUILTIN_MODULE}:exact_match)")
    try:
        module = _import_module(module_name, spec)
    except RewardError:
        raise
    except Exception as exc:  # the user's module may fail to import in any way: report it, with its traceback
        raise RewardError(f"reward {spec!r}: module {module_name!r} does not import: {type(exc).__name__}: {exc}\n"
                          f"{traceback.format_exc()}") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        names = sorted(n for n in vars(module) if callable(getattr(module, n)) and not n.startswith("_"))
        raise RewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}; its callables: "
                          f"{', '.join(names) or 'none'}")
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def required_fields(fn: Callable) -> List[str]:
    """Metadata fields ``fn`` cannot be called without: parameters after ``prompt, completion`` with no default."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _number(value, spec: str, where: str) -> float:
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return float(value)
    raise RewardError(f"reward {spec!r} on {where} returned {value!r} ({type(value).__name__}); a reward must "
                      "be a finite real number (int, float or bool)")


class RewardFn:
    """A resolved reward (see the module docstring); pickles as its spec, so RPC ships it to rollout processes,
    which import it themselves."""

    timeout_s: Optional[float] = None  # a call that runs longer raises RewardError (``asyncflow.reward_timeout_s``)

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = resolve(spec)
        self.batched = bool(getattr(self.fn, "batched", False))

    def __reduce__(self):
        return RewardFn, (self.spec,)

    def check_records(self, records: Sequence) -> None:
        """Every field the function requires is in every record's metadata (before a run, so a missing field is
        named with its ``file:line`` instead of failing mid-run)."""
        try:
            need = required_fields(self.fn)
        except (TypeError, ValueError):  # builtins without a signature: nothing to check up front
            return
        for rec in records:
            missing = [f for f in need if f not in rec.metadata]
            if missing:
                raise RewardError(f"{rec.origin}: reward {self.spec!r} needs the field(s) {missing} in every prompt "
                                  f"record; this record has {sorted(rec.metadata) or 'no metadata fields'}")

    def score(self, record, index: int, completions: List[str]) -> List[float]:
        """Rewards of one group's ``completions`` to prompt ``index`` (``record``: its text and metadata)."""
        where = f"prompt {index} ({record.origin})"

        def call():
            if self.batched:
                meta = {k: [v] * len(completions) for k, v in record.metadata.items()}
                return self.fn([record.text] * len(completions), list(completions), **meta)
            return [self.fn(record.text, c, **record.metadata) for c in completions]
        try:
            out = call() if self.timeout_s is None else self._within_timeout(call, where)
        except RewardError:
            raise
        except Exception as exc:  # the user's code: report where, with its traceback
            raise RewardError(f"reward {self.spec!r} raised on {where}: {type(exc).__name__}: {exc}\n"
                              f"{traceback.format_exc()}") from exc
        if self.batched and (not isinstance(out, (list, tuple)) or len(out) != len(completions)):
            raise RewardError(f"reward {self.spec!r} (batched) on {where} returned {type(out).__name__} "
                              f"{out!r:.200}; expected a list of {len(completions)} numbers")
        return [_number(v, self.spec, where) for v in out]

    def _within_timeout(self, call, where: str):
        """``call()`` in a daemon thread; a call still running after ``timeout_s`` is abandoned (the thread stays
        blocked until the process ends) and named."""
        box = {}

        def run():
            try:
                box["out"] = call()
            except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller's thread
                box["exc"] = exc
        thread = threading.Thread(target=run, daemon=True, name="reward")
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            raise RewardError(f"reward {self.spec!r} did not return within {self.timeout_s:g} s on {where} "
                              "(ds_ext.asyncflow.reward_timeout_s)")
        if "exc" in box:
            raise box["exc"]
        return box["out"]

    def probe(self, record) -> None:
        """Call the reward once on ``record`` with an empty completion: a function that raises or returns a
        non-number there is refused before training (exit 2) instead of failing in a rollout worker."""
        self.score(record, 0, [""])
