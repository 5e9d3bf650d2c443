"""Prefix Grouper (arXiv 2506.05433): a GRPO group's shared prompt is encoded once and each response attends to it.

``layout.py``: packing (prompt, completions, masks) into one row per group with restarting positions, and mapping
packed logits back to per-response log-probs; ``attention.py``: the grouped attention and the reference model's
attention function. Usage with the reference model::

    batch = pack(prompt_ids, prompt_mask, completion_ids, completion_mask, group_sizes)
    logits = model(batch.input_ids, position_ids=batch.position_ids, attention_fn=GroupedAttention(batch))
    logprobs = batch.completion_logprobs(logits, completion_ids)          # [R, Smax]
"""
