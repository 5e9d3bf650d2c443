"""Wiring of async GRPO runs: who generates, who trains, and how they talk.

* :func:`run_sync` -- the baseline, one process: generate the whole batch of step V with weights V (every thread
  generates), then train on it (every thread trains). ``max_staleness`` is 0 by construction.
* :func:`run_async_trainer` -- ``world_size`` processes (``world_size - trainer_ranks`` rollout workers), one
  thread each: rank 0 owns the :class:`TransferQueue` and the DeepSpeed engine, and generates groups itself (with
  its current weights, no copy) whenever the queue has nothing for it to train on; each other rank runs
  :func:`~ds_ext.asyncflow.isolated.run_rollout_rank`: a generator child that connects to rank 0's
  :class:`~ds_ext.asyncflow.remote.RolloutHub` (authenticated msgpack frames, :mod:`ds_ext.asyncflow.transport`;
  listening on :func:`transport_address` only) and reserves, generates and delivers groups through it; a worker
  that dies is dropped while its rank exits normally. After every step rank 0 pushes the new weights to each live
  worker (:class:`~ds_ext.asyncflow.weights.WeightPusher`: asynchronously, the previous push awaited first, its
  bytes and seconds measured), so generation stops only for the copy.
  The trainer's own process group (gloo, DeepSpeed) holds the trainer ranks only; the hub's address is
  ``MASTER_ADDR`` across nodes, so the same code runs there.

Both return per-step metrics (reward, lag, time, streamed micro-batches; in async runs the weight sync's
``weight_sync_*``), the trainer's idle time waiting on the queue, the queue's counters (staleness histogram, dropped
groups) and, on trainer rank 0 of an async run, the weight sync's summary (``weight_sync``).
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Dict, List, Optional

from ds_ext.asyncflow.config import AsyncFlowConfig
from ds_ext.asyncflow.queue import TransferQueue
from ds_ext.asyncflow.engines import make_worker
from ds_ext.asyncflow.rollout import RolloutWorker, new_stats
from ds_ext.asyncflow.scatter import ScatteredQueue
from ds_ext.asyncflow.protocol import RolloutTask, Trainer, TrainerFactory
from ds_ext.asyncflow.weights import WeightPusher, clone_state

STOP_TIMEOUT_S = 600.0  # a stopped worker finishes its group in flight; longer means it hangs


def _step_loop(trainer: Trainer, steps: int, produce: Callable[[int], None], progress=None,
               start: int = 0, extra: Callable[[], dict] = dict) -> List[dict]:
    history = []
    for version in range(start, steps):
        t = time.perf_counter()
        produce(version)
        metrics = trainer.train_step(version)
        metrics.update(step=version, seconds=time.perf_counter() - t, **extra())
        history.append(metrics)
        if progress is not None:
            progress(metrics)
    return history


def run_sync(engine, model_factory: Callable, task: RolloutTask, cfg: AsyncFlowConfig, steps: int,
             progress=None, start: int = 0, *, make_trainer: TrainerFactory) -> Dict[str, Any]:
    """The synchronous baseline in this process (all its threads in each phase): steps ``start .. steps - 1``
    (``start`` > 0 after a journal resume: the queue starts at that slot, so no prompt is trained twice).
    ``make_trainer``: the algorithm's trainer (:class:`~ds_ext.asyncflow.protocol.TrainerFactory`)."""
    queue = TransferQueue(cfg.group_size, cfg.groups_per_step, max_staleness=0, lease_s=cfg.lease_s,
                          start_slot=start)
    worker = make_worker("sync", model_factory, task, cfg, queue, seed=1000 * start)
    writer = _writer(cfg, engine.module)  # vLLM: weights go in as safetensors buckets + reload
    worker.set_weights(start, writer.write(start, engine.module) if writer else clone_state(engine.module))
    trainer = make_trainer(engine, queue, cfg, on_weights=lambda v, m: worker.set_weights(
        v, writer.write(v, m) if writer else clone_state(m)))

    def produce(version):
        if writer is not None:  # the vLLM engine loop: the step's whole batch, weights V
            worker.run(max_groups=(version + 1 - start) * cfg.groups_per_step)
        elif cfg.rollout_slots > 0:  # the step's whole batch through the continuous-batching slots, weights V
            worker.run(max_groups=cfg.groups_per_step)
        while worker.stats["groups"] < (version + 1 - start) * cfg.groups_per_step:
            worker.produce_one(timeout=5)

    t = time.perf_counter()
    history = _step_loop(trainer, steps, produce, progress, start)
    seconds = time.perf_counter() - t
    out = {"history": history, "seconds": seconds, "trainer_idle_s": 0.0,
           "train_busy_s": seconds - worker.stats["generate_s"] - worker.stats["wait_s"],
           "rollout": [worker.stats], "queue": queue.summary()}
    if writer is not None:
        from ds_ext.asyncflow.vllm_sync import logprob_mismatch
        writer.cleanup()
        out["weight_sync"] = {"pushes": 0, "bytes_per_push": 0.0, "transfer_s_mean": 0.0, "transfer_s_max": 0.0,
                              "blocking_s_mean": 0.0, "blocking_s_total": 0.0, "dropped_workers": [],
                              **logprob_mismatch(writer.probes, [worker.stats])}
    return out


