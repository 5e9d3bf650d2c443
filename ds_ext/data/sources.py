"""Training examples from ``--data``: text files and directories (pretraining) or JSONL lines, checked up front.

A path is a file or a directory (searched recursively, files in sorted order). ``*.jsonl`` files hold one JSON
object per line (blank lines skipped) in one of three forms, recognised by their keys:

* ``{"text": str}``: a pretraining document, loss on every token;
* ``{"prompt": str, "completion": str}``: loss on the completion only;
* ``{"messages": [{"role": str, "content": str}, ...]}``: rendered by the tokenizer's chat template, loss on the
  assistant turns only (at least one is needed).

Any other file with a suffix in :data:`ds_ext.data.corpus.TEXT_SUFFIXES` is one ``text`` document. A line that is not
a JSON object, has none of the known keys, keys of two forms (e.g. ``text`` and ``prompt``) or a value of the wrong
type is a :class:`DataError` naming the file, the line, the field (a JSON path such as ``messages[2].content``) and
what is allowed; so is an empty file (no text, or no JSON line). Nothing is skipped silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from ds_ext.data.corpus import TEXT_SUFFIXES, DataError, corpus_files

FORMS = "'text', 'prompt' + 'completion', or 'messages'"
FORM_KEYS = {"text": {"text"}, "prompt_completion": {"prompt", "completion"}, "messages": {"messages"}}


@dataclass(frozen=True)
class Example:
    kind: str             # "text", "prompt_completion" or "messages"
    fields: Dict[str, Any]
    where: str            # "file:line" (or the file for a text document), for error messages


def data_files(path: Optional[str]) -> List[Path]:
    """The files under ``path``; ``None``: the reference model's default corpus (the standard library's modules)."""
    return corpus_files(path, TEXT_SUFFIXES + (".jsonl",), "data files")


def _string(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r}: expected a string, got {type(value).__name__} {value!r:.60}")
    return value


def _messages(value, where: str) -> List[Dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'messages': expected a non-empty list of {{'role', 'content'}} objects, "
                        f"got {type(value).__name__} {value!r:.60}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field 'messages[{i}]': expected an object with 'role' and 'content', got "
                            f"{type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: field 'messages[{i}].{key}': missing")
            _string(m[key], where, f"messages[{i}].{key}")
        out.append(dict(m))
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field 'messages': no message with role 'assistant', so no token has a loss")
    return out


def parse_line(obj: Any, where: str) -> Example:
    """One JSONL object -> an :class:`Example` (see the module docstring for the forms)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with {FORMS}, got {type(obj).__name__}")
    forms = [name for name, keys in FORM_KEYS.items() if keys & obj.keys()]
    if len(forms) > 1:
        found = ", ".join(repr(k) for k in sorted(set().union(*(FORM_KEYS[f] for f in forms)) & obj.keys()))
        raise DataError(f"{where}: fields of {len(forms)} forms ({found}); a line holds exactly one of {FORMS}")
    if "messages" in obj:
        return Example("messages", {"messages": _messages(obj["messages"], where)}, where)
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if key not in obj:
                raise DataError(f"{where}: field {key!r}: missing ('prompt' and 'completion' go together)")
        return Example("prompt_completion", {k: _string(obj[k], where, k) for k in ("prompt", "completion")}, where)
    if "text" in obj:
        return Example("text", {"text": _string(obj["text"], where, "text")}, where)
    raise DataError(f"{where}: no known field (keys: {', '.join(sorted(obj)) or 'none'}); a line needs {FORMS}")


def read_jsonl(path: Path) -> Iterator[Example]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg} at column {e.colno})") from e
            yield parse_line(obj, where)


def read_examples(path: Optional[str]) -> List[Example]:
    """Every example under ``path``, in file order then line order (deterministic)."""
    out: List[Example] = []
    for f in data_files(path):
        if f.suffix == ".jsonl":
            lines = list(read_jsonl(f))
            if not lines:
                raise DataError(f"{f}: empty file (no JSON line); a .jsonl file holds one object per line")
            out.extend(lines)
        else:
            text = f.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                raise DataError(f"{f}: empty file (no text); a text file is one document")
            out.append(Example("text", {"text": text}, str(f)))
    if not out:
        raise DataError(f"--data {path}: no examples")
    return out
