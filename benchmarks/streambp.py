"""StreamBP vs DeepSpeed's long-sequence stack (ALST at sp=1), activation checkpointing and plain autograd.

    DS_EXT_BENCH_LOCK=/tmp/lock python benchmarks/streambp.py   # CPU default: HF Qwen2, 4k/8k grid, sp=2, ~15 min
    python benchmarks/streambp.py --lengths 4096,8192,16384 --budget_length 16384 --no_sp2   # the 16k budget
    python benchmarks/streambp.py --lengths 1024,2048 --full_logits_lengths 1024 --budget_length 2048
    python benchmarks/streambp.py --model reference    # the reference model grid (none / checkpointing / StreamBP)
    python benchmarks/streambp.py --device cuda --lengths 32768,65536 --full_logits_lengths 32768,65536 \
        --budget_length 65536                          # the GPU grid: bf16, plus streambp_offload (exit 2 without CUDA)
    python benchmarks/streambp.py --smoke --plot /tmp/s.png   # CI size: every mode at T=512 only

Models (random init, built in process, batch 1, fp32, random tokens):
* ``qwen2`` (default): ``transformers.Qwen2ForCausalLM`` from a ``Qwen2Config``: hidden 256, 4 layers, 4 query /
  2 KV heads (GQA), SwiGLU 704, vocabulary 32000, untied head, SDPA attention;
* ``reference``: the ds_ext reference decoder (hidden 256, 4 layers, 8 / 4 heads, SwiGLU 704, vocabulary 8192).

Modes:
* ``none``: plain autograd (all activations kept, full logits; HF's own loss on the qwen2 model);
* ``checkpointing``: ``deepspeed.checkpointing.checkpoint`` around every decoder layer (full logits);
* ``alst``: DeepSpeed's ALST stack at sequence-parallel size 1 (``deepspeed.runtime.sequence_parallel.ulysses_sp``):
  the same DeepSpeed checkpointing of every decoder layer, ``TiledMLP`` for every MLP (``ceil(T / hidden)`` shards,
  DeepSpeed's documented choice) and ``TiledFusedLogitsLoss`` for the head + loss (shards of the same number of
  tokens as StreamBP's logits chunk, so both hold logits of the same size); qwen2 only;
* ``streambp``: ds_ext StreamBP (``--chunk_size``; logits chunk ``--logits_chunk_size`` tokens, capped by
  StreamBP's own logits byte budget);
* ``streambp_offload`` (``--device cuda`` only): StreamBP with ``offload_layer_inputs`` (stored layer inputs in
  pinned host memory, so its "stored" device bytes are 0);
* ``alst_sp2`` / ``streambp_sp2`` (qwen2, unless ``--no_sp2``): the same at sequence-parallel size 2, 2 processes x
  1 thread over gloo (DeepSpeed's ``UlyssesSPAttentionHF`` for ALST; ``streambp.sequence_parallel: 2`` for
  StreamBP); T is the whole sequence, memory the larger rank's (``benchmarks/_streambp_sp.py``).

``--device cuda``: every model is cast to bf16 on the GPU (the issue's GPU grid), peak memory is the caching
allocator's ``max_memory_allocated`` growth over the step, times follow ``torch.cuda.synchronize``; gradient errors
stay an fp32 CPU measurement (exactness is an fp32 property). Without a visible CUDA device it exits with status 2
and says so. The theoretical bytes per token stay fp32 figures (halve them for bf16).

Measurement: each (mode, length) runs in a fresh process (2 torch threads) that builds the model, runs one
warm-up step at T=64, reads its resident set size (VmRSS), runs one forward+backward at length T, and reports
``ru_maxrss - VmRSS_before`` as the peak extra memory of the step and its wall time (glibc's mmap threshold is
fixed at 64 KiB in the child so that freed tensors leave RSS). The peak includes the parameter gradients (the same
for every mode). "Stored layer inputs" = ``layers x T x hidden x 4`` bytes (what checkpointing, ALST and StreamBP
keep between forward and backward); "working set" = peak - stored layer inputs, shown beside each mode's
theoretical bytes per token (:func:`theory_bytes_per_token`).

"Longest sequence under a budget": the budget is the baseline's measured peak at ``--budget_length`` (ALST's at
8k on qwen2, checkpointing's on the reference model). On qwen2 it is found by running: probes of StreamBP at the
least-squares estimate from its measured points, bisection of the (fits, fails) bracket, ``--search_probes`` runs,
resolution ``--search_step``; the same for sp=2 within ALST sp=2's per-rank peak at ``--budget_length``, where
StreamBP sp=1 is searched too (equal per-rank memory). Also a linear extrapolation from StreamBP's two longest
points. Time: ``--repeats`` paired runs (ALST then StreamBP) at ``--budget_length``, the median of the per-pair
ratios. ``DS_EXT_BENCH_LOCK=FILE``: every point holds that flock (a shared machine). Gradient error: max relative
error over all parameters of each mode vs plain autograd at ``--grad_length``. Prints a table, writes a PNG and
prints one JSON object as its last line.

Which command gives which keys: every command gives the unconditional keys below; the default model (qwen2, the
default grid ``python benchmarks/streambp.py``) adds the ALST keys (``*_vs_alst``); ``--model reference`` adds
``max_seq_ratio_vs_checkpointing`` and the other checkpointing-budget keys instead; ``--device cuda`` adds the
offload keys. The ``time_ratio_vs_checkpointing`` group needs a length in both ``--lengths`` and
``--full_logits_lengths`` (true of every documented grid; ``--smoke`` measures no full-logits mode, whose code its
gradient check still runs).

Last-line JSON keys:
- `benchmark`: "streambp"
- `device`: cpu or cuda
- `device_name`: the device measured on
- `dtype`: float32 on CPU, bfloat16 on CUDA
- `model_name`: qwen2 or reference
- `model`: the model's sizes
- `chunk_size`: StreamBP's chunk (tokens)
- `logits_chunk_size`: StreamBP's logits chunk and ALST's loss shard (tokens)
- `max_grad_rel_err`: StreamBP's max relative gradient error vs plain autograd (fp32, CPU, at --grad_length)
- `grad_rel_err`: the same for every mode, {mode: error}
- `rows`: every measured (mode, length): seconds, peak_bytes, stored_bytes (or error)
- `plot`: the PNG written, relative to the repository root
- `time_ratio_vs_checkpointing`: StreamBP time / checkpointing time at time_ratio_length (without --smoke)
- `time_ratio_length`: the longest length measured for both checkpointing and StreamBP (without --smoke)
- `memory_ratio_at_longest`: checkpointing peak / StreamBP peak at time_ratio_length (without --smoke)
- `theory_memory_ratio`: the same from theory_bytes_per_token (without --smoke)
- `max_seq_ratio_vs_checkpointing`: longest measured StreamBP length within checkpointing's peak at
  --budget_length, over --budget_length (with --model reference)
- `max_seq_ratio_extrapolated`: the same, extrapolated linearly from StreamBP's two longest points
  (with --model reference)
- `checkpointing_grad_rel_err`: checkpointing's max relative gradient error (with --model reference)
- `max_seq_ratio_vs_alst`: StreamBP's extrapolated longest length within ALST's peak at --budget_length, over
  --budget_length (without --model reference)
- `max_seq_ratio_vs_alst_measured`: StreamBP's longest length within ALST's peak at --budget_length, found by
  running (the search), over --budget_length; null when ALST did not run there (without --model reference)
- `max_seq_vs_alst_bracket`: that search's [longest fitting, shortest failing (null if none)] lengths; null when
  ALST did not run there (without --model reference)
- `budget_bytes`: ALST's peak at --budget_length (without --model reference)
- `budget_length`: --budget_length (without --model reference)
- `time_ratio_vs_alst`: StreamBP time / ALST time at --budget_length; null when either did not run there
  (without --model reference)
- `time_ratio_vs_alst_median`: median over --repeats paired runs of StreamBP time / ALST time at
  --budget_length; null when no pair ran (without --model reference)
- `time_vs_alst_spread`: max - min of those per-pair time ratios (beside time_ratio_vs_alst_median); null when
  no pair ran (without --model reference)
- `time_ratio_vs_alst_runs`: the per-pair ratios; null when no pair ran (without --model reference)
- `sp2_budget_bytes`: ALST sp=2's per-rank peak at --budget_length; null when it failed (without --model reference)
  (without --no_sp2)
- `sp2_error`: why alst_sp2 failed, else null (without --model reference) (without --no_sp2)
- `sp2_max_seq_ratio_vs_alst_sp2`: StreamBP+Ulysses sp=2's longest length within sp2_budget_bytes per rank (the
  search), over --budget_length; null when alst_sp2 failed (without --model reference) (without --no_sp2)
- `sp2_max_seq_ratio_vs_sp1`: that length over StreamBP sp=1's longest within the same per-rank bytes; null when
  either is missing (without --model reference) (without --no_sp2)
- `sp2_brackets`: both searches' [longest fitting, shortest failing] lengths, {mode: bracket}; null when
  alst_sp2 failed (without --model reference) (without --no_sp2)
- `working_set_ratio_vs_alst`: StreamBP working set / ALST's at --budget_length; null when either did not run
  there (without --model reference)
- `activation_ratio_vs_alst`: StreamBP peak / ALST peak per length, {length: ratio} (without --model reference)
- `working_set_slope_ratio_vs_alst`: StreamBP's working-set growth per token over ALST's between the two longest
  lengths; null with fewer than two (without --model reference)
- `theory_working_set_bytes_per_token`: theory per mode, {mode: bytes} (without --model reference)
- `alst_grad_rel_err`: ALST's max relative gradient error (without --model reference)
- `offload_max_seq_measured`: longest measured streambp_offload length within the budget (with --device cuda)
- `offload_max_seq_ratio_vs_baseline`: streambp_offload's extrapolated longest length over --budget_length
  (with --device cuda)
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import subprocess
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _keys import parse_with_smoke  # noqa: E402
from _streambp_sp import SP_MODES, alst_measurements, bench_lock, build_sp2, plot, run_ranks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "qwen2": dict(vocab_size=32000, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                  num_kv_heads=2),
    "reference": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                      num_kv_heads=4),
}
MODES = {"qwen2": ("none", "checkpointing", "alst", "streambp"), "reference": ("none", "checkpointing", "streambp")}
BASELINE = {"qwen2": "alst", "reference": "checkpointing"}
SMOKE = {"lengths": "512", "full_logits_lengths": "", "budget_length": 512, "streambp_only_lengths": "",
         "chunk_size": 128, "logits_chunk_size": 64, "grad_length": 128, "repeats": 1, "search_probes": 0,
         "no_sp2": True}


# ----------------------------------------------------------------------------------------------------- models
def build(model_name: str, mode: str, args):
    """``(model, loss_fn)``: ``loss_fn(ids [1, T + 1]) -> scalar`` runs the mode's forward on ``ids[:, :-1]``."""
    return (build_qwen2 if model_name == "qwen2" else build_reference)(mode, args)


