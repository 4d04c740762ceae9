"""Paired comparison of upload message formats from `hetlora simulate` run folders (issue 15).

Each folder is one `hetlora simulate ... --message-format F` run of the same settings and seeds; the first
folder is the reference (fp32). Prints a markdown table: final held-out perplexity (mean +- std over seeds), the
per-seed relative difference to the reference, and bytes sent relative to the reference.

Example:
    python benchmarks/compare_message_formats.py runs/msg-fp32 runs/msg-bf16 runs/msg-int8-block64 --method rankwise
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load_runs(folder: Path, method: str) -> tuple[str, dict[int, tuple[float, int, int]]]:
    """`(message_format, {seed: (final held-out ppl, payload bytes, upload bytes)})` of one run folder."""
    metrics = json.loads((folder / "metrics.json").read_text())
    per_seed, fmt = {}, "?"
    for seed, seed_metrics in zip(metrics["seeds"], metrics["metrics"]):
        rounds = seed_metrics[method]["rounds"]
        fmt = seed_metrics[method].get("message_format", fmt)
        per_seed[seed] = (
            rounds[-1]["heldout_ppl"],
            sum(r.get("payload_bytes", 0) for r in rounds),
            sum(r["upload_bytes"] for r in rounds),
        )
    return fmt, per_seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders; the first is the reference")
    parser.add_argument("--method", default="rankwise")
    args = parser.parse_args()
    runs = [load_runs(folder, args.method) for folder in args.folders]
    _, base = runs[0]
    print("| message format | final held-out ppl (mean ± std) | Δ vs reference per seed (%) "
          "| payload bytes / reference | upload bytes / reference (incl. client.json) |")
    print("|---|---:|---|---:|---:|")
    for fmt, per_seed in runs:
        seeds = sorted(set(per_seed) & set(base))
        ppl = [per_seed[s][0] for s in seeds]
        rel = ", ".join(f"{100 * (per_seed[s][0] - base[s][0]) / base[s][0]:+.3f}" for s in seeds)
        payload = sum(per_seed[s][1] for s in seeds) / sum(base[s][1] for s in seeds)
        upload = sum(per_seed[s][2] for s in seeds) / sum(base[s][2] for s in seeds)
        spread = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        print(f"| {fmt} | {statistics.mean(ppl):.2f} ± {spread:.2f} | {rel} | {payload:.4f} | {upload:.4f} |")


if __name__ == "__main__":
    main()
