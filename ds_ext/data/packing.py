"""Pack token documents into rows of ``seq_len`` (the packed-batch contract of the HF path).

A row is ``(input_ids, labels, position_ids)``, each ``[seq_len]`` int64: ``position_ids`` restart at 0 at every
document, so a document is a maximal run 0, 1, 2, ... and (transformers' packed-sequence masking, or StreamBP's
segment ids) a token attends only to earlier tokens of its own document. Labels are unshifted; the first label of
every document is -100, so after the shift the last token of one document never learns the first of the next.

Greedy, in order (deterministic, no sorting): a document goes into the current row if it fits, else the row is
closed with padding (one document of pad tokens, no loss) and a new row starts. A document longer than ``seq_len``
is cut into ``seq_len`` pieces, each packed as a document of its own. ``packing=False`` (``--no_packing``): every
piece gets a row of its own (one document per row, padded), as without packing in HF's SFTTrainer; a long
document is still cut into ``seq_len`` pieces rather than truncated, so no data is dropped.
"""
from __future__ import annotations

from typing import Iterable, List, Tuple

import torch
from torch.utils.data import Dataset

from ds_ext.data.encode import Doc
from ds_ext.ops.losses import IGNORE_INDEX


def pieces(docs: Iterable[Doc], seq_len: int) -> Iterable[Doc]:
    for ids, labels in docs:
        for s in range(0, len(ids), seq_len):
            if len(ids[s:s + seq_len]) >= 2:  # a one-token piece predicts nothing
                yield ids[s:s + seq_len], labels[s:s + seq_len]


def pack(docs: Iterable[Doc], seq_len: int, pad_id: int, packing: bool = True) -> torch.Tensor:
    """Rows ``[N, 3, seq_len]`` int64: input_ids, labels, position_ids (module docstring)."""
    rows: List[torch.Tensor] = []
    row: List[Tuple[List[int], List[int]]] = []
    used = 0

    def close():
        nonlocal row, used
        if not row:
            return
        parts = row + ([([pad_id] * (seq_len - used), [IGNORE_INDEX] * (seq_len - used))] if used < seq_len else [])
        ids = [i for p, _ in parts for i in p]
        labels = [i for _, lab in parts for i in [IGNORE_INDEX] + lab[1:]]
        positions = [t for p, _ in parts for t in range(len(p))]
        rows.append(torch.tensor([ids, labels, positions], dtype=torch.int64))
        row, used = [], 0

    for ids, labels in pieces(docs, seq_len):
        if used + len(ids) > seq_len or not packing:
            close()
        row.append((ids, labels))
        used += len(ids)
    close()
    return torch.stack(rows) if rows else torch.empty(0, 3, seq_len, dtype=torch.int64)


class PackedRows(Dataset):
    """Item ``i`` is ``(input_ids, labels, position_ids)``, each ``[seq_len]`` int64."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        r = self.rows[i]
        return r[0], r[1], r[2]
