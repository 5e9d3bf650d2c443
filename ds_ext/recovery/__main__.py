"""``python -m ds_ext.recovery export JOURNAL_DIR OUT [--tag TAG] [--step N]``: a standard DeepSpeed checkpoint of the newest
step all ranks' journals reach (see :mod:`ds_ext.tools.export`; a pipeline journal gives a pipeline checkpoint). ``python -m ds_ext.recovery export JOURNAL_DIR
--hf DIR [--replica R] [--tokenizer DIR]``: an HF model directory of replica R (:mod:`ds_ext.tools.export_hf`).
``python -m ds_ext.recovery inspect JOURNAL_DIR``: each rank's bases, records, newest reachable step and any
damage.

Feature payloads in the journal are replayed or passed over as each built-in feature declares
(:func:`ds_ext.features.feature_types`, :class:`ds_ext.contract.ExportRule`)."""
import argparse
import os
import sys

from ds_ext.features import feature_types
from ds_ext.recovery import journal
from ds_ext.tools.export import export, journal_ranks
from ds_ext.tools.export_hf import export_hf


def inspect(journal_dir: str) -> None:
    for rank_dir in journal_ranks(journal_dir):
        s = journal.scan(rank_dir)
        steps = sorted(s.records)
        span = f"{steps[0]}..{steps[-1]}" if steps else "none"
        print(f"{os.path.basename(rank_dir)}: bases {s.bases}, records {span}, newest reachable {s.newest_reachable()}")
        for damage in s.damage:
            print(f"  damaged: {damage}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ds_ext.recovery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a DeepSpeed checkpoint of the newest reachable step")
    e.add_argument("journal_dir")
    e.add_argument("out", nargs="?", default=None, help="DeepSpeed checkpoint directory")
    e.add_argument("--tag", default=None, help="checkpoint tag (default global_step<N>)")
    e.add_argument("--step", type=int, default=None,
                   help="the step to export (default: the newest every rank's journal reaches)")
    e.add_argument("--hf", default=None, metavar="DIR", help="write an HF model directory (save_pretrained format)")
    e.add_argument("--replica", type=int, default=0,
                   help="with --hf or a pipeline journal: the NoLoCo/DiLoCo replica to export")
    e.add_argument("--tokenizer", default=None, help="with --hf: tokenizer directory (default: the run's)")
    i = sub.add_parser("inspect", help="what each rank's journal can reconstruct")
    i.add_argument("journal_dir")
    args = p.parse_args(argv)
    if args.command == "inspect":
        inspect(args.journal_dir)
        return 0
    if args.out is None and args.hf is None:
        p.error("export needs OUT (a DeepSpeed checkpoint) or --hf DIR")
    try:
        if args.hf is not None:  # with OUT too: a pipeline journal is replayed once for both
            step = export_hf(args.journal_dir, args.hf, args.replica, args.tokenizer, args.step, feature_types(),
                             also_checkpoint=args.out, tag=args.tag)
            print(f"wrote HF model {args.hf} (replica {args.replica}, step {step})")
            if args.out is not None:
                print(f"wrote DeepSpeed checkpoint {os.path.join(args.out, args.tag or f'global_step{step}')}")
        else:
            tag = export(args.journal_dir, args.out, args.tag, args.step, feature_types(), args.replica)
            print(f"wrote DeepSpeed checkpoint {os.path.join(args.out, tag)}")
    except SystemExit as refused:  # the exporter's refusals (a message): bad input, exit 2 as every ds_ext CLI
        if not isinstance(refused.code, str):
            raise
        print(refused.code, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
