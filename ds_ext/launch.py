"""``ds-ext``: DeepSpeed's launcher plus ``--config PATH``, ``--num_procs N`` and ``--max_restarts K``.

    ds-ext [deepspeed runner flags] --config cfg.json [--num_procs N] [--max_restarts K] [--rdzv_timeout S]
           script.py [script args]

1. The config is validated before anything starts: a bad file prints every problem (JSON path, value, what is
   allowed) and exits 2 with no worker started. A config that sets ``ds_ext.asyncflow.rollout_workers`` fixes the
   process count of a single-node launch (``trainer_ranks + rollout_workers``): it is used when ``--num_procs`` is
   not given, and an explicit ``--num_procs`` that differs exits 2 naming both numbers, before anything starts.
   (Across nodes ``--num_procs`` stays per node and the script checks its world size itself.)
2. ``--deepspeed_config <abs path>`` is appended to the script's arguments.
3. Then, by what was asked:
   * ``--max_restarts K`` (K > 0): torch.distributed.elastic (``torch.distributed.run``) starts the local workers
     and restarts the whole local group up to K times when one fails; per node with ``--no_ssh --node_rank R
     --num_nodes N --master_addr ADDR`` (one ``ds-ext`` on every node, see "Several nodes" below).
   * otherwise DeepSpeed's own runner (its ``main``, through :mod:`ds_ext._deepspeed_launcher`): local processes, or multi-node through
     a hostfile and ``--launcher pdsh|openmpi|mpich|slurm|...``.
   On a machine without GPUs the local default is 2 processes (``--num_gpus``/``--num_procs``).

Several nodes, elastic (``--no_ssh``): the c10d rendezvous store lives at ``--master_addr:--master_port``. Node 0
hosts it, told so explicitly (``is_host``): torch's own guess compares the address with what this machine's
hostname resolves to, and misses an address of a second NIC, so node 0 would not start the store and every node
would time out. Node 0 also gives ``--master_addr`` as its own address (``--local_addr``), so the workers' process
group store, when node 0 holds rendezvous rank 0, is published under the address every node already reaches. A
node that cannot reach (or node 0 that cannot open) the store gives up after ``RDZV_CONNECT_TIMEOUT_S`` and exits 1
naming address and port (``--rdzv_timeout S`` sets that time). Global ranks follow torch's rendezvous order (sorted node addresses), not ``--node_rank``;
they stay the same across restarts.

The run secret (single node): ``ds-ext`` writes a fresh random secret to a 0600 file, hands its path to every rank
in ``DS_EXT_RUN_SECRET_FILE`` (never the secret itself) and removes it when it exits; AsyncFlow's connections
authenticate with it (:mod:`ds_ext.secret`). Several nodes: set ``DS_EXT_RUN_SECRET_FILE`` on every node yourself.

Threads: ``OMP_NUM_THREADS`` (unless set) is this node's cores (its CPU affinity: a container's or cgroup's share,
not the machine's) divided by its local processes. It is set only where this process starts the workers itself
(local runs, ``--no_ssh``); through a hostfile the workers start on other nodes, where ``examples/train.py``
(``ds_ext.models.threads_per_process``) takes its own node's cores.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import List, Optional, Tuple

from ds_ext._deepspeed_launcher import forward_env_prefixes, hostfile_pool, parse_runner_args, run_runner
from ds_ext.secret import SECRET_FILE_ENV, make_secret_file, remove_secret_file

OWN_FLAGS = {"--config": "config", "--num_procs": "num_procs", "--max_restarts": "max_restarts",
             "--rdzv_timeout": "rdzv_timeout"}
CPU_DEFAULT_PROCS = 2
RDZV_CONNECT_TIMEOUT_S = 60  # torch's default read_timeout (``--rdzv_timeout`` changes it); named in the error


def _strip_own(tokens: List[str]) -> Tuple[dict, List[str]]:
    """Remove ``--config X`` / ``--config=X`` (and the other own flags) from ``tokens``."""
    own, rest, i = {}, [], 0
    while i < len(tokens):
        tok = tokens[i]
        name, eq, value = tok.partition("=")
        if name in OWN_FLAGS:
            if not eq:
                if i + 1 >= len(tokens):
                    raise SystemExit(f"ds-ext: {name} needs a value")
                value, i = tokens[i + 1], i + 1
            own[OWN_FLAGS[name]] = value
        else:
            rest.append(tok)
        i += 1
    return own, rest


def split_argv(argv: List[str]):
    """Split the command line into (own flags, DeepSpeed runner namespace, runner argv).

    Own flags are taken only before the user script, so the script may have a ``--config`` of its own.
    """
    _, tentative = _strip_own(argv)
    script = parse_runner_args(tentative).user_script
    cut = argv.index(script)
    own, prefix = _strip_own(argv[:cut])
    runner_argv = prefix + argv[cut:]
    return own, parse_runner_args(runner_argv), runner_argv


def configured_procs(parsed) -> Optional[Tuple[int, str]]:
    """``(trainer_ranks + rollout_workers, description)`` when the validated config ``parsed`` (what
    :func:`ds_ext.config.check_file` returned) sets ``ds_ext.asyncflow.rollout_workers``, else ``None``."""
    flow = parsed.asyncflow
    if flow.rollout_workers is None:
        return None
    return (flow.trainer_ranks + flow.rollout_workers,
            f"ds_ext.asyncflow.trainer_ranks {flow.trainer_ranks} + rollout_workers {flow.rollout_workers}")


def _apply_configured_procs(own: dict, ns, parsed) -> Optional[str]:
    """Fill ``own["num_procs"]`` from the config on a single-node launch; the problem (a message) on a mismatch."""
    found = configured_procs(parsed)
    if found is None or _is_multi_node(ns):
        return None
    procs, what = found
    if own.get("num_procs") is None:
        own["num_procs"] = str(procs)
        return None
    given = _own_int(own, "num_procs", procs, 1)
    if given != procs:
        return (f"--num_procs {given} does not match the config's {what} = {procs} processes; drop --num_procs "
                f"or change the config")
    return None


def _own_int(own: dict, key: str, default: int, least: int) -> int:
    """The own flag ``--key`` as an integer >= ``least`` (``default`` when not given); ValueError names it."""
    raw = own.get(key, default)
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < least:
        raise ValueError(f"--{key} takes an integer >= {least}, got {raw!r}")
    return value


def _local_world(ns, own: dict) -> Optional[int]:
    if own.get("num_procs") is not None:
        return int(own["num_procs"])
    if ns.num_gpus > 0:
        return ns.num_gpus
    import torch
    return None if torch.cuda.is_available() else CPU_DEFAULT_PROCS


def local_cores() -> int:
    """Cores this process may run on (its affinity mask: what a container, cgroup cpuset or ``taskset`` allows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _worker_env(nprocs: Optional[int]) -> None:
    """Environment the workers inherit. ``nprocs``: workers started on this node by this process (``None``: they
    start elsewhere, e.g. through a hostfile, and pick their own thread count there)."""
    # The interpreter's bin first on PATH and a JIT cache per environment: DeepSpeed's JIT ops rebuild (~55 s)
    # whenever the ninja that built the cached copy differs from the one on PATH.
    from ds_ext.distributed import venv_tools_first  # lazily: it imports DeepSpeed (ds-ext --help stays fast)
    venv_tools_first()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    if nprocs:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, local_cores() // nprocs)))
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


# What ``_worker_env`` sets, forwarded to the other nodes' workers. DeepSpeed's runner forwards only variables whose
# names start with one of its export prefixes (PYTHON*, UCX*, ...). Without TORCH_EXTENSIONS_DIR a remote rank
# built its JIT comm op in ~/.cache instead, and waited forever on a build lock that a killed run had left there.
RUNNER_EXPORTS = ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", SECRET_FILE_ENV)


def _check_nodes(ns) -> Optional[str]:
    """What is wrong with a ``--no_ssh`` multi-node launch (``None``: nothing)."""
    if ns.num_nodes <= 1:
        return None
    if not ns.master_addr:
        return (f"--no_ssh with --num_nodes {ns.num_nodes} needs --master_addr: an address of node 0 that every "
                "node can reach (node 0 hosts the rendezvous there)")
    if not 0 <= ns.node_rank < ns.num_nodes:
        return f"--node_rank {ns.node_rank} is outside 0..{ns.num_nodes - 1} (--num_nodes {ns.num_nodes})"
    return None


def _is_local_address(addr: str) -> bool:
    """Whether ``addr`` (a name or address) resolves to an address this machine can bind."""
    try:
        infos = socket.getaddrinfo(addr, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((sockaddr[0], 0))
                return True
            except OSError:
                continue
    return False


def _elastic_argv(ns, nprocs: int, max_restarts: int, user_argv: List[str],
                  rdzv_timeout: int = RDZV_CONNECT_TIMEOUT_S) -> List[str]:
    multi = ns.no_ssh and ns.num_nodes > 1
    nnodes = ns.num_nodes if multi else 1
    addr = ns.master_addr if multi else (ns.master_addr or "127.0.0.1")
    host = not multi or ns.node_rank == 0
    # c10d rendezvous: each restart round gets fresh stores and ports (the static one can race a new round).
    # is_host stated, not guessed from the hostname (which misses a second NIC's address; module docstring).
    argv = [f"--nnodes={nnodes}", f"--nproc_per_node={nprocs}", f"--max_restarts={max_restarts}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={addr}:{ns.master_port}", f"--rdzv_id=ds_ext_{ns.master_port}",
            f"--rdzv_conf=is_host={int(host)},read_timeout={rdzv_timeout}"]
    if multi and host:
        argv.append(f"--local_addr={addr}")
    if ns.module:
        argv.append("--module")
    if ns.no_python:
        argv.append("--no-python")
    return argv + [ns.user_script] + user_argv


def _run_elastic(ns, nprocs: int, max_restarts: int, user_argv: List[str], rdzv_timeout: int) -> int:
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError
    from torch.distributed.run import main as torchrun_main
    argv = _elastic_argv(ns, nprocs, max_restarts, user_argv, rdzv_timeout)
    endpoint = next(a for a in argv if a.startswith("--rdzv_endpoint=")).split("=", 1)[1]
    multi = ns.no_ssh and ns.num_nodes > 1
    if multi and ns.node_rank == 0 and not _is_local_address(ns.master_addr):
        print(f"ds-ext: warning: --master_addr {ns.master_addr} is not an address of this machine; node 0 hosts "
              f"the rendezvous here anyway, so the other nodes must reach this machine at {endpoint}",
              file=sys.stderr)
    # Each round's workers meet in a fresh store hosted by their rank 0 (torch's shared agent store outlives
    # rounds, and nodes disagree on the restart count after a membership change: ds_ext.distributed).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        torchrun_main(argv)
    except RendezvousConnectionError as exc:
        cause = exc.__cause__ or exc
        if multi and ns.node_rank > 0:
            print(f"ds-ext: node {ns.node_rank} could not reach the rendezvous store at {endpoint} within "
                  f"{rdzv_timeout} s: is node 0 started with the same --master_addr/--master_port, and "
                  f"is that address reachable from this node? ({cause})", file=sys.stderr)
        else:
            print(f"ds-ext: could not host the rendezvous store at {endpoint}: is the port free on this machine? "
                  f"({cause})", file=sys.stderr)
        return 1
    return 0


def _is_multi_node(ns) -> bool:
    pool = hostfile_pool(ns.hostfile)
    return len(pool) > 1 or ns.force_multi or ns.num_nodes > 1


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    own, ns, runner_argv = split_argv(argv)
    if "config" not in own:
        print("ds-ext: --config PATH is required (a DeepSpeed JSON, optionally with a \"ds_ext\" block)",
              file=sys.stderr)
        return 2
    from ds_ext.config import DsExtConfigError, check_file
    try:
        parsed = check_file(own["config"])
    except DsExtConfigError as exc:
        print(exc, file=sys.stderr)
        print("ds-ext: no worker was started", file=sys.stderr)
        return 2
    if any(a == "--deepspeed_config" or a.startswith("--deepspeed_config=") for a in ns.user_args):
        print("ds-ext: give the config once, as --config; the script receives --deepspeed_config", file=sys.stderr)
        return 2
    config = os.path.abspath(own["config"])
    user_argv = ns.user_args + ["--deepspeed_config", config]
    try:
        problem = _apply_configured_procs(own, ns, parsed)
        max_restarts = _own_int(own, "max_restarts", 0, 0)
        rdzv_timeout = _own_int(own, "rdzv_timeout", RDZV_CONNECT_TIMEOUT_S, 1)
    except ValueError as exc:
        print(f"ds-ext: {exc}", file=sys.stderr)
        return 2
    if problem:
        print(f"ds-ext: {problem}", file=sys.stderr)
        print("ds-ext: no worker was started", file=sys.stderr)
        return 2
    nprocs = _local_world(ns, own)
    runs_here = max_restarts > 0 or ns.no_ssh or not _is_multi_node(ns)
    _worker_env(nprocs if runs_here else None)
    secret = None
    if not _is_multi_node(ns) and not os.environ.get(SECRET_FILE_ENV):
        secret = make_secret_file()  # AsyncFlow's connections authenticate with it (ds_ext.secret)
        os.environ[SECRET_FILE_ENV] = secret
    try:
        return _launch(ns, nprocs, max_restarts, user_argv, rdzv_timeout, runner_argv)
    finally:
        if secret is not None:
            remove_secret_file(secret)


def _launch(ns, nprocs, max_restarts: int, user_argv: List[str], rdzv_timeout: int, runner_argv: List[str]) -> int:
    if max_restarts > 0:
        if _is_multi_node(ns) and not ns.no_ssh:
            print("ds-ext: --max_restarts across nodes runs one ds-ext per node: add --no_ssh --node_rank R "
                  "--num_nodes N --master_addr ADDR", file=sys.stderr)
            return 2
        problem = _check_nodes(ns) if ns.no_ssh else None
        if problem:
            print(f"ds-ext: {problem}", file=sys.stderr)
            return 2
        return _run_elastic(ns, nprocs or 1, max_restarts, user_argv, rdzv_timeout)
    if _is_multi_node(ns):
        forward_env_prefixes(list(RUNNER_EXPORTS))
    cut = runner_argv.index(ns.user_script)
    prefix = runner_argv[:cut]
    if nprocs and ns.num_gpus < 0 and not ns.include and not _is_multi_node(ns):
        prefix += ["--num_gpus", str(nprocs)]
    run_runner(prefix + [ns.user_script] + user_argv)
    return 0


def cli() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
