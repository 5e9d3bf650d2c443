"""Weight sync into running vLLM engines, never restarting them (the trainer side, and the reload the engine runs).

CPU path (:class:`FileWeightPusher`, trainer rank 0, same call order as
:class:`~ds_ext.asyncflow.weights.WeightPusher`: ``watch`` -> ``push`` per step -> ``close``):

1. ``push(version, module)`` settles the previous push, then writes the policy's tensors into safetensors files
   ``<shm_dir>/ds_ext_weights_<pid>/v<version>/bucket<k>.safetensors`` of at most ``bucket_mb`` each, one bucket at
   a time, straight from the module's parameters (under ZeRO-1/2 every rank's module holds the whole, updated
   fp32 parameters after ``engine.step``; the bucket is the only copy made -- never a whole cloned ``state_dict``).
   Names are the transformers checkpoint names (an :class:`~ds_ext.asyncflow.hf_policy.HFPolicy`'s ``hf.`` prefix
   removed), so the engine reads them as a checkpoint.
2. It then sends each live worker only the push's *handle* -- ``{"kind": "files", "paths": [...]}`` -- through
   ``set_weights``; the worker drops it in its mailbox and, between two decode steps of its engine loop, runs
   :func:`reload_from_files` in the engine's model runner (``LLM.collective_rpc``): the model runner's
   ``reload_weights`` streams the buckets in as a checkpoint (CPU linears are repacked by vLLM's own loader, which
   ``model.load_weights`` after start-up would not do).
3. Measured per push: ``bytes`` (written once, read by every worker), ``write_s``, ``blocking_s`` (how long ``push``
   held the trainer: settling + writing + sending the handles), ``transfer_s`` (write start to the last worker's
   acknowledgement); each worker records its own ``reload_s``.
4. ``check_logprobs``: the pusher keeps the trainer's log-probs of a fixed probe sequence under each pushed version
   (:meth:`probe_logprobs`); each worker scores the same tokens right after its reload (prompt log-probs) and
   reports them in its stats; :func:`logprob_mismatch` compares the two per version.

Old push directories are removed once ``keep`` newer pushes exist (a worker reloads within a step of a push, and
admission control keeps no worker more than ``max_staleness`` pushes behind).

GPU path: :mod:`ds_ext.asyncflow.vllm_nccl` (an NCCL broadcast group between trainer rank 0 and the engines),
behind the same ``push`` / ``set_weights`` interface.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ds_ext.asyncflow.weights import WeightPusher

PROBE_LEN = 24  # tokens of the fixed probe sequence (its first token is the conditioning one)


def checkpoint_tensors(module: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(transformers name, tensor)`` of the policy's persistent state, without copies."""
    inner = getattr(module, "hf", module)
    for name, tensor in inner.state_dict(keep_vars=False).items():
        yield name, tensor


def write_buckets(named: Iterator[Tuple[str, torch.Tensor]], out_dir: str, bucket_bytes: int) -> Tuple[List[str], int]:
    """Write the tensors into safetensors files of at most ``bucket_bytes`` (one bucket held at a time); returns the
    paths and the bytes written."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    paths, bucket, size, total = [], {}, 0, 0

    def flush():
        nonlocal bucket, size
        if bucket:
            path = os.path.join(out_dir, f"bucket{len(paths)}.safetensors")
            save_file(bucket, path + ".tmp")
            os.replace(path + ".tmp", path)
            paths.append(path)
        bucket, size = {}, 0

    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            flush()
        # the bucket's own copy (contiguous, detached, CPU): the only copy of the weights this rank makes
        bucket[name] = tensor.detach().to("cpu", copy=True).contiguous()
        size += nbytes
        total += nbytes
    flush()
    return paths, total


def reload_from_files(worker, paths: List[str]) -> float:
    """Run inside vLLM's worker (``LLM.collective_rpc(reload_from_files, args=(paths,))``): stream the buckets into
    the running model through the model runner's ``reload_weights``; returns the seconds it took."""
    from safetensors.torch import safe_open
    from vllm.config import set_current_vllm_config

    def tensors():
        for path in paths:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    t = time.perf_counter()
    runner = worker.model_runner
    with set_current_vllm_config(runner.vllm_config):
        runner.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
    return time.perf_counter() - t


