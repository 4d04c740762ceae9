"""Benchmark HetLoRA layers against PEFT LoRA on SmolLM2-135M shapes (CPU, forward + backward).

A stack of decoder-shaped blocks (hidden 576, q/o 576x576, k/v 576->192, gate/up 576->1536, down 1536->576; the
attention softmax is left out because it costs the same with any adapter) with frozen base weights, adapted on all
seven projections. For each active rank k it times one training step (forward, backward into the adapter
weights and through the frozen base) of:

- ``lora(r=k)``: PEFT LoRA at rank k, the reference;
- ``hetlora(k)``: HetLoRA with r_max = 64 and the client allocated at rank k (target: <= 1.05 x lora(r=k));
- ``hetlora(k, mask)``: HetLoRA allocated at r_max = 64, active rank k (a client pruned mid-round);
- ``lora(r=r_max)``: what a homogeneous client at r_max pays (the saving is hetlora(k) / lora(r=r_max));
- ``base``: the frozen stack without adapters, backward to its input (so the adapter's own overhead can be read
  off).

All variants share the base weights and run in one process, interleaved in a random order every repeat; the
table gives the median of N repeats. It also saves each adapter with ``save_pretrained`` and compares the
``adapter_model.safetensors`` size of hetlora at active rank k with LoRA at r = k (target: within 2 %).

Usage::

    python benchmarks/bench_layer.py --layers 4 --repeats 21 --out runs/bench_layer.json
    python benchmarks/bench_layer.py --quick    # 1 layer, few repeats, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from peft_hetlora import HetLoRAConfig  # noqa: E402

SMOLLM2 = {"hidden": 576, "intermediate": 1536, "kv_dim": 192}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_FILE = "adapter_model.safetensors"


class Block(nn.Module):
    """One decoder layer's projections in their real data flow (attention mixing replaced by a cheap sum)."""

    def __init__(self, hidden: int, intermediate: int, kv_dim: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        kv = (self.k_proj(h) * self.v_proj(h)).mean(-1, keepdim=True)
        h = h + self.o_proj(self.q_proj(h) + kv)
        return h + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Stack(nn.Module):
    def __init__(self, layers: int, hidden: int, intermediate: int, kv_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(hidden, intermediate, kv_dim) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build_variants(base: Stack, ranks: list[int], r_max: int, alpha: float) -> dict[str, nn.Module]:
    """Every variant wraps its own deep copy of the same base weights."""
    variants: dict[str, nn.Module] = {"base": copy.deepcopy(base).requires_grad_(False)}
    for k in ranks:
        variants[f"lora(r={k})"] = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=k, lora_alpha=alpha * k / r_max, target_modules=TARGETS)
        )
        variants[f"hetlora({k})"] = get_peft_model(
            copy.deepcopy(base), HetLoRAConfig(r=r_max, rank=k, lora_alpha=alpha, target_modules=TARGETS)
        )
        if k < r_max:
            masked = get_peft_model(
                copy.deepcopy(base), HetLoRAConfig(r=r_max, rank=r_max, lora_alpha=alpha, target_modules=TARGETS)
            )
            masked.set_rank(k)
            variants[f"hetlora({k}, mask)"] = masked
    if r_max not in ranks:
        variants[f"lora(r={r_max})"] = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=r_max, lora_alpha=alpha, target_modules=TARGETS)
        )
    for model in variants.values():
        model.train()
        with torch.no_grad():  # B starts at zero; make the adapters non-trivial (does not change the cost)
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0, 0.01)
    return variants


def step(model: nn.Module, x: torch.Tensor) -> float:
    """One forward + backward; returns seconds.

    The frozen `base` stack has nothing to train, so its input requires grad instead: it then pays the same
    backward through the frozen weights as the adapted stacks (which need it to reach the lower adapters).
    """
    for param in model.parameters():
        param.grad = None
    if not any(p.requires_grad for p in model.parameters()):
        x = x.detach().requires_grad_(True)
    start = time.perf_counter()
    out = model(x)
    loss = out.float().pow(2).mean()
    loss.backward()
    return time.perf_counter() - start


