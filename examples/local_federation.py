#!/usr/bin/env python
"""A whole HetLoRA federation in one process: a coordinator and N Trainer clients with different ranks
round-tripping adapters through a LocalStore. Uses a tiny random Llama (no download) unless --model names
a local model folder.

    python examples/local_federation.py --clients 4 --rounds 3 --store /tmp/fed
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

import peft_hetlora
from peft_hetlora.federated import Coordinator, LocalStore
from trainer_callbacks import FederatedClientCallback

R_MAX = 8


def base_model(path: str | None):
    if path:
        return AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def client_data(seed: int, vocab: int) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (32, 16), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--method", default="hetlora")
    args = parser.parse_args()

    store_dir = Path(args.store or tempfile.mkdtemp(prefix="hetlora-fed-"))
    store = LocalStore(store_dir, create=True)
    clients = [f"client-{i}" for i in range(args.clients)]
    ranks = {cid: [2, 4, 8][i % 3] for i, cid in enumerate(clients)}  # three device tiers
    config = peft_hetlora.HetLoRAConfig(r=R_MAX, lora_alpha=16, target_modules=["q_proj", "v_proj"], prune_lambda=0.05)
    model = get_peft_model(base_model(args.model), config)  # one model object, re-ranked per client
    coordinator = Coordinator(
        store,
        method=args.method,
        r_max=R_MAX,
        r_min=2,
        clients=clients,
        rank_policy=ranks,
        rounds=args.rounds,
        progress=False,
    )
    if store.latest_global() is None:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            coordinator.init(tmp)

    while store.latest_global().round < args.rounds:
        round_idx = store.latest_global().round
        for i, cid in enumerate(coordinator.open_round(round_idx).participants):
            callback = FederatedClientCallback(store, cid)
            trainer = Trainer(
                model=model,
                args=TrainingArguments(
                    output_dir=str(store_dir / "trainer"),
                    max_steps=3,
                    per_device_train_batch_size=4,
                    learning_rate=1e-3,
                    report_to=[],
                    disable_tqdm=True,
                    save_strategy="no",
                    use_cpu=not torch.cuda.is_available(),
                ),
                train_dataset=client_data(i, model.config.vocab_size),
                callbacks=[callback],
            )
            trainer.remove_callback(PrinterCallback)
            trainer.train()  # pull global (truncated to this client's rank) -> local round -> prune -> upload
            print(
                f"round {round_idx}: {cid} rank {callback.last_round['rank_in']} -> {callback.last_round['rank_out']}"
            )
        print(coordinator.step(wait=False), "| weights:", store.read_summary(round_idx)["weights"])
    print(f"Final global adapter: {store.latest_global().path} (PeftModel.from_pretrained(base, '{store_dir}'))")


if __name__ == "__main__":
    main()
