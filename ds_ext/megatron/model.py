"""The ``"ds_ext"`` block for megatron-core users, the layer spec with ds_ext's core attention, a tiny GPT.

The block is the same one DeepSpeed users put in their JSON (:mod:`ds_ext.config`): :func:`parse_ds_ext` checks
it with the same pydantic models and the megatron rules of :mod:`ds_ext.config.megatron` (the distributed optimizer
stands for ZeRO stage 1; keys this path does not implement are refused, not ignored). ``python -m ds_ext.config
check`` applies the same rules without importing megatron-core.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F

from ds_ext.config import DsExtConfig, load_config_file, parse_megatron_config
from ds_ext.config.megatron import MEGATRON_KEY
from ds_ext.megatron.attention import PrefixGroupedCoreAttention


def parse_ds_ext(config: Union[Dict[str, Any], str, os.PathLike], source: Optional[str] = None) -> DsExtConfig:
    """``config``: the path of a megatron config file, or its dict (``{"megatron": {...}, "ds_ext": {...}}``; the
    ``"megatron"`` section may be left out of a dict). Raises :class:`ds_ext.config.DsExtConfigError` naming every
    problem (JSON path, value, what is allowed), including every key the megatron path does not implement."""
    if not isinstance(config, dict):
        source = source or os.fspath(config)
        config = load_config_file(config)
    if isinstance(config, dict):
        config = {MEGATRON_KEY: {}, **config}
    return parse_megatron_config(config, source=source or "config")


def layer_spec(ext: Optional[DsExtConfig] = None, **local_spec_kwargs):
    """megatron-core's local GPT layer spec (``get_gpt_layer_local_spec(**local_spec_kwargs)``) with
    :class:`PrefixGroupedCoreAttention` as core attention when Prefix Grouper is on, or when CUDA is missing
    (megatron's ``DotProductAttention`` needs it). Otherwise the spec is megatron's own, unchanged."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    spec = get_gpt_layer_local_spec(**local_spec_kwargs)
    grouped = ext is not None and ext.prefix_grouper.enabled
    if grouped or not torch.cuda.is_available():
        spec.submodules.self_attention.submodules.core_attention = PrefixGroupedCoreAttention
    return spec


def tiny_transformer_config(num_layers: int = 2, hidden_size: int = 32, num_attention_heads: int = 4,
                            num_query_groups: int = 2, ffn_hidden_size: int = 64, **overrides):
    """A small Llama-style ``TransformerConfig`` (RMSNorm, SwiGLU, no biases, GQA) that runs on CPU in fp32:
    fusions that need CUDA kernels are off, dropout is 0 (StreamBP and the exactness tests need determinism)."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    kwargs = dict(num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                  num_query_groups=num_query_groups, ffn_hidden_size=ffn_hidden_size, use_cpu_initialization=True,
                  hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm", add_bias_linear=False,
                  gated_linear_unit=True, activation_func=F.silu, bias_dropout_fusion=False,
                  apply_rope_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
                  gradient_accumulation_fusion=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def tiny_gpt(ext: Optional[DsExtConfig] = None, vocab_size: int = 64, max_sequence_length: int = 256,
             seed: int = 0, **config_overrides):
    """A tiny ``GPTModel`` (RoPE, untied head) with :func:`layer_spec`; needs ``parallel_state`` initialised (and,
    on CPU, :func:`ds_ext.megatron.shims.cpu_shims` around its use). Same ``seed``, same weights."""
    from megatron.core.models.gpt.gpt_model import GPTModel
    config = tiny_transformer_config(**config_overrides)
    torch.manual_seed(seed)
    return GPTModel(config, layer_spec(ext, normalization="RMSNorm"), vocab_size=vocab_size,
                    max_sequence_length=max_sequence_length, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False)
