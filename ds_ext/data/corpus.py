"""Byte-level tokenizer, a corpus that is on every machine with Python, and a deterministic sharded sampler.

The default corpus is the top-level ``*.py`` files of the running interpreter's standard library, read in sorted
order: no download, the same bytes on every machine with the same Python version. ``--data PATH`` takes a text
file or a directory of text files instead.
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, DistributedSampler

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".c", ".h")


class ByteTokenizer:
    """Tokens 0..255 are bytes (UTF-8); then BOS, EOS and PAD."""

    BOS, EOS, PAD = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = list(text.encode("utf-8"))
        return ([self.BOS] if bos else []) + ids + ([self.EOS] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class DataError(ValueError):
    """Training data that cannot be used; the message names file, line and field."""


class MissingData(DataError, FileNotFoundError):
    """``--data`` names nothing that exists."""


def corpus_files(path: Optional[str] = None, suffixes: Tuple[str, ...] = TEXT_SUFFIXES,
                 kind: str = "text files") -> List[Path]:
    """The files of the corpus: ``path`` (a file, or a directory searched recursively, in sorted order, for files
    with one of ``suffixes``), or by default the standard library's top-level modules. The one corpus walk of both
    data paths (this byte-level corpus and :func:`ds_ext.data.sources.data_files`)."""
    if path is None:
        return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise MissingData(f"--data {path}: no such file or directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise DataError(f"--data {path}: no {kind} ({', '.join(suffixes)}) under it")
    return files


def load_corpus(path: Optional[str] = None, max_bytes: int = 8 << 20) -> torch.Tensor:
    """Token ids of the whole corpus (documents joined by EOS), at most ``max_bytes`` tokens, as ``int16``: the
    ids :meth:`ByteTokenizer.encode` gives (byte values, then EOS), built from each file's UTF-8 bytes with
    ``torch.frombuffer`` rather than a Python list of ints (8 M list items took ~1 s in every training process)."""
    parts, n = [], 0
    eos = torch.tensor([ByteTokenizer.EOS], dtype=torch.int16)
    for f in corpus_files(path):
        data = bytearray(f.read_text(encoding="utf-8", errors="replace").encode("utf-8"))
        if data:  # frombuffer refuses an empty buffer
            parts.append(torch.frombuffer(data, dtype=torch.uint8).to(torch.int16))
        parts.append(eos)
        n += len(data) + 1
        if n >= max_bytes:
            break
    return torch.cat(parts)[:max_bytes] if parts else torch.zeros(0, dtype=torch.int16)


class TokenWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens: item ``i`` is ``(input_ids, labels)``, both ``[seq_len]``
    ``int64``, labels shifted by one."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"corpus of {len(tokens)} tokens is shorter than one window of {seq_len + 1}")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        w = self.tokens[i * self.seq_len: (i + 1) * self.seq_len + 1].long()
        return w[:-1], w[1:]


def train_eval_split(tokens: torch.Tensor, seq_len: int, eval_fraction: float = 0.05):
    """Train and held-out eval windows; the eval part is the corpus tail."""
    cut = int(len(tokens) * (1 - eval_fraction))
    return TokenWindows(tokens[:cut], seq_len), TokenWindows(tokens[cut:], seq_len)


def sharded_batches(dataset: Dataset, batch_size: int, shard: Tuple[int, int], seed: int = 0,
                    start_batch: int = 0) -> Iterator[Tuple[torch.Tensor, ...]]:
    """Endless deterministic micro-batches for data shard ``shard = (index, count)``; each item's tensors are
    stacked field by field (``(input_ids, labels)`` windows, or packed ``(input_ids, labels, position_ids)`` rows).

    Each epoch is a ``DistributedSampler`` permutation seeded by ``seed`` and the epoch, so every shard reads a
    disjoint slice. ``start_batch`` skips batches already consumed (resume continues the same sequence).
    """
    index, count = shard
    sampler = DistributedSampler(dataset, num_replicas=count, rank=index, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise ValueError(f"shard {index}/{count} has {len(sampler)} windows, fewer than one batch of {batch_size}")
    epoch, skip = divmod(start_batch, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)
        for b in range(skip, per_epoch):
            items = [dataset[i] for i in order[b * batch_size: (b + 1) * batch_size]]
            yield tuple(torch.stack(field) for field in zip(*items))
        epoch, skip = epoch + 1, 0


def threads_per_process(local_world_size: Optional[int] = None) -> int:
    """Torch threads so that processes x threads <= cores (oversubscribed CPU runs are many times slower)."""
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get(
        "LOCAL_SIZE", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"))))  # torch elastic / deepspeed / mpirun
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local))
