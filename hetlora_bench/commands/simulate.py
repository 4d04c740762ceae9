"""`hetlora simulate`: a whole federated experiment (every method) in one process, with a report.

Example:
    ```sh
    hetlora simulate --profile quick --out runs/quick
    ```
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..arms import ARMS, PROFILES, SimulationConfig

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
    "dp_clip": float,
    "attack_fraction": float,
    "attack_scale": float,
}


def add_parser(subparsers: Any, help: str) -> argparse.ArgumentParser:
    """Register `simulate` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "simulate",
        help=help,
        description="Coordinator + clients in one process through a LocalStore. Rerun the same command to resume.",
    )
    p.add_argument("--profile", choices=list(PROFILES), default="cpu", help="preset sizes (quick: tiny model, CI)")
    p.add_argument("--config", type=Path, help="YAML/JSON file of settings (see SimulationConfig)")
    p.add_argument("--out", type=Path, help="run folder (default runs/<profile>)")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument(
        "--dataset",
        help="'chitchat' (default), 'pycode' (Python source by installed package), a save_to_disk folder, "
        "or a JSON dict of load_dataset kwargs",
    )
    p.add_argument("--client-column", dest="client_column")
    p.add_argument("--text-column", dest="text_column")
    p.add_argument("--target-modules", dest="target_modules", help="comma-separated module names")
    p.add_argument(
        "--activation-cache", dest="activation_cache", action=argparse.BooleanOptionalAction,
        help="reuse the frozen lower layers' activations across arms and rounds (exact; on where it applies)",
    )
    p.add_argument(
        "--fixed-validation", dest="fixed_validation", action=argparse.BooleanOptionalAction,
        help="score every round on the fixed federation validation set (default on; early stopping reads it)",
    )
    p.add_argument("--quantize", choices=["8bit", "4bit", "torchao-int8"], help="load the base model quantised")
    p.add_argument(
        "--message-format", dest="message_format",
        help="client upload encoding: fp32 (default), bf16, fp16 or int8-block64; bytes are counted as sent",
    )
    p.add_argument("--attack", choices=["scale", "sign_flip", "unbalanced"], help="poisoned arms: the attack")
    for name, kind in _SIM_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind)
    return p


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the simulation described by parsed `simulate` arguments; print the report."""
    from ..runner import run_simulation

    overrides: dict[str, Any] = {name: getattr(args, name) for name in _SIM_FLAGS}
    if args.methods:
        overrides["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.seeds:
        overrides["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.target_modules:
        overrides["target_modules"] = [m.strip() for m in args.target_modules.split(",")]
    if args.dataset:
        overrides["dataset"] = json.loads(args.dataset) if args.dataset.strip().startswith("{") else args.dataset
    overrides["client_column"] = args.client_column
    overrides["text_column"] = args.text_column
    overrides["activation_cache"] = args.activation_cache
    overrides["fixed_validation"] = args.fixed_validation
    overrides["quantize"] = args.quantize
    overrides["message_format"] = args.message_format
    overrides["attack"] = args.attack
    config = SimulationConfig.from_sources(profile=args.profile, config_file=args.config, overrides=overrides)
    out = args.out or Path("runs") / args.profile
    report = run_simulation(config, out)
    print(report.read_text())
    print(f"Report: {report}")
    return 0
