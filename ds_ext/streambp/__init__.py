"""StreamBP (arXiv 2506.03077): exact backprop chunked along the sequence, in place of activation checkpointing.

``layer.py``: the streamed decoder-layer backward and the one mechanism that streams a layer of any family through
its :class:`~ds_ext.ops.stream.LayerAdapter`; ``hf.py``: the HF Llama/Qwen2 adapter and chunked HF loss;
``loss.py``: the chunked LM head with token cross-entropy (GRPO's objective is
:class:`ds_ext.grpo.loss.GRPOTokenLoss`); ``apply.py``: :func:`~ds_ext.streambp.apply.stream_model` for a model
and :func:`~ds_ext.streambp.apply.apply_streambp` for a ds_ext engine. Attention is the shared op
(:mod:`ds_ext.ops.attention`). Import those modules directly: this file stays light because the config block
imports ``ds_ext.streambp.config``.
"""
