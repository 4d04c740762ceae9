"""`hetlora export`: a HetLoRA adapter (or a store's latest global) -> a plain PEFT LoRA adapter.

The export records the base model it was trained against (`base_model_name_or_path`), so
`AutoPeftModelForCausalLM.from_pretrained(out)` finds it by itself: by default the adapter's own record,
with a local folder written as its absolute path and the built-in `smollm2-135m` as its converted local
folder (`resolve_model`), so the export loads offline without asking the Hub.
`--base-model-name-or-path` records another (a Hub id or a folder holding the same weights).

Example:
    ```sh
    hetlora export runs/fed adapter-lora/
    hetlora export runs/fed adapter-lora/ --base-model-name-or-path HuggingFaceTB/SmolLM2-135M-Instruct
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
    p.add_argument("--base-model-name-or-path", default=None,
                   help="the base model the export records for AutoPeftModelForCausalLM: a local folder or a Hub id "
                   "(default: the adapter's own record; smollm2-135m becomes its converted local folder)")
    return p


def usable_base(recorded: str | None) -> str | None:
    """A `base_model_name_or_path` that loads offline where it can: the built-in spec's local folder.

    Example:
        ```py
        >>> usable_base("HuggingFaceTB/SmolLM2-135M-Instruct")  # a Hub id stays as it is
        'HuggingFaceTB/SmolLM2-135M-Instruct'
        ```
    """
    from ..model_source import is_builtin_model, resolve_model

    if recorded is not None and is_builtin_model(recorded):
        return str(resolve_model(recorded).resolve())
    return recorded


def run(args: argparse.Namespace) -> int:
    """Export the adapter named by parsed `export` arguments."""
    import json

    from ..export import export_lora

    base = args.base_model_name_or_path
    if base is None:
        config = args.adapter / "adapter_config.json"
        recorded = json.loads(config.read_text()).get("base_model_name_or_path") if config.is_file() else None
        base = usable_base(recorded)
    out = export_lora(args.adapter, args.out, base_model_name_or_path=base)
    print(
        f"Plain LoRA adapter written to {out} (loads with `PeftModel.from_pretrained` or "
        "`AutoPeftModelForCausalLM.from_pretrained`, no peft_hetlora needed)."
    )
    return 0
