"""Point-to-point transfer of a stage's activations or gradients: a tensor or a tuple of tensors, any shape.

Wire format per call (all on ``group``, between two global ranks, in order): one int64 count ``n``, then per tensor an
int64 header ``[dtype code, ndim, d0 .. d5]`` and the tensor's data. Sends are non-blocking (``isend``; keep the
returned handles until :func:`wait_all`); receives block. Plain tensors only: nothing is unpickled.
"""
from __future__ import annotations

from typing import List, Tuple, Union

import torch
import torch.distributed as dist

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
          torch.uint8)
MAX_DIMS = 6
Tensors = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


def as_tuple(x: Tensors) -> Tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def send(x: Tensors, dst: int, group) -> list:
    """Start sending ``x`` (detached) to global rank ``dst``; returns handles and the buffers they read."""
    tensors = [t.detach().contiguous() for t in as_tuple(x)]
    keep: list = [torch.tensor([len(tensors)], dtype=torch.int64)]
    for t in tensors:
        if t.dtype not in DTYPES or t.dim() > MAX_DIMS:
            raise TypeError(f"pipeline p2p: cannot send a {t.dtype} tensor of {t.dim()} dims (allowed: {DTYPES}, "
                            f"<= {MAX_DIMS} dims)")
        shape = list(t.shape) + [0] * (MAX_DIMS - t.dim())
        keep += [torch.tensor([DTYPES.index(t.dtype), t.dim()] + shape, dtype=torch.int64), t]
    return [dist.isend(buf, dst, group=group) for buf in keep] + keep


def recv(src: int, group) -> Tuple[torch.Tensor, ...]:
    """Receive what :func:`send` sent from global rank ``src``, as a tuple."""
    count = torch.empty(1, dtype=torch.int64)
    dist.recv(count, src, group=group)
    out = []
    for _ in range(int(count)):
        header = torch.empty(2 + MAX_DIMS, dtype=torch.int64)
        dist.recv(header, src, group=group)
        code, ndim = int(header[0]), int(header[1])
        t = torch.empty([int(d) for d in header[2:2 + ndim]], dtype=DTYPES[code])
        dist.recv(t, src, group=group)
        out.append(t)
    return tuple(out)


def wait_all(handles: List) -> None:
    for h in handles:
        if hasattr(h, "wait"):
            h.wait()
