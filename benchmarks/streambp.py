"""StreamBP vs DeepSpeed activation checkpointing vs plain autograd: peak memory, step time, gradient error.

    python benchmarks/streambp.py                          # CPU default: T = 1k..16k (+24k StreamBP), ~6 min
    python benchmarks/streambp.py --lengths 1024,2048 --budget_length 1024 --streambp_only_lengths 4096

Model: the reference Llama-style decoder sized like an LLM in proportion (hidden 256, 4 layers, 8 heads / 4 KV
heads, SwiGLU 704, vocabulary 8192, so vocabulary / hidden = 32 as in Llama-3-8B), batch 1, fp32, random tokens.

Measurement: each (mode, length) runs in a fresh process (2 torch threads) that builds the model, runs one
warm-up step at T=64, reads its resident set size (VmRSS), runs one forward+backward at length T, and reports
``ru_maxrss - VmRSS_before`` as the peak extra memory of the step and its wall time (glibc's mmap threshold is
fixed at 64 KiB in the child so that freed tensors leave RSS). Modes:
* ``none``: plain autograd (all activations kept, full logits);
* ``checkpointing``: ``deepspeed.checkpointing.checkpoint`` around every decoder layer (full logits);
* ``streambp``: ds_ext StreamBP (``--chunk_size``, ``--logits_chunk_size``).

"Longest sequence under a budget": the budget is checkpointing's measured peak at ``--budget_length``; the answer
is the longest measured length whose StreamBP peak fits (and a linear extrapolation from the two longest points).
Gradient error: max relative error over all parameters of StreamBP and checkpointing vs autograd at T=1024.
Prints a table, writes a PNG and prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8, num_kv_heads=4,
             max_seq_len=1 << 20)
MODES = ("none", "checkpointing", "streambp")


def build(mode: str, chunk: int, logits_chunk: int):
    from ds_ext.models import LlamaForCausalLM, ModelConfig
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig(**MODEL))
    if mode == "streambp":
        from ds_ext.streambp.apply import stream_model
        from ds_ext.streambp.config import StreamBPConfig
        stream_model(model, StreamBPConfig(enabled=True, chunk_size=chunk, logits_chunk_size=logits_chunk))
    elif mode == "checkpointing":
        import deepspeed
        if not deepspeed.comm.is_initialized():  # DeepSpeed's checkpointing asks for its comm backend
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                               ("MASTER_PORT", str(29600 + os.getpid() % 1000))):
                os.environ.setdefault(key, value)
            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        deepspeed.checkpointing.configure(None, partition_activations=False)
        for layer in model.layers:
            layer.forward = _checkpointed(layer)
    return model


def _checkpointed(layer):
    import deepspeed
    plain = type(layer).forward.__get__(layer)
    return lambda x, position_ids, key_padding_mask=None: deepspeed.checkpointing.checkpoint(plain, x, position_ids)


def step(model, length: int, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(0, MODEL["vocab_size"], (1, length + 1), generator=g).to(device)
    model.zero_grad(set_to_none=True)
    _sync(device)
    t0 = time.perf_counter()
    model(ids[:, :-1], ids[:, 1:]).backward()
    _sync(device)
    return time.perf_counter() - t0


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def child(mode: str, length: int, chunk: int, logits_chunk: int, device: str) -> dict:
    torch.set_num_threads(2)
    model = build(mode, chunk, logits_chunk).to(device)
    step(model, 64)
    model.zero_grad(set_to_none=True)
    if device == "cuda":  # the caching allocator's own count of live tensor bytes
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        seconds = step(model, length)
        return {"mode": mode, "length": length, "seconds": seconds,
                "peak_bytes": torch.cuda.max_memory_allocated() - before}
    before = rss_bytes()
    seconds = step(model, length)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "length": length, "seconds": seconds, "peak_bytes": peak - before}


def measure(mode: str, length: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, str(length), "--chunk_size",
           str(args.chunk_size), "--logits_chunk_size", str(args.logits_chunk_size), "--device", args.device]
    # A fixed mmap threshold makes glibc return freed large blocks, so RSS follows the live tensors (otherwise its
    # adaptive threshold keeps freed blocks in the heap and the peak depends on allocation history).
    env = dict(os.environ, OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_="65536")
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        return {"mode": mode, "length": length, "error": proc.stderr.strip().splitlines()[-1:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {mode:>13} T={length:>6}: {result['seconds']:7.2f} s  {result['peak_bytes'] / 2**20:8.1f} MiB",
          file=sys.stderr)
    return result


def grad_errors(length: int, args) -> dict:
    """Max relative gradient error over parameters, vs plain autograd, in this process."""
    reference = build("none", args.chunk_size, args.logits_chunk_size).to(args.device)
    step(reference, length, seed=1)
    ref = {n: p.grad for n, p in reference.named_parameters()}
    errors = {}
    for mode in ("checkpointing", "streambp"):
        model = build(mode, args.chunk_size, args.logits_chunk_size).to(args.device)
        step(model, length, seed=1)
        errors[mode] = max(((p.grad - ref[n]).norm() / ref[n].norm()).item() for n, p in model.named_parameters())
    return errors


def theory_bytes_per_token(mode: str, args) -> float:
    """Activation bytes per token at the peak (fp32), leading terms. StreamBP's backward of one layer holds, beside
    the stored inputs, x, h = norm1(x), their gradients and buffers (dx, dh, x.grad, the incoming gradient) and
    k, v with their gradient buffers."""
    c, f, v, layers = MODEL["hidden_size"], MODEL["intermediate_size"], MODEL["vocab_size"], MODEL["num_layers"]
    kv = 2 * c * MODEL["num_kv_heads"] // MODEL["num_heads"]
    one_layer = 7 * c + 4 * f       # norms, q/k/v/o, residuals, SwiGLU gate/up/act/product
    logits = 3 * v                  # logits, log-softmax, their gradient
    stored = layers * c
    if mode == "none":
        return 4 * (layers * one_layer + logits)
    if mode == "checkpointing":
        return 4 * (stored + one_layer + logits)
    return 4 * (stored + 6 * c + 2 * kv + 2 * c)  # + final hidden and its gradient


def budget_answer(rows: list, budget_length: int) -> dict:
    by = {(r["mode"], r["length"]): r for r in rows if "error" not in r}
    budget = by[("checkpointing", budget_length)]["peak_bytes"]
    fits = [r["length"] for r in rows if r["mode"] == "streambp" and "error" not in r and r["peak_bytes"] <= budget]
    stream = sorted((r["length"], r["peak_bytes"]) for r in rows if r["mode"] == "streambp" and "error" not in r)
    extrapolated = float(max(fits, default=0))
    if len(stream) >= 2:
        (t1, m1), (t2, m2) = stream[-2], stream[-1]
        slope = (m2 - m1) / (t2 - t1)
        extrapolated = t2 + (budget - m2) / slope if slope > 0 else float("inf")
    return {"budget_bytes": budget, "budget_length": budget_length, "streambp_max_measured": max(fits, default=0),
            "streambp_max_extrapolated": extrapolated}


def plot(rows: list, path: str, device_label: str = "2 CPU threads") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        pts = sorted((r["length"], r["peak_bytes"] / 2**20, r["seconds"]) for r in rows
                     if r["mode"] == mode and "error" not in r)
        if pts:
            a.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
            b.loglog([p[0] for p in pts], [p[2] for p in pts], marker="o", label=mode)
    a.set(xlabel="sequence length", ylabel="peak extra memory (MiB)", title="memory of one fwd+bwd")
    b.set(xlabel="sequence length", ylabel="seconds", title=f"time of one fwd+bwd ({device_label})")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--budget_length", type=int, default=4096)
    p.add_argument("--streambp_only_lengths", default="24576",
                   help="extra lengths measured for StreamBP alone (to find its longest fit under the budget)")
    p.add_argument("--chunk_size", type=int, default=1024)
    p.add_argument("--logits_chunk_size", type=int, default=512)
    p.add_argument("--grad_length", type=int, default=1024)
    p.add_argument("--plot", default=os.path.join(ROOT, "benchmarks", "results", "streambp.png"))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: peak memory from torch.cuda.max_memory_allocated, times after synchronize")
    p.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.chunk_size, args.logits_chunk_size,
                               args.device)))
        return {}
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = [measure(mode, t, args) for t in lengths for mode in MODES]
    rows += [measure("streambp", int(t), args) for t in args.streambp_only_lengths.split(",") if t]
    errors = grad_errors(args.grad_length, args)
    by = {(r["mode"], r["length"]): r for r in rows if "error" not in r}
    print(f"{'T':>7}" + "".join(f"{m + ' MiB':>18}{m + ' s':>16}" for m in MODES) + f"{'mem ratio':>11}"
          f"{'theory':>8}{'time ratio':>12}")
    theory = theory_bytes_per_token("checkpointing", args) / theory_bytes_per_token("streambp", args)
    for t in lengths:
        cells = "".join(f"{by[(m, t)]['peak_bytes'] / 2**20:>18.1f}{by[(m, t)]['seconds']:>16.2f}"
                        if (m, t) in by else f"{'-':>18}{'-':>16}" for m in MODES)
        ck, sb = by.get(("checkpointing", t)), by.get(("streambp", t))
        ratio = f"{ck['peak_bytes'] / sb['peak_bytes']:>11.2f}{theory:>8.2f}{sb['seconds'] / ck['seconds']:>12.3f}" \
            if ck and sb else ""
        print(f"{t:>7}{cells}{ratio}")
    budget = budget_answer(rows, args.budget_length)
    print(f"\nbudget = checkpointing's peak at T={args.budget_length}: {budget['budget_bytes'] / 2**20:.1f} MiB; "
          f"StreamBP fits T={budget['streambp_max_measured']} measured, ~{budget['streambp_max_extrapolated']:.0f} "
          "extrapolated")
    print(f"max grad rel err vs autograd at T={args.grad_length}: {errors}")
    os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    plot(rows, args.plot, "2 CPU threads" if args.device == "cpu" else torch.cuda.get_device_name())
    longest = max(t for t in lengths if ("checkpointing", t) in by and ("streambp", t) in by)
    result = {
        "benchmark": "streambp", "device": args.device, "model": MODEL, "chunk_size": args.chunk_size,
        "logits_chunk_size": args.logits_chunk_size,
        "max_seq_ratio_vs_checkpointing": budget["streambp_max_measured"] / args.budget_length,
        "max_seq_ratio_extrapolated": budget["streambp_max_extrapolated"] / args.budget_length,
        "time_ratio_vs_checkpointing": by[("streambp", longest)]["seconds"] / by[("checkpointing", longest)]["seconds"],
        "time_ratio_length": longest,
        "memory_ratio_at_longest": by[("checkpointing", longest)]["peak_bytes"] / by[("streambp", longest)]["peak_bytes"],
        "theory_memory_ratio": theory,
        "max_grad_rel_err": errors["streambp"], "checkpointing_grad_rel_err": errors["checkpointing"],
        "rows": rows, "plot": os.path.relpath(args.plot, ROOT),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
