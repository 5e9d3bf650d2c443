"""A rollout worker that generates in a child process of its rank, so that the worker dying (killed, out of
memory, a crash in generation) does not take the rank's ``torch.distributed.rpc`` membership with it: the rank stays
up, trainer rank 0 drops the worker from its weight pushes and regenerates its reserved groups elsewhere
(:class:`~ds_ext.asyncflow.weights.WeightPusher`), and the run ends normally without ``ds-ext --max_restarts``.

Processes: the rank process hosts :class:`IsolatedWorker` (the RPC actor trainer rank 0 creates, with the
:class:`~ds_ext.asyncflow.rollout.RolloutWorker` interface: ``set_weights``, ``run``, ``request_stop``); its child
runs a plain ``RolloutWorker`` whose queue is :class:`_PipeQueue`. Two pipes:

* *calls* (child -> rank -> child): each queue call of the child (``reserve``, ``put_group``, ``fail``) is sent up
  with the worker's current stats; the actor's ``run`` (one RPC thread) forwards it to the queue on trainer rank 0
  and sends the answer back. EOF on this pipe = the child died: ``run`` returns its last stats with ``died: True``.
* *control* (rank -> child): ``start`` (worker arguments), ``weights`` (version, state), ``stop``. The child reads the
  initial weights before it generates anything; later ones go to the worker's mailbox from a reader thread. EOF =
  the rank is gone, and the child exits.

Messages are ``torch.save`` bytes (tensors included). :func:`prestart` forks the child early, while the rank process
has no threads yet (before ``init_rpc``; forking after RPC started its threads could inherit a held lock); an actor
that finds no prestarted child spawns one. ``kill_after_groups`` (fault injection for tests): the child SIGKILLs
itself when the queue grants it a reservation after it delivered that many groups, so it dies holding a group.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import signal
import threading
import traceback
from typing import Optional

import torch

from ds_ext.asyncflow.continuous import LengthLog
from ds_ext.asyncflow.rollout import new_stats

_prestarted = None
_kill_after: Optional[int] = None


def _pack(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


class _Child:
    def __init__(self, proc, calls, control):
        self.proc, self.calls, self.control = proc, calls, control

    @staticmethod
    def start(method: str, kill_after: Optional[int]) -> "_Child":
        ctx = multiprocessing.get_context(method)
        calls, child_calls = ctx.Pipe()
        control, child_control = ctx.Pipe()
        # a forked child inherits the rank's ends too: it closes them, so the rank dying reads as EOF there
        inherited = (calls, control) if method == "fork" else ()
        proc = ctx.Process(target=_child_main, args=(child_calls, child_control, inherited, kill_after),
                           daemon=True, name="rollout-generator")
        proc.start()
        child_calls.close()
        child_control.close()
        return _Child(proc, calls, control)


def prestart(kill_after_groups: Optional[int] = None) -> None:
    """Fork this rank's generator child now (before ``init_rpc``); the actor created later adopts it."""
    global _prestarted, _kill_after
    _kill_after = kill_after_groups
    _prestarted = _Child.start("fork", kill_after_groups)


# -- the child ---------------------------------------------------------------------------------------------------
class _PipeQueue:
    """The queue as the child sees it: every call goes up the *calls* pipe and waits for its answer."""

    def __init__(self, calls, kill_after: Optional[int]):
        self.calls, self.kill_after, self.delivered, self.worker = calls, kill_after, 0, None

    def _stats(self):
        """The worker's stats for the rank (its last word if this process dies), with only the response lengths
        added since the previous call (the rank keeps its own :class:`LengthLog` of them): sending the log whole
        on every queue call would serialise up to ``window`` slots' histograms each time."""
        stats = dict(self.worker.stats)
        lengths = stats.pop("response_lengths", None)
        return stats, (None if lengths is None else lengths.take_unsent())

    def _call(self, method: str, *args):
        try:
            self.calls.send_bytes(_pack(("call", method, args, *self._stats())))
            status, value = _unpack(self.calls.recv_bytes())
        except (EOFError, OSError):
            os._exit(1)  # the rank process is gone
        if status == "err":
            raise value
        return value

    def reserve(self, producer: str, version: int, timeout: Optional[float] = None):
        meta = self._call("reserve", producer, version, timeout)
        if meta is not None and self.kill_after is not None and self.delivered >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die holding this reservation
        return meta

    def put_group(self, group_id: int, samples, required) -> bool:
        delivered = self._call("put_group", group_id, samples, required)
        self.delivered += 1
        return delivered

    def fail(self, message: str) -> None:
        self._call("fail", message)


