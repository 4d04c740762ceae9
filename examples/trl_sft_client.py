#!/usr/bin/env python
"""A TRL `SFTTrainer` script as a HetLoRA federated client (lines marked `# [HetLoRA]` are the whole diff
against the plain TRL + LoraConfig script; docs/trainer.md shows it).

    hetlora init --store fed --base-model smollm2-135m --r-max 16 --r-min 2 --lora-alpha 32 \
        --target-modules q_proj,v_proj --clients alice,bob --rounds 2
    python examples/trl_sft_client.py --store fed --client-id alice --max-rank 4 --rounds 1
    hetlora coordinate --store fed

`--model` is the base model the federation was initialised with (`hetlora init --base-model`): `smollm2-135m`
(the default) or a local model folder with its tokenizer, resolved by
`peft_hetlora.model_source.resolve_model`.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import peft_hetlora  # [HetLoRA] registers PeftType.HETLORA with PEFT
from peft_hetlora.federated import LocalStore  # [HetLoRA] or HubStore("org/federation", token=...)
from peft_hetlora.model_source import resolve_model
from trainer_callbacks import FederatedClientCallback, run_client_rounds  # [HetLoRA]

TEXTS = [
    "The federation trains one adapter; every client keeps its data.",
    "A small device trains a low rank, a large one a high rank.",
    "The coordinator averages what the clients upload and publishes the next global adapter.",
    "Self-pruning drops the components a client does not need.",
]


def main(argv: list[str] | None = None) -> list[int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="The federation's store folder.")
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--max-rank", type=int, default=None, help="This device's budget (default r_max).")
    parser.add_argument("--rounds", type=int, default=1, help="Rounds to take part in before exiting.")
    parser.add_argument("--model", default="smollm2-135m",
                        help="The federation's base model (folder or smollm2-135m).")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=None, help="Seconds to wait for the next global.")
    options = parser.parse_args(argv)

    store = LocalStore(options.store)  # [HetLoRA]
    model = str(resolve_model(options.model))  # a local folder with the model and its tokenizer
    train = Dataset.from_dict({"text": TEXTS * 4})
    args = SFTConfig(
        output_dir=options.output_dir or f"out/{options.client_id}",
        max_steps=options.max_steps,
        per_device_train_batch_size=4,
        learning_rate=2e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # TRL's default bf16=True needs a GPU
    )
    config = peft_hetlora.HetLoRAConfig.from_federation(store, rank=options.max_rank)  # [HetLoRA]
    client = FederatedClientCallback(store, client_id=options.client_id)  # [HetLoRA]
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, peft_config=config,
                         callbacks=[client])  # [HetLoRA] callbacks=
    return run_client_rounds(trainer, client, max_rounds=options.rounds, timeout=options.timeout)  # [HetLoRA]


if __name__ == "__main__":
    print("trained rounds:", main())
