"""Prefix Grouper vs the baseline that repeats the prompt for every response: time, memory, gradient error.

    python benchmarks/prefix_grouper.py            # CPU default: P in {256,1024,4096} x S in {64,256} x G in {4,8,16}
    python benchmarks/prefix_grouper.py --quick    # headline point and a 4-point grid
    python benchmarks/prefix_grouper.py --device cuda --quick   # the same on a GPU in bf16 (exit 2 without CUDA)
    python benchmarks/prefix_grouper.py --smoke --plot /tmp/pg.png   # CI size: the one point P=128, S=32, G=4

Model: the ds_ext reference model with its default size (4 layers, hidden 128, 4 / 2 heads, byte vocabulary), fp32,
one group (1 prompt of P tokens, G responses of S tokens), GRPO-style loss ``sum(logp(response) * advantage)``.
Each (mode, P, S, G) runs in a fresh process with 2 torch threads: one warm-up step on a small group, then one
forward+backward timed; memory = ``ru_maxrss`` growth over the step (glibc mmap threshold fixed at 64 KiB so freed
tensors leave RSS). The theoretical speed-up is the FLOP ratio: projections/MLP/LM head per token times the token
count (baseline G(P+S), grouped P+GS) plus attention per query-key pair (baseline G(P+S)^2/2, grouped
P^2/2 + G(SP + S^2/2)). Headline point P=1024, S=128, G=16. Prints a table, writes a PNG and one JSON line.

``--device cuda``: the model in bf16 on the GPU (grouped attention through the CUDA flash kernel), memory = the
caching allocator's ``max_memory_allocated`` growth over the step, times after ``torch.cuda.synchronize``; the
gradient error stays an fp32 CPU measurement. Without a visible CUDA device it exits with status 2 and says so.

Last-line JSON keys:
- `benchmark`: "prefix_grouper"
- `device`: cpu or cuda
- `device_name`: the device measured on
- `headline`: the headline point {P, S, G}
- `speedup`: baseline time / grouped time at the headline point
- `theoretical_speedup`: the FLOP ratio at the headline point
- `fraction_of_theory`: speedup / theoretical_speedup
- `memory_ratio`: baseline peak memory / grouped peak memory at the headline point
- `max_grad_rel_err`: max relative gradient error of grouped vs baseline over all parameters (fp32, CPU)
- `rows`: every measured point (P, S, G, times, speed-ups, bytes)
- `plot`: the PNG written, relative to the repository root
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _keys import parse_with_smoke  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADLINE = (1024, 128, 16)
SMOKE = {"headline": [128, 32, 4], "no_grid": True}


def model_config():
    from ds_ext.models import ModelConfig
    return ModelConfig(max_seq_len=1 << 16)


def group(p: int, s: int, g: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (1, p), generator=gen)
    completions = torch.randint(0, 256, (g, s), generator=gen)
    advantages = torch.randn(g, 1, generator=gen)
    return prompt, completions, advantages


def loss_of(model, mode: str, p: int, s: int, g: int, seed: int = 0) -> torch.Tensor:
    from ds_ext.prefix_grouper.attention import GroupedAttention
    from ds_ext.prefix_grouper.layout import pack
    device = next(model.parameters()).device
    prompt, completions, adv = (t.to(device) for t in group(p, s, g, seed))
    ones = torch.ones_like
    if mode == "grouped":
        batch = pack(prompt.cpu(), ones(prompt.cpu(), dtype=torch.bool), completions.cpu(),
                     ones(completions.cpu(), dtype=torch.bool), [g])
        batch = dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device)
                                              for f in dataclasses.fields(batch)
                                              if isinstance(getattr(batch, f.name), torch.Tensor)})
        logits = model(batch.input_ids, position_ids=batch.position_ids, attention_fn=GroupedAttention(batch))
        logp = batch.completion_logprobs(logits, completions)
    else:
        ids = torch.cat([prompt.expand(g, p), completions], dim=1)
        logits = model(ids)[:, p - 1:-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, completions[..., None])[..., 0]
    return (logp * adv).sum()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def child(mode: str, p: int, s: int, g: int, device: str = "cpu") -> dict:
    from ds_ext.models import LlamaForCausalLM
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config())
    if device == "cuda":  # the GPU grid runs bf16 (CUDA flash kernel for the grouped parts)
        model = model.to("cuda", dtype=torch.bfloat16)
    loss_of(model, mode, 16, 8, 2).backward()
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()
    t0 = time.perf_counter()
    loss_of(model, mode, p, s, g).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "P": p, "S": s, "G": g, "seconds": seconds, "peak_bytes": peak - before}


def measure(mode: str, p: int, s: int, g: int, device: str = "cpu") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_="65536")
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, str(p), str(s), str(g), "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} P={p} S={s} G={g} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def theoretical_speedup(p: int, s: int, g: int) -> float:
    c = model_config()
    h, hkv, d, f, v, layers = c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size, c.num_layers
    per_token = layers * 2 * (c.hidden_size * h * d + 2 * c.hidden_size * hkv * d + h * d * c.hidden_size
                              + 3 * c.hidden_size * f) + 2 * c.hidden_size * v
    per_pair = layers * 4 * h * d
    base = g * (p + s) * per_token + g * (p + s) * (p + s + 1) / 2 * per_pair
    grouped = (p + g * s) * per_token + (p * (p + 1) / 2 + g * (s * p + s * (s + 1) / 2)) * per_pair
    return base / grouped


def grad_error(p: int, s: int, g: int) -> float:
    from ds_ext.models import LlamaForCausalLM
    grads = {}
    for mode in ("baseline", "grouped"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(model_config())
        loss_of(model, mode, p, s, g, seed=1).backward()
        grads[mode] = {n: q.grad for n, q in model.named_parameters()}
    return max(((grads["grouped"][n] - b).norm() / b.norm()).item() for n, b in grads["baseline"].items())


def plot(rows: list, path: str, device_label: str = "2 CPU threads") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"P{r['P']}/S{r['S']}/G{r['G']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["speedup"] for r in rows], width=0.4, label="measured speed-up")
    ax.bar([i + 0.2 for i in x], [r["theoretical_speedup"] for r in rows], width=0.4, label="theoretical (FLOPs)")
    ax.set_xticks(list(x), labels, rotation=70, fontsize=7)
    ax.set(ylabel="baseline time / grouped time", title=f"Prefix Grouper, reference model, {device_label}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="headline point plus P in {256,1024}, S=64, G in {4,16}")
    ap.add_argument("--plot", default=None, help="default benchmarks/results/prefix_grouper[_cuda].png")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: bf16 on the GPU, memory from torch.cuda.max_memory_allocated")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--headline", type=int, nargs=3, default=list(HEADLINE), metavar=("P", "S", "G"),
                    help="the headline point (default 1024 128 16)")
    ap.add_argument("--no_grid", action="store_true", help="measure the headline point only")
    args = parse_with_smoke(ap, argv, SMOKE)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: no CUDA device is visible (torch {torch.__version__}, "
                 f"torch.cuda.is_available() is False); run it on a GPU machine (scripts/gpu_check.sh)")
    if args.child:
        mode, *sizes = args.child
        print(json.dumps(child(mode, *map(int, sizes), device=args.device)))
        return {}
    if args.plot is None:
        args.plot = os.path.join(ROOT, "benchmarks", "results",
                                 "prefix_grouper_cuda.png" if args.device == "cuda" else "prefix_grouper.png")
    grid = ([(p, 64, g) for p in (256, 1024) for g in (4, 16)] if args.quick else
            [(p, s, g) for p in (256, 1024, 4096) for s in (64, 256) for g in (4, 8, 16)])
    headline = tuple(args.headline)
    points = [headline] + ([] if args.no_grid else [x for x in grid if x != headline])
    rows = []
    print(f"{'P':>5}{'S':>5}{'G':>4}{'base s':>9}{'grouped s':>11}{'speedup':>9}{'theory':>8}{'share':>7}"
          f"{'base MiB':>10}{'grp MiB':>9}{'mem ratio':>10}")
    for p, s, g in points:
        base, grouped = measure("baseline", p, s, g, args.device), measure("grouped", p, s, g, args.device)
        row = {"P": p, "S": s, "G": g, "baseline_s": base["seconds"], "grouped_s": grouped["seconds"],
               "speedup": base["seconds"] / grouped["seconds"], "theoretical_speedup": theoretical_speedup(p, s, g),
               "baseline_bytes": base["peak_bytes"], "grouped_bytes": grouped["peak_bytes"],
               "memory_ratio": base["peak_bytes"] / max(grouped["peak_bytes"], 1)}
        rows.append(row)
        print(f"{p:>5}{s:>5}{g:>4}{row['baseline_s']:>9.2f}{row['grouped_s']:>11.2f}{row['speedup']:>9.2f}"
              f"{row['theoretical_speedup']:>8.2f}{row['speedup'] / row['theoretical_speedup']:>7.0%}"
              f"{row['baseline_bytes'] / 2**20:>10.0f}{row['grouped_bytes'] / 2**20:>9.0f}{row['memory_ratio']:>10.2f}",
              flush=True)
    head = rows[0]
    err = grad_error(*headline)
    print(f"\nheadline P={headline[0]} S={headline[1]} G={headline[2]}: {head['speedup']:.2f}x of "
          f"{head['theoretical_speedup']:.2f}x theoretical ({head['speedup'] / head['theoretical_speedup']:.0%}); "
          f"memory {head['memory_ratio']:.2f}x lower; max grad rel err {err:.2e}")
    os.makedirs(os.path.dirname(args.plot), exist_ok=True)
    label = torch.cuda.get_device_name() + ", bf16" if args.device == "cuda" else "2 CPU threads"
    plot(rows, args.plot, label)
    result = {"benchmark": "prefix_grouper", "device": args.device, "device_name": label,
              "headline": dict(zip("PSG", headline)), "speedup": head["speedup"],
              "theoretical_speedup": head["theoretical_speedup"],
              "fraction_of_theory": head["speedup"] / head["theoretical_speedup"],
              "memory_ratio": head["memory_ratio"], "max_grad_rel_err": err, "rows": rows,
              "plot": os.path.relpath(args.plot, ROOT)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
