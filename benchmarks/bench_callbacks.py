#!/usr/bin/env python
"""Training-step overhead of HetLoRA (regulariser + HetLoRACallback) vs plain PEFT LoRA at the same rank.

Same model, data, rank and Trainer settings, interleaved repeats in one process; reports the median
seconds per step and the ratio HetLoRA / LoRA (target <= 1.03).

    python benchmarks/bench_callbacks.py --steps 10 --repeats 3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import peft_hetlora
from trainer_callbacks import HetLoRACallback


def base_model(layers: int | None):
    from peft_hetlora.model_source import resolve_model

    folder = resolve_model(None)
    if layers is None:
        return AutoModelForCausalLM.from_pretrained(str(folder))
    config = AutoConfig.from_pretrained(str(folder))
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def dataset(n: int, length: int, vocab: int) -> Dataset:
    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def time_training(model, data, steps: int, callbacks, out: Path) -> float:
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=steps,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    trainer.train()  # warm-up: first-step allocations and lazy inits are not what is compared
    start = time.perf_counter()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--r-max", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="random-init model with this many layers (default: the real SmolLM2-135M, 30 layers)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = base_model(args.layers)
    if torch.cuda.is_available():
        base = base.cuda()
    data = dataset(4 * args.steps, args.length, base.config.vocab_size)
    times: dict[str, list[float]] = {"lora": [], "hetlora": []}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for kind in ("lora", "hetlora"):
            torch.manual_seed(0)
            if kind == "lora":
                config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets)
                callbacks = []
            else:
                config = peft_hetlora.HetLoRAConfig(
                    r=args.r_max, rank=args.rank, lora_alpha=2 * args.r_max, target_modules=targets, prune_lambda=0.05
                )
                callbacks = [HetLoRACallback()]
            model = get_peft_model(base, config)
            times[kind].append(time_training(model, data, args.steps, callbacks, args.out / "trainer"))
            base = model.unload()
    lora, het = statistics.median(times["lora"]), statistics.median(times["hetlora"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    result = {
        "device": device,
        "rank": args.rank,
        "r_max": args.r_max,
        "tokens_per_step": 4 * args.length,
        "layers": base.config.num_hidden_layers,
        "lora_s_per_step": lora,
        "hetlora_s_per_step": het,
        "ratio": het / lora,
        "samples": times,
    }
    table = (
        "| device | model layers | rank (r_max) | LoRA s/step | HetLoRA + callback s/step | ratio (target <= 1.03) |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        f"| {device} | {result['layers']} | {args.rank} ({args.r_max}) | {lora:.3f} | {het:.3f} | {het / lora:.3f} |"
    )
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "callbacks.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
