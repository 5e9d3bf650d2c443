"""``streambp.offload_layer_inputs``: streamed layers' stored inputs in pinned host memory, prefetched in backward.

A streamed layer keeps only its input ``x: [B, T, C]`` for backward (:mod:`ds_ext.streambp.layer`); over ``L``
layers that is ``L x B x T x C`` of device memory, the only part of StreamBP's memory that grows with depth.
:class:`LayerInputStore` moves each stored input off the device:

* **forward** (:meth:`LayerInputStore.put`, in layer order): the side stream waits for the compute stream (``x`` is
  written), copies ``x`` into a pinned host buffer (``non_blocking``), and ``x.record_stream(side)`` keeps the
  caching allocator from handing ``x``'s memory out again before that copy ends; the device copy is then dropped
  with the last Python reference. Returns an :class:`Entry` (what the layer's autograd context keeps).
* **backward** (:meth:`LayerInputStore.get`, in reverse layer order): the layer's input comes back (already
  prefetched, or copied now), and the *previous* layer's input, the next one backward needs, is prefetched on the
  side stream while this layer's backward computes. The compute stream waits for the prefetch before it reads the
  tensor, and ``record_stream`` ties the tensor (allocated on the side stream) to the compute stream.

So the device holds at most two layers' inputs (the one in use and the one arriving) instead of ``L``. Entries link
to the entry put just before them for the previous layer (``layer_index - 1``), weakly: a forward of another
micro-batch in between (pipeline schedules) starts a new chain, and a consumed or freed entry is never fetched.

``device="cpu"`` runs the same bookkeeping with plain copies (no streams, no pinning): the order of copies and
prefetches is testable on CPU, and :attr:`LayerInputStore.log` records it. Offloading a CPU model is refused where
the config is applied (:func:`offload_refusal`): its inputs already are in host memory.
"""
from __future__ import annotations

import weakref
from typing import List, Optional, Tuple

import torch
from torch import nn

from ds_ext.config import DsExtConfigError
from ds_ext.streambp.config import StreamBPConfig


def offload_refusal(device: torch.device) -> Optional[str]:
    """Why ``streambp.offload_layer_inputs`` cannot run for a model on ``device``, or None."""
    if torch.device(device).type != "cuda":
        return (f"got true for a model on {torch.device(device).type}: offload moves stored layer inputs from GPU "
                "memory to pinned host memory, and on this device they already are in host memory; set it to "
                "false (or run on CUDA)")
    return None


class Entry:
    """One stored layer input: the host copy, its shape/dtype, and (after a prefetch) the device tensor."""

    __slots__ = ("host", "device_tensor", "ready", "layer_index", "prev", "id", "__weakref__")

    def __init__(self, host: torch.Tensor, layer_index: int, prev: Optional["Entry"], ident: int):
        self.host, self.device_tensor, self.ready = host, None, None
        self.layer_index, self.id = layer_index, ident
        self.prev = weakref.ref(prev) if prev is not None else None


class LayerInputStore:
    """Stored layer inputs of the streamed layers of one model (see the module docstring).

    ``device``: where the layers compute (``cuda[:n]``, or ``cpu`` for the bookkeeping-only mode).
    ``log``: ``(event, entry id, layer index)`` tuples, ``event`` one of ``offload``, ``prefetch``, ``fetch``
    (taken from a prefetch) and ``load`` (copied on demand); kept only with ``record`` (default: in the CPU
    bookkeeping mode), since in training it would grow by several tuples per layer and micro-batch for the whole run.
    """

    def __init__(self, device="cuda", record: Optional[bool] = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.record = not self.cuda if record is None else record
        self.log: List[Tuple[str, int, int]] = []
        self._last: Optional[weakref.ref] = None
        self._count = 0

    def put(self, x: torch.Tensor, layer_index: int) -> Entry:
        """Copy ``x`` to host memory; the caller drops ``x`` (the store keeps no device reference)."""
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.cuda)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(x, non_blocking=True)
            x.record_stream(self.stream)
        else:
            host.copy_(x)
        last = self._last() if self._last is not None else None
        prev = last if last is not None and last.layer_index == layer_index - 1 else None
        entry = Entry(host, layer_index, prev, self._count)
        self._count += 1
        self._last = weakref.ref(entry)
        self._note("offload", entry.id, layer_index)
        return entry

    def _note(self, event: str, ident: int, layer_index: int) -> None:
        if self.record:
            self.log.append((event, ident, layer_index))

    def prefetch(self, entry: Entry) -> None:
        """Start copying ``entry`` back to the device (on the side stream); a no-op when under way or consumed."""
        if entry.host is None or entry.device_tensor is not None:
            return
        self._copy_back(entry)
        self._note("prefetch", entry.id, entry.layer_index)

    def _copy_back(self, entry: Entry) -> None:
        if self.cuda:
            with torch.cuda.stream(self.stream):  # ordered after the offload copy on the same stream
                entry.device_tensor = entry.host.to(self.device, non_blocking=True)
                entry.ready = torch.cuda.Event()
                entry.ready.record(self.stream)
        else:
            entry.device_tensor = entry.host.clone()

    def get(self, entry: Entry) -> torch.Tensor:
        """The stored input on the device (the entry is consumed), and a prefetch of the previous layer's input."""
        if entry.host is None:
            raise RuntimeError(f"the stored input of layer {entry.layer_index} was already fetched (a second "
                               "backward through the same graph needs retain_graph without offload_layer_inputs)")
        fetched = entry.device_tensor is not None
        if not fetched:
            self._copy_back(entry)
        x = entry.device_tensor
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(entry.ready)
            x.record_stream(current)
        self._note("fetch" if fetched else "load", entry.id, entry.layer_index)
        entry.host = entry.device_tensor = entry.ready = None
        prev = entry.prev() if entry.prev is not None else None
        if prev is not None:
            self.prefetch(prev)
        return x


def input_store(model: nn.Module, cfg: StreamBPConfig) -> Optional[LayerInputStore]:
    """The store of ``cfg.offload_layer_inputs`` for the model's device (None when off); refused off CUDA, naming
    the key."""
    if not cfg.offload_layer_inputs:
        return None
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    refusal = offload_refusal(device)
    if refusal is not None:
        raise DsExtConfigError([("ds_ext.streambp.offload_layer_inputs", refusal)])
    return LayerInputStore(device)