def transport_address() -> tuple:
    """Where trainer rank 0's :class:`~ds_ext.asyncflow.remote.RolloutHub` listens: loopback when every rank is on
    this node, else ``MASTER_ADDR`` (never all interfaces); port ``MASTER_PORT + 3 + restart round`` (a fresh one
    per torch elastic round, ``ds-ext --max_restarts``; above ``MASTER_PORT + 2``, where the GRPO trainers' own
    process group meets: with ``+ 1 + round`` round 1's hub took that port and the relaunch failed to bind)."""
    from ds_ext.distributed import one_node
    addr = "127.0.0.1" if one_node() else os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500")) + 3 + int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return addr, port


def run_async_trainer(engine, model_factory: Callable, task: RolloutTask, cfg: AsyncFlowConfig, steps: int,
                      worker_names: List[str], progress=None, start: int = 0, trainer_rank: int = 0,
                      trainer_world: int = 1, replica_of: Callable[[int], int] = lambda r: 0,
                      replicas: int = 1, address: Optional[tuple] = None, *,
                      make_trainer: TrainerFactory) -> Dict[str, Any]:
    """A trainer rank of an async run (the rollout ranks run :func:`~ds_ext.asyncflow.isolated.run_rollout_rank`):
    train steps ``start..steps-1``. Trainer rank 0
    owns the queue (starting at slot ``start``), starts the rollout actors and pushes weights; with several trainer
    ranks it streams each micro-batch's groups to them through :class:`~ds_ext.asyncflow.scatter.ScatteredQueue`."""
    if trainer_rank > 0:
        feed = ScatteredQueue(None, trainer_rank, trainer_world, replica_of)
        trainer = make_trainer(engine, feed, cfg, trainer_rank, trainer_world, replicas=replicas)
        t = time.perf_counter()
        history = _step_loop(trainer, steps, lambda version: None, progress, start)
        return {"history": history, "seconds": time.perf_counter() - t, "trainer_idle_s": trainer.idle_s,
                "train_busy_s": time.perf_counter() - t - trainer.idle_s, "rollout": [], "queue": {}}
    return _run_async_rank0(engine, model_factory, task, cfg, steps, worker_names, progress, start, trainer_world,
                            replica_of, replicas, address or transport_address(),
                            make_trainer)


def _writer(cfg, module):
    """vLLM engines: the bucket writer of the weight sync (:mod:`ds_ext.asyncflow.vllm_sync`); else ``None``."""
    if cfg.rollout.engine != "vllm":
        return None
    from ds_ext.asyncflow.vllm_sync import BucketWriter, probe_for
    return BucketWriter(cfg.rollout.shm_dir, cfg.rollout.bucket_mb, keep=cfg.max_staleness + 3,
                        probe=probe_for(module) if cfg.rollout.check_logprobs else None)


def _pusher(cfg, workers, queue, module):
    """The weight sync of ``cfg.rollout.engine``: safetensors buckets + in-place reload for vLLM engines
    (:class:`~ds_ext.asyncflow.vllm_sync.FileWeightPusher`), a cloned state over the transport for our decoders."""
    if cfg.rollout.engine == "vllm" and cfg.rollout.weight_sync == "nccl":
        from ds_ext.asyncflow.vllm_nccl import NCCLWeightPusher
        return NCCLWeightPusher(workers, queue, cfg.rollout.nccl_addr, cfg.rollout.nccl_port, cfg.rollout.bucket_mb)
    writer = _writer(cfg, module)
    if writer is None:
        return WeightPusher(workers, queue)
    from ds_ext.asyncflow.vllm_sync import FileWeightPusher
    return FileWeightPusher(workers, queue, writer)


