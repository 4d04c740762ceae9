"""The `hetlora` command: init, coordinate, simulate, export.

Each subcommand lives in `peft_hetlora.commands.<name>` (the bench's `simulate` and `report` in
`hetlora_bench.commands.<name>`, see `bench_command_module`) and is imported only when it runs, so
`hetlora --help` imports neither torch, transformers nor PEFT. Errors the project raises on purpose
(`HetLoRAError`), bad input, an unreachable Hub and a full disk print one line `hetlora: error: ...` and
exit with the status of their kind (`EXIT_STATUS`, shown by `hetlora --help`); `--debug` (or
`HETLORA_DEBUG=1`) shows the traceback instead. Logging is configured here, once, for every subcommand
(`-v`, `-vv`, `--log-level`, accepted before or after the subcommand's name).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

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
# the bench's subcommands (module in hetlora_bench.commands), imported only when they run: see bench_command_module
BENCH_COMMANDS: dict[str, str] = {"simulate": "simulate", "report": "report"}
BENCH_INSTALL = "pip install 'peft-hetlora[bench]'"
# third-party packages only the bench needs (setup.py's `bench` extra): missing one means the bench is not installed
BENCH_DEPENDENCIES = ("matplotlib", "datasets", "yaml")
_HANDLED = (ValueError, LookupError, RuntimeError, OSError, ImportError)

# One exit status per kind of error (argparse itself exits 2 on a bad command line); `exit_status` maps errors.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_STATUS: dict[int, str] = {
    EXIT_OK: "done",
    EXIT_FAILURE: "the command could not finish: the Hub unreachable, a full disk, a broken store, a missing "
                  "package; fix that and rerun the same command (it resumes)",
    EXIT_USAGE: "bad command line, settings or input: unknown options, values out of range, settings that "
                "contradict the federation's, a missing input folder; change the command",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); the store keeps every decision, rerun to resume",
}
# class names of the network errors of httpx / httpcore (and their forks), requests, urllib3 and huggingface_hub
_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
                   "NetworkError", "TransportError", "RemoteProtocolError", "ProxyError", "ConnectionError", "Timeout",
                   "NewConnectionError", "MaxRetryError", "NameResolutionError", "OfflineModeIsEnabled"}
_NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# per-client INFO lines drown the progress bars and the report: quiet by default, but one line per round from
# the coordinator is progress, not noise
_PROGRESS_LOGGERS = ("peft_hetlora.federated.coordinator",)
_THIRD_PARTY_LOGGERS = ("httpx", "urllib3", "filelock", "datasets", "transformers", "peft")


def _chosen_command(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if arg in COMMANDS), None)


def _command_module(name: str):
    if name in BENCH_COMMANDS:
        return bench_command_module(name)
    return importlib.import_module(f"peft_hetlora.commands.{COMMANDS[name][0]}")


def bench_command_module(name: str, package: str = "hetlora_bench") -> Any:
    """The module of a bench subcommand (`simulate`, `report`), or an ImportError saying how to install the bench.

    The bench (`hetlora_bench`) ships in the same wheel as the library, its third-party packages behind the `bench`
    extra: the CLI knows its two command names only to import them lazily here (nothing in `peft_hetlora` imports
    it otherwise), and says how to install the bench when the package or one of its packages is missing.

    Example:
        ```py
        >>> try:
        ...     bench_command_module("simulate", package="no_such_bench")
        ... except ImportError as err:
        ...     print(err)
        `hetlora simulate` is part of the bench: pip install 'peft-hetlora[bench]' (no module named 'no_such_bench')
        ```
    """
    missing = next((dep for dep in (package, *BENCH_DEPENDENCIES) if importlib.util.find_spec(dep) is None), None)
    if missing is not None:
        raise ImportError(f"`hetlora {name}` is part of the bench: {BENCH_INSTALL} (no module named {missing!r})")
    return importlib.import_module(f"{package}.commands.{BENCH_COMMANDS[name]}")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `hetlora` parser; only the subcommand named in `argv` gets its full options (and imports).

    Example:
        ```py
        >>> build_parser(["export", "a", "b"]).parse_args(["export", "a", "b"]).command
        'export'
        ```
    """
    parser = argparse.ArgumentParser(
        prog="hetlora", description="Federated fine-tuning with heterogeneous LoRA ranks (arXiv 2401.06432).",
        epilog=exit_status_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen_command(sys.argv[1:] if argv is None else argv)
    for name, (_, builder, _, summary) in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=summary, add_help=False)
            continue
        build = getattr(_command_module(name), builder)
        command = build(sub) if builder == "add_coordinate_parser" else build(sub, help=summary)
        add_common_arguments(command, top_level=False)
        if command.epilog is None:
            command.epilog, command.formatter_class = exit_status_epilog(), argparse.RawDescriptionHelpFormatter
    return parser


