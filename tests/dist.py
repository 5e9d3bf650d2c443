"""Run a test body on N real processes over torch.distributed (gloo), the way DeepSpeed's ``DistributedTest`` does.

    results = run_distributed(body, world_size=2, args=(stage,))

``body`` must be a module-level function (it is pickled into spawned processes). Each process gets the
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` environment, ``DS_ACCELERATOR=cpu`` and its share of the CPU
cores as torch threads; ``deepspeed.initialize`` or ``dist.init_process_group("gloo")`` inside the body finds
them. The returned list holds each rank's return value (anything ``torch.save`` can write). An exception in any
rank fails the caller with that rank's traceback; a hang fails it after ``timeout`` seconds, all ranks killed.
Ranks listed in ``may_die`` may end by a signal (a fault test's kill -9); their result is ``None`` and the other
ranks skip the closing barrier. ``group_dies_with=True`` kills the other ranks as soon as one of those dies, as
torch elastic's agent does before it relaunches the group (their exit code is then not checked).

Ranks are forked from one forkserver per test session that has already imported torch, DeepSpeed and ds_ext
(:data:`PRELOAD`): a spawned rank spent ~4 CPU-seconds importing them, which on 2 cores was about a third of a
4-rank kill -9 test. The server only imports (no torch op runs there, so no OpenMP pool exists to be forked);
each rank still sets its own environment and thread count before its body runs.

PRELOAD also holds what ``deepspeed.initialize`` imports lazily on its first call (measured with ``python -X
importtime``, 2026-12-03, DeepSpeed of the venv): ``torch._dynamo`` (1.2 s, for ``torch.compile`` checks), the Muon
optimizer module (1.1 s, it imports ``torch._dynamo.aot_compile`` again through its own path), the JIT-op machinery
(``torch.utils.cpp_extension``, ``distutils.ccompiler``) and the expert-parallel modules: 2.35 s per rank start that
every rank of every test paid again; with them preloaded ``deepspeed.initialize`` of a tiny model takes 0.05 s.
A name that does not import on the installed DeepSpeed is skipped by the forkserver (ranks then import it
themselves, slower but the same).
"""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import traceback

import torch

from ds_ext.distributed import free_port  # noqa: F401 (tests import it from here)

PRELOAD = ["torch", "deepspeed", "ds_ext", "ds_ext.models", "dist",
           # imported lazily by deepspeed.initialize / init_distributed (see the module docstring)
           "torch._dynamo", "torch.utils.cpp_extension", "distutils.ccompiler", "distutils.sysconfig",
           "deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.module_inject.auto_ep_config",
           "deepspeed.module_inject.auto_ep_layer", "deepspeed.ops.op_builder.all_ops", "deepspeed.comm.mori"]
_context = None


def _rank_context():
    """The forkserver context, its server preloading :data:`PRELOAD` (started on first use, one per session)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _worker(rank: int, body, args, world_size: int, port: int, out_dir: str, env: dict, closing_barrier: bool):
    os.environ.update(env)
    # No LOCAL_SIZE: with it DeepSpeed's CPU backend maps ~69 MB of /dev/shm per rank for its shared-memory
    # all-reduce and never unlinks it when a rank ends abruptly; tests would fill the machine's RAM run by run.
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "DS_ACCELERATOR": "cpu"})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        result = body(*args)
        import torch.distributed as dist
        if closing_barrier and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        # Written under a temporary name and renamed: with group_dies_with the harness may kill this rank while it
        # is writing, and a half-written rank file must not look like a result.
        partial = os.path.join(out_dir, f"rank{rank}.pt.partial")
        torch.save(result, partial)
        os.replace(partial, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    os._exit(0)  # skip interpreter teardown: a gloo group whose peer died can block in its destructor


def run_distributed(body, world_size: int = 2, args: tuple = (), timeout: float = 300.0, env: dict = None,
                    may_die: tuple = (), group_dies_with: bool = False) -> list:
    ctx = _rank_context()
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, body, args, world_size, port, out_dir, dict(env or {}),
                                                   not may_die), daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while any(p.is_alive() for p in procs):
                failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in may_die]
                died = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r in may_die]
                if failed or time.monotonic() > deadline or (died and group_dies_with):
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
        victim_died = any(p.exitcode not in (None, 0) for r, p in enumerate(procs) if r in may_die)
        errors = [open(os.path.join(out_dir, f"rank{r}.err")).read() for r in range(world_size)
                  if os.path.exists(os.path.join(out_dir, f"rank{r}.err"))
                  and not (group_dies_with and victim_died)]  # peers of a killed rank fail in their collectives
        if errors:
            raise AssertionError(f"{body.__name__} failed on a rank:\n" + "\n".join(errors))
        bad = {r: p.exitcode for r, p in enumerate(procs)
               if p.exitcode != 0 and r not in may_die and not (group_dies_with and may_die)}
        if bad:
            raise AssertionError(f"{body.__name__}: ranks ended with exit codes {bad} (timeout {timeout:.0f} s: "
                                 "negative = killed by the harness or a signal)")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                if os.path.exists(os.path.join(out_dir, f"rank{r}.pt")) else None for r in range(world_size)]