def placed(model, args):
    """The model on ``args.device``: bf16 on CUDA (the GPU grid), fp32 on CPU. Before StreamBP attaches, so its
    offload store sees the model's device."""
    return model.to(args.device, dtype=torch.bfloat16 if args.device == "cuda" else torch.float32)


def streambp_config(mode: str, args):
    from ds_ext.streambp.config import StreamBPConfig
    return StreamBPConfig(enabled=True, chunk_size=args.chunk_size, logits_chunk_size=args.logits_chunk_size,
                          offload_layer_inputs=mode == "streambp_offload")


def build_reference(mode: str, args):
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    m = MODELS["reference"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
                                         intermediate_size=m["intermediate_size"], num_layers=m["num_layers"],
                                         num_heads=m["num_heads"], num_kv_heads=m["num_kv_heads"],
                                         max_seq_len=1 << 20))
    model = placed(model, args)
    if mode.startswith("streambp"):
        from ds_ext.streambp.apply import stream_model
        stream_model(model, streambp_config(mode, args))
    elif mode == "checkpointing":
        _init_deepspeed_checkpointing()
        for layer in model.layers:
            plain = type(layer).forward.__get__(layer)
            layer.forward = (lambda p: lambda x, position_ids, key_padding_mask=None:
                             _ds_checkpoint(p, x, position_ids))(plain)
    return model, lambda ids: model(ids[:, :-1], ids[:, 1:])


