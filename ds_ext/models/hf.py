"""HF transformers causal LMs from a local directory, wrapped for a DeepSpeed engine (transformers is optional).

:func:`load_hf_model` loads ``AutoModelForCausalLM`` from a local model directory (``init="pretrained"``: its
weights; ``"random"``: a fresh init from ``config.json`` alone) for the dense RoPE decoder families listed in
:data:`FAMILIES`, after checking what would fail later (:func:`check_model_dir`, :func:`check_config`); every refusal
is an :class:`HFModelError` whose message names the path, key or value and what is allowed. There is no download:
hub names are refused, the machine may have no internet.

:class:`HFCausalLM` is what the engine trains: ``forward(input_ids [B, T], labels [B, T], position_ids [B, T] =
None) -> mean token loss``. It runs ``hf.model`` for the final hidden states (``attention_mask=None``: packed rows
are recognised by transformers from ``position_ids`` that restart at 0 at every document, so a token attends only to
its own document) and the LM head + cross-entropy ``logits_chunk_size`` positions at a time
(:func:`ds_ext.ops.chunked_loss.chunked_lm_loss`; full ``[B, T, V]`` logits never exist). Labels are unshifted (HF's
convention): position t is scored on ``labels[:, t + 1]``, -100 = no loss. ``set_lm_loss(fn)`` is the seam StreamBP
uses to put its own chunked head in (the same seam as the reference model's). Without labels it returns logits.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ds_ext.ops.losses import shift_labels
from ds_ext.ops.chunked_loss import TokenCrossEntropy, chunked_lm_loss

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # config.json "model_type" values trained here
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


class HFModelError(ValueError):
    """A model directory, config, tokenizer or setting that cannot be trained; the message says why."""


def check_model_dir(path: str, init: str = "pretrained") -> Path:
    """``path`` must be a local directory with ``config.json`` (and weights for ``init="pretrained"``)."""
    if init not in ("pretrained", "random"):
        raise HFModelError(f"--init {init!r}: allowed pretrained, random")
    root = Path(path)
    if not root.is_dir():
        raise HFModelError(f"--model {path}: not a directory. --model takes a local Hugging Face model directory "
                           "(config.json, *.safetensors, tokenizer files); hub names are not accepted and nothing is "
                           "downloaded (this machine has no internet): download the model elsewhere and copy the "
                           "directory here, or use --model reference")
    if not (root / "config.json").is_file():
        raise HFModelError(f"--model {path}: no config.json in this directory (a Hugging Face model directory has "
                           "config.json, *.safetensors and tokenizer files)")
    if init == "pretrained" and not any(any(root.glob(p)) for p in WEIGHT_PATTERNS):
        raise HFModelError(f"--model {path}: no weights ({', '.join(WEIGHT_PATTERNS)}) in this directory; "
                           "use --init random to train from config.json alone")
    return root


def is_moe(config) -> bool:
    return "moe" in str(config.model_type) or any(getattr(config, k, None) for k in (
        "num_experts", "num_local_experts", "n_routed_experts"))


def uses_sliding_window(config) -> bool:
    """Whether any layer attends within a sliding window (Mistral's ``sliding_window``, Qwen2/3's
    ``use_sliding_window``, or ``layer_types`` naming ``sliding_attention``)."""
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return True
    if hasattr(config, "use_sliding_window"):
        return bool(config.use_sliding_window) and bool(getattr(config, "sliding_window", None))
    return bool(getattr(config, "sliding_window", None))


def check_config(config, path: str, streambp: bool = False) -> None:
    """Refuse a family or setting this path cannot train (see :data:`FAMILIES`)."""
    kind = config.model_type
    if is_moe(config):
        raise HFModelError(f"--model {path}: model_type {kind!r} has mixture-of-experts layers, which are not "
                           f"supported; supported: dense {', '.join(FAMILIES)}")
    if kind not in FAMILIES:
        raise HFModelError(f"--model {path}: model_type {kind!r} is not supported; supported families (config.json "
                           f"model_type): {', '.join(FAMILIES)} (dense RoPE decoders)")
    if streambp and uses_sliding_window(config):
        raise HFModelError(f"--model {path}: sliding-window attention (sliding_window="
                           f"{getattr(config, 'sliding_window', None)}) cannot run under ds_ext.streambp, which "
                           "streams full causal attention; turn StreamBP off or use a model without sliding window")


def has_rope_scaling(config) -> bool:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kinds = {p.get("rope_type", p.get("type", "default")) for p in (
        params.values() if params and all(isinstance(v, dict) for v in params.values()) else [params])}
    return bool(kinds - {"default"})


def check_seq_len(config, seq_len: int, path: str) -> None:
    """``--seq_len`` must fit the model's positions unless RoPE scaling extends them."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit and not has_rope_scaling(config):
        raise HFModelError(f"--seq_len {seq_len} exceeds max_position_embeddings={limit} of {path}/config.json and "
                           "the config has no RoPE scaling (rope_parameters.rope_type other than 'default'); use "
                           f"--seq_len <= {limit} or a config with RoPE scaling")


