"""AsyncFlow's transport: authenticated connections carrying msgpack frames, nothing unpickled.

Who talks: trainer rank 0 listens on one TCP address (:class:`Listener`, bound to the address it is given --
``MASTER_ADDR``, loopback on one node -- never all interfaces); each rollout worker connects to it
(:func:`connect`). Nothing else of AsyncFlow listens.

Per connection, in order:

1. **Handshake** (mutual, HMAC-SHA256 over the per-run secret, :func:`run_secret`): the listener sends
   ``b"DSX1" + n_s`` (32 random bytes); the client answers ``n_c + HMAC(secret, b"client" + n_s + n_c)``; the
   listener checks it (constant-time) and answers ``HMAC(secret, b"server" + n_c + n_s)``, which the client checks.
   Each read before the handshake completes is capped at 128 bytes and the whole handshake at
   :data:`HANDSHAKE_S` seconds; a peer that fails it is disconnected and named in one log line (never the secret).
2. **Frames**: ``multiprocessing.connection.Connection.send_bytes`` / ``recv_bytes`` (a 4-byte length, then the
   bytes; only the bytes API is used -- ``recv()`` would unpickle). Each frame is one msgpack object
   (:func:`encode` / :func:`decode`): maps, arrays, strings, numbers, bytes, plus two extension types:

   * ``1`` (tensor): ``u32 header length, msgpack [dtype name, shape], raw bytes`` (C order, little endian as the
     machine's; dtypes in :data:`DTYPES` only);
   * ``2`` (group reservation): the msgpack map of :class:`~ds_ext.asyncflow.queue.GroupMeta`'s fields.

   A frame that does not decode raises :class:`TransportError`; msgpack builds only plain values, so a forged
   frame can be refused but never runs code.

The secret: ``ds-ext`` writes 32 random bytes (hex) to a file readable by its user only and hands the path to every
rank in ``DS_EXT_RUN_SECRET_FILE``; the file is removed when ``ds-ext`` exits. A run started another way (the plain
``deepspeed`` launcher, several nodes) must set ``DS_EXT_RUN_SECRET_FILE`` itself (the same secret on every node),
else the async run refuses to start (:func:`run_secret` says how).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import struct
import threading
import time
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional

import msgpack
import torch

from ds_ext.secret import SECRET_FILE_ENV, SecretError, make_secret_file, run_secret  # noqa: F401 -- re-exported

HANDSHAKE_S = 10.0
MAGIC = b"DSX1"
EXT_TENSOR, EXT_META = 1, 2
DTYPES = {name: getattr(torch, name) for name in
          ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}


class TransportError(SecretError):
    """A peer failed the handshake or sent a frame that does not decode (a missing secret: its base,
    :class:`~ds_ext.secret.SecretError`)."""


# -- the codec -----------------------------------------------------------------------------------------------------
def _default(obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        name = str(t.dtype).replace("torch.", "")
        if name not in DTYPES:
            raise TypeError(f"tensor dtype {t.dtype} is not in the transport's dtypes")
        header = msgpack.packb([name, list(t.shape)])
        return msgpack.ExtType(EXT_TENSOR, struct.pack("<I", len(header)) + header
                               + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    from ds_ext.asyncflow.queue import GroupMeta
    if isinstance(obj, GroupMeta):
        return msgpack.ExtType(EXT_META, msgpack.packb(asdict(obj)))
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars (a user's reward)
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot send a {type(obj).__name__} over the AsyncFlow transport")


def _ext_hook(code: int, data: bytes):
    if code == EXT_TENSOR:
        (n,) = struct.unpack_from("<I", data)
        name, shape = msgpack.unpackb(data[4:4 + n])
        dtype = DTYPES[name]  # KeyError: not an allowed dtype
        shape = [int(s) for s in shape]
        raw = data[4 + n:]
        numel = 1
        for s in shape:
            numel *= s
        if len(raw) != numel * torch.empty((), dtype=dtype).element_size():
            raise ValueError(f"tensor of shape {shape} {name} with {len(raw)} bytes")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    if code == EXT_META:
        from ds_ext.asyncflow.queue import GroupMeta
        return GroupMeta(**msgpack.unpackb(data))
    raise ValueError(f"unknown msgpack extension type {code}")


def encode(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def decode(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 -- any malformed frame: refused, named
        raise TransportError(f"an undecodable frame ({type(exc).__name__}: {str(exc)[:200]})") from None


def send(conn: Connection, obj: Any) -> None:
    conn.send_bytes(encode(obj))


def recv(conn: Connection) -> Any:
    """The next frame, decoded (``EOFError`` / ``OSError`` when the peer is gone)."""
    return decode(conn.recv_bytes())


# -- handshake -----------------------------------------------------------------------------------------------------
def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def _server_handshake(conn: Connection, secret: bytes) -> None:
    n_s = secrets.token_bytes(32)
    conn.send_bytes(MAGIC + n_s)
    answer = conn.recv_bytes(128)
    n_c, mac = answer[:32], answer[32:]
    if len(n_c) != 32 or not hmac.compare_digest(mac, _mac(secret, b"client", n_s, n_c)):
        raise TransportError("authentication failed (wrong or no run secret)")
    conn.send_bytes(_mac(secret, b"server", n_c, n_s))


def _client_handshake(conn: Connection, secret: bytes) -> None:
    hello = conn.recv_bytes(128)
    if not hello.startswith(MAGIC) or len(hello) != len(MAGIC) + 32:
        raise TransportError("the listener is not an AsyncFlow trainer")
    n_s, n_c = hello[len(MAGIC):], secrets.token_bytes(32)
    conn.send_bytes(n_c + _mac(secret, b"client", n_s, n_c))
    if not hmac.compare_digest(conn.recv_bytes(128), _mac(secret, b"server", n_c, n_s)):
        raise TransportError("the trainer failed authentication (another run's secret?)")


def _authenticated(sock: socket.socket, secret: bytes, handshake) -> Connection:
    """The socket as a :class:`Connection` once ``handshake`` passed within :data:`HANDSHAKE_S` (a peer that stalls
    is cut off: the socket is shut down under the blocked read)."""
    sock.setblocking(True)
    # Connection writes a frame over 16 KiB as two send()s (header, then payload): with Nagle's algorithm the
    # payload waits for the peer's delayed ACK of the header, ~40 ms per call (measured 44 ms for a 31 KB
    # put_group on loopback, 64 of them per GRPO step). Frames are whole messages: send them at once.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(os.dup(sock.fileno()))
    timer = threading.Timer(HANDSHAKE_S, lambda: _shutdown(sock))
    timer.daemon = True
    timer.start()
    try:
        handshake(conn, secret)
    except (EOFError, OSError, TransportError) as exc:
        conn.close()
        raise TransportError(str(exc) if isinstance(exc, TransportError) else
                             f"handshake cut off ({type(exc).__name__})") from None
    finally:
        timer.cancel()
        sock.close()  # the Connection holds its own descriptor
    return conn


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def check_bind_address(addr: str) -> None:
    """Refuse the wildcard addresses: every listener binds the one address it is given."""
    try:
        wildcard = ipaddress.ip_address(addr).is_unspecified
    except ValueError:
        wildcard = addr in ("", "*")
    if wildcard:
        raise TransportError(f"refusing to listen on {addr!r} (all interfaces): give MASTER_ADDR the one address "
                             "the rollout workers reach (127.0.0.1 on one node)")


class Listener:
    """Accepts authenticated connections on ``(addr, port)`` (exactly that address); each passes to
    ``on_connection(conn, peer)`` in a thread of its own. Refused peers are logged by address only."""

    def __init__(self, addr: str, port: int, secret: bytes, on_connection: Callable[[Connection, str], None]):
        check_bind_address(addr)
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.sock = socket.create_server((addr, port), family=family, backlog=64)
        self.addr, self.port = addr, self.sock.getsockname()[1]
        self.secret, self.on_connection = secret, on_connection
        self.refused = 0
        self.closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="asyncflow-listener")
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                sock, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock, f"{peer[0]}:{peer[1]}"), daemon=True).start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        try:
            conn = _authenticated(sock, self.secret, _server_handshake)
        except TransportError as exc:
            self.refused += 1
            print(f"asyncflow transport: refused a connection from {peer}: {exc}", flush=True)
            return
        self.on_connection(conn, peer)

    def close(self) -> None:
        self.closed = True
        _shutdown(self.sock)
        self.sock.close()


def connect(addr: str, port: int, secret: bytes, timeout_s: float = 1800.0) -> Connection:
    """An authenticated connection to the trainer's :class:`Listener`, retrying while it is not up yet (the trainer
    may still be building its engine) for up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((addr, port), timeout=HANDSHAKE_S)
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TransportError(f"no AsyncFlow trainer answered at {addr}:{port} within {timeout_s:.0f} s "
                                     f"({exc})") from None
            time.sleep(0.2)
    return _authenticated(sock, secret, _client_handshake)
