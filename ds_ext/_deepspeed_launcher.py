"""The one place ds_ext touches DeepSpeed's launcher (``deepspeed.launcher.runner``, what the ``deepspeed`` command
runs): its argument parser, its entry point, its hostfile reader and the list of environment-variable prefixes it
forwards to other nodes. ``ds-ext`` (:mod:`ds_ext.launch`) calls these functions only; the launcher module is
imported lazily, so ``ds-ext --help`` and the config check stay fast.

:data:`INTERNALS` lists each runner name used; ``tests/test_deepspeed_adapter.py`` checks that every one exists on
the installed DeepSpeed (an upgrade that moves one fails there, naming it) and that no other ``ds_ext`` module
imports ``deepspeed.launcher``.

Run as a module (``python -m ds_ext._deepspeed_launcher ARGS``) it is DeepSpeed's per-node launcher
(``deepspeed.launcher.launch``, same arguments) with one change: it polls its workers every :data:`POLL_S`
seconds instead of every second. DeepSpeed's loop sleeps 1 s after each poll, so every run outlived its workers
by 1-2 s (measured: a trivial 2-process ``ds-ext`` run took 6.3 s, of which 2.8 s after the workers' last line;
with the short poll 4.3 s and 0.9 s). :func:`run_runner` has the runner start this module where it would start
``deepspeed.launcher.launch`` for the local node (multi-node runners keep DeepSpeed's own command).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

RUNNER = "deepspeed.launcher.runner"
LAUNCH = "deepspeed.launcher.launch"
INTERNALS = [(RUNNER, "parse_args"), (RUNNER, "main"), (RUNNER, "fetch_hostfile"), (RUNNER, "EXPORT_ENVS"),
             (RUNNER, "subprocess"), (LAUNCH, "main"), (LAUNCH, "time"),
             (LAUNCH, "parse_args")]
MODULE = "ds_ext._deepspeed_launcher"  # run as a module: DeepSpeed's per-node launcher, short poll
POLL_S = 0.05  # the per-node launcher's poll of its workers (DeepSpeed's: 1 s)


def _runner():
    from deepspeed.launcher import runner
    return runner


def parse_runner_args(argv: Sequence[str]):
    """The ``deepspeed`` runner's namespace for ``argv`` (its flags, ``user_script``, ``user_args``)."""
    return _runner().parse_args(list(argv))


def run_runner(argv: Sequence[str]) -> None:
    """Run the ``deepspeed`` runner with ``argv`` (local processes, or pdsh/MPI/SLURM across the hostfile). The
    local node's launcher is this module (DeepSpeed's, polling every :data:`POLL_S` s): the runner's
    ``subprocess`` is swapped for the call, and only a command of the runner's local form
    ``[python, -u, -m, deepspeed.launcher.launch, ...]`` is rewritten."""
    runner = _runner()
    real = runner.subprocess

    def popen(cmd, *args, **kwargs):
        if isinstance(cmd, list) and cmd[1:4] == ["-u", "-m", LAUNCH]:
            cmd = cmd[:3] + [MODULE] + cmd[4:]
        return real.Popen(cmd, *args, **kwargs)

    runner.subprocess = _Overridden(real, Popen=popen)
    try:
        runner.main(list(argv))
    finally:
        runner.subprocess = real


class _Overridden:
    """A module as DeepSpeed's launcher code sees it: the names given replaced, everything else the real module's."""

    def __init__(self, real, **names):
        self._real = real
        self.__dict__.update(names)

    def __getattr__(self, name):
        return getattr(self._real, name)


def hostfile_pool(path: Optional[str]) -> Dict[str, int]:
    """``{host: slots}`` of a DeepSpeed hostfile (empty when there is none)."""
    return _runner().fetch_hostfile(path) or {}


def forward_env_prefixes(names: List[str]) -> None:
    """Make the runner forward variables whose names start with ``names`` to the other nodes' workers (it reads its
    prefix list when it builds the pdsh/mpirun/srun command)."""
    runner = _runner()
    runner.EXPORT_ENVS = list(runner.EXPORT_ENVS) + [v for v in names if v not in runner.EXPORT_ENVS]


def short_poll(time_module):
    """``time`` for DeepSpeed's launcher: ``sleep`` capped at :data:`POLL_S` (its loop's only sleep is the poll)."""
    return _Overridden(time_module, sleep=lambda seconds: time_module.sleep(min(seconds, POLL_S)))


def launch_main() -> None:
    """DeepSpeed's per-node launcher (its ``main``, reading ``sys.argv``) with the short poll; once its workers are
    gone (finished, failed or killed), the shared-memory buffers they left are removed (:func:`_remove_shm_buffers`)."""
    from deepspeed.launcher import launch
    launch.time = short_poll(launch.time)
    args = launch.parse_args()  # what main() reads from sys.argv: the run's master address and port
    before = set(_shm_buffers())
    try:
        launch.main()
    finally:
        _remove_shm_buffers(before, args.master_addr, int(args.master_port))


SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer_"  # DeepSpeed's CPU comm op: <prefix><uid>_<addr>_<port>_<rank>
SHM_PORTS = 8  # the run's ports: MASTER_PORT and the few above it that a run's own groups use (GRPO's trainers: +2)


def _shm_buffers() -> list:
    try:
        return [n for n in os.listdir(SHM_DIR) if n.startswith(f"{SHM_PREFIX}{os.getuid()}_")]
    except OSError:
        return []


def _remove_shm_buffers(before: set, addr: str, port: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce creates a ~69 MB ``/dev/shm`` file per rank and never unlinks it:
    remove those that appeared while this launcher ran, for its master address and ports ``MASTER_PORT ..
    MASTER_PORT + SHM_PORTS - 1`` (another run's buffers, on other ports, stay)."""
    ours = {f"{SHM_PREFIX}{os.getuid()}_{addr}_{p}_" for p in range(port, port + SHM_PORTS)}
    for name in set(_shm_buffers()) - before:
        if name[:name.rindex("_") + 1] in ours:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass


if __name__ == "__main__":
    launch_main()
