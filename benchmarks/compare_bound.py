"""Paired comparison of two `hetlora simulate` runs of one arm: the default influence bound against `clip_norm: "off"`.

Per seed and round: held-out perplexity of both runs, how many clients the bound clipped (from the bounded run's
summary.json), and whether the two published globals are byte-identical. Reproduces the table in
docs/aggregation.md ("What it costs an honest federation"):

    OMP_NUM_THREADS=1 hetlora simulate --profile cpu --methods flexlora_held --seeds 0,1,2 --out runs/bound-on
    echo '{"clip_norm": "off"}' > off.json
    OMP_NUM_THREADS=1 hetlora simulate --profile cpu --methods flexlora_held --seeds 0,1,2 --config off.json \
        --out runs/bound-off
    python benchmarks/compare_bound.py runs/bound-on runs/bound-off --arm flexlora_held
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def _rounds(folder: Path) -> dict[int, dict]:
    lines = (folder / "rounds.jsonl").read_text().splitlines()
    return {row["round"]: row for row in map(json.loads, lines)}


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def compare(bounded: Path, unbounded: Path, arm: str) -> list[dict]:
    """One row per (seed, round) both runs reached."""
    rows = []
    for seed_dir in sorted(bounded.glob("seed-*")):
        on, off = seed_dir / arm, unbounded / seed_dir.name / arm
        if not (on / "rounds.jsonl").is_file() or not (off / "rounds.jsonl").is_file():
            continue
        ron, roff = _rounds(on), _rounds(off)
        for k in sorted(set(ron) & set(roff)):
            summary = on / "store" / "rounds" / str(k - 1) / "summary.json"
            bound = (json.loads(summary.read_text()).get("aggregation") or {}).get("influence_bound") or {} \
                if k and summary.is_file() else {}
            weights = [d / "store" / "rounds" / str(k) / "global" / "adapter_model.safetensors" for d in (on, off)]
            rows.append({"seed": seed_dir.name, "round": k, "bounded": ron[k]["heldout_ppl"],
                         "off": roff[k]["heldout_ppl"], "clipped": len(bound.get("clipped") or {}),
                         "identical": _digest(weights[0]) is not None and _digest(weights[0]) == _digest(weights[1])})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bounded", type=Path)
    parser.add_argument("unbounded", type=Path)
    parser.add_argument("--arm", default="flexlora_held")
    args = parser.parse_args(argv)
    print("| seed | round | held-out ppl, default bound | held-out ppl, off | clients clipped | globals identical |")
    print("|---|---|---|---|---|---|")
    for r in compare(args.bounded, args.unbounded, args.arm):
        print(f"| {r['seed']} | {r['round']} | {r['bounded']:.3f} | {r['off']:.3f} | {r['clipped']} | "
              f"{'yes' if r['identical'] else 'no'} |")


if __name__ == "__main__":
    main()
