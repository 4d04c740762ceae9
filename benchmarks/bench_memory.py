"""Peak memory of one local round: HetLoRA at rank k next to PEFT LoRA(r=k), float32 / 8-bit / 4-bit base.

Each measurement runs in a fresh subprocess (so nothing one run allocated is reused by the next): it
loads SmolLM2-135M (the cached folder `resolve_model` converts from the PyPI GGUF; docs/design.md#real-parts) with
`peft_hetlora.quantization.load_quantized_base`, adds the adapter, then resets the kernel's peak-RSS
counter (``/proc/self/clear_refs`` = 5) and trains one local round (`--steps` AdamW steps on random
tokens, batch x block as the main job). Reported per run:

- ``peak_rss``: the process's peak resident set size during the round (``VmHWM`` after the reset);
  this is what a device must hold, base model included (CPU; on CUDA the torch allocator's
  ``max_memory_allocated`` is reported instead and labelled so);
- ``round_delta``: ``peak_rss`` minus the resident size just before the round (activations, gradients,
  optimizer state and allocator slack: the part the rank changes).

Usage:
    nice -n 5 python benchmarks/bench_memory.py --ranks 2 8 16 --quantize none 8bit 4bit \
        --out benchmarks/results/memory

The JSON rows feed `peft_hetlora.federated.policies.device_memory.DeviceMemoryTable` (`--table` prints them in
that form).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_heap() -> None:
    """Return memory freed while loading (float weights replaced by quantised ones) to the OS.

    Without it glibc keeps the freed arenas resident and a quantised base looks larger than a float one.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS then includes the allocator's free lists
        pass


