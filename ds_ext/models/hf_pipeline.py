"""A transformers causal LM (Llama/Qwen2 family, weights loaded) as a DeepSpeed ``PipelineModule``.

Layers, in order (``L`` decoder layers; the index is the ``PipelineModule`` layer index that prefixes names)::

    0            HFEmbeddingPipe     (input_ids, position_ids) -> (hidden [B, T, C], position_ids)
                 (HFTiedEmbeddingPipe with tied embeddings)
    1 .. L       HFDecoderLayerPipe  (hidden, position_ids) -> (hidden, position_ids)
    L + 1        HFNormPipe          (hidden, position_ids) -> normed hidden [B, T, C]
    L + 2        HFHeadPipe          normed hidden -> logits [B, T, V] (hidden itself with ``emit_hidden``)
                 (tied: HFTiedEmbeddingPipe applied by tied_head_forward)

With ``tie_word_embeddings`` the first and last entries are one ``TiedLayerSpec`` (key ``"embed"``): the head is
the embedding module applied by :func:`tied_head_forward`, DeepSpeed keeps the stage-0 and last-stage copies equal
(broadcast at build, gradients all-reduced over the tied group).

Batches are ``((input_ids, position_ids), labels)``: ``[B, T]`` long each, labels *unshifted* (HF convention, -100
= no loss), ``position_ids`` restarting at 0 at every packed document. Stages exchange tensors only: the hidden
states and the position ids (long: DeepSpeed sends no gradient for it). Each stage derives what its decoder layers
need from ``position_ids`` itself, once per micro-batch (:class:`StageInputs`): RoPE ``(cos, sin)`` from the
model's own rotary module and the attention mask from transformers' ``create_causal_mask`` (or the sliding-window
one for a sliding layer), exactly as the HF model's forward does, so a decoder layer sees the same call inside and
outside the pipeline (StreamBP's HF adapter streams it alike).

Weights: the layer specs wrap the caller's HF submodules (no copy), so ``from_pretrained`` weights are used as
loaded; DeepSpeed builds only this rank's stage. With ``release_other_stages`` (default) the parameters of the
layers of other stages are then replaced by meta tensors in ``hf_model``: a rank keeps its own stage only.

StreamBP (:func:`ds_ext.streambp.apply.stream_model` on the stage) finds the wrapped HF decoder layers, and the
head's ``emit_hidden``/``lm_head``/``loss_labels`` seam routes the head + loss through its chunked loss.
CheckFree rebuilds a stage by layer: its repeated layer class is ``HFDecoderLayerPipe`` (the most frequent spec).

Names: :func:`pipeline_to_hf_key` / :func:`pipeline_state_to_hf` map pipeline parameter names to HF ones
(``"3.layer.mlp.up_proj.weight"`` -> ``"model.layers.2.mlp.up_proj.weight"``), :func:`hf_to_pipeline_key` back.
"""
from __future__ import annotations

import inspect
import re
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from ds_ext.ops.losses import IGNORE_INDEX, shift_labels

TIED_KEY = "embed"
DECODER_CLASS = "HFDecoderLayerPipe"


class StageInputs:
    """What every decoder layer of a stage derives from ``position_ids``, computed once per micro-batch: RoPE
    ``(cos, sin)`` ``[B, T, D]`` in the hidden dtype and the attention mask per kind (``None`` where transformers
    needs none, e.g. sdpa on unpacked rows). Shared by the decoder layers built by one :func:`hf_pipeline` call.

    The cache key is the ``position_ids`` tensor object itself (held, so its id cannot be reused) with the hidden
    states' dtype, device and shape: all layers of one stage forward receive the same object; a new micro-batch, a
    recomputation from detached inputs (activation checkpointing) or another stage input recomputes."""

    def __init__(self, config, rotary_emb: nn.Module):
        self.config, self.rotary_emb = config, rotary_emb
        self._key: Optional[tuple] = None
        self._rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._masks: Dict[bool, object] = {}

    def get(self, hidden: torch.Tensor, position_ids: torch.Tensor, sliding: bool):
        key = (position_ids, hidden.dtype, hidden.device, hidden.shape)
        if self._key is None or self._key[0] is not position_ids or self._key[1:] != key[1:]:
            self._key, self._masks = key, {}
            self._rope = self.rotary_emb(hidden, position_ids)
        if sliding not in self._masks:
            self._masks[sliding] = _mask(self.config, hidden, position_ids, sliding)
        return self._rope, self._masks[sliding]


