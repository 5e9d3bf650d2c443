"""HF causal LMs (Llama family) as GRPO policies, for the peer-comparable setting of the AsyncFlow benchmark.

* :class:`HFPolicy` gives a ``transformers`` causal LM the reference model's call signature
  (``forward(input_ids, labels=None, position_ids=None, key_padding_mask=None)`` -> logits ``[B, T, V]`` or the mean
  token loss), so the DeepSpeed trainer, the SFT warm start and the rollout treat both alike;
* :func:`generate_hf`: sampling with transformers' own KV cache (``DynamicCache``): one prefill over the left-padded
  prompts, then one position per step; returns the same :class:`~ds_ext.models.generate.Generation` (tokens,
  behaviour log-probs under the sampling distribution, lengths through EOS) as the reference model's sampler;
* :func:`byte_tokenizer_hf`: :class:`~ds_ext.models.ByteTokenizer`'s ids as a ``PreTrainedTokenizerFast`` (one
  token per character, ``<bos>``/``<eos>``/``<pad>`` = 256/257/258), so TRL's trainer runs on the same ids.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ds_ext.models.generate import Generation, TokenSampler, decode
from ds_ext.models.llama import causal_lm_loss


class HFPolicy(nn.Module):
    """A transformers causal LM behind the reference model's signature (see the module docstring)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids, labels=None, position_ids=None, key_padding_mask=None):
        mask = key_padding_mask.long() if key_padding_mask is not None else None
        logits = self.hf(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
        return logits if labels is None else causal_lm_loss(logits, labels)


def tiny_llama(hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2, vocab_size: int = 259,
               seed: int = 0) -> nn.Module:
    """A randomly initialised ``transformers.LlamaForCausalLM`` over the byte vocabulary (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from ds_ext.models import ByteTokenizer
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, bos_token_id=ByteTokenizer.BOS, eos_token_id=ByteTokenizer.EOS,
                      pad_token_id=ByteTokenizer.PAD, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = ByteTokenizer.EOS
    model.generation_config.pad_token_id = ByteTokenizer.PAD
    return model


@torch.no_grad()
def generate_hf(policy: HFPolicy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                temperature: float = 1.0, eos_id: Optional[int] = None, pad_id: int = 0,
                generator: Optional[torch.Generator] = None, step_hook=None) -> Generation:
    """Sample ``max_new_tokens`` at most per prompt (``[B, P]``, left-padded) with transformers' KV cache;
    ``step_hook`` runs between decode steps (see :func:`ds_ext.models.generate.generate`)."""
    from transformers import DynamicCache
    model, b = policy.hf, prompt_ids.shape[0]
    cache = DynamicCache()
    mask = prompt_mask.long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    ids = prompt_ids

    def next_logits(tok: Optional[torch.Tensor]) -> torch.Tensor:
        nonlocal ids, positions, mask
        if tok is not None:  # one new token per row, at the next position
            ids, positions = tok[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], 1)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True)
        return out.logits[:, -1]
    return decode(next_logits, TokenSampler(b, max_new_tokens, temperature, eos_id, pad_id, generator),
                  max_new_tokens, step_hook)


def byte_tokenizer_hf():
    """:class:`~ds_ext.models.ByteTokenizer` ids as a transformers tokenizer (ASCII text; see the module doc)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from ds_ext.models import ByteTokenizer
    vocab = {chr(i): i for i in range(256)}
    vocab.update({"<bos>": ByteTokenizer.BOS, "<eos>": ByteTokenizer.EOS, "<pad>": ByteTokenizer.PAD})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<pad>")