def build_qwen2(mode: str, args):
    import transformers
    m = MODELS["qwen2"]
    config = transformers.Qwen2Config(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"], num_key_value_heads=m["num_kv_heads"],
        max_position_embeddings=1 << 17, tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = placed(transformers.Qwen2ForCausalLM(config).float().train(), args)
    if mode.startswith("streambp"):
        from ds_ext.streambp.apply import stream_model
        from ds_ext.streambp.hf import causal_lm_loss
        stream_model(model, streambp_config(mode, args))
        return model, lambda ids: causal_lm_loss(model, ids[:, :-1], ids[:, :-1],
                                                 logits_chunk_size=args.logits_chunk_size)
    if mode in ("checkpointing", "alst"):
        _init_deepspeed_checkpointing()
        for layer in model.model.layers:
            layer.forward = _hf_checkpointed(layer)
    if mode == "alst":
        for layer in model.model.layers:
            layer.mlp.forward = _tiled_mlp(layer.mlp, m["hidden_size"])
        return model, lambda ids: alst_loss(model, ids[:, :-1], args.logits_chunk_size)
    return model, lambda ids: model(input_ids=ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss


def _init_deepspeed_checkpointing() -> None:
    import deepspeed
    if not deepspeed.comm.is_initialized():  # DeepSpeed's checkpointing asks for its comm backend
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(29600 + os.getpid() % 1000))):
            os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    deepspeed.checkpointing.configure(None, partition_activations=False)


