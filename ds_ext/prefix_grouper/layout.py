"""Grouped layout for Prefix Grouper (arXiv 2506.05433): one row per GRPO group, ``[prefix; suffix_1; ...; suffix_G]``.

A batch of ``N`` groups, group ``n`` with one prompt (prefix, ``P_n`` tokens) and ``G_n`` responses (suffixes,
``S_{n,1..G_n}`` tokens), becomes ``input_ids: [N, L]`` (``L`` = the longest row, right padded) with
``position_ids`` that restart at ``P_n`` for every suffix (``0..P-1, P..P+S_1-1, P..P+S_2-1, ...``), as if each
response followed the prompt alone. ``segment_ids: [N, L]`` says which part a token belongs to (0 = prefix,
``j`` = suffix j, -1 = padding).

:func:`pack` builds it from the usual GRPO tensors (prompts ``[N, Pmax]`` left or right padded with a mask;
completions ``[R, Smax]`` with a mask, ``R = sum G_n``, in group order); :meth:`GroupedBatch.completion_logprobs`
maps packed logits back to per-response token log-probs ``[R, Smax]``: response token ``k`` is predicted at the
prefix's last position for ``k = 0`` and at its own position ``k - 1`` otherwise. The block mask of this layout is
:func:`ds_ext.ops.attention.grouped_attention_mask` (re-exported here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch
import torch.nn.functional as F

# The grouped masks are shared operators (StreamBP's chunks, the masked fallback); re-exported for the layout's users.
from ds_ext.ops.attention import grouped_attention_mask, grouped_chunk_mask  # noqa: F401


@dataclass
class GroupedBatch:
    input_ids: torch.Tensor      # [N, L]
    position_ids: torch.Tensor   # [N, L]
    segment_ids: torch.Tensor    # [N, L] 0 prefix, j >= 1 suffix j, -1 padding
    prefix_lens: List[int]       # [N]
    suffix_lens: List[List[int]]  # [N][G_n]
    predictor_index: torch.Tensor  # [R, Smax] packed position whose logits predict completion token k
    row_of_response: torch.Tensor  # [R] packed row of each response

    @property
    def num_responses(self) -> int:
        return len(self.row_of_response)

    def completion_logprobs(self, logits: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
        """``logits: [N, L, V]`` (packed) and ``completion_ids: [R, Smax]`` -> log-probs ``[R, Smax]`` (padding
        positions of ``completion_ids`` get arbitrary values; mask them with the completion mask)."""
        picked = logits[self.row_of_response[:, None], self.predictor_index]  # [R, Smax, V]
        logp = F.log_softmax(picked.float(), dim=-1)
        return torch.gather(logp, -1, completion_ids.clamp(min=0)[..., None])[..., 0]


def _real(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return tokens[mask.bool()]


def pack(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
         completion_mask: torch.Tensor, group_sizes: Sequence[int], pad_id: int = 0) -> GroupedBatch:
    """Pack ``N`` prompts and their ``R = sum(group_sizes)`` completions into the grouped layout."""
    if len(group_sizes) != prompt_ids.shape[0] or sum(group_sizes) != completion_ids.shape[0]:
        raise ValueError(f"group_sizes {list(group_sizes)} do not match {prompt_ids.shape[0]} prompts and "
                         f"{completion_ids.shape[0]} completions")
    rows, positions, segments, prefix_lens, suffix_lens = [], [], [], [], []
    predictor = torch.zeros(completion_ids.shape, dtype=torch.long)
    row_of = torch.zeros(completion_ids.shape[0], dtype=torch.long)
    r = 0
    for n, g in enumerate(group_sizes):
        prefix = _real(prompt_ids[n], prompt_mask[n])
        p = len(prefix)
        parts, pos, seg, lens = [prefix], [torch.arange(p)], [torch.zeros(p, dtype=torch.long)], []
        offset = p
        for j in range(1, g + 1):
            suffix = _real(completion_ids[r], completion_mask[r])
            s = len(suffix)
            parts.append(suffix)
            pos.append(torch.arange(p, p + s))
            seg.append(torch.full((s,), j, dtype=torch.long))
            k = torch.arange(completion_ids.shape[1])
            predictor[r] = torch.where(k == 0, torch.full_like(k, p - 1), offset + k - 1).clamp(max=offset + s - 1)
            row_of[r] = n
            lens.append(s)
            offset += s
            r += 1
        rows.append(torch.cat(parts))
        positions.append(torch.cat(pos))
        segments.append(torch.cat(seg))
        prefix_lens.append(p)
        suffix_lens.append(lens)
    length = max(len(x) for x in rows)
    pad = lambda xs, value: torch.stack([F.pad(x, (0, length - len(x)), value=value) for x in xs])
    return GroupedBatch(pad(rows, pad_id), pad(positions, 0), pad(segments, -1), prefix_lens, suffix_lens,
                        predictor, row_of)
