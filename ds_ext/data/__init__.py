"""The HF data path: examples from text/JSONL (:mod:`.sources`), tokenized with loss masks (:mod:`.encode`), packed
into rows with per-document positions (:mod:`.packing`); :func:`build_datasets` does all three."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ds_ext.data.encode import encode
from ds_ext.data.packing import PackedRows, pack
from ds_ext.data.sources import DataError, Example, read_examples


def pack_examples(path: str, tokenizer, seq_len: int, packing: bool = True) -> torch.Tensor:
    """Every example under ``path``, tokenized and packed: rows ``[N, 3, seq_len]`` (:func:`pack`)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return pack((encode(tokenizer, ex) for ex in read_examples(path)), seq_len, pad, packing)


def build_datasets(path: str, tokenizer, seq_len: int, min_rows: int, eval_fraction: float = 0.05,
                   eval_path: Optional[str] = None, packing: bool = True,
                   eval_min_rows: Optional[int] = None) -> Tuple[PackedRows, PackedRows]:
    """Train and eval rows. Without ``eval_path`` the eval rows are the last ``max(min_rows, eval_fraction)`` of
    the packed data (file order); with it, all of ``path`` trains and ``eval_path`` (same formats) is the eval set.
    ``min_rows``: rows one micro-batch of every data shard needs; ``eval_min_rows`` (default ``min_rows``): rows
    the eval set needs (every rank evaluates all of it: one micro-batch). Fewer is a :class:`DataError`."""
    rows = pack_examples(path, tokenizer, seq_len, packing)
    if eval_path is not None:
        held = pack_examples(eval_path, tokenizer, seq_len, packing)
        eval_min_rows = min_rows if eval_min_rows is None else eval_min_rows
        for flag, where, n, need, what in (("--data", path, len(rows), min_rows, "one micro-batch per data shard"),
                                           ("--eval_data", eval_path, len(held), eval_min_rows, "one micro-batch")):
            if n < need:
                raise DataError(f"{flag} {where}: {n} rows of --seq_len {seq_len}; at least {need} are needed "
                                f"({what}): more data or a shorter --seq_len")
        return PackedRows(rows), PackedRows(held)
    n_eval = max(min_rows, int(len(rows) * eval_fraction))
    if len(rows) - n_eval < min_rows:
        raise DataError(f"--data {path}: {len(rows)} rows of --seq_len {seq_len}; training needs at least "
                        f"{min_rows + n_eval} ({min_rows} for one micro-batch per data shard, {n_eval} held out for "
                        "eval): more data, a shorter --seq_len, or a separate --eval_data")
    return PackedRows(rows[:-n_eval]), PackedRows(rows[-n_eval:])


__all__ = ["DataError", "Example", "PackedRows", "build_datasets", "encode", "pack", "pack_examples", "read_examples"]