def probe_ids(vocab_size: int, length: int = PROBE_LEN, seed: int = 1234) -> List[int]:
    """The fixed probe sequence both sides score after a push (any ids of the vocabulary; not sampled)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=g).tolist()


@torch.no_grad()
def trainer_probe_logprobs(module: torch.nn.Module, ids: List[int]) -> torch.Tensor:
    """``[len(ids) - 1]`` fp32 log-probs of ``ids[1:]`` under the trainer's module (teacher-forced)."""
    device = next(module.parameters()).device
    x = torch.tensor([ids], device=device)
    logits = module(x, position_ids=torch.arange(len(ids), device=device)[None])
    return torch.log_softmax(logits[0, :-1].float(), -1).gather(-1, x[0, 1:, None]).squeeze(-1).cpu()


def relative_error(engine_lp, trainer_lp) -> float:
    """``max |engine - trainer| / max |trainer|`` over the probe tokens (log-probs; the scale is the largest
    magnitude, so a log-prob near 0 does not blow the ratio up)."""
    e, t = torch.as_tensor(engine_lp, dtype=torch.float64), torch.as_tensor(trainer_lp, dtype=torch.float64)
    return float((e - t).abs().max() / t.abs().max().clamp(min=1e-12))


def logprob_mismatch(trainer_probes: Dict[int, torch.Tensor], worker_stats: List[dict]) -> Dict[str, float]:
    """Per pushed version, the engine's probe log-probs (each worker's ``probe_logprobs``: version -> list) against
    the trainer's; the maximum relative error over workers and versions, and how many pairs were compared."""
    errs = []
    for stats in worker_stats:
        for version, engine_lp in (stats.get("probe_logprobs") or {}).items():
            if int(version) in trainer_probes:
                errs.append(relative_error(engine_lp, trainer_probes[int(version)]))
    return {"logprob_mismatch": max(errs) if errs else float("nan"), "logprob_checks": len(errs)}


class BucketWriter:
    """Writes each pushed version's buckets under ``<shm_dir>/ds_ext_weights_<pid>/v<version>`` and keeps the
    trainer's probe log-probs of that version; only the newest ``keep`` directories stay."""

    def __init__(self, shm_dir: str = "/dev/shm", bucket_mb: float = 64.0, keep: int = 4,
                 probe: Optional[List[int]] = None):
        self.root = os.path.join(shm_dir, f"ds_ext_weights_{os.getpid()}")
        self.bucket_bytes = max(1, int(bucket_mb * 2 ** 20))
        self.keep, self.probe = keep, probe
        self.dirs: List[str] = []
        self.probes: Dict[int, torch.Tensor] = {}

    def write(self, version: int, module: torch.nn.Module) -> dict:
        """Write version ``version``'s buckets; returns the handle workers get (also the initial weights)."""
        out = os.path.join(self.root, f"v{version}")
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        paths, nbytes = write_buckets(checkpoint_tensors(module), out, self.bucket_bytes)
        self.dirs.append(out)
        while len(self.dirs) > self.keep:
            shutil.rmtree(self.dirs.pop(0), ignore_errors=True)
        if self.probe is not None:
            was = module.training
            module.eval()
            self.probes[version] = trainer_probe_logprobs(module, self.probe)
            module.train(was)
        return {"kind": "files", "paths": paths, "bytes": nbytes, "write_s": time.perf_counter() - t}

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def probe_for(module: torch.nn.Module) -> Optional[List[int]]:
    """The probe sequence for a transformers policy (its config's vocabulary), else ``None``."""
    config = getattr(getattr(module, "hf", module), "config", None)
    return probe_ids(config.vocab_size) if config is not None else None


class FileWeightPusher(WeightPusher):
    """:class:`WeightPusher` whose pushes are safetensors buckets in shared memory plus a reload in each engine."""

    def __init__(self, workers: Dict[str, object], queue, writer: BucketWriter):
        super().__init__(workers, queue)
        self.writer = writer
        self.probes = writer.probes

    def write(self, version: int, module: torch.nn.Module) -> dict:
        return self.writer.write(version, module)

    def push(self, version: int, module: torch.nn.Module) -> None:
        t0 = time.perf_counter()
        self._settle()
        handle = self.write(version, module)
        n = self._send(version, handle, since=t0)
        self.pushes.append({"version": version, "bytes": handle["bytes"], "workers": n,
                            "write_s": handle["write_s"], "transfer_s": None,
                            "blocking_s": time.perf_counter() - t0})

    def cleanup(self) -> None:
        """Remove the push directories (after the workers stopped)."""
        self.writer.cleanup()
