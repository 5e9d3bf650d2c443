"""The one place ds_ext touches DeepSpeed's launcher (``deepspeed.launcher.runner``, what the ``deepspeed`` command
runs): its argument parser, its entry point, its hostfile reader and the list of environment-variable prefixes it
forwards to other nodes. ``ds-ext`` (:mod:`ds_ext.launch`) calls these functions only; the launcher module is
imported lazily, so ``ds-ext --help`` and the config check stay fast.

:data:`INTERNALS` lists each runner name used; ``tests/test_deepspeed_adapter.py`` checks that every one exists on
the installed DeepSpeed (an upgrade that moves one fails there, naming it) and that no other ``ds_ext`` module
imports ``deepspeed.launcher``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

RUNNER = "deepspeed.launcher.runner"
INTERNALS = [(RUNNER, "parse_args"), (RUNNER, "main"), (RUNNER, "fetch_hostfile"), (RUNNER, "EXPORT_ENVS")]


def _runner():
    from deepspeed.launcher import runner
    return runner


def parse_runner_args(argv: Sequence[str]):
    """The ``deepspeed`` runner's namespace for ``argv`` (its flags, ``user_script``, ``user_args``)."""
    return _runner().parse_args(list(argv))


def run_runner(argv: Sequence[str]) -> None:
    """Run the ``deepspeed`` runner with ``argv`` (local processes, or pdsh/MPI/SLURM across the hostfile)."""
    _runner().main(list(argv))


def hostfile_pool(path: Optional[str]) -> Dict[str, int]:
    """``{host: slots}`` of a DeepSpeed hostfile (empty when there is none)."""
    return _runner().fetch_hostfile(path) or {}


def forward_env_prefixes(names: List[str]) -> None:
    """Make the runner forward variables whose names start with ``names`` to the other nodes' workers (it reads its
    prefix list when it builds the pdsh/mpirun/srun command)."""
    runner = _runner()
    runner.EXPORT_ENVS = list(runner.EXPORT_ENVS) + [v for v in names if v not in runner.EXPORT_ENVS]
