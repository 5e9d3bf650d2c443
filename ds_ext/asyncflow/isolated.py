"""A rollout rank: its worker generates in a child process, so that the worker dying (killed, out of memory, a crash
in generation) does not take the rank with it -- the rank exits 0, trainer rank 0 drops the worker from its weight
pushes and regenerates its reserved groups elsewhere (:class:`~ds_ext.asyncflow.weights.WeightPusher`), and the run
ends normally without ``ds-ext --max_restarts``.

Processes: the rank process (:func:`run_rollout_rank`) builds nothing; it forks the generator child and waits for
it. The child builds its worker (:func:`~ds_ext.asyncflow.engines.make_worker`, from the rank's own task, config
and model factory: nothing of them travels over a socket) and connects to trainer rank 0's
:class:`~ds_ext.asyncflow.remote.RolloutHub` twice (*calls*: its queue, :class:`~ds_ext.asyncflow.remote.RemoteQueue`;
*control*: weights and stop, read by a thread into the worker's mailbox), authenticated with the run secret. It
waits for the initial weights before it generates anything. A pipe from the rank is its lifeline: EOF there (the
rank was killed) ends the child.

Fault injection for tests (``faults``, in the style of torchft's injector): ``kill_after`` N -- the child SIGKILLs
itself when the queue grants it a reservation after it delivered N groups, so it dies holding a group;
``garbage_after`` N -- after N delivered groups it sends a frame that is not msgpack instead of its next call (trainer
rank 0 drops it, and it exits when its connection closes); ``slow_s`` S -- it sleeps S seconds before delivering
each group (longer than ``lease_s``: every group arrives late and is discarded, and the worker goes on).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import traceback
from typing import Callable, Optional

from ds_ext.asyncflow import transport
from ds_ext.asyncflow.continuous import LengthLog
from ds_ext.asyncflow.remote import RemoteQueue


class _ChildQueue(RemoteQueue):
    def __init__(self, conn, faults: dict):
        super().__init__(conn)
        self.kill_after, self.delivered = faults.get("kill_after"), 0
        self.garbage_after, self.slow_s = faults.get("garbage_after"), faults.get("slow_s", 0.0)

    def call(self, method: str, *args):
        try:
            return super().call(method, *args)
        except (EOFError, OSError):
            os._exit(1)  # trainer rank 0 is gone

    def reserve(self, producer: str, version: int, timeout: Optional[float] = None):
        if self.garbage_after is not None and self.delivered >= self.garbage_after:
            self.conn.send_bytes(b"\xc1 not msgpack")  # fault injection: 0xc1 is never valid msgpack
            try:
                self.conn.recv_bytes()
            except (EOFError, OSError):
                os._exit(1)  # the hub closed the connection, as it should
        meta = super().reserve(producer, version, timeout)
        if meta is not None and self.kill_after is not None and self.delivered >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die holding this reservation
        return meta

    def put_group(self, group_id: int, samples, required) -> bool:
        time.sleep(self.slow_s)  # fault injection: a slow worker
        delivered = super().put_group(group_id, samples, required)
        self.delivered += 1
        return delivered


def _watch(conn, then) -> None:
    try:
        conn.recv_bytes()
    except (EOFError, OSError):
        pass
    then()


def _control_loop(control, worker) -> None:
    while True:
        try:
            msg = transport.recv(control)
        except (EOFError, OSError, transport.TransportError):
            os._exit(0)  # trainer rank 0 is gone (or spoke nonsense): nothing more to generate for
        if msg.get("op") == "weights":
            worker.set_weights(int(msg["version"]), msg["weights"])
            transport.send(control, {"ack": msg["version"]})
        elif msg.get("op") == "stop":
            worker.request_stop()


def _child_main(lifeline, rank_end, name, factory, task, cfg, threads, seed, addr, port, secret, faults):
    from ds_ext.asyncflow.engines import make_worker
    rank_end.close()
    threading.Thread(target=_watch, args=(lifeline, lambda: os._exit(0)), daemon=True).start()
    conns = {}
    for role in ("calls", "control"):
        conns[role] = transport.connect(addr, port, secret)
        transport.send(conns[role], {"role": role, "worker": name})
    queue = _ChildQueue(conns["calls"], faults)
    worker = make_worker(name, factory, task, cfg, queue, threads, seed)  # cfg.rollout.engine: vllm | hf
    # continuous batching fills it; RemoteQueue sends its increments with each call
    worker.stats["response_lengths"] = LengthLog.for_config(cfg, track_unsent=True)
    queue.worker = worker
    first = transport.recv(conns["control"])  # the initial weights: nothing is generated before them
    if first.get("op") != "weights":
        raise transport.TransportError(f"rollout worker {name}: expected the initial weights, got {first.get('op')}")
    worker.set_weights(int(first["version"]), first["weights"])
    transport.send(conns["control"], {"ack": first["version"]})
    threading.Thread(target=_control_loop, args=(conns["control"], worker), daemon=True).start()
    try:
        worker.run()
    except BaseException:  # noqa: BLE001 -- reported to trainer rank 0, which names it
        queue.call("error", traceback.format_exc())
        os._exit(1)
    queue.call("done")
    os._exit(0)


def run_rollout_rank(name: str, model_factory, task, cfg, addr: str, port: int, threads: Optional[int] = None,
                     seed: int = 0, faults: Optional[dict] = None, started: Callable[[], None] = lambda: None) -> int:
    """Fork this rank's generator child (call it while the process has no threads: a fork then cannot inherit a
    held lock), call ``started()`` and wait for the child; returns its exit code (the rank itself goes on to exit
    normally)."""
    secret = transport.run_secret()  # refuse here, with the message, before forking anything
    ctx = multiprocessing.get_context("fork")
    lifeline, rank_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, daemon=True, name="rollout-generator",
                       args=(lifeline, rank_end, name, model_factory, task, cfg, threads, seed, addr, port, secret,
                             dict(faults or {})))
    proc.start()
    lifeline.close()
    started()
    proc.join()
    rank_end.close()
    if proc.exitcode:
        print(f"asyncflow: rollout worker {name}'s generator exited with code {proc.exitcode}", flush=True)
    return proc.exitcode
