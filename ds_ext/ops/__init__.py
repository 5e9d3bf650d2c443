"""Shared operators, below every feature package: the attention op (flash parts merged by log-sum-exp, masks, GQA
SDPA), RoPE's rotation and the token-loss pieces (``IGNORE_INDEX``, GRPO token weights). Import the modules
directly (``ds_ext.ops.attention``, ``ds_ext.ops.rope``, ``ds_ext.ops.losses``); this file imports nothing."""
