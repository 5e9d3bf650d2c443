"""Rollout workers in other processes, over :mod:`ds_ext.asyncflow.transport` (authenticated msgpack frames).

Each worker opens two connections to trainer rank 0's :class:`RolloutHub`; the first frame of each is
``{"role": "calls" | "control", "worker": name}`` (a name the hub does not expect is refused):

* *calls* (worker asks, hub answers): ``{"m": method, "a": [args], "stats": {...}, "lengths": [[slot, n], ...]}``
  for ``reserve`` / ``put_group`` / ``fail`` on the :class:`~ds_ext.asyncflow.queue.TransferQueue`, answered
  ``{"ok": value}`` or ``{"err": message, "kind": exception name}``; the stats ride along so that a worker that dies
  leaves its last counters. ``{"m": "done", "stats": ...}`` ends the worker's run (its final stats),
  ``{"m": "error", "a": [traceback], ...}`` reports a crash. EOF, or a frame that does not decode or names another
  method: the worker is gone -- its run future resolves with ``died: True`` and the hub closes the connection.
* *control* (hub sends, worker acknowledges): ``{"op": "weights", "version": v, "weights": state or handle}`` ->
  ``{"ack": v}``; ``{"op": "stop"}`` (no answer).

:class:`WorkerHandle` is trainer rank 0's view of one worker with the interface the weight pushers use
(``rpc_async().set_weights(v, payload)`` -> a future with ``wait()``; ``run`` future; ``request_stop()``).
:class:`RemoteQueue` is the worker's view of the queue.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Dict, List, Optional

from ds_ext.asyncflow import transport
from ds_ext.asyncflow.continuous import LengthLog
from ds_ext.asyncflow.queue import RolloutFailed
from ds_ext.asyncflow.rollout import new_stats

QUEUE_METHODS = ("reserve", "put_group", "fail")


class Reply(concurrent.futures.Future):
    """A future with torch's ``wait()`` spelling (what :class:`~ds_ext.asyncflow.weights.WeightPusher` calls)."""

    def wait(self, timeout: Optional[float] = None):
        return self.result(timeout)


class _Async:
    def __init__(self, handle: "WorkerHandle"):
        self.handle = handle

    def set_weights(self, version: int, payload) -> Reply:
        return self.handle.set_weights_async(version, payload)


class WorkerHandle:
    def __init__(self, name: str, cfg):
        self.name = name
        self.control = None
        self.connected = threading.Event()
        self.run: Reply = Reply()      # the worker's final stats (``died`` True if it vanished)
        self.stats = new_stats()
        self.lengths = LengthLog.for_config(cfg)
        self._sender = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"push-{name}")
        self._alive = True

    def rpc_async(self) -> _Async:
        return _Async(self)

    def _send_weights(self, version: int, payload) -> bool:
        if not self._alive or self.control is None:
            return False
        try:
            transport.send(self.control, {"op": "weights", "version": version, "weights": payload})
            transport.recv(self.control)  # the acknowledgement: the worker holds the weights in its mailbox
            return True
        except (EOFError, OSError, transport.TransportError):
            self._alive = False
            return False

    def set_weights_async(self, version: int, payload) -> Reply:
        """``False`` when the worker is gone (trainer rank 0 then drops it)."""
        out = Reply()
        inner = self._sender.submit(self._send_weights, version, payload)
        inner.add_done_callback(lambda f: out.set_exception(f.exception()) if f.exception() else
                                out.set_result(f.result()))
        return out

    def set_weights(self, version: int, payload) -> bool:
        return self.set_weights_async(version, payload).result()

    def request_stop(self) -> None:
        def stop():
            if self._alive and self.control is not None:
                try:
                    transport.send(self.control, {"op": "stop"})
                except OSError:
                    pass
        self._sender.submit(stop).result()

    def finish(self, stats: dict) -> None:
        if not self.run.done():
            self.run.set_result(stats)
        self._alive = False

    def close(self) -> None:
        self._sender.shutdown(wait=False)
        if self.control is not None:
            self.control.close()


