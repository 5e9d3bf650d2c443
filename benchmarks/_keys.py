"""The two conventions every ``benchmarks/<name>.py`` with a ``main`` follows, read by the bench test tier
(tests/test_benchmarks_smoke.py) so that the documentation and the check cannot drift apart.

1. Its module docstring lists the keys of the JSON object it prints as its last line, once, in a section::

       Last-line JSON keys:
       - `key`: what it means
       - `other`: what it means; null when ... (with --flag value)

   The section starts at the line ``Last-line JSON keys:`` and ends at the first blank line (or the end of the
   docstring). An entry is a line ``- `key`: meaning``; indented lines continue the entry above. A key that appears
   only with a flag says so in its entry: ``(with --flag)``, ``(with --flag value)``, ``(without --flag)`` or
   ``(without --flag value)``, several of them meaning all; it is required exactly when the command line (the
   ``--smoke`` sizes included) satisfies them. A key whose value may be JSON ``null`` says ``null`` in its meaning.
   The key ``skipped`` is reserved: a benchmark that cannot run here (a missing optional package, no root) prints
   ``{"skipped": why}`` as its only key and exits 0.

2. ``--smoke`` (:func:`parse_with_smoke`): a few steps of a tiny model, for CI; flags given explicitly still win.
   Its sizes are the module-level dict literal ``SMOKE`` (read by the test with :func:`smoke_sizes`).
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

HEADER = "Last-line JSON keys:"
_ENTRY = re.compile(r"^- `([A-Za-z0-9_./@-]+)`: (.+)$")
_CONDITION = re.compile(r"\((with|without) (--[A-Za-z0-9_-]+)((?: [^)\s-][^)\s]*)?)\)")


def _given(argv: List[str], flag: str, value: Optional[str]) -> bool:
    """Whether ``argv`` has ``flag`` (followed by ``value`` when given; ``--flag=value`` too)."""
    for i, arg in enumerate(argv):
        if arg == flag and (value is None or (i + 1 < len(argv) and argv[i + 1] == value)):
            return True
        if value is not None and arg == f"{flag}={value}":
            return True
    return False


@dataclass
class Key:
    """One documented key; ``conditions``: ``(negated, flag, value)`` from its ``(with[out] --flag [value])``."""
    name: str
    meaning: str
    conditions: List[Tuple[bool, str, Optional[str]]] = field(default_factory=list)

    @property
    def nullable(self) -> bool:
        return re.search(r"\bnull\b", self.meaning) is not None

    def required(self, argv: Sequence[str]) -> bool:
        """Whether a run with command line ``argv`` (with the smoke sizes spelled out) must print this key."""
        if self.name == "skipped":
            return False
        return all(_given(list(argv), flag, value) != negated for negated, flag, value in self.conditions)


def documented_keys(doc: str) -> List[Key]:
    """The keys of ``doc``'s ``Last-line JSON keys:`` section (ValueError naming the line when malformed)."""
    lines = (doc or "").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == HEADER]
    if len(starts) != 1:
        raise ValueError(f"the docstring has {len(starts)} lines {HEADER!r}; exactly one is the convention")
    keys: List[Key] = []
    for line in lines[starts[0] + 1:]:
        if not line.strip():
            break
        if line[:1].isspace() and keys:  # continuation of the entry above
            keys[-1].meaning += " " + line.strip()
            continue
        m = _ENTRY.match(line.rstrip())
        if not m:
            raise ValueError(f"{HEADER} entry {line!r} is not of the form '- `key`: meaning'")
        keys.append(Key(m.group(1), m.group(2)))
    if not keys:
        raise ValueError(f"the {HEADER!r} section lists no keys")
    for key in keys:
        key.conditions = [(c.group(1) == "without", c.group(2), c.group(3).strip() or None)
                          for c in _CONDITION.finditer(key.meaning)]
    return keys


def smoke_sizes(path: str) -> dict:
    """The module-level ``SMOKE = {...}`` literal of the benchmark at ``path`` (without importing it)."""
    tree = ast.parse(open(path).read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "SMOKE" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{path}: no module-level SMOKE = {{...}} (the --smoke sizes)")


def smoke_argv(smoke: dict, argv: Sequence[str] = ()) -> List[str]:
    """``argv`` plus the ``--smoke`` sizes it does not set, spelled out as flags."""
    out = list(argv)
    for name, value in smoke.items():
        if any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv) or value is False:
            continue
        out.append(f"--{name}")
        if value is not True:
            out += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return out


def docstring(path: str) -> str:
    """The module docstring of the benchmark at ``path`` (without importing it)."""
    return ast.get_docstring(ast.parse(open(path).read(), path)) or ""


def parse_with_smoke(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], smoke: dict):
    """``parser.parse_args(argv)`` with a ``--smoke`` flag whose defaults are ``smoke`` (explicit flags win)."""
    sizes = " ".join(smoke_argv(smoke))
    parser.add_argument("--smoke", action="store_true",
                        help=f"a few steps of a tiny model, for CI (the bench test tier): {sizes}")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--smoke" in argv:
        parser.set_defaults(**smoke)
    return parser.parse_args(argv)
