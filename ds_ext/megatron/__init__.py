"""ds_ext features for megatron-core 0.16.1 users (``pip install .[megatron]``), with the same ``"ds_ext"`` block.

No fork of megatron-core and no patch at import time; each feature attaches through a public seam:

* Prefix Grouper: :func:`layer_spec` puts :class:`PrefixGroupedCoreAttention` into the layer spec's
  ``core_attention``; :func:`grouped_forward` runs a packed GRPO batch (``attention.py``).
* StreamBP: :func:`streambp_layers` gives every ``TransformerLayer`` the exact chunked backward in place of
  megatron's recompute (``streambp.py``).
* NoLoCo / DiLoCo: :func:`replica_groups` builds replica-sized data-parallel groups for megatron's DDP and
  distributed optimizer; :func:`noloco_setup` returns the replica-only ``finalize_model_grads_func`` and the
  ``after_step()`` outer step on the optimizer's fp32 shards (``noloco.py``).
* Recovery journal: :func:`journal_for` journals the distributed optimizer's shards per step (``journal.py``).
* :class:`MegatronRunner` drives NoLoCo and the journal (both :class:`ds_ext.contract.Feature`) in phase order, as
  the DeepSpeed engine drives its features (``runner.py``).
* CPU: :func:`cpu_shims` lets megatron's DDP, optimizer and RoPE run without CUDA, inside a ``with`` block only.

The block is parsed by :func:`parse_ds_ext` with the DeepSpeed path's models and the megatron rules of
:mod:`ds_ext.config.megatron`: the distributed optimizer counts as ZeRO-1, and what this path does not implement
(checkpoint-free recovery, the AsyncFlow sample ledger, ``topology.pipeline_stages > 1``) is refused with an error
naming the key, not ignored.

Import the submodules directly if you need only one; this file imports megatron-core.
"""
from ds_ext.megatron.attention import GroupedMask, PrefixGroupedCoreAttention, grouped_forward
from ds_ext.megatron.journal import MegatronJournal, journal_for
from ds_ext.megatron.model import layer_spec, parse_ds_ext, tiny_gpt, tiny_transformer_config
from ds_ext.megatron.noloco import MegatronNoLoCo, noloco_setup, replica_groups
from ds_ext.megatron.runner import MegatronRunner
from ds_ext.megatron.shims import cpu_shims
from ds_ext.megatron.streambp import streambp_layers

__all__ = ["GroupedMask", "PrefixGroupedCoreAttention", "grouped_forward", "layer_spec", "parse_ds_ext", "tiny_gpt",
           "tiny_transformer_config", "MegatronJournal", "journal_for", "MegatronNoLoCo", "MegatronRunner", "noloco_setup", "replica_groups", "cpu_shims",
           "streambp_layers"]
