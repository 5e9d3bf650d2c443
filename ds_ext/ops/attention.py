"""The attention op every ds_ext path runs: flash kernel calls over key parts, merged by log-sum-exp.

**Merged attention.** Queries ``q: [B, H, Lq, D]`` attend over several key *parts*; part ``i`` is
:class:`Part` ``(k, v, causal, q_rows, kv_rows)``: keys/values ``k[:, :, kv_rows], v[:, :, kv_rows]`` (``[B, Hkv, n,
D]``, grouped-query heads are handled by the kernel, K/V are never repeated), seen by the queries ``q_rows`` only,
fully or causally (square, upper-left aligned). Each part is one flash call giving ``out_i`` and the row
log-sum-exp ``lse_i`` of its scores; parts are merged as flash-decoding does::

    lse = logaddexp(lse_a, lse_b);   out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

which equals one softmax over the concatenated keys with the parts' masks. Backward calls the flash backward kernel
once per part with the *merged* ``out`` and ``lse``: the kernel forms ``P = exp(S - lse)`` and ``rowsum(dO * O)``
from them, which are the true full-softmax quantities, so the parts' ``dQ`` add up and their ``dK, dV`` are the
parts' exact gradients (written into one buffer per distinct K/V tensor, so slices of one tensor cost no copies).
Query rows no part covers get output 0 (padding rows of a packed batch).

Users: StreamBP's chunk attention (:func:`chunk_attention`: the unmasked prefix plus the causal diagonal block;
with packed documents, per document overlapping the chunk its earlier keys unmasked plus its causal diagonal block),
Prefix Grouper's grouped rows (prefix causal; suffixes over the prefix and causally over themselves) and, through
Prefix Grouper, the megatron core attention.

**Kernels.** :func:`ds_ext.ops.attention_kernels.select_kernel` picks the kernel by device, dtype, head dim and
whether the caller needs a mask the parts cannot express: PyTorch's CPU flash kernel (fp32), CUDA flash (bf16/fp16)
or CUDA memory-efficient attention (fp32, or where flash does not apply), all behind one ``(out, lse)`` contract.
Under bf16/fp16 the parts are merged in fp32 (the log-sum-exp merge must not round to low precision) and the merged
output is cast back once. Where no fused kernel applies, or a mask the parts cannot express is needed (key padding,
a grouped chunk), callers run :func:`grouped_sdpa` with a boolean mask (:func:`chunk_mask`,
:func:`grouped_chunk_mask`): exact too, only slower. Each reason is logged once (logger ``ds_ext.ops.attention``,
INFO).

**Packed documents.** ``segment_ids: [B, T]`` (equal ids = one document; a document is a contiguous run, rows may
differ) restrict causal attention to the query's own document. :func:`chunk_attention` and
:func:`packed_attention` (the whole sequence, any dtype: one causal SDPA call per document) take them and never
build a ``T x T`` mask; the masked fallback builds per-chunk ``[B, 1, c, e]`` masks from the segment ids.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# log_fallback is re-exported: callers with their own masked paths log through it
from ds_ext.ops.attention_kernels import KERNELS, MASKED_SDPA, Kernel, log_fallback, select_kernel  # noqa: F401

Rows = Optional[Tuple[int, int]]


class Part(NamedTuple):
    """One key part of :func:`merged_attention`: ``k, v: [B, Hkv, n, D]``, read at rows ``kv_rows`` (``(a, b)``,
    None = all), attended by the query rows ``q_rows`` (None = all), causally (square, upper-left) or fully."""

    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    q_rows: Rows = None
    kv_rows: Rows = None


def _rows(rows: Rows) -> slice:
    return slice(None) if rows is None else slice(*rows)


def lse_merge(out, lse, out_i, lse_i):
    """Merge a part's ``(out_i [.., L, D], lse_i [.., L])`` into the running ``(out, lse)`` (None: nothing yet)."""
    if out is None:
        return out_i, lse_i
    merged = torch.logaddexp(lse, lse_i)
    return torch.exp(lse - merged)[..., None] * out + torch.exp(lse_i - merged)[..., None] * out_i, merged


