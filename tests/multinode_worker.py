"""``examples/train.py`` as it is, plus one file per rank at the end: ``--dump_dir D`` gets ``rank<R>.pt`` with the
rank's final weights, host name, launch round and torch threads (``tests/test_multinode.py`` compares weights across runs).

    ds-ext ... tests/multinode_worker.py --dump_dir D [examples/train.py flags]
"""
import os
import socket
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import ds_ext  # noqa: E402
import train  # noqa: E402


def main(argv):
    dump_dir = argv[argv.index("--dump_dir") + 1]
    rest = argv[:argv.index("--dump_dir")] + argv[argv.index("--dump_dir") + 2:]
    engines = []
    initialize = ds_ext.initialize

    def keep(*args, **kwargs):
        out = initialize(*args, **kwargs)
        engines.append(out[0])
        return out

    ds_ext.initialize = keep  # train.py calls ds_ext.initialize through the module: this sees its engine
    train.main(rest)
    engine = engines[-1]
    rank = torch.distributed.get_rank()
    out = {"rank": rank, "host": socket.gethostname(), "round": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
           "global_steps": engine.global_steps, "threads": torch.get_num_threads(),
           "weights": {n: p.detach().clone() for n, p in engine.module.named_parameters()}}
    os.makedirs(dump_dir, exist_ok=True)
    torch.save(out, os.path.join(dump_dir, f"rank{rank}.pt.tmp"))
    os.replace(os.path.join(dump_dir, f"rank{rank}.pt.tmp"), os.path.join(dump_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1:])