def saved_bytes(model: nn.Module, folder: Path) -> int:
    model.save_pretrained(folder)
    return (folder / ADAPTER_FILE).stat().st_size


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shapes = dict(SMOLLM2)
    if args.quick:
        args.layers, args.repeats, args.warmup = 1, 5, 1
    load_before = os.getloadavg()
    base = Stack(args.layers, **shapes)
    variants = build_variants(base, args.ranks, args.r_max, args.alpha)
    x = torch.randn(args.batch, args.seq, shapes["hidden"])

    # the variants compared with each other run back to back (in a random order) so that they see the same load
    groups = [
        [name for name in (f"lora(r={k})", f"hetlora({k})", f"hetlora({k}, mask)") if name in variants]
        for k in args.ranks
    ]
    groups += [[name] for name in variants if not any(name in group for group in groups)]
    times: dict[str, list[float]] = {name: [] for name in variants}
    rng = random.Random(args.seed)
    for _ in range(args.warmup):
        for name in variants:
            step(variants[name], x)
    for _ in tqdm(range(args.repeats), desc="repeats (all variants interleaved)", unit="rep"):
        rng.shuffle(groups)
        for group in groups:
            for name in rng.sample(group, len(group)):
                times[name].append(step(variants[name], x))

    median = {name: statistics.median(values) for name, values in times.items()}

    def paired(numerator: str, denominator: str) -> float | None:
        """Median over repeats of the per-repeat ratio (both measured in the same repeat)."""
        if numerator not in times:
            return None
        return statistics.median(a / b for a, b in zip(times[numerator], times[denominator], strict=True))

    base_time = median["base"]
    rows = []
    rmax_name = f"lora(r={args.r_max})"
    for k in args.ranks:
        lora_name, het_name, mask_name = f"lora(r={k})", f"hetlora({k})", f"hetlora({k}, mask)"
        rows.append(
            {
                "k": k,
                "lora_k_ms": 1e3 * median[lora_name],
                "hetlora_k_ms": 1e3 * median[het_name],
                "hetlora_k_mask_ms": 1e3 * median[mask_name] if mask_name in median else None,
                "lora_rmax_ms": 1e3 * median[rmax_name],
                "ratio_hetlora_vs_lora_k": paired(het_name, lora_name),
                "ratio_mask_vs_lora_k": paired(mask_name, lora_name),
                "ratio_hetlora_vs_lora_rmax": paired(het_name, rmax_name),
                "ratio_hetlora_vs_lora_k_of_minima": min(times[het_name]) / min(times[lora_name]),
                "adapter_overhead_lora_k_ms": 1e3 * (median[lora_name] - base_time),
                "adapter_overhead_hetlora_k_ms": 1e3 * (median[het_name] - base_time),
            }
        )

    sizes = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ranks:
            key = f"hetlora({k}, mask)" if f"hetlora({k}, mask)" in variants else f"hetlora({k})"
            het = saved_bytes(variants[key], Path(tmp) / f"het{k}")
            lora = saved_bytes(variants[f"lora(r={k})"], Path(tmp) / f"lora{k}")
            sizes.append({"k": k, "hetlora_bytes": het, "lora_bytes": lora, "relative_difference": het / lora - 1})

    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {**vars(args), **shapes, "targets": TARGETS},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "median_ms": {name: 1e3 * value for name, value in median.items()},
        "all_ms": {name: [1e3 * v for v in values] for name, values in times.items()},
        "rows": rows,
        "sizes": sizes,
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    r_max = s["r_max"]
    lines = [
        f"SmolLM2-135M shapes, {s['layers']} layers x 7 projections, batch {s['batch']} x {s['seq']} tokens, "
        f"r_max {r_max}, {s['threads']} threads, median of {s['repeats']} interleaved repeats "
        f"(base stack without adapters: {result['median_ms']['base']:.1f} ms). Times: median per variant; ratios: "
        "median of the per-repeat ratios (the compared variants run back to back); `min ratio`: ratio of the "
        "fastest steps. Load average (1 min) before / after: "
        f"{result['environment']['load_average_before'][0]:.1f} / {result['environment']['load_average_after'][0]:.1f}"
        f" on {result['environment']['cpu_count']} cores.",
        "",
        "| k | LoRA r=k (ms) | HetLoRA k (ms) | HetLoRA / LoRA r=k "
        f"| HetLoRA k, mask at {r_max} (ms) | mask / LoRA r=k "
        f"| LoRA r={r_max} (ms) | HetLoRA k / LoRA r={r_max} | min ratio HetLoRA / LoRA r=k "
        "| adapter overhead LoRA / HetLoRA (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        mask = "-" if row["hetlora_k_mask_ms"] is None else f"{row['hetlora_k_mask_ms']:.1f}"
        mask_ratio = "-" if row["ratio_mask_vs_lora_k"] is None else f"{row['ratio_mask_vs_lora_k']:.3f}"
        lines.append(
            f"| {row['k']} | {row['lora_k_ms']:.1f} | {row['hetlora_k_ms']:.1f} | "
            f"**{row['ratio_hetlora_vs_lora_k']:.3f}** | {mask} | {mask_ratio} | {row['lora_rmax_ms']:.1f} | "
            f"{row['ratio_hetlora_vs_lora_rmax']:.3f} | {row['ratio_hetlora_vs_lora_k_of_minima']:.3f} | "
            f"{row['adapter_overhead_lora_k_ms']:.1f} / "
            f"{row['adapter_overhead_hetlora_k_ms']:.1f} |"
        )
    lines += [
        "",
        "| k | HetLoRA saved bytes (active k) | LoRA r=k saved bytes | difference |",
        "|---:|---:|---:|---:|",
    ]
    for row in result["sizes"]:
        lines.append(
            f"| {row['k']} | {row['hetlora_bytes']:,} | {row['lora_bytes']:,} "
            f"| {100 * row['relative_difference']:+.2f} % |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder blocks in the stack (SmolLM2-135M has 30)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r-max", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=128.0, help="lora_alpha at r_max (LoRA r=k gets alpha*k/r_max)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 layer, 5 repeats: a smoke run")
    parser.add_argument("--out", type=Path, help="write the full result (all timings) as JSON here")
    args = parser.parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
