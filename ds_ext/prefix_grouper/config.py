"""``"ds_ext": {"prefix_grouper": {...}}``: Prefix Grouper (arXiv 2506.05433)."""
from ds_ext.config.base import ExtSection


class PrefixGrouperConfig(ExtSection):
    """With it on, the engine accepts a :class:`ds_ext.prefix_grouper.layout.GroupedBatch` as its input: the
    model runs on the packed rows with restarting positions and prefix-grouped attention and returns packed
    logits (map them to responses with ``GroupedBatch.completion_logprobs``)."""

    enabled: bool = False
    """Route ``engine(grouped_batch)`` through prefix-grouped attention."""