def add_common_arguments(parser: argparse.ArgumentParser, *, top_level: bool = True) -> None:
    """Add `-v`, `--log-level` and `--debug` (on a subcommand's parser too, so they work after its name).

    A subcommand's copies default to "not given", so `hetlora -v init ...` and `hetlora init -v ...` agree.

    Example:
        ```py
        >>> parser = argparse.ArgumentParser()
        >>> add_common_arguments(parser)
        >>> parser.parse_args(["-vv", "--log-level", "debug"]).log_level
        'DEBUG'
        ```
    """
    unset = {} if top_level else {"default": argparse.SUPPRESS}
    group = parser.add_argument_group("logging and errors (any subcommand)")
    group.add_argument("-v", "--verbose", action="count", **({"default": 0} if top_level else unset),
                       help="more logging: -v per-client progress (INFO), -vv debug (default: warnings, and one line "
                       "per round from the coordinator)")
    group.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                       **({"default": None} if top_level else unset),
                       help="the logging level of every logger (replaces -v)")
    group.add_argument("--debug", action="store_true", **({"default": False} if top_level else unset),
                       help="show tracebacks of errors (also HETLORA_DEBUG=1)")


def exit_status_epilog() -> str:
    """The exit-status table for `--help` (from `EXIT_STATUS`, the one place it is defined).

    Example:
        ```py
        >>> exit_status_epilog().splitlines()[0]
        'exit status:'
        ```
    """
    return "exit status:\n" + "\n".join(f"  {code:<4}{meaning}" for code, meaning in EXIT_STATUS.items())


def configure_logging(args: argparse.Namespace) -> int:
    """Configure logging once, from `--log-level` / `-v` (any subcommand); returns the level set.

    Example:
        ```py
        >>> configure_logging(argparse.Namespace(verbose=0, log_level="ERROR")) == logging.ERROR
        True
        ```
    """
    explicit = getattr(args, "log_level", None)
    verbose = getattr(args, "verbose", 0) or 0
    level = getattr(logging, explicit) if explicit else {0: logging.WARNING, 1: logging.INFO}.get(verbose,
                                                                                                  logging.DEBUG)
    root = logging.getLogger()
    if not root.handlers:  # a host that installed its own handlers (pytest, an embedding app) keeps them
        logging.basicConfig(format=_LOG_FORMAT)
    root.setLevel(level)
    for name in _PROGRESS_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if not explicit and level > logging.INFO else logging.NOTSET)
    for name in _THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    return level


