"""Kernel selection for the merged attention op: fused kernels that return the row log-sum-exp, one contract.

:func:`select_kernel` picks, for queries ``q: [B, H, L, D]`` and keys ``k: [B, Hkv, n, D]``:

=================== ========================================================================================
``cpu_flash``        CPU, fp32: ``aten::_scaled_dot_product_flash_attention_for_cpu`` (+ backward).
``cuda_flash``       CUDA, bf16/fp16, compute capability >= 8.0, ``D <= 256`` and ``D % 8 == 0``:
                     ``aten::_scaled_dot_product_flash_attention`` (+ backward). Grouped K/V heads natively.
``cuda_efficient``   CUDA, fp32 (``D % 4 == 0``), or bf16/fp16 where flash does not apply (``D % 8 == 0``):
                     ``aten::_scaled_dot_product_efficient_attention`` (+ backward). It has no grouped heads, so
                     K/V are expanded to ``H`` heads for the call (a view, copied by the kernel call) and their
                     gradients summed back over each group.
``masked_sdpa``      everything else, or when the caller needs a mask the parts cannot express (key padding, a
                     caller's chunk mask): the caller runs SDPA with a boolean mask. Logged once per reason
                     (logger ``ds_ext.ops.attention``, INFO).
=================== ========================================================================================

**Contract** (what :class:`ds_ext.ops.attention.MergedAttention` calls, identical for every kernel):
``forward(q, k, v, causal, scale) -> (out [B, H, L, D] in q's dtype, lse [B, H, L] fp32)`` and
``backward(grad_out, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)`` shaped like ``q, k, v``, where ``out``
and ``lse`` may be the *merged* ones (see :mod:`ds_ext.ops.attention`). ``causal`` parts are square, so upper-left
(CPU, efficient) and bottom-right (flash) causal alignment agree. Dropout is always 0, so the CUDA backwards' RNG
arguments (philox seed/offset) are never read; they get empty tensors of the forward's dtypes.

Normalisation per kernel: the CPU kernel's ``lse`` is a transposed ``[B, L, H]`` buffer (used as is); the flash op
returns nine values (``out, lse`` kept; its ``cum_seq_q/k`` are None for dense inputs and go back as None); the
efficient op returns ``lse`` padded to a multiple of 32 query rows (sliced to ``L``; backward pads the merged
``lse`` again, as its kernel indexes it with that stride) and its backward kernel reads ``out`` with row stride
``H * D`` (:func:`efficient_out_layout` gives the merged ``out`` that layout). Every wrapper is checked against the
ops' meta registrations and schemas, live and for torch 2.11 (``tests/test_attention_meta.py``).

The kernel handles are module attributes (None where this PyTorch build lacks them), so tests can replace them with
CPU functions that follow the CUDA ops' signatures and layouts.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

logger = logging.getLogger("ds_ext.ops.attention")

CPU_FLASH, CUDA_FLASH, CUDA_EFFICIENT, MASKED_SDPA = "cpu_flash", "cuda_flash", "cuda_efficient", "masked_sdpa"

_aten = torch.ops.aten
CPU_FLASH_FORWARD = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None)
CPU_FLASH_BACKWARD = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
CUDA_FLASH_FORWARD = getattr(_aten, "_scaled_dot_product_flash_attention", None)
CUDA_FLASH_BACKWARD = getattr(_aten, "_scaled_dot_product_flash_attention_backward", None)
CUDA_EFFICIENT_FORWARD = getattr(_aten, "_scaled_dot_product_efficient_attention", None)
CUDA_EFFICIENT_BACKWARD = getattr(_aten, "_scaled_dot_product_efficient_attention_backward", None)

LSE_ALIGN = 32  # the efficient kernel's log-sum-exp rows are padded to a multiple of this
_LOW = (torch.bfloat16, torch.float16)
_logged_reasons = set()


class Facts(NamedTuple):
    """What :func:`choose` decides on (gathered from tensors by :func:`facts`, given directly in tests)."""

    device: str  # "cpu", "cuda", ...
    dtype: torch.dtype
    head_dim: int
    heads: int
    kv_heads: int
    capability: Tuple[int, int] = (0, 0)  # CUDA compute capability; (0, 0) off CUDA


def facts(q: torch.Tensor, k: torch.Tensor) -> Facts:
    cap = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else (0, 0)
    return Facts(q.device.type, q.dtype, q.shape[-1], q.shape[1], k.shape[1], tuple(cap))


def _missing(label: str, *handles: str) -> Optional[str]:
    """Why the kernels named by the module attributes ``handles`` cannot run, or None when all are present."""
    return f"this PyTorch build has no {label} kernels" if any(globals()[h] is None for h in handles) else None


def choose(f: Facts, mask_reason: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """``(kernel, reason)``: the kernel name, and why the masked fallback was chosen (None for a fused kernel)."""
    if mask_reason is not None:
        return MASKED_SDPA, mask_reason
    if f.heads % f.kv_heads:
        return MASKED_SDPA, f"{f.heads} query heads are not a multiple of {f.kv_heads} key/value heads"
    if f.dtype not in (torch.float32,) + _LOW:
        return MASKED_SDPA, f"dtype {f.dtype} (fused kernels take fp32, bf16, fp16)"
    if f.device == "cpu":
        missing = _missing("CPU flash attention", "CPU_FLASH_FORWARD", "CPU_FLASH_BACKWARD")
        if missing:
            return MASKED_SDPA, missing
        if f.dtype != torch.float32:
            return MASKED_SDPA, f"dtype {f.dtype} on CPU (the CPU merged path runs fp32 only)"
        return CPU_FLASH, None
    if f.device != "cuda":
        return MASKED_SDPA, f"inputs on {f.device} (fused kernels: CPU and CUDA)"
    why_not_flash = _why_not_cuda_flash(f)
    if why_not_flash is None:
        return CUDA_FLASH, None
    align = 4 if f.dtype == torch.float32 else 8
    missing = _missing("CUDA memory-efficient attention", "CUDA_EFFICIENT_FORWARD", "CUDA_EFFICIENT_BACKWARD")
    if missing is None and f.head_dim % align == 0:
        return CUDA_EFFICIENT, None
    return MASKED_SDPA, (f"no fused CUDA kernel: flash: {why_not_flash}; efficient: "
                         f"{missing or f'head dim {f.head_dim} is not a multiple of {align}'}")


def _why_not_cuda_flash(f: Facts) -> Optional[str]:
    if f.dtype not in _LOW:
        return f"dtype {f.dtype} (flash takes bf16/fp16)"
    if f.capability < (8, 0):
        return f"compute capability {f.capability[0]}.{f.capability[1]} < 8.0"
    if f.head_dim > 256 or f.head_dim % 8:
        return f"head dim {f.head_dim} (flash takes a multiple of 8 up to 256)"
    return _missing("CUDA flash attention", "CUDA_FLASH_FORWARD", "CUDA_FLASH_BACKWARD")


def log_fallback(what: str, reason: str) -> None:
    """Log once per (what, reason) that ``what`` runs masked SDPA instead of the merged fused path."""
    if (what, reason) not in _logged_reasons:
        _logged_reasons.add((what, reason))
        logger.info("%s: masked SDPA instead of the flash + log-sum-exp path: %s", what, reason)


def select_kernel(q: torch.Tensor, k: torch.Tensor, mask_reason: Optional[str] = None,
                  what: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """:func:`choose` on the tensors' facts; a masked choice is logged once as ``what`` (when given)."""
    name, reason = choose(facts(q, k), mask_reason)
    if reason is not None and what is not None:
        log_fallback(what, reason)
    return name, reason