def _mask(config, hidden: torch.Tensor, position_ids: torch.Tensor, sliding: bool):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    make = create_sliding_window_causal_mask if sliding else create_causal_mask
    # the KV-cache argument is `past_key_values` up to transformers 5.19 and `cache` later: ask the function
    cache_kw = "cache" if "cache" in inspect.signature(make).parameters else "past_key_values"
    return make(config=config, inputs_embeds=hidden, attention_mask=None, position_ids=position_ids,
                **{cache_kw: None})


def is_sliding_layer(config, index: int) -> bool:
    """Whether decoder layer ``index`` uses sliding-window attention, as the HF model decides it: by
    ``config.layer_types`` (Qwen2/Qwen3), else by ``config.sliding_window`` being set (Mistral)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return types[index] == "sliding_attention"
    return getattr(config, "sliding_window", None) is not None


class HFEmbeddingPipe(nn.Module):
    """The HF token embedding: ``(input_ids, position_ids) -> (hidden, position_ids)``."""

    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, inputs):
        if isinstance(inputs, torch.Tensor):  # input_ids only: positions 0..T-1
            inputs = (inputs, torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs))
        input_ids, position_ids = inputs
        return self.embed_tokens(input_ids), position_ids


class HFTiedEmbeddingPipe(HFEmbeddingPipe):
    """The tied embedding, which is also the LM head on the last stage (:func:`tied_head_forward`); it carries the
    head seam StreamBP reads (``emit_hidden``, ``lm_head.weight``, ``loss_labels``)."""

    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__(embed_tokens)
        self.emit_hidden = False  # read by tied_head_forward only

    @property
    def lm_head(self) -> nn.Module:
        """The head's weight holder (``.weight: [V, C]``)."""
        return self.embed_tokens

    @staticmethod
    def loss_labels(labels: torch.Tensor) -> torch.Tensor:
        return shift_labels(labels)


def tied_head_forward(module: HFTiedEmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """The tied LM head: logits ``hidden @ E^T`` (``[B, T, V]``), or ``hidden`` with ``emit_hidden``."""
    return hidden if module.emit_hidden else F.linear(hidden, module.embed_tokens.weight)


class HFDecoderLayerPipe(nn.Module):
    """One HF decoder layer, called as the HF model calls it (RoPE, mask, ``position_ids``, no KV cache)."""

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module, inputs: StageInputs, sliding: bool):
        super().__init__()
        self.layer, self.rotary_emb = layer, rotary_emb  # rotary_emb: shared (buffers only), registered for .to()
        self.inputs, self.sliding = inputs, sliding

    def forward(self, inputs):
        hidden, position_ids = inputs
        rope, mask = self.inputs.get(hidden, position_ids, self.sliding)
        out = self.layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rope,
                         use_cache=False)
        return (out[0] if isinstance(out, tuple) else out), position_ids  # transformers < 5 returned a tuple


class HFNormPipe(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, inputs):
        return self.norm(inputs[0])


class HFHeadPipe(nn.Module):
    """The untied LM head. With ``emit_hidden`` (set by StreamBP) it returns the normed hidden states and the
    module's ``loss_fn`` applies ``lm_head`` chunk by chunk on ``loss_labels(labels)``."""

    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        self.lm_head = lm_head
        self.emit_hidden = False

    @staticmethod
    def loss_labels(labels: torch.Tensor) -> torch.Tensor:
        return shift_labels(labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.emit_hidden else self.lm_head(hidden)


def hf_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss on unshifted labels: position t scores token t + 1, mean over labels != -100 (fp32)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift_labels(labels).reshape(-1),
                           ignore_index=IGNORE_INDEX)


def _parts(hf_model: nn.Module):
    """(decoder body, lm_head) of a Llama/Qwen2-family causal LM, or a ValueError naming what is missing."""
    body, head = getattr(hf_model, "model", None), getattr(hf_model, "lm_head", None)
    missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(body, n)]
    if body is None or head is None or missing:
        what = "model/lm_head" if body is None or head is None else "model." + ", model.".join(missing)
        raise ValueError(f"hf_pipeline: {type(hf_model).__name__} is not a Llama/Qwen2-family causal LM (no {what}); "
                         "supported: Llama, Qwen2, Qwen3, Mistral")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"hf_pipeline: {type(hf_model).__name__}.lm_head has a bias; supported heads have none")
    return body, head


