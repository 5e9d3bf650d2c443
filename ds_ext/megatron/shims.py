"""Run megatron-core's DDP and distributed optimizer on CPU: :func:`cpu_shims`, a scoped context manager.

megatron-core 0.16.1 assumes CUDA in a few places that have nothing to do with the math:

* ``torch.cuda.current_device()`` as the device of DDP's grad/param buffers (``param_and_grad_buffer.py``), of the
  RoPE frequencies (``rotary_pos_embedding.py``) and of the distributed optimizer's buffers;
* tensors made with ``device='cuda'`` (the optimizer's unit loss scale, ``clip_grads.py``'s norm scratch);
* ``param.type() == 'torch.cuda.FloatTensor'`` to sort parameters into fp32 / fp16 / bf16 groups
  (``distrib_optimizer.py``, ``optimizer.py``) and ``tensor.cuda()``.

Inside ``with cpu_shims():`` (CPU-only machines; on a machine with CUDA it does nothing) ``torch.cuda.current_device``
returns ``"cpu"`` and a :class:`torch.overrides.TorchFunctionMode` rewrites ``device='cuda'`` to ``'cpu'``, makes
``Tensor.cuda()`` the identity and answers ``Tensor.type()`` with the CUDA name of the CPU type. Nothing is changed at
import time and everything is restored on exit. Keep every megatron call (model build, DDP, optimizer build and
``step``, forward/backward) inside the block. Not covered (they stay GPU-only): megatron's default
``DotProductAttention`` (use :class:`ds_ext.megatron.attention.PrefixGroupedCoreAttention`), the pipeline schedules
(``schedules.py`` hard-codes ``device="cuda"`` in a path the mode cannot reach), ``overlap_grad_reduce`` (CUDA streams).
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.split(":")[0] == "cuda"


class _CudaAsCpu(TorchFunctionMode):
    """``device='cuda'`` -> ``'cpu'``; ``Tensor.cuda()`` -> identity; ``Tensor.type()`` -> ``'torch.cuda.<T>'``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if args[0].is_cuda else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_shims():
    """Let megatron-core's DDP, distributed optimizer and RoPE run on CPU for the duration of the block (no-op when
    CUDA is available). Not thread-safe: it swaps ``torch.cuda.current_device`` process-wide while active."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        with _CudaAsCpu():
            yield
    finally:
        torch.cuda.current_device = saved