class MergedAttention(torch.autograd.Function):
    """``apply(q, scale, kernel, spec, *tensors)``: ``kernel`` a :class:`ds_ext.ops.attention_kernels.Kernel`,
    ``spec`` holds per part ``(k_index, v_index, causal, q_rows, kv_rows)`` into the distinct K/V ``tensors``; see
    the module docstring for the algorithm and why backward is exact."""

    @staticmethod
    def forward(ctx, q, scale, kernel: Kernel, spec, *tensors):
        acc = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) and len(spec) > 1 else None
        out = lse = None
        for ki, vi, causal, q_rows, kv_rows in spec:
            rq, rk = _rows(q_rows), _rows(kv_rows)
            out_i, lse_i = kernel.forward(q[:, :, rq], tensors[ki][:, :, rk], tensors[vi][:, :, rk], causal, scale)
            out_i = out_i if acc is None else out_i.to(acc)
            if q_rows is None:
                out, lse = lse_merge(out, lse, out_i, lse_i)
                continue
            if out is None:  # rows no part covers stay 0 (lse -inf: a later merge takes the part's values exactly)
                out = out_i.new_zeros(q.shape[:3] + out_i.shape[3:])
                lse = lse_i.new_full(q.shape[:3], float("-inf"))
            out[:, :, rq], lse[:, :, rq] = lse_merge(out[:, :, rq], lse[:, :, rq], out_i, lse_i)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, out, lse, *tensors)
        ctx.scale, ctx.kernel, ctx.spec = scale, kernel, spec
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, out, lse, *tensors = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq = torch.zeros_like(q)
        grads: List[Optional[torch.Tensor]] = [None] * len(tensors)
        for ki, vi, causal, q_rows, kv_rows in ctx.spec:
            rq, rk = _rows(q_rows), _rows(kv_rows)
            dq_i, dk_i, dv_i = ctx.kernel.backward(grad_out[:, :, rq], q[:, :, rq], tensors[ki][:, :, rk],
                                                   tensors[vi][:, :, rk], out[:, :, rq], lse[:, :, rq], causal,
                                                   ctx.scale)
            dq[:, :, rq] += dq_i
            for index, d in ((ki, dk_i), (vi, dv_i)):
                if grads[index] is None and kv_rows is None:
                    grads[index] = d  # a fresh tensor: later parts may add into it
                    continue
                if grads[index] is None:
                    grads[index] = torch.zeros_like(tensors[index])
                grads[index][:, :, rk] += d
        return (dq, None, None, None, *grads)


def merged_attention(q: torch.Tensor, parts: Sequence[Part], scale: Optional[float] = None,
                     kernel: Optional[str] = None) -> torch.Tensor:
    """Attention of ``q`` over ``parts`` (see :class:`Part`), ``[B, H, Lq, D]``, with the fused kernel ``kernel``
    (a name from :data:`ds_ext.ops.attention_kernels.KERNELS`; None: :func:`select_kernel`'s choice, which must not be
    the masked fallback: callers check :func:`select_kernel` first and run their masked path on its reason).
    The same tensor may appear in several parts (e.g. row slices of one K): its gradient is one tensor."""
    if kernel is None:
        kernel, reason = select_kernel(q, parts[0].k)
        if kernel == MASKED_SDPA:
            raise ValueError(f"merged attention has no fused kernel for these inputs ({reason}); "
                             "run the caller's masked SDPA path instead")
    tensors: List[torch.Tensor] = []
    index = {}

    def slot(t):
        if id(t) not in index:
            index[id(t)] = len(tensors)
            tensors.append(t)
        return index[id(t)]
    spec = tuple((slot(p.k), slot(p.v), p.causal, p.q_rows, p.kv_rows) for p in parts)
    return MergedAttention.apply(q, _scale(q, scale), KERNELS[kernel], spec, *tensors)


def _scale(q, scale: Optional[float]) -> float:
    return scale if scale is not None else q.shape[-1] ** -0.5


def grouped_sdpa(q, k, v, **kwargs) -> torch.Tensor:
    """SDPA with grouped key/value heads (``k, v: [B, Hkv, T, D]``, ``Hkv`` dividing ``H``).

    On CPU the flash kernel takes grouped heads directly (``enable_gqa``). On CUDA, ``enable_gqa`` rules out the
    memory-efficient kernel, the only fused one for fp32, so SDPA would fall back to the math path and materialise
    ``T x T`` scores; there K/V are repeated to ``H`` heads instead (``O(T)`` extra memory)."""
    if q.device.type == "cpu" or k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    repeat = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1),
                                          **kwargs)


