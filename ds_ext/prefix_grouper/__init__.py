"""Prefix Grouper (arXiv 2506.05433): a GRPO group's shared prompt is encoded once and each response attends to it.

``layout.py``: packing (prompt, completions, masks) into one row per group with restarting positions, and mapping
packed logits back to per-response log-probs; ``attention.py``: the grouped attention (key parts of the shared op
:mod:`ds_ext.ops.attention`) and the reference model's attention function; ``apply.py``: ``model(grouped_batch)``
(:func:`~ds_ext.prefix_grouper.apply.prefix_group_model`, or
:func:`~ds_ext.prefix_grouper.apply.apply_prefix_grouper` for a ds_ext engine). Usage with the reference model::

    batch = pack(prompt_ids, prompt_mask, completion_ids, completion_mask, group_sizes)
    logits = model(batch.input_ids, position_ids=batch.position_ids, attention_fn=GroupedAttention(batch))
    logprobs = batch.completion_logprobs(logits, completion_ids)          # [R, Smax]
"""
