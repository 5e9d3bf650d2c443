"""``examples/train.py`` as it is, plus one file per rank at the end: ``--dump_dir D`` gets ``rank<R>.pt`` with the
rank's final weights, host name, torch threads and how many workers started on that host (one file per start in D).
``tests/test_multinode.py`` compares the weights across runs.

    ds-ext ... tests/multinode_worker.py --dump_dir D [--pace_from STEP:SECONDS] [examples/train.py flags]

``--pace_from S:T``: in the first worker started on a host, every forward from step S on sleeps T seconds. NoLoCo
lets a replica whose partner died train on alone (it skips the mix); paced, the survivor is still training when
torch elastic restarts the group for the relaunched partner, as in any run longer than this test's few steps.
Pacing changes no number.
"""
import faulthandler
import os
import signal
import socket
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import ds_ext  # noqa: E402
import train  # noqa: E402


def take(argv, flag):
    """(value of ``flag`` or None, argv without it)."""
    if flag not in argv:
        return None, argv
    i = argv.index(flag)
    return argv[i + 1], argv[:i] + argv[i + 2:]


def main(argv):
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack: what a hung run waits on
    dump_dir, argv = take(argv, "--dump_dir")
    pace, argv = take(argv, "--pace_from")
    os.makedirs(dump_dir, exist_ok=True)
    host = socket.gethostname()
    first_start = not any(f.startswith(f"start.{host}.") for f in os.listdir(dump_dir))
    open(os.path.join(dump_dir, f"start.{host}.{os.getpid()}"), "w").close()
    engines = []
    initialize = ds_ext.initialize

    def keep(*args, **kwargs):
        out = initialize(*args, **kwargs)
        engines.append(out[0])
        if pace and first_start:
            step, seconds = pace.split(":")
            out[0].module.register_forward_pre_hook(
                lambda m, a: time.sleep(float(seconds)) if out[0].global_steps >= int(step) - 1 else None)
        return out

    ds_ext.initialize = keep  # train.py calls ds_ext.initialize through the module: this sees its engine
    train.main(argv)
    engine = engines[-1]
    rank = torch.distributed.get_rank()
    starts = sum(f.startswith(f"start.{host}.") for f in os.listdir(dump_dir))
    out = {"rank": rank, "host": host, "starts": starts,
           "global_steps": engine.global_steps, "threads": torch.get_num_threads(),
           "weights": {n: p.detach().clone() for n, p in engine.module.named_parameters()}}
    torch.save(out, os.path.join(dump_dir, f"rank{rank}.pt.tmp"))
    os.replace(os.path.join(dump_dir, f"rank{rank}.pt.tmp"), os.path.join(dump_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1:])