def _ds_checkpoint(fn, *args):
    import deepspeed
    return deepspeed.checkpointing.checkpoint(fn, *args)


def _hf_checkpointed(layer):
    """The HF decoder layer's forward under ``deepspeed.checkpointing.checkpoint`` (keyword arguments such as
    ``position_embeddings`` ride in the closure; the hidden states are the checkpointed input)."""
    plain = type(layer).forward

    def forward(hidden_states, *args, **kwargs):
        return _ds_checkpoint(functools.partial(plain, layer, **kwargs), hidden_states, *args)
    return forward


def _tiled_mlp(mlp, hidden: int):
    """ALST's ``TiledMLP`` around an HF MLP, ``ceil(T / hidden)`` shards (DeepSpeed's documented choice)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP
    own = type(mlp).forward
    params = list(mlp.parameters())

    def forward(x):
        return TiledMLP.apply(own, mlp, x, math.ceil(x.shape[-2] / hidden), params)
    return forward


def alst_loss(model, ids: torch.Tensor, logits_chunk: int) -> torch.Tensor:
    """ALST's head + loss: ``TiledFusedLogitsLoss`` over shards of ``logits_chunk`` tokens, ``"sum"`` of the
    shards' token cross-entropy sums each divided by the number of labels of the whole sequence, so the result is
    the mean token loss; labels shifted like HF's. (The division must happen inside the shards: the function runs
    each shard's backward in its forward, so the head's weight gradient never sees a division made afterwards.)"""
    import torch.nn.functional as F
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    vocab, count = model.config.vocab_size, (labels != -100).sum()

    def loss_fn(self, x, y):
        return F.cross_entropy(self.lm_head(x).float().view(-1, vocab), y.view(-1), ignore_index=-100,
                               reduction="sum") / count
    shards = math.ceil(ids.shape[1] / logits_chunk)
    return TiledFusedLogitsLoss.apply(loss_fn, model, hidden, labels, None, shards, [model.lm_head.weight], "sum")


# ----------------------------------------------------------------------------------------------- measurement
def step(loss_fn, model, length: int, vocab: int, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (1, length + 1), generator=g).to(device)
    model.zero_grad(set_to_none=True)
    _sync(device)
    t0 = time.perf_counter()
    loss_fn(ids).backward()
    _sync(device)
    return time.perf_counter() - t0


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def child(model_name: str, mode: str, length: int, args) -> dict:
    sp = mode in SP_MODES  # one of 2 ranks, 1 thread each
    torch.set_num_threads(1 if sp else 2)
    model, loss_fn = build_sp2(sys.modules[__name__], mode, args) if sp else build(model_name, mode, args)
    model.to(args.device)
    vocab = MODELS[model_name]["vocab_size"]
    step(loss_fn, model, 64, vocab)
    model.zero_grad(set_to_none=True)
    if args.device == "cuda":  # the caching allocator's own count of live tensor bytes
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        seconds = step(loss_fn, model, length, vocab)
        return {"mode": mode, "length": length, "seconds": seconds,
                "peak_bytes": torch.cuda.max_memory_allocated() - before}
    before = rss_bytes()
    seconds = step(loss_fn, model, length, vocab)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "length": length, "seconds": seconds, "peak_bytes": peak - before}


def measure(mode: str, length: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, str(length), "--model", args.model,
           "--chunk_size", str(args.chunk_size), "--logits_chunk_size", str(args.logits_chunk_size),
           "--device", args.device]
    ranks = 2 if mode in SP_MODES else 1
    # A fixed mmap threshold makes glibc return freed large blocks, so RSS follows the live tensors (otherwise its
    # adaptive threshold keeps freed blocks in the heap and the peak depends on allocation history).
    env = dict(os.environ, OMP_NUM_THREADS=str(2 // ranks), MALLOC_MMAP_THRESHOLD_="65536")
    # DeepSpeed's CPU comm op (checkpointing's init_distributed) is built once per venv, as the tests do
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    env["DS_ACCELERATOR"] = args.device  # explicit: the parent's own CPU setting (grad_errors) must not leak
    envs = [env]
    if ranks > 1:
        from ds_ext.distributed import free_port
        port = str(free_port())
        envs = [dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=port) for r in range(ranks)]
    try:
        with bench_lock():
            procs = run_ranks(cmd, envs, args.point_timeout, ROOT)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "length": length, "error": f"timed out after {args.point_timeout} s"}
    failed = [err for code, _, err in procs if code != 0]
    if failed:
        return {"mode": mode, "length": length, "error": failed[0].strip().splitlines()[-1:]}
    per_rank = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in procs]
    result = {"mode": mode, "length": length, "seconds": max(r["seconds"] for r in per_rank),
              "peak_bytes": max(r["peak_bytes"] for r in per_rank)}
    result["stored_bytes"] = 0 if mode == "streambp_offload" else stored_bytes(args.model, length // ranks,
                                                                                args.device)
    print(f"  {mode:>13} T={length:>6}: {result['seconds']:7.2f} s  {result['peak_bytes'] / 2**20:8.1f} MiB",
          file=sys.stderr)
    return result


def stored_bytes(model_name: str, length: int, device: str = "cpu") -> int:
    """The layer inputs kept between forward and backward: layers x T x hidden, fp32 (bf16 on CUDA)."""
    m = MODELS[model_name]
    return m["num_layers"] * length * m["hidden_size"] * (2 if device == "cuda" else 4)


def grad_errors(length: int, args) -> dict:
    """Max relative gradient error over parameters, vs plain autograd, in this process (fp32 on CPU whatever
    ``--device``: exactness is the fp32 property)."""
    args = argparse.Namespace(**{**vars(args), "device": "cpu"})
    deepspeed_on_cpu()
    vocab = MODELS[args.model]["vocab_size"]
    reference, loss_fn = build(args.model, "none", args)
    step(loss_fn, reference, length, vocab, seed=1)
    ref = {n: p.grad for n, p in reference.named_parameters()}
    errors = {}
    for mode in MODES[args.model][1:]:
        model, loss_fn = build(args.model, mode, args)
        step(loss_fn, model, length, vocab, seed=1)
        errors[mode] = max(((p.grad - ref[n]).norm() / ref[n].norm()).item() for n, p in model.named_parameters())
    return errors


def deepspeed_on_cpu() -> None:
    """DeepSpeed's accelerator in this process is the CPU one, whatever the machine: its checkpointing moves the
    checkpointed hidden states to ``get_accelerator()``'s device, which on a GPU machine is ``cuda:0`` by default,
    while :func:`grad_errors` runs CPU models. Set before DeepSpeed first asks (``DS_ACCELERATOR``), replaced if an
    earlier import already chose another."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.accelerator import get_accelerator, set_accelerator
    if get_accelerator().device_name() != "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
        set_accelerator(CPU_Accelerator())