def _start_workers(cfg, worker_names, queue, start: int, module, address: tuple):
    """The hub the rollout workers connect to, their initial weights (awaited: nothing is generated before them)
    and their run futures."""
    from ds_ext.asyncflow import transport
    from ds_ext.asyncflow.remote import RolloutHub
    hub = RolloutHub(queue, cfg, worker_names, *address, transport.run_secret())
    hub.wait_connected()
    workers = hub.workers
    pusher = _pusher(cfg, workers, queue, module)
    nccl = cfg.rollout.engine == "vllm" and cfg.rollout.weight_sync == "nccl"
    # vLLM: the first weights as the push's handle (NCCL: None, the engines keep the directory's weights until the
    # broadcast below); our decoders: a cloned state
    initial = None if nccl else pusher.write(start, module) if hasattr(pusher, "write") else clone_state(module)
    for w in workers.values():  # a resumed NCCL run: version -1, admission holds the engines until the push below
        w.set_weights(-1 if nccl and start > 0 else start, initial)
    runs = {name: w.run for name, w in workers.items()}
    for name, fut in runs.items():
        pusher.watch(name, fut)
    if nccl and start > 0:  # a resumed run: the engines get the journal's weights before they generate more
        pusher.push(start, module)
    return hub, pusher, runs


def _stop_workers(pusher: WeightPusher, runs: dict, queue, hub) -> list:
    """Settle the last push, stop the live workers, and collect every worker's stats (a dead one's last)."""
    pusher.close()
    for w in pusher.live().values():
        w.request_stop()
    queue.close()
    stats = []
    for name, fut in runs.items():
        try:
            stats.append(fut.wait(STOP_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 -- the worker is gone or stuck; the run still ended
            stats.append({**new_stats(), "died": True, "error": f"{type(exc).__name__}: {exc}"})
    hub.close()
    return stats


def _run_async_rank0(engine, model_factory, task, cfg, steps, worker_names, progress, start, trainer_world,
                     replica_of, replicas, address, make_trainer) -> Dict[str, Any]:
    queue = TransferQueue(cfg.group_size, cfg.groups_per_step, cfg.max_staleness, lease_s=cfg.lease_s,
                          start_slot=start, staleness_policy=cfg.staleness_policy)
    hub, pusher, runs = _start_workers(cfg, worker_names, queue, start, engine.module, address)

    # the trainer's process generates too while it would wait on the queue: with its own (current) weights
    local = RolloutWorker("trainer", lambda: engine.module, task, cfg, queue, seed=len(worker_names) + 1000 * start,
                          shared=True)
    local.version = start

    def push_all(version, module):
        local.version = version
        if version % cfg.rollout.weight_sync_interval == 0:
            pusher.push(version, module)

    idle = (lambda: local.produce_one(timeout=0)) if cfg.trainer_generates else None
    if trainer_world > 1:
        feed = ScatteredQueue(queue, 0, trainer_world, replica_of, idle_work=idle)
        trainer = make_trainer(engine, feed, cfg, 0, trainer_world, on_weights=push_all, replicas=replicas)
    else:
        trainer = make_trainer(engine, queue, cfg, on_weights=push_all, idle_work=idle)
    t = time.perf_counter()
    history = _step_loop(trainer, steps, lambda version: None, progress, start, pusher.last_metrics)
    seconds = time.perf_counter() - t
    stats = _stop_workers(pusher, runs, queue, hub)
    getattr(pusher, "cleanup", lambda: None)()
    weight_sync = pusher.summary()
    if getattr(pusher, "probes", None):
        from ds_ext.asyncflow.vllm_sync import logprob_mismatch
        weight_sync.update(logprob_mismatch(pusher.probes, stats))
    idle_work_s = trainer.idle_work_s if trainer_world == 1 else 0.0
    return {"history": history, "seconds": seconds, "trainer_idle_s": trainer.idle_s - idle_work_s,
            "train_busy_s": seconds - trainer.idle_s,
            "rollout": stats + [local.stats], "queue": queue.summary(), "weight_sync": weight_sync}


def worker_names(world_size: int, trainer_ranks: int = 1) -> List[str]:
    return [f"rollout{r}" for r in range(trainer_ranks, world_size)]


def worker_name(rank: int) -> str:
    return f"rollout{rank}"


def model_factory_for(build: Callable, *args) -> Callable:
    """The rollout workers' model factory (each rank builds its own; nothing of it travels)."""
    return functools.partial(build, *args)
