"""Parts of ``benchmarks/streambp.py``: the sequence-parallel (sp=2) modes, the search for the longest sequence
within a memory budget (by running), the repeated timing, the per-point lock and the plot.

sp=2 modes (2 processes x 1 thread, gloo, one ``(mode, T)`` point = both ranks; ``T`` is the whole sequence, each
rank holds ``T / 2`` tokens; a rank's peak is its RSS growth as in the sp=1 modes, the point's peak the larger):

* ``alst_sp2``: DeepSpeed's ALST at sequence-parallel size 2: ``UlyssesSPAttentionHF.register_with_transformers``
  (SDPA core attention, all-to-all of q/k/v and the output), DeepSpeed checkpointing of every layer,
  ``TiledMLP`` and ``TiledFusedLogitsLoss`` on the rank's shard, labels shifted over the whole sequence;
* ``streambp_sp2``: ds_ext StreamBP with ``sequence_parallel: 2`` (:mod:`ds_ext.streambp.ulysses`) and its shard
  loss (:func:`ds_ext.streambp.ulysses.causal_lm_shard_loss`).
"""
from __future__ import annotations

import math
import os
import statistics
import subprocess
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

from _pipeline_bench import maybe_locked  # noqa: E402 -- benchmarks/ is on sys.path for its scripts

SP_MODES = ("alst_sp2", "streambp_sp2")


def bench_lock():
    """``DS_EXT_BENCH_LOCK=FILE``: each measured point holds that ``flock`` (a machine shared with other jobs; the
    benchmark's own process waits unlocked between points)."""
    return maybe_locked(os.environ.get("DS_EXT_BENCH_LOCK"))


def run_ranks(cmd, envs, timeout: float, cwd: str) -> list:
    """Run ``cmd`` once per environment at the same time; ``[(returncode, stdout, stderr)]``; kills all on timeout
    (``subprocess.TimeoutExpired``). Output goes through files: a rank blocked on a full pipe would stall the
    collective its peers wait in."""
    with tempfile.TemporaryDirectory() as tmp:
        files = [(open(os.path.join(tmp, f"{i}.out"), "w+"), open(os.path.join(tmp, f"{i}.err"), "w+"))
                 for i in range(len(envs))]
        procs = [subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=cwd, env=env)
                 for env, (out, err) in zip(envs, files)]
        try:
            deadline = time.monotonic() + timeout
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        result = []
        for p, (out, err) in zip(procs, files):
            out.seek(0)
            err.seek(0)
            result.append((p.returncode, out.read(), err.read()))
            out.close()
            err.close()
        return result


