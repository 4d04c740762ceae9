#!/usr/bin/env python
"""Causal-LM fine-tuning with `transformers.Trainer`, in the style of transformers' `run_clm.py`,
turned into a HetLoRA federated client. The HetLoRA lines are marked `# [HetLoRA]`; without them this
is an ordinary LoRA fine-tuning script.

    python examples/run_clm_hetlora.py --model_name_or_path path/to/model --train_file my.txt \
        --store runs/fed --client_id alice --rounds 3 --output_dir out/alice --max_steps 20

`hetlora init --store runs/fed --base-model path/to/model --clients alice,bob` creates the federation and
the coordinator (`hetlora coordinate --store runs/fed --wait`) publishes the global adapter each round; this
script trains one local round per global it sees and uploads its adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import load_dataset
from peft import get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

import peft_hetlora  # [HetLoRA] registers the HETLORA PEFT type
from peft_hetlora.federated import LocalStore  # [HetLoRA]
from trainer_callbacks import FederatedClientCallback, run_client_rounds  # [HetLoRA]


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "local folder of a causal LM"})
    train_file: str = field(metadata={"help": "a .txt / .json / .csv file with a `text` column"})
    block_size: int = 128
    store: str = field(default="runs/fed", metadata={"help": "[HetLoRA] the federation's LocalStore folder"})
    client_id: str = field(default="client-0", metadata={"help": "[HetLoRA] this client's id"})
    rank: int = field(default=4, metadata={"help": "[HetLoRA] this device's budget: the largest rank it trains"})
    rounds: int = field(default=1, metadata={"help": "[HetLoRA] local rounds to run"})


def main() -> None:
    script_args, training_args = HfArgumentParser((ScriptArguments, TrainingArguments)).parse_args_into_dataclasses()
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    extension = script_args.train_file.rsplit(".", 1)[-1].replace("txt", "text")
    raw = load_dataset(extension, data_files={"train": script_args.train_file})["train"]

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=script_args.block_size)

    train = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path)
    store = LocalStore(script_args.store)  # [HetLoRA] or HubStore("org/federation") for hf://org/federation
    # [HetLoRA] instead of LoraConfig: r_max, lora_alpha, target modules and layers come from the federation (so they
    # cannot differ); `rank` is this device's budget, the largest rank it can train
    config = peft_hetlora.HetLoRAConfig.from_federation(store, rank=script_args.rank, prune_lambda=0.05)
    model = get_peft_model(model, config)
    client = FederatedClientCallback(store, script_args.client_id)  # [HetLoRA] trains at min(assigned rank, rank)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[client],  # [HetLoRA]
    )
    # [HetLoRA] instead of .train(); --resume_from_checkpoint: a restarted client continues its open round's checkpoint
    run_client_rounds(trainer, client, max_rounds=script_args.rounds, timeout=3600,
                      resume=bool(training_args.resume_from_checkpoint))


if __name__ == "__main__":
    main()
