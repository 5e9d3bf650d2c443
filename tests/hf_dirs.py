"""Tiny Hugging Face model directories made at test time (no downloads): a byte-level BPE tokenizer trained with the
``tokenizers`` library on an embedded corpus, saved as a ``PreTrainedTokenizerFast`` with a ChatML chat template, and
a random-init Qwen2 (or other family) model written with ``save_pretrained``."""
from __future__ import annotations

from pathlib import Path

CORPUS = """The quick brown fox jumps over the lazy dog. A journal records every optimizer step of the partition.
Pipelines split the decoder layers into stages; each stage holds its own layers and sends activations onward.
Replicas train on their own shards and average their weights every few hundred steps, which saves bandwidth.
def add(a, b):\n    return a + b\nprint(add(2, 3))  # 5\nfor i in range(10):\n    total = total + i * i
User questions and assistant answers: what is two plus three? It is five. What colour is the sky? Blue, mostly.
Sequences are packed into rows; positions restart at every document, so tokens attend only inside their document.
""" * 3

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(out: Path, vocab_size: int = 320):
    """Byte-level BPE (``vocab_size`` ids incl. the 256 bytes and 3 specials) saved to ``out``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def qwen2_config(vocab_size: int = 320, **overrides):
    from transformers import Qwen2Config
    kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    kw.update(overrides)
    return Qwen2Config(**kw)


def make_model_dir(out: Path, config=None, seed: int = 0, tokenizer: bool = True, weights: bool = True) -> Path:
    """A model directory: ``config`` (default :func:`qwen2_config`) with random weights and the test tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM
    out.mkdir(parents=True, exist_ok=True)
    config = config or qwen2_config()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if weights:
        model.save_pretrained(out)
    else:
        config.save_pretrained(out)
    if tokenizer:
        make_tokenizer(out, vocab_size=min(config.vocab_size, 320))
    return out
