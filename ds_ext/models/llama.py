"""The ds_ext reference model: a small Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU).

Shapes: ``B`` batch, ``T`` sequence, ``H`` query heads, ``Hkv`` key/value heads, ``D`` head dim, ``C`` hidden size.

Attention goes through one swappable function, ``attention_fn(q, k, v, key_padding_mask) -> out`` with
``q: [B, H, T, D]``, ``k, v: [B, Hkv, T, D]`` and ``out: [B, H, T, D]``; the default is causal PyTorch SDPA.
Features that change attention (Prefix Grouper) replace it through :meth:`LlamaForCausalLM.set_attention_fn`
or per call (``attention_fn=``). StreamBP streams a layer through :class:`ReferenceLayerAdapter`
(:meth:`DecoderLayer.stream_adapter`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ds_ext.ops.attention import grouped_sdpa
from ds_ext.ops.losses import IGNORE_INDEX
from ds_ext.ops.rope import apply_rope
from ds_ext.ops.stream import LayerAdapter, StreamCall, chunk_mask_of


@dataclass
class ModelConfig:
    """Hyper-parameters of the reference model. Defaults: a ~1M-parameter model that trains on 2 CPU cores."""

    vocab_size: int = 264          # 256 bytes + 3 specials, padded to a multiple of 8
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """RoPE tables for ``position_ids: [B, T]`` -> ``cos, sin: [B, 1, T, D]`` (halves repeated, Llama layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
                               / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def sdpa_attention(q, k, v, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention with PyTorch SDPA. ``key_padding_mask: [B, T]`` bool, True for real tokens.

    A query always sees itself, so a row of padding never becomes all-masked (no NaN); its output is unused."""
    if key_padding_mask is None:
        return grouped_sdpa(q, k, v, is_causal=True)
    t = q.shape[-2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    mask = causal & key_padding_mask[:, None, None, :]
    mask = mask | torch.eye(t, dtype=torch.bool, device=q.device)
    return grouped_sdpa(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(c, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(c, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(c, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, c, bias=False)
        self.attention_fn: Callable = sdpa_attention

    def project_qkv(self, x: torch.Tensor, position_ids: torch.Tensor):
        """``x: [B, T, C]`` -> roped ``q: [B, H, T, D]``, ``k, v: [B, Hkv, T, D]``."""
        b, t, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, -1, d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, d).transpose(1, 2)
        cos, sin = rope_cos_sin(position_ids, d, self.cfg.rope_theta, x.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, position_ids, key_padding_mask=None, attention_fn=None):
        q, k, v = self.project_qkv(x, position_ids)
        out = (attention_fn or self.attention_fn)(q, k, v, key_padding_mask)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``h + mlp(norm(h))``; ``[B, T, C] -> [B, T, C]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, position_ids, key_padding_mask=None, attention_fn=None):
        h = x + self.attn(self.input_norm(x), position_ids, key_padding_mask, attention_fn)
        return h + self.mlp(self.post_attn_norm(h))

    def stream_adapter(self) -> "ReferenceLayerAdapter":
        """StreamBP's view of this layer (see :mod:`ds_ext.streambp.layer`)."""
        return ReferenceLayerAdapter(self)


class ReferenceLayerAdapter(LayerAdapter):
    """StreamBP's adapter for :class:`DecoderLayer` (and its pipeline form): calls
    ``layer(x, position_ids=None, key_padding_mask=None, attention_fn=None)``, positions default to ``0..T-1``; a
    per-call ``attention_fn`` must give chunk masks (:class:`ds_ext.ops.stream.ChunkMasked`)."""

    def own_forward(self, x, position_ids=None, key_padding_mask=None, attention_fn=None):
        position_ids = self.default_positions(x) if position_ids is None else position_ids
        return DecoderLayer.forward(self.layer, x, position_ids, key_padding_mask, attention_fn)

    def streamed_call(self, x, position_ids=None, key_padding_mask=None, attention_fn=None) -> StreamCall:
        position_ids = self.default_positions(x) if position_ids is None else position_ids

        def full(x_, positions, padding):
            return DecoderLayer.forward(self.layer, x_, positions, padding, attention_fn)
        return StreamCall(x, position_ids, key_padding_mask, full, chunk_mask_of(attention_fn))

    def norm1(self, x):
        return self.layer.input_norm(x)

    def _heads(self, proj, h):
        b, t, _ = h.shape
        return proj(h).view(b, t, -1, self.layer.attn.cfg.head_dim).transpose(1, 2)

    def _rope(self, z, positions):
        cfg = self.layer.attn.cfg
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, z.dtype)
        return apply_rope(z, cos, sin)

    def queries(self, h, positions):
        return self._rope(self._heads(self.layer.attn.q_proj, h), positions)

    def keys_values(self, h, positions) -> Tuple[torch.Tensor, torch.Tensor]:
        attn = self.layer.attn
        return self._rope(self._heads(attn.k_proj, h), positions), self._heads(attn.v_proj, h)

    def attention_out(self, attn):
        b, _, c, _ = attn.shape
        return self.layer.attn.o_proj(attn.transpose(1, 2).reshape(b, c, -1))

    def mlp_block(self, y):
        return y + self.layer.mlp(self.layer.post_attn_norm(y))


def default_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    b, t = input_ids.shape[:2]
    return torch.arange(t, device=input_ids.device).expand(b, t)


def init_weights(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy; ``labels`` are already shifted (label t is the token after input t)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class LlamaForCausalLM(nn.Module):
    """Embedding, decoder layers, final norm, LM head. ``forward(input_ids, labels=None, ...)`` returns the
    mean token loss when ``labels`` is given (what a DeepSpeed engine backpropagates), else logits ``[B, T, V]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_loss_fn: Optional[Callable] = None
        init_weights(self, cfg.init_std)

    def set_lm_loss(self, fn: Optional[Callable]) -> None:
        """Replace "logits, then mean token cross-entropy" by ``fn(hidden [B, T, C], lm_head.weight [V, C],
        labels [B, T]) -> loss`` (StreamBP's chunked head); ``None`` restores the default."""
        self.lm_loss_fn = fn

    def set_attention_fn(self, fn: Callable) -> None:
        for layer in self.layers:
            layer.attn.attention_fn = fn

    def hidden_states(self, input_ids, position_ids=None, key_padding_mask=None, attention_fn=None) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, C]``. ``attention_fn`` overrides the layers' attention for this call
        (Prefix Grouper's grouped attention)."""
        position_ids = default_position_ids(input_ids) if position_ids is None else position_ids
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, position_ids, key_padding_mask, **({"attention_fn": attention_fn} if attention_fn else {}))
        return self.norm(x)

    def forward(self, input_ids, labels=None, position_ids=None, key_padding_mask=None, attention_fn=None):
        hidden = self.hidden_states(input_ids, position_ids, key_padding_mask, attention_fn)
        if labels is not None and self.lm_loss_fn is not None:
            return self.lm_loss_fn(hidden, self.lm_head.weight, labels)
        logits = self.lm_head(hidden)
        return logits if labels is None else causal_lm_loss(logits, labels)
