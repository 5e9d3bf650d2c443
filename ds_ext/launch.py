"""``ds-ext``: DeepSpeed's launcher plus ``--config PATH``, ``--num_procs N`` and ``--max_restarts K``.

    ds-ext [deepspeed runner flags] --config cfg.json [--num_procs N] [--max_restarts K] script.py [script args]

1. The config is validated before anything starts: a bad file prints every problem (JSON path, value, what is
   allowed) and exits 2 with no worker started.
2. ``--deepspeed_config <abs path>`` is appended to the script's arguments.
3. Then, by what was asked:
   * ``--max_restarts K`` (K > 0): torch.distributed.elastic (``torch.distributed.run``) starts the local workers
     and restarts the whole local group up to K times when one fails; per node with ``--no_ssh --node_rank``.
   * otherwise DeepSpeed's own runner (``deepspeed.launcher.runner.main``): local processes, or multi-node through
     a hostfile and ``--launcher pdsh|openmpi|mpich|slurm|...``.
   On a machine without GPUs the local default is 2 processes (``--num_gpus``/``--num_procs``).
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Tuple

OWN_FLAGS = {"--config": "config", "--num_procs": "num_procs", "--max_restarts": "max_restarts"}
CPU_DEFAULT_PROCS = 2


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
    from deepspeed.launcher import runner

    _, tentative = _strip_own(argv)
    script = runner.parse_args(tentative).user_script
    cut = argv.index(script)
    own, prefix = _strip_own(argv[:cut])
    runner_argv = prefix + argv[cut:]
    return own, runner.parse_args(runner_argv), runner_argv


def _local_world(ns, own: dict) -> Optional[int]:
    if own.get("num_procs") is not None:
        return int(own["num_procs"])
    if ns.num_gpus > 0:
        return ns.num_gpus
    import torch
    return None if torch.cuda.is_available() else CPU_DEFAULT_PROCS


def _worker_env(nprocs: Optional[int]) -> None:
    # The interpreter's bin first on PATH and a JIT cache per environment: DeepSpeed's JIT ops rebuild (~55 s)
    # whenever the ninja that built the cached copy differs from the one on PATH.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    if nprocs:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs)))
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _elastic_argv(ns, nprocs: int, max_restarts: int, user_argv: List[str]) -> List[str]:
    nnodes = max(ns.num_nodes, 1) if ns.no_ssh else 1
    # c10d rendezvous: each restart round gets fresh stores and ports (the static one can race a new round).
    argv = [f"--nnodes={nnodes}", f"--nproc_per_node={nprocs}", f"--max_restarts={max_restarts}",
            "--rdzv_backend=c10d", f"--rdzv_endpoint={ns.master_addr or '127.0.0.1'}:{ns.master_port}",
            f"--rdzv_id=ds_ext_{ns.master_port}"]
    if ns.module:
        argv.append("--module")
    if ns.no_python:
        argv.append("--no-python")
    return argv + [ns.user_script] + user_argv


def _is_multi_node(ns) -> bool:
    from deepspeed.launcher.runner import fetch_hostfile
    pool = fetch_hostfile(ns.hostfile) or {}
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
        check_file(own["config"])
    except DsExtConfigError as exc:
        print(exc, file=sys.stderr)
        print("ds-ext: no worker was started", file=sys.stderr)
        return 2
    if any(a == "--deepspeed_config" or a.startswith("--deepspeed_config=") for a in ns.user_args):
        print("ds-ext: give the config once, as --config; the script receives --deepspeed_config", file=sys.stderr)
        return 2
    config = os.path.abspath(own["config"])
    user_argv = ns.user_args + ["--deepspeed_config", config]
    nprocs = _local_world(ns, own)
    max_restarts = int(own.get("max_restarts", 0))
    _worker_env(nprocs)
    if max_restarts > 0:
        if _is_multi_node(ns) and not ns.no_ssh:
            print("ds-ext: --max_restarts across nodes runs one ds-ext per node: add --no_ssh --node_rank R "
                  "--num_nodes N --master_addr ADDR", file=sys.stderr)
            return 2
        from torch.distributed.run import main as torchrun_main
        torchrun_main(_elastic_argv(ns, nprocs or 1, max_restarts, user_argv))
        return 0
    from deepspeed.launcher import runner
    cut = runner_argv.index(ns.user_script)
    prefix = runner_argv[:cut]
    if nprocs and ns.num_gpus < 0 and not ns.include and not _is_multi_node(ns):
        prefix += ["--num_gpus", str(nprocs)]
    runner.main(prefix + [ns.user_script] + user_argv)
    return 0


def cli() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
