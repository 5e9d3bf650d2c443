"""AsyncFlow's transport in one process: the codec, the handshake, the hub's refusals (nothing unpickled), the
secret's checks. The run-level checks (another network namespace, ``ss``) are in test_asyncflow_trust.py."""
import os
import pickle
import socket
import struct
import time

import pytest
import torch

from ds_ext.asyncflow import transport
from ds_ext.asyncflow.config import AsyncFlowConfig
from ds_ext.asyncflow.queue import GroupMeta, RolloutFailed, TransferQueue
from ds_ext.asyncflow.remote import RemoteQueue, RolloutHub


class _Boom:
    """Unpickling this runs ``os.system(touch marker)``: the proof that nothing unpickles a frame."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture()
def secret(tmp_path, monkeypatch):
    path = transport.make_secret_file(str(tmp_path))
    monkeypatch.setenv(transport.SECRET_FILE_ENV, path)
    return transport.run_secret()


def _frame(payload: bytes) -> bytes:
    return struct.pack("!i", len(payload)) + payload  # multiprocessing.connection's framing


def test_codec_round_trips_tensors_and_reservations_and_refuses_garbage():
    value = {"w": torch.randn(3, 4), "b": torch.zeros(0, 2, dtype=torch.bfloat16), "n": torch.tensor(7),
             "m": GroupMeta(1, 2, 3, "rollout1", 4, [5, 6], 7.5), "k": {3: [1.5, "x"]}}
    back = transport.decode(transport.encode(value))
    assert torch.equal(back["w"], value["w"]) and back["b"].shape == (0, 2) and back["b"].dtype == torch.bfloat16
    assert back["n"].item() == 7 and back["m"] == value["m"] and back["k"] == {3: [1.5, "x"]}
    for junk in (b"\xc1", pickle.dumps({"a": 1}), transport.encode({"t": torch.ones(2)})[:-3]):
        with pytest.raises(transport.TransportError, match="undecodable"):
            transport.decode(junk)


def test_a_connection_without_the_secret_is_refused_and_a_forged_frame_never_unpickled(secret, tmp_path):
    marker = tmp_path / "unpickled"
    q = TransferQueue(group_size=2, groups_per_step=1)
    hub = RolloutHub(q, AsyncFlowConfig(group_size=2, groups_per_step=1), ["rollout1"], "127.0.0.1", 0, secret)
    try:
        # 1. no secret: a pickle frame where the handshake's answer belongs, then one more
        with socket.create_connection(("127.0.0.1", hub.listener.port), timeout=5) as s:
            s.recv(64)
            s.sendall(_frame(pickle.dumps(_Boom(marker))) + _frame(pickle.dumps(_Boom(marker))))
            try:  # closed without an answer (a reset: the hub closed with the forged bytes unread)
                assert s.recv(64) == b""
            except ConnectionResetError:
                pass
        # 2. a wrong secret
        with pytest.raises(transport.TransportError):
            transport.connect("127.0.0.1", hub.listener.port, b"0" * 64, timeout_s=5)
        # 3. the right secret, then a pickle frame as the first frame and as a queue call: dropped, not unpickled
        for hello in (None, {"role": "calls", "worker": "rollout1"}):
            conn = transport.connect("127.0.0.1", hub.listener.port, secret, timeout_s=5)
            if hello:
                transport.send(conn, hello)
            conn.send_bytes(pickle.dumps(_Boom(marker)))
            with pytest.raises(EOFError):
                conn.recv_bytes()  # the hub closed the connection
        stats = hub.workers["rollout1"].run.wait(5)
        assert stats["died"] and "bad frame" in stats["error"]
        time.sleep(0.2)
        assert hub.listener.refused == 2 and not marker.exists()
    finally:
        hub.close()


def test_an_authenticated_worker_reserves_and_delivers_through_the_hub(secret):
    q = TransferQueue(group_size=2, groups_per_step=1)
    hub = RolloutHub(q, AsyncFlowConfig(group_size=2, groups_per_step=1), ["rollout1"], "127.0.0.1", 0, secret)
    try:
        conn = transport.connect("127.0.0.1", hub.listener.port, secret, timeout_s=5)
        transport.send(conn, {"role": "calls", "worker": "rollout1"})
        remote = RemoteQueue(conn)
        meta = remote.reserve("rollout1", 0, 1.0)
        assert isinstance(meta, GroupMeta) and meta.slot == 0
        samples = [{"prompt_ids": torch.tensor([3, 4]), "response_ids": torch.tensor([5]), "response_len": 1,
                    "logprobs": torch.tensor([-0.5]), "reward": 1.0, "version": 0} for _ in range(2)]
        assert remote.put_group(meta.group_id, samples, ["reward"]) is True
        group = q.take("train", 0, 1, timeout=1)[0]
        assert torch.equal(group["samples"][1]["prompt_ids"], torch.tensor([3, 4]))
        q.fail("the reward raised")
        with pytest.raises(RolloutFailed, match="the reward raised"):  # the queue's error travels back, typed
            remote.reserve("rollout1", 0, 1.0)
        remote.call("done")
        assert hub.workers["rollout1"].run.wait(5)["died"] is False
    finally:
        hub.close()


def _nodelay(conn) -> bool:
    with socket.socket(fileno=os.dup(conn.fileno())) as s:
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_put_group_sized_call_is_not_held_by_nagle_and_delayed_acks(secret):
    """A frame over 16 KiB leaves as two writes (header, payload); with Nagle's algorithm on, the payload waits for
    the peer's delayed ACK, 40 ms on Linux (measured 44 ms per 31 KB put_group before the fix). Both ends must set
    TCP_NODELAY; the round trip is then ~1 ms here. Bound 20 ms on the median of 10: half the delayed-ACK minimum,
    >10x the measured time, so a loaded machine does not fail it while a Nagle stall always does."""
    served = []

    def echo(conn, peer):
        served.append(conn)
        while True:
            try:
                transport.recv(conn)
            except (EOFError, OSError):
                return
            transport.send(conn, {"ok": True})

    listener = transport.Listener("127.0.0.1", 0, secret, echo)
    try:
        conn = transport.connect("127.0.0.1", listener.port, secret, timeout_s=5)
        samples = [{"response_ids": torch.zeros(192, dtype=torch.long), "logprobs": torch.zeros(192),
                    "token_versions": torch.zeros(192, dtype=torch.long)} for _ in range(8)]
        msg = {"m": "put_group", "a": [1, samples]}
        assert len(transport.encode(msg)) > 16384  # the two-write case
        times = []
        for _ in range(10):
            t = time.perf_counter()
            transport.send(conn, msg)
            transport.recv(conn)
            times.append(time.perf_counter() - t)
        assert _nodelay(conn) and served and _nodelay(served[0])
        assert sorted(times)[5] < 0.020, times
        conn.close()
    finally:
        listener.close()


def test_listeners_refuse_all_interfaces_and_runs_refuse_a_missing_or_open_secret(tmp_path, monkeypatch):
    for addr in ("0.0.0.0", "::", ""):
        with pytest.raises(transport.TransportError, match="all interfaces"):
            transport.Listener(addr, 0, b"x" * 64, lambda c, p: None)
    monkeypatch.delenv(transport.SECRET_FILE_ENV, raising=False)
    with pytest.raises(transport.SecretError, match="start the run with ds-ext"):
        transport.run_secret()
    path = tmp_path / "secret"
    path.write_text("a" * 64)
    path.chmod(0o644)
    monkeypatch.setenv(transport.SECRET_FILE_ENV, str(path))
    with pytest.raises(transport.SecretError, match="chmod 600"):
        transport.run_secret()
