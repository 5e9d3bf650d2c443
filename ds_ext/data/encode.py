"""Examples -> token documents ``(ids, labels)`` with an HF tokenizer; labels unshifted, -100 = no loss.

* ``text``: the tokenizer's own special tokens (``add_special_tokens=True``, e.g. Llama's BOS) + EOS; loss on all.
* ``prompt_completion``: ``prompt`` with special tokens, then ``completion`` + EOS; loss on the completion + EOS.
* ``messages``: the chat template's text, split at the assistant turns and tokenized piece by piece; loss on the
  assistant pieces. Assistant turn i spans from the end of ``render(messages[:i], add_generation_prompt=True)`` to
  the end of ``render(messages[:i + 1])`` (its content and the template's end-of-turn tokens, so the model learns to
  stop); each render must be a prefix of the next, which is checked (a template that rewrites earlier turns is
  refused, naming the line).
"""
from __future__ import annotations

from typing import List, Tuple

from ds_ext.data.sources import DataError, Example
from ds_ext.ops.losses import IGNORE_INDEX

Doc = Tuple[List[int], List[int]]  # (ids, labels), equal length


def _ids(tokenizer, text: str, special: bool) -> List[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _eos(tokenizer) -> List[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _render(tokenizer, messages, where: str, **kw) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    except Exception as e:  # jinja errors (raise_exception in templates) have no common base class
        raise DataError(f"{where}: field 'messages': the tokenizer's chat template refused it: {e}") from e


def assistant_spans(tokenizer, messages, where: str) -> Tuple[str, List[Tuple[int, int]]]:
    """The rendered conversation and the character spans ``[s, e)`` of its assistant turns."""
    full = _render(tokenizer, messages, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], where, add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[:i + 1], where)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(f"{where}: field 'messages[{i}]': the chat template does not render the conversation "
                            "turn by turn (an earlier render is not a prefix of a later one), so the assistant "
                            "tokens cannot be located")
        spans.append((len(before), len(through)))
    return full, spans


def encode_messages(tokenizer, messages, where: str) -> Doc:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: field 'messages': the tokenizer has no chat_template; use 'text' or "
                        "'prompt' + 'completion' lines, or a tokenizer with a chat template")
    full, spans = assistant_spans(tokenizer, messages, where)
    ids, labels, at = [], [], 0
    for s, e in spans + [(len(full), len(full))]:
        for piece, loss in ((full[at:s], False), (full[s:e], True)):
            if piece:
                p = _ids(tokenizer, piece, False)  # the template writes its own special tokens
                ids += p
                labels += p if loss else [IGNORE_INDEX] * len(p)
        at = e
    return ids, labels


def encode(tokenizer, ex: Example) -> Doc:
    """One example -> ``(ids, labels)`` (module docstring)."""
    if ex.kind == "text":
        ids = _ids(tokenizer, ex.fields["text"], True) + _eos(tokenizer)
        return ids, list(ids)
    if ex.kind == "prompt_completion":
        p = _ids(tokenizer, ex.fields["prompt"], True)
        c = _ids(tokenizer, ex.fields["completion"], False) + _eos(tokenizer)
        return p + c, [IGNORE_INDEX] * len(p) + c
    return encode_messages(tokenizer, ex.fields["messages"], ex.where)