def _read(control):
    try:
        return _unpack(control.recv_bytes())
    except (EOFError, OSError):
        os._exit(0)  # the rank process is gone


def _control_loop(control, worker) -> None:
    while True:
        msg = _read(control)
        if msg[0] == "weights":
            worker.set_weights(msg[1], msg[2])
        elif msg[0] == "stop":
            worker.request_stop()


def _child_main(calls, control, inherited, kill_after) -> None:
    from ds_ext.asyncflow.engines import make_worker
    for conn in inherited:
        conn.close()
    _, name, factory, task, cfg, threads, seed = _read(control)
    queue = _PipeQueue(calls, kill_after)
    worker = make_worker(name, factory, task, cfg, queue, threads, seed)  # cfg.rollout.engine: vllm | hf
    # continuous batching fills it, _PipeQueue._stats drains its increments
    worker.stats["response_lengths"] = LengthLog.for_config(cfg, track_unsent=True)
    queue.worker = worker
    calls.send_bytes(_pack(("ready",)))  # its engine is built (a vLLM engine takes ~20 s): the run's clock may start
    first = _read(control)  # the initial weights: nothing is generated before them
    assert first[0] == "weights", first[0]
    worker.set_weights(first[1], first[2])
    threading.Thread(target=_control_loop, args=(control, worker), daemon=True).start()
    try:
        stats = worker.run()
    except BaseException:  # noqa: BLE001 -- reported to the rank, which raises it on trainer rank 0
        calls.send_bytes(_pack(("error", traceback.format_exc(), dict(worker.stats))))
        os._exit(1)
    calls.send_bytes(_pack(("done", stats)))


# -- the rank's actor --------------------------------------------------------------------------------------------
class IsolatedWorker:
    """RPC actor on a rollout rank; same arguments as :class:`~ds_ext.asyncflow.rollout.RolloutWorker`."""

    def __init__(self, name: str, model_factory, task, cfg, queue, threads: Optional[int] = None, seed: int = 0):
        global _prestarted
        child, _prestarted = _prestarted, None
        self.child = child if child is not None else _Child.start("spawn", _kill_after)
        self.name = name
        self.queue = queue.rpc_sync() if hasattr(queue, "rpc_sync") else queue
        self.alive = True
        self._lock = threading.Lock()
        self.stats = new_stats()
        self._lengths = LengthLog.for_config(cfg)  # the child's response lengths, received in increments
        self._send(("start", name, model_factory, task, cfg, threads, seed))

    def _send(self, msg) -> bool:
        with self._lock:
            if not self.alive:
                return False
            try:
                self.child.control.send_bytes(_pack(msg))
                return True
            except (BrokenPipeError, OSError):
                self.alive = False
                return False

    def set_weights(self, version: int, state) -> bool:
        """``False`` when the child is gone (trainer rank 0 then drops this worker)."""
        return self._send(("weights", version, state))

    def request_stop(self) -> None:
        self._send(("stop",))

    def wait_ready(self) -> bool:
        """Block until the child has built its worker (its engine); ``False`` if it died first (:meth:`run` then
        returns at once with ``died: True``). Call before :meth:`run`."""
        try:
            msg = _unpack(self.child.calls.recv_bytes())
        except (EOFError, OSError):
            return False
        if msg[0] != "ready":
            self._early = msg
        return True

    def run(self) -> dict:
        """Serve the child's queue calls until it is done (its stats) or dies (the last stats, ``died: True``)."""
        early = getattr(self, "_early", None)
        while True:
            try:
                msg, early = (early, None) if early is not None else (_unpack(self.child.calls.recv_bytes()), None)
            except (EOFError, OSError):
                break
            if msg[0] == "ready":  # wait_ready was not called
                continue
            if msg[0] == "done":
                self.child.proc.join(timeout=30)
                return dict(msg[1], died=False)
            if msg[0] == "error":
                raise RuntimeError(f"rollout worker {self.name} failed in its generator process:\n{msg[1]}")
            _, method, args, stats, new_lengths = msg
            if new_lengths is not None:  # the child sends only what it added (see _PipeQueue._stats)
                self._lengths.add_pairs(new_lengths)
                stats["response_lengths"] = self._lengths
            self.stats = stats
            try:
                reply = ("ok", getattr(self.queue, method)(*args))
            except Exception as exc:  # noqa: BLE001 -- the child re-raises it where it called
                reply = ("err", exc)
            try:
                self.child.calls.send_bytes(_pack(reply))
            except (BrokenPipeError, OSError):
                break
        with self._lock:
            self.alive = False
        self.child.proc.join(timeout=30)
        return dict(self.stats, died=True, exitcode=self.child.proc.exitcode)