def chunk_mask(s: int, e: int, key_padding_mask: Optional[torch.Tensor], device,
               segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean ``[B or 1, 1, e - s, e]``: query rows ``[s, e)`` over keys ``[0, e)``, causal aligned bottom-right,
    within the query's document (``segment_ids: [B, >= e]``), key padding (``[B, >= e]``, True = real), and each
    query sees itself (a padded row never becomes all-masked; its output is unused)."""
    q_pos = torch.arange(s, e, device=device)[:, None]
    k_pos = torch.arange(e, device=device)[None, :]
    mask = k_pos <= q_pos
    if segment_ids is not None:
        mask = (mask & (segment_ids[:, s:e, None] == segment_ids[:, None, :e]))[:, None]
    if key_padding_mask is not None:
        mask = (mask & key_padding_mask[:, None, None, :e]) | (k_pos == q_pos)
    return mask if mask.dim() == 4 else mask[None, None]


def grouped_chunk_mask(segment_ids: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Boolean ``[N, 1, e - s, e]``: rows ``[s, e)`` of the grouped mask over keys ``[0, e)`` (``segment_ids: [N, L]``,
    0 prefix, ``j >= 1`` suffix j, -1 padding). Prefix tokens attend causally to the prefix; a suffix token attends
    to the whole prefix and causally to its own suffix; every token sees itself (padding rows never become
    all-masked)."""
    q_seg, k_seg = segment_ids[:, s:e, None], segment_ids[:, None, :e]
    q_idx = torch.arange(s, e, device=segment_ids.device)[:, None]
    k_idx = torch.arange(e, device=segment_ids.device)[None, :]
    allowed = (k_idx <= q_idx) & ((k_seg == 0) & (q_seg >= 0) | (k_seg == q_seg) & (q_seg > 0))
    return (allowed | (k_idx == q_idx))[:, None]


def grouped_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The whole grouped mask ``[N, 1, L, L]`` (see :func:`grouped_chunk_mask`)."""
    return grouped_chunk_mask(segment_ids, 0, segment_ids.shape[1])


def on_block(parts: Sequence[Part], s: int, block: Tuple[torch.Tensor, torch.Tensor]) -> List[Part]:
    """Parts over the keys ``[0, e)`` of a chunk, rewritten for keys held in two tensors: rows ``< s`` in the parts'
    own ``k, v`` (the prefix, ``[B, Hkv, s, D]``), rows ``>= s`` in ``block = (k_block, v_block)`` (``[B, Hkv, e - s,
    D]``). A part reading a whole tensor gets ``kv_rows=None`` (its gradient is then the kernel's own output, no
    buffer of the tensor's size). A causal part must not straddle ``s``."""
    out = []
    for p in parts:
        a, b = p.kv_rows if p.kv_rows is not None else (0, s + block[0].shape[2])
        if p.causal and a < s < b:
            raise ValueError(f"a causal part over keys [{a}, {b}) straddles the block start {s}")
        if a < s:
            out.append(p._replace(kv_rows=_whole(a, min(b, s), p.k.shape[2])))
        if b > s:
            out.append(Part(block[0], block[1], p.causal, p.q_rows, _whole(max(a, s) - s, b - s, block[0].shape[2])))
    return out


def _whole(a: int, b: int, n: int) -> Rows:
    return None if (a, b) == (0, n) else (a, b)


def document_spans(segment_ids: torch.Tensor, e: int) -> List[List[Tuple[int, int]]]:
    """Per batch row, the ``(start, end)`` of each document within positions ``[0, e)`` (``segment_ids: [B, >= e]``;
    a document is a run of equal ids). One host sync."""
    seg = segment_ids[:, :e]
    starts: List[List[int]] = [[0] for _ in range(seg.shape[0])]
    for row, col in torch.nonzero(seg[:, 1:] != seg[:, :-1]).tolist():
        starts[row].append(col + 1)
    return [list(zip(row, row[1:] + [e])) for row in starts]


def _row_groups(segment_ids: torch.Tensor, e: int) -> List[Tuple[slice, List[Tuple[int, int]]]]:
    """``(rows, spans)``: all rows at once when they share their document spans in ``[0, e)``, else one per row."""
    spans = document_spans(segment_ids, e)
    if all(row == spans[0] for row in spans):
        return [(slice(None), spans[0])]
    return [(slice(b, b + 1), row) for b, row in enumerate(spans)]


def document_parts(k, v, s: int, e: int, spans: Sequence[Tuple[int, int]]) -> List[Part]:
    """The parts (:class:`Part`) of chunk ``[s, e)`` (query rows ``0 .. e - s``) with packed documents: for each
    document ``[a, z)`` overlapping the chunk, its keys before the chunk ``[a, s)`` unmasked and its causal diagonal
    block ``[max(a, s), min(z, e))``. ``spans`` lie in ``[0, e)``."""
    parts = []
    for a, z in spans:
        if z <= s:
            continue  # a document that ended before the chunk: no query of the chunk sees it
        qa, qz = max(a, s), min(z, e)
        rows = (qa - s, qz - s)
        if a < s:
            parts.append(Part(k, v, False, rows, (a, s)))
        parts.append(Part(k, v, True, rows, (qa, qz)))
    return parts


def _packed_parts(k, v, s: int, e: int, spans, block, rows: slice) -> List[Part]:
    """:func:`document_parts` of batch rows ``rows``; with ``block`` (the chunk's own keys/values, see
    :func:`chunk_attention`) rewritten by :func:`on_block` (a document's diagonal block never straddles ``s``)."""
    parts = document_parts(k, v, s, e, spans)
    return parts if block is None else on_block(parts, s, (block[0][rows], block[1][rows]))


def packed_attention(q, k, v, segment_ids: Optional[torch.Tensor] = None,
                     key_padding_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     block: int = 1024) -> torch.Tensor:
    """Causal attention of the whole sequence, ``q: [B, H, T, D]`` over ``k, v: [B, Hkv, T, D]``, within packed
    documents (``segment_ids: [B, T]``) and with key padding (``[B, T]``, True = real), never a ``T x T`` mask.

    Documents only: one causal SDPA call per document (per row when rows differ), exact in any dtype. Key padding
    (with or without documents): query blocks of ``block`` rows through :func:`chunk_attention`'s masked path
    (``[B, 1, block, e]`` masks). Neither: one causal SDPA call."""
    t = q.shape[2]
    if key_padding_mask is None and segment_ids is None:
        return grouped_sdpa(q, k, v, is_causal=True, scale=scale)
    if key_padding_mask is None:
        out = torch.empty_like(q)
        for rows, spans in _row_groups(segment_ids, t):
            for a, z in spans:
                out[rows, :, a:z] = grouped_sdpa(q[rows, :, a:z], k[rows, :, a:z], v[rows, :, a:z], is_causal=True,
                                                 scale=scale)
        return out
    return torch.cat([chunk_attention(q[:, :, s:s + block], k[:, :, :s + block], v[:, :, :s + block], s,
                                      key_padding_mask, scale, segment_ids=segment_ids)
                      for s in range(0, t, block)], dim=2)


def chunk_attention(q, k, v, s: int, key_padding_mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, mask: Optional[torch.Tensor] = None,
                    segment_ids: Optional[torch.Tensor] = None, *,
                    block: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Causal attention of the queries at positions ``[s, s + c)`` (``q: [B, H, c, D]``) over the keys
    ``[0, s + c)`` (``k, v: [B, Hkv, s + c, D]``), never with an ``[s + c, s + c]`` mask.

    ``block = (k_block, v_block)``: the keys/values of the chunk's own positions ``[s, s + c)`` are separate tensors
    (``[B, Hkv, c, D]``) and ``k, v`` hold only the prefix ``[0, s)`` (StreamBP's backward: the prefix is a
    detached buffer, the block carries the chunk's graph; :func:`on_block`).

    Merged path: the unmasked part ``[0, s)`` and the causal diagonal block ``[s, s + c)``; with packed documents
    (``segment_ids: [B, >= s + c]``) the parts of :func:`document_parts`, one merged call for all rows when they
    share their document spans, else one per row. ``mask`` (a boolean ``[B or 1, 1, c, s + c]`` from the caller's
    attention, e.g. a grouped chunk) or ``key_padding_mask`` select masked SDPA instead (with ``block``, on the
    concatenated keys; documents then enter the ``[B, 1, c, s + c]`` chunk mask)."""
    e = k.shape[2] if block is None else s + block[0].shape[2]
    needs_mask = ("the caller's attention gives a chunk mask" if mask is not None else
                  "a key padding mask is given" if key_padding_mask is not None else None)
    kernel, _reason = select_kernel(q, k, needs_mask, what="chunk attention")
    if kernel != MASKED_SDPA and segment_ids is not None:
        outs = [merged_attention(q[rows], _packed_parts(k[rows], v[rows], s, e, spans, block, rows), scale, kernel)
                for rows, spans in _row_groups(segment_ids, e)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    if kernel != MASKED_SDPA:
        parts = [Part(k, v, False, kv_rows=(0, s))] if s > 0 else []
        parts.append(Part(k, v, True, kv_rows=(s, e)))
        return merged_attention(q, parts if block is None else on_block(parts, s, block), scale, kernel)
    if block is not None:
        k, v = torch.cat([k, block[0]], dim=2), torch.cat([v, block[1]], dim=2)
    if mask is None:
        mask = chunk_mask(s, e, key_padding_mask, q.device, segment_ids)
    elif segment_ids is not None:
        mask = mask & chunk_mask(s, e, None, q.device, segment_ids)
    return grouped_sdpa(q, k, v, attn_mask=mask, scale=scale)
