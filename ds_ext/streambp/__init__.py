"""StreamBP (arXiv 2506.03077): exact backprop chunked along the sequence, in place of activation checkpointing.

``layer.py``: the streamed decoder-layer backward and its adapters; ``loss.py``: the chunked LM head with token
cross-entropy and GRPO/PPO losses; ``apply.py``: attaching both to a model or a ds_ext engine. Import those
modules directly: this file stays light because the config block imports ``ds_ext.streambp.config``.
"""