def theory_bytes_per_token(model_name: str, mode: str) -> float:
    """Peak bytes per token, fp32, leading terms (constants such as logits chunks and parameter gradients left
    out); :func:`theory_working_set` without the stored layer inputs.

    ``u = hidden`` floats. One plain layer keeps ``7 u + 4 F`` (norms, q/k/v/o, residuals, SwiGLU gate/up/act/
    product); full logits cost ``3 V`` (logits, log-softmax, gradient)."""
    m = MODELS[model_name]
    stored = m["num_layers"] * m["hidden_size"] * 4
    return (0 if mode == "none" else stored) + theory_working_set(model_name, mode)


def theory_working_set(model_name: str, mode: str) -> float:
    """Working-set bytes per token (beside the stored layer inputs), the larger of two phases:

    * head + loss (checkpointing's full logits; ALST: the last layer's output, the final norm's normalised rows
      and output, the gradient of the hidden states: ``4 u``; StreamBP applies the final norm inside its chunked
      head: the last layer's output and its gradient, ``2 u``);
    * one layer's backward: the incoming gradient and the input gradient (``2 u``) plus, for checkpointing and
      ALST, the recomputed layer's saved activations (``8 u + kv``: norms, q, k/v, attention output and its
      projection input, residual, the MLP input; ALST's ``TiledMLP`` keeps only that input, checkpointing also the
      SwiGLU activations ``4 F``), for StreamBP the keys/values and their gradient accumulators (``2 kv``)."""
    m = MODELS[model_name]
    c, f, v = m["hidden_size"], m["intermediate_size"], m["vocab_size"]
    kv = 2 * c * m["num_kv_heads"] // m["num_heads"]
    one_layer = 7 * c + 4 * f
    if mode == "none":
        return 4 * (m["num_layers"] * one_layer + 3 * v)
    if mode == "checkpointing":
        return 4 * max(3 * v + 2 * c, 2 * c + one_layer + kv)
    if mode == "alst":
        return 4 * max(4 * c, 2 * c + 8 * c + kv)
    return 4 * max(2 * c, 2 * c + 2 * kv)


