"""Is issue 24's first target reachable at all? The unaffordable oracle against capable-only and HomLoRA(r_min), per
seed and round.

Issue 24 asks the default to beat HomLoRA(r_max) trained on the capable clients only ("capable-only") on every seed
from round 5 on. Every heterogeneous method trains, per round, a subset of what HomLoRA(r_max) on *all* clients
trains (the same sampled clients, each at rank ``r_max``): that federation is the oracle no device mix can afford,
and in every run of the project's study it is the lower envelope of the heterogeneous arms. So where the oracle
does not beat capable-only, no aggregation rule can be expected to: the target asks for more than full rank on
every device buys. The same holds for HomLoRA(r_min): where the oracle does not beat it, full rank buys nothing
over rank ``r_min`` at that horizon, and neither can a mix of ranks.

This tool reads the stored baselines (``benchmarks/results/study/chosen/r20/<corpus>/metrics.json``, the rows
``hetlora simulate`` writes, every arm at its own rate chosen on client validation) and, per corpus, seed and
reported round ``h``, compares each arm at its **best held-out round up to h** (the most favourable early stop any
rule could pick: an upper bound on what early stopping gives each side) and at round ``h`` itself. ``--chosen ''``
reads the run folders of ``--runs`` alone (a study whose baselines were all rerun, e.g. on a corpus that changed).

Outputs ``feasibility.{md,json,png}``.

Example:
    >>> from feasibility24 import best_up_to, feasibility_rows
    >>> best_up_to([{"round": 1, "heldout_ppl": 9.0}, {"round": 2, "heldout_ppl": 7.0},
    ...             {"round": 3, "heldout_ppl": 8.0}], 3)
    7.0
    >>> seeds = {0: {"homlora_rmax": {"rounds": [{"round": 5, "heldout_ppl": 10.0}]},
    ...              "homlora_rmax_capable": {"rounds": [{"round": 5, "heldout_ppl": 9.5}]},
    ...              "homlora_rmin": {"rounds": [{"round": 5, "heldout_ppl": 12.0}]},
    ...              "flexlora_held": {"rounds": [{"round": 5, "heldout_ppl": 11.0}]}}}
    >>> row = feasibility_rows(seeds, [5])[0]
    >>> row["oracle_beats_capable"], row["oracle_beats_rmin"], round(row["default_vs_oracle_pct"], 1)
    (False, True, 10.0)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # hetlora_bench, when run as a script

from hetlora_bench.seed_stats import data_signature, heldout_at, same_data  # noqa: E402

ORACLE, CAPABLE, RMIN, DEFAULT = "homlora_rmax", "homlora_rmax_capable", "homlora_rmin", "flexlora_held"
ROUNDS = (3, 5, 10, 15, 20)


def best_up_to(method: Mapping[str, Any] | Sequence[Mapping[str, Any]], h: int) -> float | None:
    """The lowest held-out perplexity over rounds ``1..h`` (``None`` when round ``h`` was not reached).

    Example:
        >>> best_up_to([{"round": 1, "heldout_ppl": 5.0}, {"round": 2, "heldout_ppl": 6.0}], 2)
        5.0
    """
    if heldout_at(method, h) is None:
        return None
    values = [v for t in range(1, h + 1) if (v := heldout_at(method, t)) is not None]
    return min(values) if values else None


def _pct(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else 100.0 * (a - b) / b


def feasibility_rows(seeds: Mapping[Any, Mapping[str, Any]], rounds: Sequence[int] = ROUNDS) -> list[dict[str, Any]]:
    """One row per (seed, round): oracle, capable-only, HomLoRA(r_min) and the default, at the round and best-so-far.

    ``oracle_beats_capable`` / ``oracle_beats_rmin`` compare the two at their best round up to ``h`` (None without
    an r_min curve); the ``default_vs_*_pct`` columns are the default's gap in percent of the other arm's
    best-so-far (negative: the default is better), ``oracle_vs_*_pct`` the oracle's.
    """
    out: list[dict[str, Any]] = []
    for seed, arms in sorted(seeds.items(), key=lambda kv: str(kv[0])):
        if not all(a in arms for a in (ORACLE, CAPABLE)):
            continue
        for h in rounds:
            best = {a: best_up_to(arms[a], h) if a in arms else None for a in (ORACLE, CAPABLE, RMIN, DEFAULT)}
            if best[ORACLE] is None or best[CAPABLE] is None:
                continue
            out.append({
                "seed": seed, "round": h,
                "oracle_at": heldout_at(arms[ORACLE], h), "capable_at": heldout_at(arms[CAPABLE], h),
                "oracle_best": best[ORACLE], "capable_best": best[CAPABLE],
                "rmin_best": best[RMIN], "default_best": best[DEFAULT],
                "oracle_beats_capable": best[ORACLE] < best[CAPABLE],
                "oracle_vs_capable_pct": _pct(best[ORACLE], best[CAPABLE]),
                "oracle_beats_rmin": None if best[RMIN] is None else best[ORACLE] < best[RMIN],
                "oracle_vs_rmin_pct": _pct(best[ORACLE], best[RMIN]),
                "default_vs_capable_pct": _pct(best[DEFAULT], best[CAPABLE]),
                "default_vs_rmin_pct": _pct(best[DEFAULT], best[RMIN]),
                "default_vs_oracle_pct": _pct(best[DEFAULT], best[ORACLE]),
            })
    return out


def _f(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}%" if signed else f"{value:.2f}"


def markdown(rows_by_corpus: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """The table: one line per corpus and round, the seeds side by side."""
    lines = ["| corpus | round | oracle best (s0/s1/s2) | capable-only best | oracle beats capable | r_min best | "
             "oracle beats r_min | default best | default vs capable | default vs r_min | default vs oracle |",
             "|---|---:|---|---|---|---|---|---|---|---|---|"]
    for corpus, rows in rows_by_corpus.items():
        for h in sorted({r["round"] for r in rows}):
            rs = [r for r in rows if r["round"] == h]
            wins = sum(r["oracle_beats_capable"] for r in rs)
            known = [r["oracle_beats_rmin"] for r in rs if r["oracle_beats_rmin"] is not None]
            over_rmin = f"{sum(known)} of {len(known)}" if known else "-"

            def col(key: str, signed: bool = False, rs: Sequence[Mapping[str, Any]] = rs) -> str:
                return " / ".join(_f(r[key], signed) for r in rs)
            lines.append(f"| {corpus} | {h} | {col('oracle_best')} | {col('capable_best')} | {wins} of {len(rs)} | "
                         f"{col('rmin_best')} | {over_rmin} | {col('default_best')} | "
                         f"{col('default_vs_capable_pct', True)} | {col('default_vs_rmin_pct', True)} | "
                         f"{col('default_vs_oracle_pct', True)} |")
    return "\n".join(lines) + "\n"


def plot(rows_by_corpus: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """Oracle, default and HomLoRA(r_min) relative to capable-only (percent, per seed) against the round, one panel per
    corpus."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows_by_corpus), figsize=(5.5 * len(rows_by_corpus), 3.8), squeeze=False)
    for ax, (corpus, rows) in zip(axes[0], rows_by_corpus.items()):
        for i, seed in enumerate(sorted({r["seed"] for r in rows}, key=str)):
            rs = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["round"])
            ax.plot([r["round"] for r in rs], [r["oracle_vs_capable_pct"] for r in rs], "o-", color="tab:green",
                    alpha=0.7, label="HomLoRA(r_max), all clients (oracle)" if i == 0 else None)
            ax.plot([r["round"] for r in rs], [r["default_vs_capable_pct"] for r in rs], "s--", color="tab:blue",
                    alpha=0.7, label="flexlora_held (default)" if i == 0 else None)
            if all(r["rmin_best"] is not None for r in rs):
                ax.plot([r["round"] for r in rs], [_pct(r["rmin_best"], r["capable_best"]) for r in rs], "^:",
                        color="tab:red", alpha=0.7, label="HomLoRA(r_min), all clients" if i == 0 else None)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(f"{corpus}: best-so-far held-out ppl vs capable-only")
        ax.set_xlabel("round")
        ax.set_ylabel("% vs capable-only (below 0: better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load(metrics_json: Path) -> dict[Any, dict[str, Any]]:
    """``{seed: {arm: {"rounds": [...]}}}`` from a stored study ``metrics.json``."""
    data = json.loads(metrics_json.read_text())
    return dict(zip(data["seeds"], data["metrics"]))


def overlay_runs(seeds: dict[Any, dict[str, Any]], runs: Path, corpus: str) -> list[str]:
    """Replace stored arms by the run folders under ``runs/<corpus>/<arm>/s<seed>/`` (``study24.py --out`` layout).

    Returns the arms replaced. A rerun at another rate is compared exactly like the stored one.
    """
    from study_plan import read_rows

    replaced: set[str] = set()
    stored = bool(seeds)
    for arm_dir in sorted((runs / corpus).glob("*")) if (runs / corpus).is_dir() else []:
        if not stored:  # no stored baselines: every seed the run folders hold
            for folder in arm_dir.glob("s*"):
                if folder.name[1:].isdigit():
                    seeds.setdefault(int(folder.name[1:]), {})
        for seed in list(seeds):
            rows = read_rows(arm_dir / f"s{seed}" / f"seed-{seed}" / arm_dir.name)
            if rows:
                ours = data_signature(rows)
                if seeds[seed] and not any(same_data(data_signature(m["rounds"]), ours) for m in seeds[seed].values()):
                    raise SystemExit(f"feasibility24: {arm_dir.name} seed {seed} under {runs} saw other data than the "
                                     f"stored baselines (round-0 held-out and clients: {ours})")
                seeds[seed][arm_dir.name] = {"rounds": rows}
                replaced.add(arm_dir.name)
    return sorted(replaced)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chosen", default="benchmarks/results/study/chosen/r20",
                        help="folder with <corpus>/metrics.json (the stored baselines); '' for none (--runs alone)")
    parser.add_argument("--corpora", default="chitchat,pycode")
    parser.add_argument("--runs", type=Path, default=None,
                        help="a study24.py --out folder whose arms replace the stored ones (a rerun at another rate)")
    parser.add_argument("--name", default="feasibility", help="output file stem")
    parser.add_argument("--out", default="benchmarks/results/study24")
    args = parser.parse_args(argv)
    rows = {}
    for corpus in args.corpora.split(","):
        seeds = load(Path(args.chosen) / corpus / "metrics.json") if args.chosen else {}
        if args.runs is not None:
            print(f"{corpus}: arms from {args.runs}: {overlay_runs(seeds, args.runs, corpus)}")
        rows[corpus] = feasibility_rows(seeds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{args.name}.md").write_text(markdown(rows))
    plot(rows, out / f"{args.name}.png")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