def check_tokenizer(tokenizer, config, where: str) -> None:
    """The tokenizer's ids must index the embedding."""
    if len(tokenizer) > config.vocab_size:
        raise HFModelError(f"tokenizer {where} has {len(tokenizer)} tokens but the model's embedding has "
                           f"vocab_size={config.vocab_size}: ids >= {config.vocab_size} would index past it; use the "
                           "model's own tokenizer or resize the embedding first")


def load_config(path: str, init: str = "pretrained"):
    from transformers import AutoConfig
    root = check_model_dir(path, init)
    try:
        return AutoConfig.from_pretrained(root, local_files_only=True)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        raise HFModelError(f"--model {path}: config.json cannot be read by transformers: {e}") from e


def load_hf_model(path: str, init: str = "pretrained", dtype: Optional[torch.dtype] = None, streambp: bool = False):
    """The ``transformers`` causal LM of the local directory ``path`` (``dtype`` None: fp32, the master weights a
    DeepSpeed engine trains; its ``"bf16"`` block casts the module itself). ``init="random"`` builds it from
    ``config.json`` with the current torch seed. Refusals: :class:`HFModelError` (module docstring)."""
    from transformers import AutoModelForCausalLM
    config = load_config(path, init)
    check_config(config, path, streambp)
    dtype = dtype or torch.float32
    if init == "random":
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    if getattr(model.lm_head, "bias", None) is not None:
        raise HFModelError(f"--model {path}: the LM head has a bias, which the chunked head does not apply")
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(path: str, config=None, flag: str = "--tokenizer"):
    """``AutoTokenizer`` from the local directory ``path``; ``flag`` names where it came from in messages
    (``--tokenizer``, or ``--model`` when the model directory's own tokenizer is used)."""
    from transformers import AutoTokenizer
    hint = "; pass --tokenizer DIR" if flag != "--tokenizer" else ""
    if not Path(path).is_dir():
        raise HFModelError(f"{flag} {path}: not a directory (a local tokenizer directory is needed; nothing is "
                           f"downloaded){hint}")
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise HFModelError(f"{flag} {path}: no tokenizer files in this directory (none of "
                           f"{', '.join(TOKENIZER_FILES)}){hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        # transformers' text lists every backend it tried (sentencepiece, tiktoken, ...): its first line is enough
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise HFModelError(f"{flag} {path}: transformers cannot load the tokenizer in this directory: {first}"
                           f"{hint}") from e
    if config is not None:
        check_tokenizer(tokenizer, config, path)
    return tokenizer


class HFCausalLM(nn.Module):
    """A transformers causal LM as ``.hf``, trained through :meth:`forward` (see the module docstring).

    ``source`` and ``tokenizer_dir`` are recorded for exports (:meth:`export_meta`)."""

    def __init__(self, hf: nn.Module, logits_chunk_size: int = 1024, source: Optional[str] = None,
                 tokenizer_dir: Optional[str] = None):
        super().__init__()
        self.hf = hf
        self.logits_chunk_size = logits_chunk_size
        self.source, self.tokenizer_dir = source, tokenizer_dir
        self.lm_loss_fn: Optional[Callable] = None
        self.forward_fn: Optional[Callable] = None

    def set_forward(self, fn: Optional[Callable]) -> None:
        """Replace :meth:`forward` by ``fn(input_ids, labels, position_ids)`` (StreamBP's sequence-parallel forward,
        which runs this rank's shard of the rows: :mod:`ds_ext.streambp.ulysses`); ``None`` restores it."""
        self.forward_fn = fn

    def set_lm_loss(self, fn: Optional[Callable]) -> None:
        """Replace the head + loss by ``fn(hidden [B, T, C], lm_head.weight [V, C], shifted labels [B, T]) ->
        loss`` (StreamBP's chunked head); ``None`` restores the default chunked cross-entropy."""
        self.lm_loss_fn = fn

    def hidden_states(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.hf.model(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                             use_cache=False).last_hidden_state

    def forward(self, input_ids, labels=None, position_ids=None):
        if self.forward_fn is not None:
            return self.forward_fn(input_ids, labels, position_ids)
        hidden = self.hidden_states(input_ids, position_ids)
        weight = self.hf.lm_head.weight
        if labels is None:
            return self.hf.lm_head(hidden)
        if self.lm_loss_fn is not None:
            return self.lm_loss_fn(hidden, weight, shift_labels(labels))
        return chunked_lm_loss(hidden, weight, TokenCrossEntropy(shift_labels(labels)), self.logits_chunk_size)

    def export_meta(self) -> dict:
        """What an HF-format export of this model's weights needs (recorded in the journal's ``EXPORT.bin``)."""
        return hf_export_meta(self.hf.config, self.source, self.tokenizer_dir)


def hf_export_meta(config, source: Optional[str], tokenizer_dir: Optional[str]) -> dict:
    """The journal's record for ``export --hf`` (:mod:`ds_ext.recovery.meta`): the HF config as a dict, the model
    directory it came from and the tokenizer directory (absolute)."""
    return {"config": json.loads(config.to_json_string()), "source": source,
            "tokenizer_dir": os.path.abspath(tokenizer_dir) if tokenizer_dir else None}


def hf_key(name: str) -> str:
    """An :class:`HFCausalLM` parameter name -> the wrapped model's own (``hf.model.x`` -> ``model.x``)."""
    return name[3:] if name.startswith("hf.") else name


def save_hf_state(state: dict, config_dict: dict, tokenizer, out: str) -> None:
    """Write ``state`` (HF parameter names -> fp32 tensors) as ``save_pretrained`` does (safetensors + config.json),
    plus the tokenizer files: a directory ``from_pretrained`` loads. Refuses names the config's model lacks."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k == "lm_head.weight" and config.tie_word_embeddings}
    if unexpected or set(missing) - tied:
        raise HFModelError(f"weights do not match the {config.model_type} config: missing {sorted(set(missing) - tied)}"
                           f", unexpected {sorted(unexpected)}")
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def gather_fp32_state(module: nn.Module) -> dict:
    """HF parameter name -> full fp32 master weight of a DeepSpeed engine's :class:`HFCausalLM` (ZeRO-1/2: each
    param assembled from the partitions by DeepSpeed's public ``safe_get_full_fp32_param``, an all-reduce over the
    ZeRO group, so every rank of the group calls this in the same order; no ZeRO: the fp32 params themselves)."""
    from deepspeed.utils import safe_get_full_fp32_param
    state = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        state[hf_key(name)] = (full if full is not None else p.detach()).float().clone()
    return state