def working_set_slope_ratio(by: dict, lengths) -> Optional[float]:
    """StreamBP's working-set growth per token over ALST's, between the two longest lengths both measured (the
    constants, parameter gradients and the logits chunk, cancel)."""
    both = sorted(t for t in lengths if ("alst", t) in by and ("streambp", t) in by)
    if len(both) < 2:
        return None
    t1, t2 = both[-2:]

    def ws(mode, t):
        return by[(mode, t)]["peak_bytes"] - by[(mode, t)]["stored_bytes"]
    return (ws("streambp", t2) - ws("streambp", t1)) / (ws("alst", t2) - ws("alst", t1))


def budget_answer(rows: list, baseline: str, budget_length: int, mode: str = "streambp") -> dict:
    """The longest sequence ``mode`` runs within the baseline's peak at ``budget_length``: measured, and
    extrapolated linearly from its two longest points."""
    by = {(r["mode"], r["length"]): r for r in rows if "error" not in r}
    budget = by[(baseline, budget_length)]["peak_bytes"]
    stream = sorted((r["length"], r["peak_bytes"]) for r in rows if r["mode"] == mode and "error" not in r)
    fits = [t for t, peak in stream if peak <= budget]
    extrapolated = float(max(fits, default=0))
    if len(stream) >= 2:
        (t1, m1), (t2, m2) = stream[-2], stream[-1]
        slope = (m2 - m1) / (t2 - t1)
        extrapolated = t2 + (budget - m2) / slope if slope > 0 else float("inf")
    return {"budget_bytes": budget, "budget_length": budget_length, "baseline": baseline,
            "streambp_max_measured": max(fits, default=0), "streambp_max_extrapolated": extrapolated}


