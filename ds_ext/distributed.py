"""Process-group start-up shared by :func:`ds_ext.initialize` and :func:`ds_ext.build_topology`.

Under torch.distributed.elastic (``ds-ext --max_restarts K``) the workers of every restart round meet in the agent's
TCPStore, which outlives the round. Gloo publishes each rank's listening address under fixed keys, so a restarted
rank 1 can read the address of the *previous* round's rank 0 before the new rank 0 overwrites it, and fail with
"connectFullMesh ... Connection refused". Initialising the default group on a store prefixed by the restart count
gives each round its own keys.

Listening only where told: torch's TCPStore server binds every interface whatever host it is given. Where this
module starts the store server (rank 0 outside torch elastic, and rank 0's fresh store of an elastic round), it binds
a socket to ``MASTER_ADDR`` itself and hands it to the store (``master_listen_fd``), so the store listens on that
address only. On one node with a loopback ``MASTER_ADDR``, gloo's own connections are bound to loopback too
(``GLOO_SOCKET_IFNAME=lo`` unless set). Everything else defers to ``deepspeed.init_distributed``.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
from datetime import timedelta

import deepspeed
import torch.distributed as dist


def one_node() -> bool:
    """Whether every rank runs on this node (torch elastic's ``LOCAL_WORLD_SIZE``, DeepSpeed's ``LOCAL_SIZE``)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)) == world


def is_loopback(addr: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(addr, None, proto=socket.IPPROTO_TCP))
    except (socket.gaierror, ValueError):
        return False


def bound_store(addr: str, port: int, world: int, is_master: bool, timeout: timedelta, **kw) -> dist.TCPStore:
    """A TCPStore whose server (``is_master``) listens on ``addr`` only (see the module docstring)."""
    if not is_master:
        return dist.TCPStore(addr, port, world, False, timeout=timeout, **kw)
    info = socket.getaddrinfo(addr, port, proto=socket.IPPROTO_TCP)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(info[4])
    sock.listen(128)
    # the store takes the descriptor over: the Python object must not close it
    return dist.TCPStore(addr, port, world, True, timeout=timeout, master_listen_fd=sock.detach(), **kw)


def _loopback_gloo() -> None:
    addr = os.environ.get("MASTER_ADDR")
    if addr and one_node() and is_loopback(addr):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def _elastic_round_store(timeout: timedelta):
    env = os.environ
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = bound_store(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]),
                        is_master=not agent_store and int(env["RANK"]) == 0, timeout=timeout,
                        multi_tenant=not agent_store)
    # The agent store outlives rounds: key by round. Without it (ds-ext sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
    # rank 0 hosts a fresh store each round; a fixed key then, as nodes' restart counts differ after a membership
    # change (torch does not count those as restarts).
    key = env["TORCHELASTIC_RESTART_COUNT"] if agent_store else "own"
    return dist.PrefixStore(f"ds_ext/round_{key}", store)


def init_distributed(dist_init_required=None, distributed_port=None) -> None:
    """``deepspeed.init_distributed`` with the accelerator's backend; restart-safe under torch elastic."""
    backend = deepspeed.get_accelerator().communication_backend_name()
    venv_tools_first()
    env = os.environ
    elastic = "TORCHELASTIC_RESTART_COUNT" in env
    if not dist.is_initialized() and dist_init_required is not False and (elastic or distributed_port is None) \
            and all(k in env for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")):
        _loopback_gloo()
        timeout = timedelta(minutes=int(env.get("DEEPSPEED_TIMEOUT", 30)))
        if elastic:
            store = _elastic_round_store(timeout)
        else:
            store = bound_store(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]),
                                is_master=int(env["RANK"]) == 0, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                                timeout=timeout)
    kwargs = {} if distributed_port is None else {"distributed_port": distributed_port}
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=dist_init_required, **kwargs)


def shutdown() -> None:
    """Destroy every process group, once a process's last collective is done (the end of a script's run; a no-op
    without one). PyTorch asks for it at the end of every training script: without it, gloo's worker threads may
    still hold work objects (tensors with Python references) when the interpreter finalizes, and the process aborts
    with SIGABRT, "terminate called without an active exception" (pytorch/pytorch#190489), after its run finished.
    Seen here once in ~15 runs of the vLLM README command: all 12 steps done, exit status -6."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def venv_tools_first() -> None:
    """Put this interpreter's bin directory first on ``PATH`` when it holds a ``ninja`` (a venv's): DeepSpeed's
    CPU comm op is JIT-built into ``TORCH_EXTENSIONS_DIR`` by the ``ninja`` found on ``PATH``, and a cache built by
    another ninja version is rebuilt (~30-60 s on 2 cores). ``ds-ext`` does this for the workers it starts; a worker
    started elsewhere (``mpirun`` on another node, whose login ``PATH`` lacks the venv) must do it itself, or two
    ninjas rebuild the shared cache in turn."""
    own = os.path.dirname(sys.executable)
    first = os.environ.get("PATH", "").split(os.pathsep)[0]
    if first != own and os.path.exists(os.path.join(own, "ninja")):
        os.environ["PATH"] = own + os.pathsep + os.environ.get("PATH", "")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it; bound on ``host`` only, never on all interfaces): for a
    rendezvous store started right after, e.g. the exporter's processes or a test's ranks."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

