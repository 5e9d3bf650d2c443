"""``python -m ds_ext.config check FILE [FILE ...]``: validate DeepSpeed JSON files with a ``"ds_ext"`` block.
``python -m ds_ext.config docs [--out docs/config.md]``: write the config reference generated from the models.

Prints ``FILE: ok`` per valid file; for a bad one prints every problem (JSON path, value, what is allowed) to stderr
and exits 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ds_ext.config import DsExtConfigError, check_file


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_ext.config", description="Validate ds_ext configs.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="validate DeepSpeed JSON files with a ds_ext block; exit 2 on error")
    check.add_argument("files", nargs="+")
    docs = sub.add_parser("docs", help="write the config reference page generated from the models")
    docs.add_argument("--out", default="docs/config.md", help="the page to write")
    args = parser.parse_args(argv)
    if args.cmd == "docs":
        from ds_ext.config.reference import render
        with open(args.out, "w", encoding="utf-8") as f:  # a file, not stdout: DeepSpeed logs to stdout on import
            f.write(render())
        print(f"{args.out}: written")
        return 0
    status = 0
    for path in args.files:
        try:
            check_file(path)
            print(f"{path}: ok")
        except DsExtConfigError as exc:
            print(exc, file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    raise SystemExit(main())
