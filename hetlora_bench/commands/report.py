"""`hetlora report DIR...`: merge `hetlora simulate` run folders (several seeds or corpora) into one table.

Example:
    ```sh
    hetlora report runs/chitchat runs/pycode --out runs/all --reference homlora_rmax
    ```
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any, help: str) -> argparse.ArgumentParser:
    """Register `report` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "report", help=help, description="Pools the seeds of each corpus and writes report.md, report.json and a PNG."
    )
    p.add_argument("folders", nargs="+", type=Path, help="run folders written by `hetlora simulate`")
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="where to write the merged report")
    p.add_argument("--reference", help="method every other method is paired with (default homlora_rmax)")
    return p


def run(args: argparse.Namespace) -> int:
    """Merge the run folders named in the parsed arguments."""
    from ..seed_stats import main_report

    argv = [str(folder) for folder in args.folders] + ["--out", str(args.out)]
    if args.reference:
        argv += ["--reference", args.reference]
    return int(main_report(argv))
