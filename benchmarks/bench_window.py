"""Window training: frozen factors vs merged into the base, against a prefix client and HomLoRA(r_max).

A client of budget k trains k components of a rank-r_max global; the other r_max - k stay frozen so its
model is the global model (docs/design.md#component-rule). Two ways to hold the frozen part:

- ``window(k, factors)``: buffers A_f, B_f added in forward as s * B_f (A_f x) (two extra thin matmuls in
  forward and two in backward, through which the gradient to lower layers flows);
- ``window(k, merged)``: W + s * B_f A_f merged into the base weight once per round (no per-step cost; a merge
  and an un-merge per round, float bases only).

Baselines in the same process, on the same SmolLM2-135M-shaped decoder blocks as ``bench_layer.py``
(all seven projections adapted): ``prefix(k)`` (HetLoRA's rank-k client, no frozen part: its model is the
truncated global) and ``prefix(r_max)`` (HomLoRA at r_max). Each step is forward + backward + AdamW step;
the variants run interleaved in a random order every repeat and the table gives medians and ratios to
``prefix(k)``.

Memory is counted exactly rather than sampled: the bytes autograd saves for backward (each storage once,
the model's own weights excluded), plus adapter parameters, their gradients, AdamW's two moments and the
frozen buffers. The base weights are the same for every variant and are reported once.

Usage::

    python benchmarks/bench_window.py --layers 2 --repeats 9 --out benchmarks/results/window.json
    python benchmarks/bench_window.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from bench_layer import SMOLLM2, TARGETS, Stack  # noqa: E402
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from peft_hetlora import HetLoRAConfig  # noqa: E402
from peft_hetlora.federated import truncate  # noqa: E402


def build(base: Stack, k: int, r_max: int, global_state: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """The four variants, each on its own copy of the base weights."""
    variants = {}
    window = list(range(r_max - k, r_max))  # a window at the top of the global: every other component frozen
    for name, rank, frozen in (
        (f"prefix({k})", k, None),
        (f"window({k}, factors)", k, "factors"),
        (f"window({k}, merged)", k, "merged"),
        (f"prefix({r_max})", r_max, None),
    ):
        model = get_peft_model(copy.deepcopy(base), HetLoRAConfig(r=r_max, rank=rank, lora_alpha=2 * r_max,
                                                                  target_modules=TARGETS))
        if frozen is None:
            set_peft_model_state_dict(model, truncate(global_state, rank))
        else:
            model.set_components(window, global_state, frozen=frozen)
        model.train()
        variants[name] = model
    return variants


def adapter_bytes(model: nn.Module) -> int:
    """Trainable parameters x 4 (value, gradient, two AdamW moments) + frozen buffers, in bytes."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "lora_frozen_" in n)
    return 4 * trainable + frozen


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward (each storage once; the model's weights excluded)."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model(x).pow(2).mean().backward()
    optimizer.step()
    return time.perf_counter() - start


def round_overhead(base: Stack, k: int, r_max: int, global_state: dict[str, torch.Tensor], frozen: str) -> float:
    """Seconds to set a window up and drop it again (a round's fixed cost)."""
    model = get_peft_model(copy.deepcopy(base), HetLoRAConfig(r=r_max, rank=k, lora_alpha=2 * r_max,
                                                              target_modules=TARGETS))
    start = time.perf_counter()
    model.set_components(list(range(r_max - k, r_max)), global_state, frozen=frozen)
    model.drop_frozen()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--r-max", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.repeats, args.ranks = 1, 3, [2]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = Stack(args.layers, SMOLLM2["hidden"], SMOLLM2["intermediate"], SMOLLM2["kv_dim"]).requires_grad_(False)
    reference = get_peft_model(copy.deepcopy(base), HetLoRAConfig(r=args.r_max, lora_alpha=2 * args.r_max,
                                                                  target_modules=TARGETS))
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.01)
    global_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(reference).items()}
    x = torch.randn(args.batch, args.tokens, SMOLLM2["hidden"], generator=torch.Generator().manual_seed(1))
    rows = []
    for k in args.ranks:
        variants = build(base, k, args.r_max, global_state)
        outputs = {name: model(x).detach() for name, model in variants.items()}
        # the two window variants compute the same model (the global) and differ only in where the rest lives
        agree = float((outputs[f"window({k}, factors)"] - outputs[f"window({k}, merged)"]).abs().max())
        optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                      for n, m in variants.items()}
        for name, model in variants.items():  # warm-up (allocates AdamW state)
            step(model, optimizers[name], x)
        times: dict[str, list[float]] = {name: [] for name in variants}
        order = list(variants)
        for _ in tqdm(range(args.repeats), desc=f"k={k}", leave=False):
            random.shuffle(order)
            for name in order:
                times[name].append(step(variants[name], optimizers[name], x))
        baseline = f"prefix({k})"
        memory = {name: saved_bytes(m, x) + adapter_bytes(m) for name, m in variants.items()}
        overhead = {f: round_overhead(base, k, args.r_max, global_state, f) for f in ("factors", "merged")}
        for name in variants:
            median = statistics.median(times[name])
            rows.append({
                "k": k,
                "variant": name,
                "step_s": median,
                "step_ratio": median / statistics.median(times[baseline]),
                "memory_bytes": memory[name],
                "memory_ratio": memory[name] / memory[baseline],
                "trainable_params": sum(p.numel() for p in variants[name].parameters() if p.requires_grad),
                "round_setup_s": overhead.get(name.split(", ")[-1].rstrip(")")) if "window" in name else None,
                "factors_vs_merged_max_abs_diff": agree if "window" in name else None,
            })
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    result = {
        "settings": {**vars(args), "out": str(args.out) if args.out else None},
        "base_weight_bytes": base_bytes,
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "rows": rows,
    }
    print("| k | variant | step (s) | step / prefix(k) | memory (MB) | memory / prefix(k) | trainable | setup (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        setup = "" if row["round_setup_s"] is None else f"{row['round_setup_s']:.4f}"
        print(f"| {row['k']} | {row['variant']} | {row['step_s']:.4f} | {row['step_ratio']:.3f} | "
              f"{row['memory_bytes'] / 1e6:.2f} | {row['memory_ratio']:.3f} | {row['trainable_params']} | {setup} |")
    print(f"base weights: {base_bytes / 1e6:.1f} MB (shared by every variant)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
