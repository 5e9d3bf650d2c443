"""The journal's on-disk record: a checksummed frame of JSON metadata and raw tensor bytes (no pickle anywhere).

Frame layout (little endian)::

    magic b"DSXJ" | version u16 | kind u16 | step i64 | meta_len u32 | payload_len u64 | crc32 u32
    meta: UTF-8 JSON, meta_len bytes | payload: the tensors' bytes back to back, payload_len bytes

``crc32`` covers the 28 header bytes before it, the meta and the payload, so a flipped byte anywhere is caught, and a
frame that runs past the end of its file is torn. Decoding builds tensors with ``torch.frombuffer`` from the
dtypes and shapes in the meta (a fixed whitelist of dtypes): reading a journal never runs code from it.

Nested state (dicts with string keys, lists, tensors, numbers, strings, None) is carried by :func:`flatten` /
:func:`unflatten`: tensors are replaced by ``{"__tensor__": i}`` in the JSON and stored in the payload.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Tuple

import torch

MAGIC = b"DSXJ"
# 2: one commit-frame layout for the DeepSpeed and megatron journals ({applied, groups, state: {counters, hyper,
#    scaler, lr_scheduler, rng}, features}) and one gradient frame per master tensor; version 1 journals had two
#    layouts and are refused (see journal.check_version).
VERSION = 2
KIND_STEP, KIND_BASE, KIND_GRAD = 1, 2, 3  # a step's commit frame, a base, a step's gradient frame
HEADER = struct.Struct("<4sHHqIQ")
CRC = struct.Struct("<I")
FRAME_OVERHEAD = HEADER.size + CRC.size
DTYPES = {str(d).split(".")[-1]: d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                             torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                             torch.bool)}
TENSOR_KEY = "__tensor__"


class RecordError(ValueError):
    """A frame that cannot be used: ``reason`` says why (torn, checksum, magic, ...), ``offset`` where it starts."""

    def __init__(self, path: str, offset: int, reason: str):
        self.path, self.offset, self.reason = path, offset, reason
        super().__init__(f"{path} at byte {offset}: {reason}")


@dataclass
class Record:
    """One decoded frame: ``meta`` with tensors put back in place (see :func:`unflatten`)."""

    kind: int
    step: int
    state: Dict[str, Any]
    nbytes: int


def flatten(obj: Any, tensors: List[torch.Tensor]) -> Any:
    """JSON-able copy of ``obj`` with each tensor appended to ``tensors`` and replaced by a reference."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {TENSOR_KEY: len(tensors) - 1}
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad or TENSOR_KEY in obj:
            raise TypeError(f"journal state: dict keys must be strings (not {TENSOR_KEY!r}); got {bad[:3]}")
        return {k: flatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"journal state: cannot store a {type(obj).__name__} (tensors and plain values only)")


def unflatten(obj: Any, tensors: List[torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {TENSOR_KEY}:
            return tensors[obj[TENSOR_KEY]]
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def encode(kind: int, step: int, state: Dict[str, Any]) -> List[memoryview]:
    """The frame for ``state`` as a list of buffers (header+crc, meta, one per tensor) for ``writelines``."""
    tensors: List[torch.Tensor] = []
    tree = flatten(state, tensors)
    buffers = [_tensor_bytes(t) for t in tensors]
    layout, offset = [], 0
    for t, b in zip(tensors, buffers):
        layout.append([str(t.dtype).split(".")[-1], list(t.shape), offset, b.nbytes])
        offset += b.nbytes
    meta = json.dumps({"tree": tree, "tensors": layout}, separators=(",", ":")).encode()
    header = HEADER.pack(MAGIC, VERSION, kind, step, len(meta), offset)
    crc = zlib.crc32(meta, zlib.crc32(header))
    for b in buffers:
        crc = zlib.crc32(b, crc)
    return [memoryview(header + CRC.pack(crc)), memoryview(meta)] + buffers


def decode_body(kind: int, step: int, meta: bytes, payload: bytearray) -> Record:
    doc = json.loads(meta)
    tensors = []
    for dtype, shape, offset, nbytes in doc["tensors"]:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not allowed")
        dt = DTYPES[dtype]
        count = nbytes // torch.empty((), dtype=dt).element_size()
        flat = torch.frombuffer(payload, dtype=dt, count=count, offset=offset) if count else torch.empty(0, dtype=dt)
        tensors.append(flat.reshape(shape))
    return Record(kind, step, unflatten(doc["tree"], tensors), FRAME_OVERHEAD + len(meta) + len(payload))


def read_frame(f: BinaryIO, path: str, offset: int, file_size: int) -> Optional[Record]:
    """The frame at ``offset`` (``None`` at a clean end of file); raises :class:`RecordError` if it is damaged."""
    head = f.read(FRAME_OVERHEAD)
    if not head:
        return None
    if len(head) < FRAME_OVERHEAD:
        raise RecordError(path, offset, f"torn header ({len(head)} of {FRAME_OVERHEAD} bytes)")
    magic, version, kind, step, meta_len, payload_len = HEADER.unpack_from(head)
    if magic != MAGIC:
        raise RecordError(path, offset, f"bad magic {magic!r}")
    if version != VERSION:
        raise RecordError(path, offset, f"frame of format version {version}; this ds_ext reads version {VERSION}")
    need = meta_len + payload_len
    if offset + FRAME_OVERHEAD + need > file_size:
        raise RecordError(path, offset, f"torn record for step {step} (needs {need} bytes, "
                                        f"{file_size - offset - FRAME_OVERHEAD} left)")
    meta, payload = f.read(meta_len), bytearray(f.read(payload_len))
    (crc,) = CRC.unpack_from(head, HEADER.size)
    if zlib.crc32(payload, zlib.crc32(meta, zlib.crc32(head[:HEADER.size]))) != crc:
        raise RecordError(path, offset, f"checksum mismatch in the record for step {step}")
    try:
        return decode_body(kind, step, meta, payload)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise RecordError(path, offset, f"undecodable record for step {step}: {exc}") from None


def read_frames(path: str) -> Iterator[Tuple[int, Record]]:
    """``(offset, record)`` for each good frame of a file, in order; raises :class:`RecordError` at the first bad
    one (the frames before it were yielded and are good)."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        offset = 0
        while True:
            record = read_frame(f, path, offset, size)
            if record is None:
                return
            yield offset, record
            offset += record.nbytes
