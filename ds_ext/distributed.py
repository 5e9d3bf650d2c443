"""Process-group start-up shared by :func:`ds_ext.initialize` and :func:`ds_ext.build_topology`.

Under torch.distributed.elastic (``ds-ext --max_restarts K``) the workers of every restart round meet in the agent's
TCPStore, which outlives the round. Gloo publishes each rank's listening address under fixed keys, so a restarted
rank 1 can read the address of the *previous* round's rank 0 before the new rank 0 overwrites it, and fail with
"connectFullMesh ... Connection refused". Initialising the default group on a store prefixed by the restart count
gives each round its own keys. Everywhere else this defers to ``deepspeed.init_distributed`` unchanged.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import deepspeed
import torch.distributed as dist


def _elastic_round_store(timeout: timedelta):
    env = os.environ
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]),
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
    if "TORCHELASTIC_RESTART_COUNT" in os.environ and not dist.is_initialized() and dist_init_required is not False:
        timeout = timedelta(minutes=int(os.environ.get("DEEPSPEED_TIMEOUT", 30)))
        dist.init_process_group(backend, store=_elastic_round_store(timeout), rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    kwargs = {} if distributed_port is None else {"distributed_port": distributed_port}
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=dist_init_required, **kwargs)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it; bound on ``host`` only, never on all interfaces): for a
    rendezvous store started right after, e.g. the exporter's processes or a test's ranks."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