def network_error(err: BaseException) -> BaseException | None:
    """The network failure (no connection, a timeout, offline mode) behind `err`, if there is one.

    Follows `__cause__` / `__context__`, and recognises httpx, httpcore, requests, urllib3 and
    huggingface_hub errors by class name, so none of them is imported here.

    Example:
        ```py
        >>> network_error(RuntimeError("x")) is None, type(network_error(ConnectionRefusedError(111, "no")))
        (True, <class 'ConnectionRefusedError'>)
        ```
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)):
            return current
        for cls in type(current).__mro__:
            if cls.__name__ in _NETWORK_ERRORS and cls.__module__.split(".")[0].rstrip("0123456789") in \
                    _NETWORK_MODULES:
                return current
        current = current.__cause__ or current.__context__
    return None


def _hub_endpoint(args: argparse.Namespace | None) -> str:
    endpoint = getattr(args, "hub_endpoint", None) or os.environ.get("HF_ENDPOINT")
    if endpoint is None and "huggingface_hub.constants" in sys.modules:
        endpoint = sys.modules["huggingface_hub.constants"].ENDPOINT
    return endpoint or "https://huggingface.co"


def network_error_line(err: BaseException, args: argparse.Namespace | None = None) -> str:
    """One line for a network failure: what was unreachable, for which store, and what to do.

    Example:
        ```py
        >>> line = network_error_line(ConnectionRefusedError(111, "Connection refused"),
        ...                           argparse.Namespace(store="hf://org/fed", hub_endpoint="http://127.0.0.1:9"))
        >>> print(line.replace(": ", ":\\n"))
        cannot reach the Hub at http://127.0.0.1:9 for store hf://org/fed ([Errno 111] Connection refused):
        check the network (or HF_ENDPOINT / --hub-endpoint) and rerun the same command (it resumes).
        ```
    """
    cause = network_error(err) or err
    store = getattr(args, "store", None)
    where = f" for store {store}" if store else ""
    reason = " ".join(str(cause).split()) or type(cause).__name__
    if type(cause).__name__ == "OfflineModeIsEnabled":
        return (f"the Hub is needed{where} but offline mode is on (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE, "
                "or use a folder store.")
    return (f"cannot reach the Hub at {_hub_endpoint(args)}{where} ({reason}): check the network (or HF_ENDPOINT / "
            "--hub-endpoint) and rerun the same command (it resumes).")


def exit_status(err: BaseException) -> int:
    """The exit status of `err`'s kind (`EXIT_STATUS`).

    Example:
        ```py
        >>> exit_status(ValueError("bad")), exit_status(OSError(28, "full")), exit_status(KeyboardInterrupt())
        (2, 1, 130)
        ```
    """
    from .utils.errors import FederationMismatch, StoreError

    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if network_error(err) is not None or isinstance(err, (StoreError, ImportError)):
        return EXIT_FAILURE
    if isinstance(err, (ValueError, LookupError, FederationMismatch, FileNotFoundError, NotADirectoryError,
                        IsADirectoryError)):
        return EXIT_USAGE
    return EXIT_FAILURE


def handles(err: BaseException) -> bool:
    """Whether `err` becomes one line (a project error, bad input, storage, network) rather than a traceback."""
    from .utils.errors import HetLoRAError

    return isinstance(err, (HetLoRAError, *_HANDLED)) or network_error(err) is not None


def report_error(err: BaseException, command: str, args: argparse.Namespace | None = None) -> int:
    """Print `hetlora: error: <command>: <one line>` on stderr and return the exit status of `err`'s kind."""
    line = network_error_line(err, args) if network_error(err) is not None else error_line(err)
    print(f"hetlora: error: {command}: {line}", file=sys.stderr)
    return exit_status(err)


def error_line(err: BaseException) -> str:
    """`err` as one line for `hetlora: error: ...` (a full disk says what to do; a project error, such as
    `StoreFullError`, keeps its own sentence naming the folder and the fix).

    Example:
        ```py
        >>> error_line(OSError(28, "No space left on device", "fed/rounds/3"))
        'no space left on device while writing fed/rounds/3: free some space and rerun the same command (it resumes).'
        ```
    """
    from .utils.errors import HetLoRAError

    if isinstance(err, OSError) and err.errno == errno.ENOSPC and not isinstance(err, HetLoRAError):
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
    try:
        parser = build_parser(argv)
    except ImportError as err:  # `simulate` / `report` without the bench's packages: say how to install them
        return report_error(err, _chosen_command(argv) or "hetlora")
    args = parser.parse_args(argv)
    return run_command(args.command, getattr(_command_module(args.command), COMMANDS[args.command][2]), args)


def run_command(command: str, runner: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Configure logging, run `runner(args)` and turn a handled error into one line and its exit status.

    Example:
        ```py
        >>> def fails(args):
        ...     raise ValueError("--rounds must be >= 1")
        >>> run_command("coordinate", fails, argparse.Namespace(verbose=0, log_level=None, debug=False))
        2
        ```
    """
    configure_logging(args)
    try:
        return int(runner(args))
    except KeyboardInterrupt:
        print(f"hetlora {command}: interrupted; the store keeps every decision, run the same command to resume.",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug_requested(args) or not handles(err):
            raise
        return report_error(err, command, args)


if __name__ == "__main__":
    sys.exit(main())
