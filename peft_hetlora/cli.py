"""The `hetlora` command: init, coordinate, simulate, export.

Each subcommand lives in `peft_hetlora.commands.<name>` and is imported only when it runs, so
`hetlora --help` imports neither torch, transformers nor PEFT. Errors the project raises on purpose
(`HetLoRAError`), bad input and a full disk print one line `hetlora: error: ...` and exit non-zero;
`--debug` (or `HETLORA_DEBUG=1`) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# name -> (module in peft_hetlora.commands, parser builder, runner, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "init": ("init", "add_parser", "run", "create a federation: a store with global 0 from a base model"),
    "coordinate": (
        "coordinate",
        "add_coordinate_parser",
        "run_coordinate",
        "run or resume a federation's coordinator (publish, collect, validate, aggregate)",
    ),
    "simulate": ("simulate", "add_parser", "run", "run a federated experiment (all methods) in one process"),
    "export": ("export", "add_parser", "run", "convert a HetLoRA adapter into a plain PEFT LoRA adapter"),
    "report": ("report", "add_parser", "run", "merge simulate run folders (seeds, corpora) into one table"),
}
_HANDLED = (ValueError, LookupError, RuntimeError, OSError, ImportError)


def _chosen_command(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if arg in COMMANDS), None)


def _command_module(name: str):
    return importlib.import_module(f"peft_hetlora.commands.{COMMANDS[name][0]}")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `hetlora` parser; only the subcommand named in `argv` gets its full options (and imports).

    Example:
        ```py
        >>> build_parser(["export", "a", "b"]).parse_args(["export", "a", "b"]).command
        'export'
        ```
    """
    parser = argparse.ArgumentParser(
        prog="hetlora", description="Federated fine-tuning with heterogeneous LoRA ranks (arXiv 2401.06432)."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="more logging: -v per-client progress (INFO), -vv debug (default: warnings only)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors (also HETLORA_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen_command(sys.argv[1:] if argv is None else argv)
    for name, (_, builder, _, summary) in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=summary, add_help=False)
            continue
        build = getattr(_command_module(name), builder)
        build(sub) if builder == "add_coordinate_parser" else build(sub, help=summary)
    return parser


def error_line(err: BaseException) -> str:
    """`err` as one line for `hetlora: error: ...` (a full disk says what to do).

    Example:
        ```py
        >>> error_line(OSError(28, "No space left on device", "fed/rounds/3"))
        'no space left on device while writing fed/rounds/3: free some space and rerun the same command (it resumes).'
        ```
    """
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" while writing {err.filename}" if err.filename else ""
        return f"no space left on device{where}: free some space and rerun the same command (it resumes)."
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    return " ".join(str(message).split()) or type(err).__name__


def debug_requested(args: argparse.Namespace | None = None) -> bool:
    """Whether tracebacks were asked for (`--debug` or `HETLORA_DEBUG=1`)."""
    return bool(getattr(args, "debug", False)) or os.environ.get("HETLORA_DEBUG", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hetlora`.

    Example:
        ```py
        >>> main(["simulate", "--profile", "quick", "--out", "runs/quick"])  # doctest: +SKIP
        0
        ```
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    # quiet by default: per-client INFO lines drown the progress bars and the report
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if level > logging.INFO:  # one line per round from the coordinator is progress, not noise
        logging.getLogger("peft_hetlora.federated.coordinator").setLevel(logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(getattr(_command_module(args.command), COMMANDS[args.command][2])(args))
    except Exception as err:
        from .federated.errors import HetLoRAError

        if debug_requested(args) or not isinstance(err, (HetLoRAError, *_HANDLED)):
            raise
        print(f"hetlora: error: {args.command}: {error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
