"""The HF data path: examples from text/JSONL (:mod:`.sources`), tokenized with loss masks (:mod:`.encode`), packed
into rows with per-document positions (:mod:`.packing`); :func:`build_datasets` does all three."""
from __future__ import annotations

from typing import Tuple

from ds_ext.data.encode import encode
from ds_ext.data.packing import PackedRows, pack
from ds_ext.data.sources import DataError, Example, read_examples


def build_datasets(path: str, tokenizer, seq_len: int, min_rows: int,
                   eval_fraction: float = 0.05) -> Tuple[PackedRows, PackedRows]:
    """Train and held-out eval rows (the eval rows are the last ``max(min_rows, eval_fraction)`` of the packed
    data). ``min_rows``: rows one micro-batch of every data shard needs; fewer is a :class:`DataError`."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = pack((encode(tokenizer, ex) for ex in read_examples(path)), seq_len, pad)
    n_eval = max(min_rows, int(len(rows) * eval_fraction))
    if len(rows) - n_eval < min_rows:
        raise DataError(f"--data {path}: {len(rows)} packed rows of --seq_len {seq_len}; training needs at least "
                        f"{min_rows + n_eval} ({min_rows} for one micro-batch per data shard, {n_eval} held out for "
                        "eval): more data or a shorter --seq_len")
    return PackedRows(rows[:-n_eval]), PackedRows(rows[-n_eval:])


__all__ = ["DataError", "Example", "PackedRows", "build_datasets", "encode", "pack", "read_examples"]