class RolloutHub:
    """Trainer rank 0's end: a :class:`~ds_ext.asyncflow.transport.Listener` whose calls go to ``queue``."""

    def __init__(self, queue, cfg, names: List[str], addr: str, port: int, secret: bytes):
        self.queue = queue
        self.workers: Dict[str, WorkerHandle] = {n: WorkerHandle(n, cfg) for n in names}
        self.listener = transport.Listener(addr, port, secret, self._on_connection)

    def wait_connected(self, timeout_s: float = 1800.0) -> None:
        for h in self.workers.values():
            if not h.connected.wait(timeout_s):
                raise transport.TransportError(f"rollout worker {h.name} did not connect to trainer rank 0 at "
                                               f"{self.listener.addr}:{self.listener.port} within {timeout_s:.0f} s")

    def _on_connection(self, conn, peer: str) -> None:
        try:
            hello = transport.recv(conn)
            role, name = hello["role"], hello["worker"]
            handle = self.workers[name]
        except (EOFError, OSError, transport.TransportError, KeyError, TypeError) as exc:
            print(f"asyncflow transport: closed a connection from {peer}: a bad first frame ({exc!r:.200})",
                  flush=True)
            conn.close()
            return
        if role == "control":
            handle.control = conn
            handle.connected.set()
        elif role == "calls":
            self._serve_calls(handle, conn)
        else:
            conn.close()

    def _serve_calls(self, h: WorkerHandle, conn) -> None:
        why = "its connection closed"
        while True:
            try:
                msg = transport.recv(conn)
                method, args = msg["m"], list(msg.get("a", ()))
                self._note_stats(h, msg)
            except (EOFError, OSError):
                break
            except (transport.TransportError, KeyError, TypeError, ValueError) as exc:
                why = f"it sent a bad frame: {exc}"
                break
            if method == "done":
                h.finish(dict(h.stats, died=False))
                conn.close()
                return
            if method == "error":
                h.run.set_exception(RuntimeError(f"rollout worker {h.name} failed in its generator process:\n"
                                                 f"{args[0] if args else ''}"))
                conn.close()
                return
            if method not in QUEUE_METHODS:
                why = f"it called {method!r}, not a queue method"
                break
            try:
                reply = {"ok": getattr(self.queue, method)(*args)}
            except Exception as exc:  # noqa: BLE001 -- the worker re-raises it where it called
                reply = {"err": str(exc), "kind": type(exc).__name__}
            try:
                transport.send(conn, reply)
            except OSError:
                break
        conn.close()
        print(f"asyncflow: rollout worker {h.name}: {why}", flush=True)
        h.finish(dict(h.stats, died=True, error=why))

    @staticmethod
    def _note_stats(h: WorkerHandle, msg: dict) -> None:
        stats = msg.get("stats")
        if stats is None:
            return
        if not isinstance(stats, dict):
            raise TypeError("stats is not a map")
        lengths = msg.get("lengths")
        if lengths:  # the worker sends only what it added since its previous call
            h.lengths.add_pairs([(int(s), int(n)) for s, n in lengths])
        stats["response_lengths"] = h.lengths
        h.stats = stats

    def close(self) -> None:
        self.listener.close()
        for h in self.workers.values():
            h.close()


class RemoteQueue:
    """The queue as a worker sees it: each call is one frame on the *calls* connection and waits for its answer."""

    def __init__(self, conn, worker=None):
        self.conn, self.worker = conn, worker

    def _stats(self) -> dict:
        if self.worker is None:
            return {}
        stats = dict(self.worker.stats)
        lengths = stats.pop("response_lengths", None)
        return {"stats": stats, "lengths": None if lengths is None else lengths.take_unsent()}

    def call(self, method: str, *args):
        transport.send(self.conn, {"m": method, "a": list(args), **self._stats()})
        if method in ("done", "error"):
            return None
        reply = transport.recv(self.conn)
        if "err" in reply:
            raise (RolloutFailed if reply.get("kind") == "RolloutFailed" else RuntimeError)(reply["err"])
        return reply["ok"]

    def reserve(self, producer: str, version: int, timeout: Optional[float] = None):
        return self.call("reserve", producer, version, timeout)

    def put_group(self, group_id: int, samples, required) -> bool:
        return self.call("put_group", group_id, samples, list(required))

    def fail(self, message: str) -> None:
        self.call("fail", message)
