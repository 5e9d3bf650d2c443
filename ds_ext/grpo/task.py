"""A GRPO task: prompts, a tokenizer and a reward. The runtime, queue, rollout and trainer see only :class:`Task`.

* Prompts: :class:`JsonlPrompts` (one JSON object per line: ``"prompt"`` text, or ``"messages"`` -- a chat rendered
  with the tokenizer's chat template and ``add_generation_prompt`` -- plus any metadata fields, handed to the reward)
  or :class:`AdditionPrompts` (the built-in example: ``"a+b="`` after an instruction, ``answer`` = the sum, prompt
  ``i`` drawn by a generator seeded with ``i``) or :class:`ReversePrompts` (the long-tail task: reverse a string of
  log-uniformly random length, so correct responses range from a few tokens to hundreds). Prompt ``i`` of the run is
  record ``i mod len`` (epochs repeat the file in order); a regenerated group gets the same prompt.
* Tokenizer: :class:`TextCodec` over a transformers tokenizer (``AutoTokenizer`` of the policy's directory) or the
  reference model's :class:`~ds_ext.models.ByteTokenizer`.
* Reward: :class:`~ds_ext.grpo.rewards.RewardFn` (``module:function`` or a built-in verifier).

:meth:`Task.score` decodes each response up to its EOS (excluded; a response cut at ``max_new_tokens`` is decoded
whole) and calls the reward. Every check that can run before training runs in :func:`build_task` (bad JSONL, a
missing field, a chat without a template, a reward that does not import or returns a non-number on a probe) and
raises :class:`TaskError` / :class:`~ds_ext.grpo.rewards.RewardError`, which name the file, line and field.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import torch

from ds_ext.grpo.rewards import RewardError, RewardFn

INSTRUCTION = "You are a careful calculator: add the two numbers, answer with the sum only. "
EXACT_MATCH = "ds_ext.grpo.rewards:exact_match"
PREFIX_MATCH = "ds_ext.grpo.rewards:prefix_match"


class TaskError(ValueError):
    """Bad task input (prompt file, record, tokenizer); the message names the file, line and field."""


@dataclass
class PromptRecord:
    text: str
    metadata: Dict[str, Any] = field(default_factory=dict)
    origin: str = ""                 # "file.jsonl:LINE" or "addition#i", for error messages
    add_special_tokens: bool = True  # False for chat-rendered text (the template wrote BOS itself)


class TextCodec:
    """Text <-> ids for prompts and completions: a transformers tokenizer, or ``None`` for the byte tokenizer."""

    def __init__(self, hf_tokenizer=None):
        self.hf = hf_tokenizer
        if hf_tokenizer is None:
            from ds_ext.models import ByteTokenizer
            self.byte = ByteTokenizer()
            self.eos_id, self.pad_id = ByteTokenizer.EOS, ByteTokenizer.PAD
        else:
            if hf_tokenizer.eos_token_id is None:
                raise TaskError("the tokenizer has no eos_token: responses could never end (set eos_token in its "
                                "tokenizer_config.json)")
            self.eos_id = hf_tokenizer.eos_token_id
            self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        if self.hf is None:
            return self.byte.encode(text, bos=add_special_tokens)
        return self.hf(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        if self.hf is None:
            return self.byte.decode(ids)
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list, origin: str) -> str:
        if self.hf is None or not getattr(self.hf, "chat_template", None):
            raise TaskError(f"{origin}: the record has 'messages' but the tokenizer has no chat template; give "
                            "'prompt' text instead, or use a model directory whose tokenizer has one")
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors of a user template: name the record
            raise TaskError(f"{origin}: the chat template failed on 'messages': {type(exc).__name__}: {exc}") from exc


def _parse_record(obj, origin: str, codec: TextCodec) -> PromptRecord:
    if not isinstance(obj, dict):
        raise TaskError(f"{origin}: a record must be a JSON object, got {type(obj).__name__}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise TaskError(f"{origin}: a record needs exactly one of 'prompt' (text) or 'messages' (a chat); it has "
                        f"{'both' if has_prompt else 'neither'} (fields: {sorted(obj)})")
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
    if "completion" in meta:
        raise TaskError(f"{origin}: 'completion' is not allowed as a metadata field (the reward's own argument)")
    if has_prompt:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise TaskError(f"{origin}: 'prompt' must be a non-empty string, got {obj['prompt']!r:.80}")
        return PromptRecord(obj["prompt"], meta, origin)
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs):
        raise TaskError(f"{origin}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}}")
    return PromptRecord(codec.render_chat(msgs, origin), meta, origin, add_special_tokens=False)


class JsonlPrompts:
    """The records of a JSONL file (blank lines skipped), parsed and checked when built."""

    def __init__(self, path: str, codec: TextCodec):
        self.path = path
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except OSError as exc:
            raise TaskError(f"--prompts {path}: {exc.strerror or exc}") from exc
        self.records: List[PromptRecord] = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            self.records.append(_parse_record(obj, f"{path}:{n}", codec))
        if not self.records:
            raise TaskError(f"--prompts {path}: no records")

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> PromptRecord:
        return self.records[index % len(self.records)]

    def checked_records(self) -> List[PromptRecord]:
        return self.records


@dataclass
class AdditionPrompts:
    """The built-in example task: ``instruction + "a+b="``, metadata ``answer`` = the sum."""

    max_operand: int = 4
    min_operand: int = 0
    instruction: str = INSTRUCTION
    seed: int = 0

    def operands(self, index: int):
        rng = random.Random(self.seed * 1_000_003 + index)
        return rng.randint(self.min_operand, self.max_operand), rng.randint(self.min_operand, self.max_operand)

    def record(self, index: int) -> PromptRecord:
        a, b = self.operands(index)
        return PromptRecord(f"{self.instruction}{a}+{b}=", {"answer": str(a + b)}, f"addition#{index}")

    def checked_records(self) -> List[PromptRecord]:
        return [self.record(0)]  # every record has the same fields


@dataclass
class ReversePrompts:
    """The long-tail task: ``instruction + s + "="`` for a random lower-case string ``s`` whose length is
    log-uniform in ``[min_len, max_len]`` (median ~ sqrt(min_len * max_len): most answers are short, a few are
    hundreds of characters); metadata ``answer`` = ``s`` reversed. Prompt ``i`` is drawn by a generator seeded with
    ``i``. With the byte tokenizer a correct response is ``len(s) + 1`` tokens (EOS included)."""

    min_len: int = 2
    max_len: int = 256
    instruction: str = "reverse: "
    seed: int = 0
    alphabet: str = "abcdefghijklmnopqrstuvwxyz"

    def __post_init__(self):
        if not 1 <= self.min_len <= self.max_len:
            raise TaskError(f"ReversePrompts: need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")

    def string(self, index: int) -> str:
        rng = random.Random(self.seed * 1_000_003 + index)
        n = int(round(math.exp(rng.uniform(math.log(self.min_len), math.log(self.max_len)))))
        return "".join(rng.choice(self.alphabet) for _ in range(n))

    def record(self, index: int) -> PromptRecord:
        s = self.string(index)
        return PromptRecord(f"{self.instruction}{s}=", {"answer": s[::-1]}, f"reverse#{index}")

    def checked_records(self) -> List[PromptRecord]:
        return [self.record(0)]


class Task:
    """Prompts + tokenizer + reward: what the rollout and the trainer need of a task (see the module docstring)."""

    def __init__(self, prompts, codec: TextCodec, reward: RewardFn):
        self.prompts, self.codec, self.reward = prompts, codec, reward
        self.eos_id, self.pad_id = codec.eos_id, codec.pad_id

    def record(self, index: int) -> PromptRecord:
        return self.prompts.record(index)

    def prompt_ids(self, index: int) -> torch.Tensor:
        """``[P]`` int64."""
        rec = self.record(index)
        return torch.tensor(self.codec.encode(rec.text, rec.add_special_tokens), dtype=torch.long)

    def completion(self, response_ids: torch.Tensor, length: int) -> str:
        ids = response_ids[:length].tolist()
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return self.codec.decode(ids)

    def score(self, index: int, responses: torch.Tensor, lengths: Sequence[int]) -> List[float]:
        """Rewards ``[G]`` of one group: ``responses [G, L]`` to prompt ``index``, ``lengths`` through EOS."""
        texts = [self.completion(responses[i], int(lengths[i])) for i in range(len(lengths))]
        return self.reward.score(self.record(index), index, texts)

    def sft_batch(self, indices: List[int]):
        """``(input_ids, labels)`` for a supervised warm start on records with an ``answer`` field: labels only on
        the answer and its EOS (-100 elsewhere)."""
        rows, labels = [], []
        for i in indices:
            prompt = self.prompt_ids(i).tolist()
            answer = self.codec.encode(str(self.record(i).metadata["answer"]), add_special_tokens=False)
            answer = answer + [self.eos_id]
            ids = prompt + answer
            rows.append(ids[:-1])
            labels.append([-100] * (len(prompt) - 1) + answer)
        width = max(map(len, rows))
        pad = lambda seqs, v: torch.tensor([s + [v] * (width - len(s)) for s in seqs])  # noqa: E731
        return pad(rows, self.pad_id), pad(labels, -100)


def build_task(prompts, reward: str = EXACT_MATCH, hf_tokenizer=None, probe: bool = True) -> Task:
    """The task of a run, with every up-front check (:class:`TaskError` / ``RewardError`` on bad input).
    ``prompts``: a JSONL path or a prompt source (:class:`AdditionPrompts`)."""
    codec = TextCodec(hf_tokenizer)
    source = JsonlPrompts(prompts, codec) if isinstance(prompts, str) else prompts
    fn = RewardFn(reward)
    fn.check_records(source.checked_records())
    if probe:
        fn.probe(source.record(0))
    return Task(source, codec, fn)


def addition_task(min_operand: int = 0, max_operand: int = 4, instruction: str = INSTRUCTION, seed: int = 0,
                  hf_tokenizer=None) -> Task:
    """The built-in example: :class:`AdditionPrompts` scored by the exact-match verifier."""
    return build_task(AdditionPrompts(max_operand, min_operand, instruction, seed), EXACT_MATCH, hf_tokenizer)


def reverse_task(min_len: int = 2, max_len: int = 256, seed: int = 0, hf_tokenizer=None) -> Task:
    """The long-tail task: :class:`ReversePrompts` scored by :func:`~ds_ext.grpo.rewards.prefix_match`."""
    return build_task(ReversePrompts(min_len, max_len, seed=seed), PREFIX_MATCH, hf_tokenizer)


__all__ = ["AdditionPrompts", "JsonlPrompts", "PromptRecord", "ReversePrompts", "RewardError", "Task", "TaskError",
           "TextCodec", "addition_task", "build_task", "reverse_task"]