def hf_layer_specs(hf_model: nn.Module) -> list:
    """The layer specs of :func:`hf_pipeline` (see the module docstring), wrapping ``hf_model``'s submodules."""
    body, head = _parts(hf_model)
    config = hf_model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied and head.weight is not body.embed_tokens.weight:
        raise ValueError("hf_pipeline: config.tie_word_embeddings is true but lm_head.weight is not "
                         "model.embed_tokens.weight (call hf_model.tie_weights() after changing either)")
    inputs = StageInputs(config, body.rotary_emb)
    specs = [TiedLayerSpec(TIED_KEY, HFTiedEmbeddingPipe, body.embed_tokens, forward_fn=None,
                           tied_weight_attr="embed_tokens.weight") if tied
             else LayerSpec(HFEmbeddingPipe, body.embed_tokens)]
    specs += [LayerSpec(HFDecoderLayerPipe, layer, body.rotary_emb, inputs, is_sliding_layer(config, i))
              for i, layer in enumerate(body.layers[:config.num_hidden_layers])]
    specs.append(LayerSpec(HFNormPipe, body.norm))
    specs.append(TiedLayerSpec(TIED_KEY, HFTiedEmbeddingPipe, body.embed_tokens, forward_fn=tied_head_forward,
                               tied_weight_attr="embed_tokens.weight") if tied else LayerSpec(HFHeadPipe, head))
    return specs


class HFPipelineModule(PipelineModule):
    """The ``PipelineModule`` :func:`hf_pipeline` builds; ``export_meta()`` gives what ``export --hf`` of its journal
    needs (:func:`ds_ext.models.hf.hf_export_meta`, or None when the caller recorded nothing)."""

    def __init__(self, *args, hf_meta: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.hf_meta = hf_meta

    def export_meta(self) -> Optional[dict]:
        return self.hf_meta


def hf_pipeline(hf_model: nn.Module, topology=None, loss_fn: Optional[Callable] = None,
                num_stages: Optional[int] = None, release_other_stages: bool = True, hf_meta: Optional[dict] = None,
                **pipeline_kwargs) -> PipelineModule:
    """``hf_model`` (a transformers Llama/Qwen2-family causal LM, weights loaded) as a ``PipelineModule``.

    ``topology``: a ds_ext :class:`~ds_ext.topology.Topology` (its ``process_topology()`` is used) or a DeepSpeed
    ``ProcessTopology``; or ``num_stages`` for DeepSpeed's default pipe x data layout. ``loss_fn(logits, labels)``
    gets the *unshifted* labels (default :func:`hf_causal_lm_loss`, HF's loss); StreamBP replaces it by its chunked
    cross-entropy on shifted labels. Extra keyword arguments go to ``PipelineModule`` (default
    ``partition_method="type:HFDecoderLayerPipe"``: decoder layers balanced over stages). Collective: every rank of
    the topology calls it. With ``release_other_stages`` the other stages' parameters in ``hf_model`` become meta
    tensors (``hf_model`` is then a partial model: save through :func:`pipeline_state_to_hf`). ``hf_meta``
    (:func:`ds_ext.models.hf.hf_export_meta`) is recorded by the journal so ``export --hf`` works offline."""
    if topology is None and num_stages is None:
        raise ValueError("hf_pipeline: give topology (ds_ext Topology or DeepSpeed ProcessTopology) or num_stages")
    if topology is not None and hasattr(topology, "process_topology"):
        topology = topology.process_topology()
    pipeline_kwargs.setdefault("partition_method", f"type:{DECODER_CLASS}")
    pipe = HFPipelineModule(layers=hf_layer_specs(hf_model), num_stages=None if topology is not None else num_stages,
                            topology=topology, loss_fn=loss_fn or hf_causal_lm_loss, hf_meta=hf_meta,
                            **pipeline_kwargs)
    if release_other_stages:
        release_unused_parameters(hf_model, {id(p) for p in pipe.parameters()})
    return pipe


def release_unused_parameters(model: nn.Module, keep: set) -> int:
    """Replace every parameter of ``model`` whose id is not in ``keep`` by a meta tensor of its shape (the storage
    is freed once nothing else holds it); returns how many elements were released. Tied parameters are one object,
    so a tied weight kept by a stage stays."""
    released = 0
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in keep and p.device.type != "meta":
                released += p.numel()
                setattr(module, name, nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad))
    return released


