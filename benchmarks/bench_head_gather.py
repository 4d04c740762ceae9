"""Cached training step: LM head on every position (the model's loss on full logits) vs only where a label exists.

`TopLayersCausalLM` applies the final norm and the 49k-row LM head only at positions with a next-token label
(not on padding, not on a row's last position). This measures one training step (forward + backward of the
adapted top layers and the head) both ways on the cpu profile's real batches (SmolLM2-135M, chitchat, 4 x <=64
tokens, LoRA on the top 8 layers), interleaved step by step in one process, and checks the two losses agree.

    PYTHONPATH=$PWD python benchmarks/bench_head_gather.py --steps 40 --out benchmarks/results/head_gather.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hetlora_bench import runner
from hetlora_bench.activation_cache import CachedCollator
from hetlora_bench.arm_setup import arm_adapter_config
from hetlora_bench.arms import SimulationConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/head_gather.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = SimulationConfig.from_sources(profile="cpu")
    wb = runner.prepare(config, 0)
    if wb.cache is None:
        raise SystemExit(f"the activation cache does not apply here ({wb.cache_note})")
    adapter_config = arm_adapter_config(config, config.r_max, wb, prune=False)
    with runner._peft_model(wb, adapter_config, 0) as model:
        wrapper = wb.trainable(model)
        wrapper.train()
        causal = model.get_base_model()
        client = sorted(wb.corpus.client_ids)[0]
        data = wb.train_set(client)
        collate = CachedCollator()
        generator = torch.Generator().manual_seed(0)
        full_s, gathered_s, diffs, padding = [], [], [], []
        for _ in range(args.steps):
            idx = torch.randint(len(data), (config.batch_size,), generator=generator).tolist()
            batch = collate(data.__getitems__(idx))
            labels = batch["labels"]
            padding.append(float((labels[:, 1:] == -100).float().mean()))
            started = time.perf_counter()
            logits = wrapper(hidden_states=batch["hidden_states"], attention_mask=batch["attention_mask"]).logits
            full = causal.loss_function(logits=logits, labels=labels, vocab_size=causal.config.vocab_size)
            full.backward()
            full_s.append(time.perf_counter() - started)
            model.zero_grad()
            started = time.perf_counter()
            gathered = wrapper(**batch).loss
            gathered.backward()
            gathered_s.append(time.perf_counter() - started)
            model.zero_grad()
            diffs.append(abs(full.item() - gathered.item()) / abs(full.item()))
    result = {
        "steps": args.steps,
        "threads": args.threads,
        "median_full_s": statistics.median(full_s),
        "median_gathered_s": statistics.median(gathered_s),
        "speedup_of_medians": statistics.median(full_s) / statistics.median(gathered_s),
        "median_paired_speedup": statistics.median(f / g for f, g in zip(full_s, gathered_s)),
        "positions_without_label": statistics.mean(padding),
        "max_rel_loss_difference": max(diffs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
