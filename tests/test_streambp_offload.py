"""``streambp.offload_layer_inputs``: the layer-input store's copy/prefetch order (CPU bookkeeping mode), exact
gradients with the store in the loop, the refusal on CPU, and (``-m cuda``) the real pinned-memory path."""
import gc
import weakref

import pytest
import torch

from ds_ext.config import DsExtConfigError, parse_ext_config
from ds_ext.models import LlamaForCausalLM, ModelConfig
from ds_ext.streambp.apply import stream_model
from ds_ext.streambp.config import StreamBPConfig
from ds_ext.streambp.offload import LayerInputStore

torch.set_num_threads(1)
TINY = dict(hidden_size=64, intermediate_size=176, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=64)
# fp32: chunked sums reorder additions; the project's exactness bar for fp32 is a relative error of 1e-5.
FP32_RTOL = 1e-5


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def test_inputs_leave_the_device_and_come_back_in_reverse_with_the_previous_layer_prefetched():
    store = LayerInputStore("cpu")
    xs = [torch.randn(2, 5, 4) for _ in range(3)]
    refs = [weakref.ref(x) for x in xs]
    values = [x.clone() for x in xs]
    entries = [store.put(x, i) for i, x in enumerate(xs)]
    del xs
    gc.collect()
    assert all(r() is None for r in refs)  # the store kept host copies only: the originals are gone
    got = [store.get(entries[i]) for i in (2, 1, 0)]
    assert all(torch.equal(g, values[i]) for g, i in zip(got, (2, 1, 0)))
    assert store.log == [("offload", 0, 0), ("offload", 1, 1), ("offload", 2, 2),
                         ("load", 2, 2), ("prefetch", 1, 1),      # the last layer's backward fetches layer 1 ahead
                         ("fetch", 1, 1), ("prefetch", 0, 0),
                         ("fetch", 0, 0)]
    with pytest.raises(RuntimeError, match="layer 1 was already fetched"):
        store.get(entries[1])


def test_another_micro_batch_forward_in_between_starts_a_new_chain():
    """Pipeline schedules run several micro-batches' forwards before their backwards: a layer's backward
    prefetches only its own micro-batch's previous layer."""
    store = LayerInputStore("cpu")
    a0, a1 = store.put(torch.ones(1, 2), 0), store.put(torch.ones(1, 2), 1)
    b0, b1 = store.put(torch.zeros(1, 2), 0), store.put(torch.zeros(1, 2), 1)
    store.get(b1)
    store.get(a1)
    assert [e for e in store.log if e[0] == "prefetch"] == [("prefetch", 2, 0), ("prefetch", 0, 0)]
    assert torch.equal(store.get(b0), torch.zeros(1, 2)) and torch.equal(store.get(a0), torch.ones(1, 2))


def test_a_streamed_model_with_its_inputs_in_the_store_has_exact_gradients():
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    plain, streamed = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    streamed.load_state_dict(plain.state_dict())
    store = LayerInputStore("cpu")
    stream_model(streamed, StreamBPConfig(enabled=True, chunk_size=7, logits_chunk_size=5), store=store)
    ids, labels = torch.randint(0, 256, (2, 29)), torch.randint(0, 256, (2, 29))
    for m in (plain, streamed):
        m(ids, labels).backward()
    for (name, p), q in zip(plain.named_parameters(), streamed.parameters()):
        assert rel_err(q.grad, p.grad) <= FP32_RTOL, name
    events = [(e[0], e[2]) for e in store.log]
    assert events == [("offload", 0), ("offload", 1), ("offload", 2), ("load", 2), ("prefetch", 1), ("fetch", 1),
                      ("prefetch", 0), ("fetch", 0)]


def test_offload_on_cpu_is_refused_naming_the_key():
    assert parse_ext_config({"ds_ext": {"streambp": {"enabled": True, "offload_layer_inputs": True}}}
                            ).streambp.offload_layer_inputs
    model = LlamaForCausalLM(ModelConfig(**TINY))
    with pytest.raises(DsExtConfigError, match="offload_layer_inputs.*model on cpu.*already are in host memory"):
        stream_model(model, StreamBPConfig(enabled=True, offload_layer_inputs=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offload_keeps_gradients_and_frees_the_stored_inputs():
    """On a GPU: the same gradients as StreamBP without offload, and the peak device memory of forward + backward
    no longer holds every layer's input (8 layers; the stored inputs alone are 8 x [1, 4096, 512] fp32 = 64 MiB)."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=512, intermediate_size=1024, num_layers=8, num_heads=8, num_kv_heads=4,
                      max_seq_len=4096)
    ids = torch.randint(0, 256, (1, 4096), device="cuda")
    results = {}
    for offload in (False, True):
        torch.manual_seed(1)
        model = LlamaForCausalLM(cfg).cuda()
        stream_model(model, StreamBPConfig(enabled=True, chunk_size=1024, offload_layer_inputs=offload))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(ids, ids).backward()
        torch.cuda.synchronize()
        results[offload] = (torch.cuda.max_memory_allocated() - base, [p.grad.clone() for p in model.parameters()])
    for a, b in zip(results[True][1], results[False][1]):
        assert rel_err(a, b) <= FP32_RTOL  # same kernels, same order: exact up to fp32 reordering
    stored = 8 * 4096 * 512 * 4
    assert results[False][0] - results[True][0] >= 0.5 * stored, (results[False][0], results[True][0])
