"""The example task: addition with a verifiable reward behind a long shared instruction (the part Prefix Grouper
encodes once per group).

Prompt ``i`` (deterministic from its index, so a regenerated group gets the same prompt): the instruction, then
``"a+b="`` with ``a, b`` drawn from ``min_operand..max_operand`` by a generator seeded with ``i``. Reward 1 when the response,
up to its EOS, is exactly the decimal sum; else 0. ``sft_batch`` gives supervised pairs for the short warm start.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Tuple

import torch

from ds_ext.models import ByteTokenizer

INSTRUCTION = "You are a careful calculator: add the two numbers, answer with the sum only. "


@dataclass
class AdditionTask:
    max_operand: int = 4
    min_operand: int = 0
    instruction: str = INSTRUCTION
    seed: int = 0

    def __post_init__(self):
        self.tok = ByteTokenizer()

    def operands(self, index: int) -> Tuple[int, int]:
        rng = random.Random(self.seed * 1_000_003 + index)
        return rng.randint(self.min_operand, self.max_operand), rng.randint(self.min_operand, self.max_operand)

    def prompt_text(self, index: int) -> str:
        a, b = self.operands(index)
        return f"{self.instruction}{a}+{b}="

    def prompt_ids(self, index: int) -> torch.Tensor:
        """``[P]`` int64 (BOS + bytes)."""
        return torch.tensor(self.tok.encode(self.prompt_text(index), bos=True))

    def reward(self, index: int, response_ids: torch.Tensor, length: int) -> float:
        a, b = self.operands(index)
        ids = response_ids[:length].tolist()
        if not ids or ids[-1] != ByteTokenizer.EOS:
            return 0.0
        return float(self.tok.decode(ids[:-1]) == str(a + b))

    def sft_batch(self, indices: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` for a supervised step: labels only on the answer and its EOS (-100 elsewhere)."""
        rows, labels = [], []
        for i in indices:
            a, b = self.operands(i)
            prompt = self.prompt_ids(i).tolist()
            answer = self.tok.encode(str(a + b), eos=True)
            ids = prompt + answer
            rows.append(ids[:-1])
            labels.append([-100] * (len(prompt) - 1) + answer)
        width = max(map(len, rows))
        pad = lambda seqs, v: torch.tensor([s + [v] * (width - len(s)) for s in seqs])  # noqa: E731
        return pad(rows, ByteTokenizer.PAD), pad(labels, -100)