# ------------------------------------------------------------------------------------------------------ the kernels


class Kernel(NamedTuple):
    """One fused kernel under the module docstring's contract."""

    name: str
    forward: Callable
    backward: Callable


def _cpu_forward(q, k, v, causal, scale):
    return CPU_FLASH_FORWARD(q, k, v, 0.0, causal, scale=scale)


def _cpu_backward(grad_out, q, k, v, out, lse, causal, scale):
    return CPU_FLASH_BACKWARD(grad_out, q, k, v, out, lse, 0.0, causal, scale=scale)


def _no_rng(device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Philox seed/offset for a backward without dropout (never read; the forward's dtypes)."""
    return torch.empty(2, dtype=torch.uint64, device=device), torch.empty((), dtype=torch.uint64, device=device)


def _flash_forward(q, k, v, causal, scale):
    out, lse, *_ = CUDA_FLASH_FORWARD(q, k, v, 0.0, causal, False, scale=scale)
    return out, lse


def _flash_backward(grad_out, q, k, v, out, lse, causal, scale):
    seed, offset = _no_rng(q.device)
    dq, dk, dv = CUDA_FLASH_BACKWARD(grad_out, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2],
                                     0.0, causal, seed, offset, scale=scale)
    return dq, dk, dv


def _expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, Hkv, n, D]`` -> ``[B, heads, n, D]``, query head ``h`` reading K/V head ``h // (heads / Hkv)``."""
    b, hkv, n, d = t.shape
    return t if hkv == heads else t[:, :, None].expand(b, hkv, heads // hkv, n, d).reshape(b, heads, n, d)


def _sum_heads(g: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Inverse of :func:`_expand_heads` for gradients: sum each group's ``heads / kv_heads`` heads."""
    b, h, n, d = g.shape
    return g if h == kv_heads else g.view(b, kv_heads, h // kv_heads, n, d).sum(2)


def _efficient_forward(q, k, v, causal, scale):
    h = q.shape[1]
    out, lse, _seed, _offset = CUDA_EFFICIENT_FORWARD(q, _expand_heads(k, h), _expand_heads(v, h), None, True, 0.0,
                                                      causal, scale=scale)
    return out, lse[:, :, :q.shape[2]]


def efficient_out_layout(out: torch.Tensor) -> torch.Tensor:
    """``out [B, H, L, Dv]`` in the memory layout the efficient backward kernel reads: it takes the batch and head
    strides from the tensor but assumes the row stride is ``H * Dv`` (``o_strideM()`` in PyTorch's
    ``mem_eff_attention/kernel_backward.h``: rows of all heads interleaved, ``[B, L, H, Dv]`` memory, as its forward
    writes it). A merged ``out`` (built by the log-sum-exp merge, or sliced from a zero buffer) is ``[B, H, L, Dv]``
    contiguous, row stride ``Dv``: passed as is, the kernel reads other heads' rows and past the buffer's end."""
    b, h, n, d = out.shape
    if out.stride(3) == 1 and (n <= 1 or out.stride(2) == h * d):
        return out
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _efficient_backward(grad_out, q, k, v, out, lse, causal, scale):
    h, rows = q.shape[1], q.shape[2]
    padded = lse.new_zeros(lse.shape[:2] + (-(-rows // LSE_ALIGN) * LSE_ALIGN,))
    padded[:, :, :rows] = lse
    seed, offset = _no_rng(q.device)
    dq, dk, dv, _ = CUDA_EFFICIENT_BACKWARD(grad_out, q, _expand_heads(k, h), _expand_heads(v, h), None,
                                            efficient_out_layout(out), padded, seed, offset, 0.0,
                                            [True, True, True, False], causal, scale=scale)
    return dq, _sum_heads(dk, k.shape[1]), _sum_heads(dv, v.shape[1])


KERNELS: Dict[str, Kernel] = {
    CPU_FLASH: Kernel(CPU_FLASH, _cpu_forward, _cpu_backward),
    CUDA_FLASH: Kernel(CUDA_FLASH, _flash_forward, _flash_backward),
    CUDA_EFFICIENT: Kernel(CUDA_EFFICIENT, _efficient_forward, _efficient_backward),
}
