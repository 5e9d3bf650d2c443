"""``python -m ds_ext.config check FILE [FILE ...]``: validate DeepSpeed JSON files with a ``"ds_ext"`` block.
``python -m ds_ext.config docs``: print the config reference (``docs/config.md``) generated from the models.

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
    sub.add_parser("docs", help="print the config reference page (docs/config.md) generated from the models")
    args = parser.parse_args(argv)
    if args.cmd == "docs":
        from ds_ext.config.reference import render
        sys.stdout.write(render())
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
