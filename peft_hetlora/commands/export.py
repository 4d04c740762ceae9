"""`hetlora export`: a HetLoRA adapter (or a store's latest global) -> a plain PEFT LoRA adapter.

Example:
    ```sh
    hetlora export runs/fed adapter-lora/
    ```
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any, help: str) -> argparse.ArgumentParser:
    """Register `export` on an argparse subparsers object."""
    p = subparsers.add_parser("export", help=help, description=help)
    p.add_argument(
        "adapter", type=Path, help="saved HetLoRA adapter folder (or a LocalStore folder: its latest global)"
    )
    p.add_argument("out", type=Path, help="output folder for the plain LoRA adapter")
    return p


def run(args: argparse.Namespace) -> int:
    """Export the adapter named by parsed `export` arguments."""
    from ..export import export_lora

    out = export_lora(args.adapter, args.out)
    print(
        f"Plain LoRA adapter written to {out} (loads with `PeftModel.from_pretrained` or "
        "`AutoPeftModelForCausalLM.from_pretrained`, no peft_hetlora needed)."
    )
    return 0