# -- names ------------------------------------------------------------------------------------------------------
def pipeline_to_hf_key(name: str, num_layers: int) -> str:
    """The HF ``state_dict`` name of the pipeline parameter ``name`` (a name of :func:`hf_pipeline`'s module with
    ``num_layers`` decoder layers). A tied embedding maps to ``model.embed_tokens.weight``."""
    tied = re.fullmatch(rf"tied_modules\.{TIED_KEY}\.embed_tokens\.(.+)", name)
    if tied:
        return f"model.embed_tokens.{tied.group(1)}"
    match = re.fullmatch(r"(\d+)\.(\w+)\.(.+)", name)
    if match:
        index, holder, rest = int(match.group(1)), match.group(2), match.group(3)
        if index == 0 and holder == "embed_tokens":
            return f"model.embed_tokens.{rest}"
        if 1 <= index <= num_layers and holder == "layer":
            return f"model.layers.{index - 1}.{rest}"
        if index == num_layers + 1 and holder == "norm":
            return f"model.norm.{rest}"
        if index == num_layers + 2 and holder == "lm_head":
            return f"lm_head.{rest}"
    raise ValueError(f"{name!r} is not a parameter name of an HF pipeline with {num_layers} decoder layers "
                     "(expected 0.embed_tokens.*, <1..L>.layer.*, <L+1>.norm.*, <L+2>.lm_head.* or "
                     f"tied_modules.{TIED_KEY}.embed_tokens.*)")


def hf_to_pipeline_key(name: str, num_layers: int, tie_word_embeddings: bool) -> str:
    """The pipeline name of the HF parameter ``name`` (inverse of :func:`pipeline_to_hf_key`; with tied
    embeddings ``lm_head.weight`` is the embedding's name)."""
    if tie_word_embeddings and (name.startswith("model.embed_tokens.") or name == "lm_head.weight"):
        return f"tied_modules.{TIED_KEY}.embed_tokens.{name.rsplit('.', 1)[1]}"
    for prefix, target in (("model.embed_tokens.", "0.embed_tokens."), ("model.norm.", f"{num_layers + 1}.norm."),
                           ("lm_head.", f"{num_layers + 2}.lm_head.")):
        if name.startswith(prefix):
            return target + name[len(prefix):]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if match and int(match.group(1)) < num_layers:
        return f"{int(match.group(1)) + 1}.layer.{match.group(2)}"
    raise ValueError(f"{name!r} is not a parameter of a Llama/Qwen2-family model with {num_layers} decoder layers")


def pipeline_state_to_hf(state: Mapping[str, torch.Tensor], num_layers: int,
                         tie_word_embeddings: bool) -> Dict[str, torch.Tensor]:
    """Pipeline-named tensors (one stage's or several stages' merged ``named_parameters``/``state_dict``) ->
    HF-named tensors, for ``hf_model.load_state_dict`` / ``save_pretrained``. With tied embeddings the embedding
    is also returned as ``lm_head.weight`` (the same tensor, as the HF model's own ``state_dict`` holds it)."""
    out = {pipeline_to_hf_key(name, num_layers): t for name, t in state.items()}
    if tie_word_embeddings and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def gather_hf_state_dict(module: PipelineModule, topology, num_layers: int, tie_word_embeddings: bool,
                         replica: int = 0, dst: int = 0) -> Optional[Dict[str, torch.Tensor]]:
    """The whole model's HF-named state dict (CPU fp32 tensors) on global rank ``dst``; None on the other ranks.
    Collective over the world group: every rank calls it. Each rank first assembles its stage's fp32 master weights
    (:func:`ds_ext.models.hf.gather_fp32_state`: DeepSpeed's ``safe_get_full_fp32_param`` over the stage's
    data-parallel group, ZeRO-1/2 or the bf16 optimizer; an fp32 engine without them: the parameters), so a bf16
    run writes its masters, not their bf16 copies; then the ranks of replica ``replica`` with data index 0 (one per
    stage) send theirs to ``dst`` (``topology``: the ds_ext Topology the module was built with). Raises on ``dst``
    if a parameter is missing, naming it."""
    import torch.distributed as dist
    from ds_ext.models.hf import gather_fp32_state
    rank = dist.get_rank()
    rep, _, data = topology.coords(rank)
    masters = {n: t.cpu() for n, t in gather_fp32_state(module).items()}  # every rank: a collective per stage group
    mine = masters if rep == replica and data == 0 else None
    parts = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(mine, parts, dst=dst)
    if rank != dst:
        return None
    merged = {}
    for part in parts:
        merged.update(part or {})
    out = pipeline_state_to_hf(merged, num_layers, tie_word_embeddings)
    missing = [f"model.layers.{i}" for i in range(num_layers) if f"model.layers.{i}.input_layernorm.weight" not in out]
    missing += [n for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight") if n not in out]
    if missing:
        raise ValueError(f"gather_hf_state_dict: no stage of replica {replica} holds {missing}")
    return out