def init_distributed() -> None:
    """DeepSpeed's comm over gloo from the rank's environment (set by the parent)."""
    import deepspeed
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def build_sp2(bench, mode: str, args):
    """``(model, loss_fn)`` of an sp=2 mode for this rank; ``bench`` is the ``benchmarks/streambp.py`` module (its
    model and ALST pieces). ``loss_fn(ids [1, T + 1])`` runs this rank's shard of ``ids[:, :-1]``."""
    import transformers
    init_distributed()
    m = bench.MODELS["qwen2"]
    config = transformers.Qwen2Config(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"], num_key_value_heads=m["num_kv_heads"],
        max_position_embeddings=1 << 17, tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = bench.placed(transformers.Qwen2ForCausalLM(config).float().train(), args)
    if mode == "streambp_sp2":
        from ds_ext._deepspeed import ulysses_sequence_group
        from ds_ext.streambp.apply import stream_model
        from ds_ext.streambp.ulysses import causal_lm_shard_loss
        group = ulysses_sequence_group(2)
        stream_model(model, bench.streambp_config(mode, args).model_copy(update={"sequence_parallel": 2}),
                     sequence_group=group)
        return model, lambda ids: causal_lm_shard_loss(model, ids[:, :-1], ids[:, :-1], group,
                                                       args.logits_chunk_size)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    mpu = UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", 2, 1, seq_length_is_variable=True)
    bench._init_deepspeed_checkpointing()
    for layer in model.model.layers:
        layer.forward = bench._hf_checkpointed(layer)
        layer.mlp.forward = bench._tiled_mlp(layer.mlp, m["hidden_size"])
    return model, lambda ids: alst_shard_loss(model, ids[:, :-1], mpu.get_sequence_parallel_group(),
                                              args.logits_chunk_size)


def alst_shard_loss(model, ids: torch.Tensor, group, logits_chunk: int) -> torch.Tensor:
    """ALST's loss of this rank's shard: the model on rows ``[r L, (r + 1) L)`` with global ``position_ids``,
    ``TiledFusedLogitsLoss`` over shards of ``logits_chunk`` tokens, labels shifted over the whole sequence, each
    shard's CE sum divided by the label count of all ranks (so the ranks' losses sum to the mean)."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    t = ids.shape[1]
    shard = t // n
    rows = slice(rank * shard, (rank + 1) * shard)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)[:, rows]
    positions = torch.arange(rank * shard, (rank + 1) * shard).expand(ids.shape[0], shard)
    hidden = model.model(input_ids=ids[:, rows], position_ids=positions, use_cache=False).last_hidden_state
    count = (labels != -100).sum()
    dist.all_reduce(count, group=group)
    vocab = model.config.vocab_size

    def loss_fn(self, x, y):
        return F.cross_entropy(self.lm_head(x).float().view(-1, vocab), y.view(-1), ignore_index=-100,
                               reduction="sum") / count
    return TiledFusedLogitsLoss.apply(loss_fn, model, hidden, labels, None, math.ceil(shard / logits_chunk),
                                      [model.lm_head.weight], "sum")


def search_max_length(measure: Callable[[int], dict], budget: int, known: List[dict], step: int,
                      probes: int) -> Dict[str, object]:
    """The longest length (a multiple of ``step``) whose measured peak fits ``budget`` bytes, by running:
    ``measure(T) -> row`` measures one point, ``known`` are rows already measured for the mode. Each probe is the
    least-squares line through the measured points (memory grows linearly in T) solved for the budget, rounded down
    to ``step``; bisection of the bracket ``(fits, fails)`` when that estimate leaves it. Stops after
    ``probes`` probes or when the bracket is one step wide. Returns ``max_fit`` (the longest measured length that
    fits; 0 if none), ``min_fail`` (the shortest that did not, None if none), the probe ``rows``."""
    points = sorted((r["length"], r["peak_bytes"]) for r in known if "error" not in r)
    fits = max((t for t, p in points if p <= budget), default=0)
    fail = min((t for t, p in points if p > budget), default=None)
    rows = []
    for _ in range(probes):
        if fail is not None and fail - fits <= step:
            break
        guess = fits + step
        if len(points) >= 2:  # least squares over the measured points
            mt, mm = statistics.mean(t for t, _ in points), statistics.mean(m for _, m in points)
            var = sum((t - mt) ** 2 for t, _ in points)
            slope = sum((t - mt) * (m - mm) for t, m in points) / var if var else 0
            if slope > 0:
                guess = int((mt + (budget - mm) / slope) // step * step)
        upper = fail if fail is not None else math.inf
        if not fits < guess < upper:
            guess = fits + step if fail is None else (fits + fail) // 2 // step * step
            if guess <= fits:
                break
        row = measure(guess)
        rows.append(row)
        if "error" in row:
            fail = guess if fail is None else min(fail, guess)
            continue
        points = sorted(points + [(guess, row["peak_bytes"])])
        if row["peak_bytes"] <= budget:
            fits = max(fits, guess)
        else:
            fail = guess if fail is None else min(fail, guess)
    return {"max_fit": fits, "min_fail": fail, "rows": rows}


def paired_time_ratio(first: List[dict], second: List[dict]) -> Optional[Dict[str, object]]:
    """``second / first`` step time over paired runs (run i of each, measured back to back): the median of the
    per-pair ratios, their spread (max - min) and the ratios; None without a complete pair."""
    ratios = [b["seconds"] / a["seconds"] for a, b in zip(first, second) if "error" not in a and "error" not in b]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "spread": max(ratios) - min(ratios), "ratios": ratios}


def alst_measurements(measure: Callable[[str, int], dict], rows: list, args) -> dict:
    """Beyond the grid (qwen2), at ``T = --budget_length``: ``--repeats`` paired runs of ALST and StreamBP
    (``time``: :func:`paired_time_ratio`; the grid's run is the first pair); the search for StreamBP's longest
    sequence within ALST's peak at T (``sp1``); unless ``--no_sp2``: ALST sp=2's per-rank peak at T (``sp2_budget``)
    and, within it, the longest sequence of StreamBP+Ulysses sp=2 (``sp2``, seeded by runs at T/2 and T) and of
    StreamBP sp=1 (``sp1_at_sp2_budget``). Search rows are appended to ``rows`` (repeats are not)."""
    t = args.budget_length
    by = {(r["mode"], r["length"]): r for r in rows if "error" not in r}
    runs = {m: [by[(m, t)]] if (m, t) in by else [] for m in ("alst", "streambp")}
    for _ in range(args.repeats - 1):
        for m in ("alst", "streambp"):
            runs[m].append(measure(m, t))
    out = {"time": paired_time_ratio(runs["alst"], runs["streambp"])}
    if ("alst", t) not in by:
        return out

    def search(mode, budget, known):
        found = search_max_length(lambda n: measure(mode, n), budget, known, args.search_step, args.search_probes)
        rows.extend(found["rows"])
        return found
    out["sp1"] = search("streambp", by[("alst", t)]["peak_bytes"], [r for r in rows if r["mode"] == "streambp"])
    if args.no_sp2:
        return out
    alst2 = measure("alst_sp2", t)
    rows.append(alst2)
    if "error" in alst2:
        out["sp2_error"] = alst2["error"]
        return out
    seeds = [measure("streambp_sp2", n) for n in (t // 2, t)]
    rows.extend(seeds)
    out["sp2_budget"] = alst2["peak_bytes"]
    out["sp2"] = search("streambp_sp2", alst2["peak_bytes"], seeds)
    out["sp1_at_sp2_budget"] = search("streambp", alst2["peak_bytes"], [r for r in rows if r["mode"] == "streambp"])
    return out


def plot(rows: list, modes, path: str, device_label: str = "2 CPU threads") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    colors = dict(zip(modes, plt.rcParams["axes.prop_cycle"].by_key()["color"]))  # one color per mode in every panel
    for mode in modes:
        pts = sorted((r["length"], r["peak_bytes"] / 2**20, r["seconds"], (r["peak_bytes"] - r["stored_bytes"]) / 2**20)
                     for r in rows if r["mode"] == mode and "error" not in r)
        if pts:
            a.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode, color=colors[mode])
            b.loglog([p[0] for p in pts], [p[2] for p in pts], marker="o", label=mode, color=colors[mode])
            if mode != "none":
                c.loglog([p[0] for p in pts], [p[3] for p in pts], marker="o", label=mode, color=colors[mode])
    a.set(xlabel="sequence length", ylabel="peak extra memory (MiB)", title="memory of one fwd+bwd")
    b.set(xlabel="sequence length", ylabel="seconds", title=f"time of one fwd+bwd ({device_label})")
    c.set(xlabel="sequence length", ylabel="MiB", title="working set (peak - stored layer inputs)")
    for ax in (a, b, c):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
