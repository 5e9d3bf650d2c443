"""Weight sync from trainer rank 0 to the rollout workers, with its cost measured, and dead workers dropped.

:class:`WeightPusher` (trainer rank 0, after every optimizer step; call order ``watch`` each worker's ``run`` future
once -> ``push`` per step -> ``close``):

1. ``push(version, module)`` first settles the previous push (waits for every worker's acknowledgement: a worker
   copies new weights between decode steps, so a push normally has long arrived), then clones the weights and sends
   them to every live worker with ``rpc_async().set_weights`` (a :class:`~ds_ext.asyncflow.remote.WorkerHandle`:
   one msgpack frame on the worker's control connection, sent from the handle's own thread; the trainer goes on
   training while they travel).
2. Measured per push: ``bytes`` = the state's tensor bytes x the workers it went to; ``transfer_s`` = from the send
   to the last worker's acknowledgement (each future's completion time, recorded by a callback, so the trainer's
   own delay in looking does not count); ``blocking_s`` = how long ``push`` held the trainer (settling the previous
   push + the clone + handing the state to the sender threads).
3. A worker whose ``set_weights`` answers ``False`` (its connection is gone) or raises,
   or whose ``run`` ended before ``close`` (it died), is dropped: no later push goes to it, and
   ``queue.producer_died(name)`` returns its reserved, incomplete groups to the queue's pool, so the other workers
   (and the trainer's own idle-time generation) regenerate the same prompts for the same slots. Groups it delivered
   complete stay: no sample is lost or trained twice.
"""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional

import torch


def clone_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def state_bytes(state: Dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class WeightPusher:
    def __init__(self, workers: Dict[str, object], queue):
        """``workers``: name -> :class:`~ds_ext.asyncflow.remote.WorkerHandle` (``rpc_async().set_weights``);
        ``queue``: the local :class:`~ds_ext.asyncflow.queue.TransferQueue`."""
        self.workers = dict(workers)
        self.queue = queue
        self.dropped: List[str] = []
        self.closing = False
        self._lock = threading.Lock()
        self._pending: Optional[tuple] = None  # (send time, [(name, future, [ack time])])
        self.pushes: List[dict] = []            # one record per push: bytes, workers, transfer_s, blocking_s

    # -- failure handling ----------------------------------------------------------------------------------------
    def drop(self, name: str, why: str) -> None:
        with self._lock:
            if name not in self.workers:
                return
            del self.workers[name]
            self.dropped.append(name)
        regenerated = self.queue.producer_died(name)
        print(f"asyncflow: rollout worker {name} dropped ({why}); {regenerated} reserved group(s) go back to the "
              f"queue for the other workers", flush=True)

    def watch(self, name: str, run_future) -> None:
        """``run_future``: the worker's ``run`` (it returns when stopped; earlier, the worker died)."""
        def done(fut):
            if self.closing:
                return
            try:
                stats = fut.wait()
                why = f"its generator exited with code {stats.get('exitcode')}" if isinstance(stats, dict) \
                    else "its run ended"
            except Exception as exc:  # noqa: BLE001 -- any failure means the worker is gone
                why = f"its rank is unreachable: {type(exc).__name__}"
            self.drop(name, why)
        run_future.add_done_callback(done)

    # -- pushes ----------------------------------------------------------------------------------------------------
    def _settle(self) -> None:
        if self._pending is None:
            return
        sent, futures = self._pending
        self._pending = None
        acks = []
        for name, fut, ack in futures:
            try:
                alive = fut.wait()
            except Exception as exc:  # noqa: BLE001
                self.drop(name, f"set_weights failed: {type(exc).__name__}")
                continue
            if alive is False:
                self.drop(name, "its generating process is gone")
                continue
            acks.append(ack[0] if ack else time.perf_counter())
        self.pushes[-1]["transfer_s"] = (max(acks) - sent) if acks else 0.0

    def push(self, version: int, module: torch.nn.Module) -> None:
        t0 = time.perf_counter()
        self._settle()
        state = clone_state(module)
        n = self._send(version, state)
        self.pushes.append({"version": version, "bytes": state_bytes(state) * n, "workers": n, "transfer_s": None,
                            "blocking_s": time.perf_counter() - t0})

    def _send(self, version: int, payload, since: Optional[float] = None) -> int:
        """``set_weights(version, payload)`` on every live worker, asynchronously (the next push or :meth:`close`
        settles the futures; transfer time counts from ``since``, default now). Returns how many were sent to."""
        with self._lock:
            targets = list(self.workers.items())
        sent = time.perf_counter() if since is None else since
        futures = []
        for name, rref in targets:
            ack: List[float] = []
            fut = rref.rpc_async().set_weights(version, payload)
            fut.add_done_callback(lambda _f, ack=ack: ack.append(time.perf_counter()))
            futures.append((name, fut, ack))
        self._pending = (sent, futures)
        return len(targets)

    def last_metrics(self) -> Dict[str, float]:
        """This push's bytes and trainer blocking time, and the transfer time of the newest settled push."""
        if not self.pushes:
            return {}
        settled = [p["transfer_s"] for p in self.pushes if p["transfer_s"] is not None]
        return {"weight_sync_bytes_per_push": float(self.pushes[-1]["bytes"]),
                "weight_sync_blocking_s": self.pushes[-1]["blocking_s"],
                "weight_sync_transfer_s": settled[-1] if settled else 0.0}

    def close(self) -> None:
        """Settle the last push (its transfer time) and stop counting ended ``run`` futures as deaths."""
        self._settle()
        self.closing = True

    def live(self) -> Dict[str, object]:
        with self._lock:
            return dict(self.workers)

    def summary(self) -> Dict[str, object]:
        done = [p for p in self.pushes if p["transfer_s"] is not None]
        n = max(1, len(self.pushes))
        return {"pushes": len(self.pushes),
                "bytes_per_push": sum(p["bytes"] for p in self.pushes) / n,
                "transfer_s_mean": sum(p["transfer_s"] for p in done) / max(1, len(done)),
                "transfer_s_max": max((p["transfer_s"] for p in done), default=0.0),
                "blocking_s_mean": sum(p["blocking_s"] for p in self.pushes) / n,
                "blocking_s_total": sum(p["blocking_s"] for p in self.pushes),
                "dropped_workers": list(self.dropped)}
