"""The `hetlora` command: simulate, coordinate, export."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .simulation.config import ARMS, PROFILES, SimulationConfig

_SIM_FLAGS = {
    "model": str,
    "num_clients": int,
    "clients_per_round": int,
    "rounds": int,
    "local_steps": int,
    "batch_size": int,
    "block_size": int,
    "learning_rate": float,
    "r_min": int,
    "r_max": int,
    "lora_alpha": float,
    "prune_lambda": float,
    "prune_gamma": float,
    "rank_policy": str,
    "top_layers": int,
    "min_examples": int,
    "max_examples_per_client": int,
    "engine": str,
    "reference": str,
}


def _add_simulate(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="run a federated HetLoRA experiment (all methods) in one process and write a report",
        description="Coordinator + clients in one process through a LocalStore. Rerun the same command to resume.",
    )
    p.add_argument("--profile", choices=list(PROFILES), default="cpu", help="preset sizes (quick: tiny model, CI)")
    p.add_argument("--config", type=Path, help="YAML/JSON file of settings (see SimulationConfig)")
    p.add_argument("--out", type=Path, help="run folder (default runs/<profile>)")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--dataset", help="'chitchat', a save_to_disk folder, or a JSON dict of load_dataset kwargs")
    p.add_argument("--client-column", dest="client_column")
    p.add_argument("--text-column", dest="text_column")
    p.add_argument("--target-modules", dest="target_modules", help="comma-separated module names")
    p.add_argument("--activation-cache", dest="activation_cache", action=argparse.BooleanOptionalAction)
    for name, kind in _SIM_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind)


def _simulate(args: argparse.Namespace) -> int:
    from .simulation.runner import run_simulation

    overrides = {name: getattr(args, name) for name in _SIM_FLAGS}
    if args.methods:
        overrides["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.seeds:
        overrides["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.target_modules:
        overrides["target_modules"] = [m.strip() for m in args.target_modules.split(",")]
    if args.dataset:
        overrides["dataset"] = json.loads(args.dataset) if args.dataset.strip().startswith("{") else args.dataset
    overrides["client_column"] = args.client_column
    overrides["activation_cache"] = args.activation_cache
    overrides["text_column"] = args.text_column
    config = SimulationConfig.from_sources(profile=args.profile, config_file=args.config, overrides=overrides)
    out = args.out or Path("runs") / args.profile
    report = run_simulation(config, out)
    print(report.read_text())
    print(f"Report: {report}")
    return 0


def _add_export(subparsers) -> None:
    p = subparsers.add_parser("export", help="convert a HetLoRA adapter folder into a plain PEFT LoRA adapter")
    p.add_argument(
        "adapter", type=Path, help="saved HetLoRA adapter folder (or a LocalStore folder: its latest global)"
    )
    p.add_argument("out", type=Path, help="output folder for the plain LoRA adapter")


def _export(args: argparse.Namespace) -> int:
    from .export import export_lora

    out = export_lora(args.adapter, args.out)
    print(f"Plain LoRA adapter written to {out} (loads with `PeftModel.from_pretrained`, no peft_hetlora needed).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `hetlora` argument parser."""
    from .federated.coordinate_cli import add_coordinate_parser

    parser = argparse.ArgumentParser(
        prog="hetlora", description="Federated fine-tuning with heterogeneous LoRA ranks."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_simulate(sub)
    add_coordinate_parser(sub)
    _add_export(sub)
    sub.add_parser("report", help="merge run folders into one multi-seed table", add_help=False).add_argument(
        "report_args", nargs=argparse.REMAINDER
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hetlora`.

    Example:
        ```py
        >>> main(["simulate", "--profile", "quick", "--out", "runs/quick"])  # doctest: +SKIP
        0
        ```
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "report":
            from .simulation.seed_stats import main_report

            return main_report(args.report_args)
        if args.command == "export":
            return _export(args)
        from .federated.coordinate_cli import run_coordinate

        return run_coordinate(args)
    except (ValueError, KeyError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"hetlora {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