def _drop_checkpoint_pages() -> int:
    """Drop the pages of still-mapped ``*.safetensors`` checkpoints from this process's resident set.

    transformers reads the checkpoint through a memory map that stays mapped after loading. A float
    base's parameters live in that map (its pages count again as soon as the round touches them); a
    quantised base was built from it and never reads it again, yet its pages would stay in RSS. After
    ``madvise(MADV_DONTNEED)`` only what the round touches is resident. Returns the bytes unmapped from RSS.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    before = _status_kib("RssFile")
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        regions = [line.split()[0] for line in maps if line.rstrip().endswith(".safetensors")]
    for region in regions:
        start, end = (int(x, 16) for x in region.split("-"))
        libc.madvise(start, end - start, 4)  # MADV_DONTNEED
    return (before - _status_kib("RssFile")) * 1024


def _tensor_bytes(model) -> int:
    """Bytes of the model's distinct parameter and buffer storages (quantised storage counted as stored)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        parts = [tensor] + [
            getattr(tensor, name) for name in ("SCB", "absmax") if getattr(tensor, name, None) is not None
        ]
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            parts.append(state.absmax)
        for part in parts:
            storage = part.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def worker(args: argparse.Namespace) -> dict:
    """One measurement (runs in its own process)."""
    import torch
    from peft import LoraConfig, get_peft_model

    import peft_hetlora
    from peft_hetlora.model_source import resolve_model
    from peft_hetlora.quantization import load_quantized_base, quantization_summary

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    mode = None if args.quantize == "none" else args.quantize
    path = resolve_model(args.model)
    _release_freed_heap()
    libraries_kib = _status_kib("VmRSS")  # interpreter + torch / transformers / peft (+ bitsandbytes) imported
    base = load_quantized_base(path, mode)
    base_tensor_bytes = _tensor_bytes(base)
    base.config.use_cache = False
    layers = base.config.num_hidden_layers
    top = list(range(layers - args.top_layers, layers)) if args.top_layers else None
    common = dict(target_modules=args.targets, lora_alpha=32, lora_dropout=0.0, layers_to_transform=top)
    if args.method == "hetlora":
        config = peft_hetlora.HetLoRAConfig(r=args.r_max, rank=args.rank, r_min=1, prune_lambda=0.05, **common)
    else:
        config = LoraConfig(r=args.rank, **common)
    model = get_peft_model(base, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-4)
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, base.config.vocab_size, (args.batch, args.block), generator=generator)
        for _ in range(args.steps)
    ]
    cuda = torch.cuda.is_available() and args.device == "cuda"
    _release_freed_heap()
    dropped = _drop_checkpoint_pages()
    anon_kib, file_kib = _status_kib("RssAnon"), _status_kib("RssFile")
    before_kib = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")  # reset VmHWM (peak RSS) to the current RSS
    start = time.perf_counter()
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM")
    row = {
        "model": args.model,
        "quantize": mode or "float32",
        "backend": quantization_summary(model)["backend"] or "float32",
        "method": args.method,
        "rank": args.rank,
        "r_max": args.r_max if args.method == "hetlora" else args.rank,
        "trainable_params": sum(p.numel() for p in trainable),
        "batch": args.batch,
        "block": args.block,
        "steps": args.steps,
        "base_tensor_bytes": base_tensor_bytes,
        "libraries_rss_bytes": libraries_kib * 1024,
        "peak_rss_bytes": peak_kib * 1024,
        "rss_before_round_bytes": before_kib * 1024,
        "rss_anon_before_round_bytes": anon_kib * 1024,
        "rss_file_before_round_bytes": file_kib * 1024,
        "checkpoint_pages_dropped_bytes": dropped,
        "round_delta_bytes": (peak_kib - before_kib) * 1024,
        "memory_measure": "VmHWM (peak RSS) after malloc_trim, checkpoint-map MADV_DONTNEED, clear_refs=5",
        "seconds_per_step": seconds / args.steps,
        "final_loss": float(loss),
    }
    if cuda:  # pragma: no cover - GPU only
        row["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return row


def run_one(args: argparse.Namespace, method: str, rank: int, quantize: str) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker",
        "--method", method, "--rank", str(rank), "--quantize", quantize,
        "--model", args.model, "--r-max", str(args.r_max), "--batch", str(args.batch),
        "--block", str(args.block), "--steps", str(args.steps), "--threads", str(args.threads),
        "--top-layers", str(args.top_layers), "--targets", *args.targets,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed ({method}, r={rank}, {quantize}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median_of(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]  # rows of older runs may lack the newer fields
    return statistics.median(values) if values else float("nan")


def summarise(rows: list[dict]) -> list[dict]:
    """Median per (quantize, method, rank) and the HetLoRA / LoRA peak ratio per (quantize, rank)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["quantize"], row["rank"], row["method"]), []).append(row)
    table = []
    for quantize in dict.fromkeys(r["quantize"] for r in rows):
        for rank in sorted({r["rank"] for r in rows}):
            het, lora = groups.get((quantize, rank, "hetlora")), groups.get((quantize, rank, "lora"))
            if not het or not lora:
                continue
            med = {
                name: {
                    key: statistics.median(r[key] for r in runs)
                    for key in ("peak_rss_bytes", "round_delta_bytes", "seconds_per_step")
                }
                for name, runs in (("hetlora", het), ("lora", lora))
            }
            table.append(
                {
                    "quantize": quantize,
                    "rank": rank,
                    "hetlora_peak_mib": med["hetlora"]["peak_rss_bytes"] / 2**20,
                    "lora_peak_mib": med["lora"]["peak_rss_bytes"] / 2**20,
                    "peak_ratio": med["hetlora"]["peak_rss_bytes"] / med["lora"]["peak_rss_bytes"],
                    "hetlora_delta_mib": med["hetlora"]["round_delta_bytes"] / 2**20,
                    "lora_delta_mib": med["lora"]["round_delta_bytes"] / 2**20,
                    "hetlora_s_per_step": med["hetlora"]["seconds_per_step"],
                    "lora_s_per_step": med["lora"]["seconds_per_step"],
                    "base_tensor_mib": _median_of(het, "base_tensor_bytes") / 2**20,
                    "libraries_rss_mib": _median_of(het + lora, "libraries_rss_bytes") / 2**20,
                    "repeats": len(het),
                }
            )
    return table


def markdown(table: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "| base | base tensors (MiB) | rank k | HetLoRA peak RSS (MiB) | LoRA(r=k) peak RSS (MiB) | ratio "
        "| HetLoRA round delta (MiB) | LoRA round delta (MiB) | s/step HetLoRA / LoRA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['quantize']} | {row['base_tensor_mib']:.1f} | {row['rank']} | {row['hetlora_peak_mib']:.1f} "
            f"| {row['lora_peak_mib']:.1f} "
            f"| {row['peak_ratio']:.3f} | {row['hetlora_delta_mib']:.1f} | {row['lora_delta_mib']:.1f} "
            f"| {row['hetlora_s_per_step']:.2f} / {row['lora_s_per_step']:.2f} |"
        )
    header = (
        f"SmolLM2-135M-Instruct ({args.model}), one local round = {args.steps} AdamW steps at batch {args.batch} x "
        f"{args.block} tokens, targets {'/'.join(args.targets)} on the top {args.top_layers} layers, HetLoRA r_max = "
        f"{args.r_max}; median of {table[0]['repeats'] if table else 0} fresh process(es) per cell. "
        f"Peak RSS is the process's VmHWM during "
        f"the round (after resetting it), base model included; the round delta is peak minus the RSS just before. "
        f"The interpreter with torch / transformers / peft imported holds "
        f"{statistics.median(r['libraries_rss_mib'] for r in table):.0f} MiB before any model is loaded."
    )
    return header + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=["hetlora", "lora"], default="hetlora", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument(
        "--quantize", nargs="+", default=["none", "8bit", "4bit"], help="bases: none, 8bit, 4bit, torchao-int8"
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--r-max", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top-layers", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj", "o_proj"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per cell (0 with --merge: no new run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument(
        "--merge", type=Path, nargs="*", default=[], help="earlier --out JSON files (same settings) to pool rows with"
    )
    args = parser.parse_args(argv)
    if args.worker:
        args.quantize = args.quantize[0]
        print(json.dumps(worker(args)))
        return

    from tqdm import tqdm

    jobs = [
        (method, rank, quantize)
        for _ in range(args.repeats)
        for quantize in args.quantize
        for rank in args.ranks
        for method in ("lora", "hetlora")
    ]
    rows = [row for path in args.merge for row in json.loads(path.read_text())["rows"]]
    rows += [run_one(args, *job) for job in tqdm(jobs, desc="memory runs")]
    table = summarise(rows)
    text = markdown(table, args)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        import torch

        machine = {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
        }
        payload = {"machine": machine, "settings": vars(args) | {"out": str(args.out)}, "rows": rows, "table": table}
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