def print_table(rows: list, modes, lengths, model_name: str) -> None:
    by = {(r["mode"], r["length"]): r for r in rows if "error" not in r}
    print(f"{'mode':>14}{'T':>7}{'peak MiB':>10}{'seconds':>9}{'stored MiB':>12}{'working MiB':>13}"
          f"{'ws B/token':>12}{'theory B/token':>16}")
    for mode in modes:
        theory = (float("nan") if mode in SP_MODES else theory_working_set(model_name, mode) if mode != "none"
                  else theory_bytes_per_token(model_name, mode))
        for t in lengths:
            r = by.get((mode, t))
            if r is None:
                continue
            ws = r["peak_bytes"] - (0 if mode == "none" else r["stored_bytes"])
            print(f"{mode:>14}{t:>7}{r['peak_bytes'] / 2**20:>10.1f}{r['seconds']:>9.2f}"
                  f"{r['stored_bytes'] / 2**20:>12.1f}{ws / 2**20:>13.1f}{ws / t:>12.0f}{theory:>16.0f}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2", choices=sorted(MODELS))
    p.add_argument("--lengths", default=None,
                   help="lengths for the baseline and StreamBP (qwen2: 4096,8192; reference: 1k..16k)")
    p.add_argument("--full_logits_lengths", default=None,
                   help="lengths for the full-logits modes none and checkpointing (qwen2: 4096,8192; reference: "
                        "the same as --lengths)")
    p.add_argument("--budget_length", type=int, default=None, help="qwen2: 8192 (ALST's peak); reference: 4096")
    p.add_argument("--streambp_only_lengths", default=None,
                   help="extra lengths measured for StreamBP alone (reference default 24576)")
    p.add_argument("--chunk_size", type=int, default=None, help="StreamBP chunk (qwen2: 512, reference: 1024)")
    p.add_argument("--logits_chunk_size", type=int, default=None,
                   help="tokens per logits chunk for StreamBP and ALST's loss shards (qwen2: 128, reference: 512)")
    p.add_argument("--grad_length", type=int, default=1024)
    p.add_argument("--point_timeout", type=float, default=600, help="seconds one (mode, length) process may take")
    p.add_argument("--plot", default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: peak memory from torch.cuda.max_memory_allocated, times after synchronize")
    p.add_argument("--repeats", type=int, default=3, help="paired ALST/StreamBP runs at --budget_length (qwen2)")
    p.add_argument("--search_probes", type=int, default=3,
                   help="runs per search for the longest sequence within a budget (qwen2)")
    p.add_argument("--search_step", type=int, default=512, help="length resolution of that search (even)")
    p.add_argument("--no_sp2", action="store_true", help="skip the sp=2 modes (qwen2: 2 processes x 1 thread)")
    p.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parse_with_smoke(p, argv, SMOKE)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: no CUDA device is visible (torch {torch.__version__}, "
                f"torch.cuda.is_available() is False); run it on a GPU machine (scripts/gpu_check.sh)")
    qwen = args.model == "qwen2"
    defaults = dict(lengths="4096,8192" if qwen else "1024,2048,4096,8192,16384",
                    budget_length=8192 if qwen else 4096, streambp_only_lengths="" if qwen else "24576",
                    chunk_size=512 if qwen else 1024, logits_chunk_size=128 if qwen else 512,
                    plot=os.path.join(ROOT, "benchmarks", "results", ("streambp_qwen2" if qwen else "streambp")
                                      + ("_cuda.png" if args.device == "cuda" else ".png")))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.full_logits_lengths is None:
        args.full_logits_lengths = "4096,8192" if qwen else args.lengths
    if args.child:
        print(json.dumps(child(args.model, args.child[0], int(args.child[1]), args)))
        return {}
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))  # grad_errors
    modes, baseline = MODES[args.model], BASELINE[args.model]
    if args.device == "cuda":
        modes = modes + ("streambp_offload",)
    lengths = [int(x) for x in args.lengths.split(",")]
    full = [int(x) for x in args.full_logits_lengths.split(",") if x]
    rows = []
    for t in sorted(set(lengths) | set(full)):
        for mode in modes:
            if ((mode in ("none", "checkpointing") and t in full)
                    or (mode in (baseline, "streambp", "streambp_offload") and t in lengths)):
                rows.append(measure(mode, t, args))
    rows += [measure("streambp", int(t), args) for t in args.streambp_only_lengths.split(",") if t]
    extra = alst_measurements(lambda mode, n: measure(mode, n, args), rows, args) if qwen else {}
    errors = grad_errors(args.grad_length, args)
    all_lengths = sorted({r["length"] for r in rows})
    shown = modes + tuple(m for m in SP_MODES if any(r["mode"] == m for r in rows))
    print_table(rows, shown, all_lengths, args.model)
    by = {(r["mode"], r["length"]): r for r in rows if "error" not in r}
    budget = budget_answer(rows, baseline, args.budget_length)
    print(f"\nbudget = {baseline}'s peak at T={args.budget_length}: {budget['budget_bytes'] / 2**20:.1f} MiB; "
          f"StreamBP fits T={budget['streambp_max_measured']} measured, ~{budget['streambp_max_extrapolated']:.0f} "
          "extrapolated")
    print(f"max grad rel err vs autograd at T={args.grad_length} (fp32, CPU): {errors}")
    os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    plot(rows, shown, args.plot, "2 CPU threads" if args.device == "cpu" else torch.cuda.get_device_name())
    result = {"benchmark": "streambp", "device": args.device, "model_name": args.model, "model": MODELS[args.model],
              "chunk_size": args.chunk_size, "logits_chunk_size": args.logits_chunk_size,
              "max_grad_rel_err": errors["streambp"], "grad_rel_err": errors,
              "rows": rows, "plot": os.path.relpath(args.plot, ROOT),
              "dtype": "bfloat16" if args.device == "cuda" else "float32",
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    if "streambp_offload" in modes:
        off = budget_answer(rows, baseline, args.budget_length, "streambp_offload")
        result.update(offload_max_seq_measured=off["streambp_max_measured"],
                      offload_max_seq_ratio_vs_baseline=off["streambp_max_extrapolated"] / args.budget_length)
    both = [t for t in lengths if ("checkpointing", t) in by and ("streambp", t) in by]
    if both:
        t = max(both)
        ck, sb = by[("checkpointing", t)], by[("streambp", t)]
        result.update(time_ratio_vs_checkpointing=sb["seconds"] / ck["seconds"], time_ratio_length=t,
                      memory_ratio_at_longest=ck["peak_bytes"] / sb["peak_bytes"],
                      theory_memory_ratio=theory_bytes_per_token(args.model, "checkpointing")
                      / theory_bytes_per_token(args.model, "streambp"))
    if baseline == "checkpointing":
        result.update(max_seq_ratio_vs_checkpointing=budget["streambp_max_measured"] / args.budget_length,
                      max_seq_ratio_extrapolated=budget["streambp_max_extrapolated"] / args.budget_length,
                      checkpointing_grad_rel_err=errors["checkpointing"])
    else:
        t = args.budget_length
        al, sb = by.get(("alst", t)), by.get(("streambp", t))
        result.update(
            max_seq_ratio_vs_alst=budget["streambp_max_extrapolated"] / t,
            max_seq_ratio_vs_alst_measured=extra["sp1"]["max_fit"] / t if "sp1" in extra else None,
            max_seq_vs_alst_bracket=[extra["sp1"]["max_fit"], extra["sp1"]["min_fail"]] if "sp1" in extra else None,
            budget_bytes=budget["budget_bytes"], budget_length=t,
            time_ratio_vs_alst=sb["seconds"] / al["seconds"] if al and sb else None,
            working_set_ratio_vs_alst=((sb["peak_bytes"] - sb["stored_bytes"]) / (al["peak_bytes"] - al["stored_bytes"])
                                       if al and sb else None),
            activation_ratio_vs_alst={str(n): by[("streambp", n)]["peak_bytes"] / by[("alst", n)]["peak_bytes"]
                                      for n in lengths if ("alst", n) in by and ("streambp", n) in by},
            working_set_slope_ratio_vs_alst=working_set_slope_ratio(by, lengths),
            theory_working_set_bytes_per_token={mode: theory_working_set(args.model, mode) for mode in modes[1:]},
            alst_grad_rel_err=errors["alst"])
        timing = extra.get("time") or {}
        result.update(time_ratio_vs_alst_median=timing.get("median"), time_vs_alst_spread=timing.get("spread"),
                      time_ratio_vs_alst_runs=timing.get("ratios"))
        if not args.no_sp2:
            sp2, sp1 = extra.get("sp2"), extra.get("sp1_at_sp2_budget")
            result.update(
                sp2_budget_bytes=extra.get("sp2_budget"), sp2_error=extra.get("sp2_error"),
                sp2_max_seq_ratio_vs_alst_sp2=sp2["max_fit"] / t if sp2 else None,
                sp2_max_seq_ratio_vs_sp1=sp2["max_fit"] / sp1["max_fit"] if sp2 and sp1 and sp1["max_fit"] else None,
                sp2_brackets={"streambp_sp2": [sp2["max_fit"], sp2["min_fail"]],
                              "streambp": [sp1["max_fit"], sp1["min_fail"]]} if sp2 and sp1 else None)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
