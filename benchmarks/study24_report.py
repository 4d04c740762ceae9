"""The issue-24 report: new arms paired per seed with the stored baselines, per round, per upload byte, early-stopped.

Inputs are per corpus ``{seed: {arm: {"rounds": [...]}}}`` (the rows `hetlora simulate` writes); every number is
held-out perplexity, and every "best round" is chosen on validation data only
(:func:`hetlora_bench.seed_stats.early_stopped`): the fixed federation validation set (``fixed_val_ppl``, every
client's validation examples, the same for every arm and round) when both sides of a comparison have it, else the
sampled clients' ``client_val_ppl`` (the stored baselines), marked ``client_val`` in the tables.
The **targets** (issue 24), per candidate arm, corpus, seed and
reported round ``h >= 5``: it beats HomLoRA(r_max) on the capable clients only and HomLoRA(r_min), both sides
early-stopped up to ``h``; at round 20, it is within 1 % of HomLoRA(r_max) on all clients (early-stopped too).

Example:
    >>> from study24_report import target_rows
    >>> runs = {0: {"new": {"rounds": [{"round": 5, "client_val_ppl": 1.0, "heldout_ppl": 9.0}]},
    ...             "homlora_rmax_capable": {"rounds": [{"round": 5, "client_val_ppl": 1.0, "heldout_ppl": 10.0}]},
    ...             "homlora_rmin": {"rounds": [{"round": 5, "client_val_ppl": 1.0, "heldout_ppl": 8.0}]}}}
    >>> [(r["beats_capable"], r["beats_rmin"], r["within_1pct_rmax"]) for r in target_rows(runs, ["new"], [5])]
    [(True, False, None)]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hetlora_bench.method_numbers import ppl_at_upload, round_rows
from hetlora_bench.seed_stats import (
    FIXED_VAL,
    REPORT_ROUNDS,
    criteria_note,
    early_stopped,
    early_stopping_markdown,
    heldout_at,
    horizon_table,
    stop_criterion,
)

CAPABLE, RMIN, RMAX = "homlora_rmax_capable", "homlora_rmin", "homlora_rmax"
#: the baselines every candidate is paired with (those present)
PAIRED_WITH = (CAPABLE, RMIN, RMAX, "flexlora_held")
#: "within 1 %" of HomLoRA(r_max) at this round
FINAL_ROUND = 20
WITHIN = 0.01

Runs = Mapping[Any, Mapping[str, Mapping[str, Any]]]  # seed -> arm -> {"rounds": [...]}


def _es(runs: Runs, seed: Any, arm: str, h: int, criterion: str | None = None) -> float | None:
    method = runs.get(seed, {}).get(arm)
    if method is None:
        return None
    chosen = early_stopped(method, h, criterion)
    return None if chosen is None else chosen["heldout_ppl"]


def pair_criterion(runs: Runs, seed: Any, arms: Sequence[str]) -> str:
    """The one early-stopping criterion for ``arms`` (those present) of a seed, so that a candidate and its
    baselines are stopped alike: ``fixed_val_ppl`` when every round of each has it, else ``client_val_ppl``
    (the stored baselines of the previous study have no fixed set: such pairs are reported on client validation
    and marked).

    Example:
        >>> runs = {0: {"a": {"rounds": [{"round": 1, "fixed_val_ppl": 2.0, "client_val_ppl": 3.0}]},
        ...             "b": {"rounds": [{"round": 1, "client_val_ppl": 3.0}]}}}
        >>> pair_criterion(runs, 0, ["a"]), pair_criterion(runs, 0, ["a", "b"])
        ('fixed_val_ppl', 'client_val_ppl')
    """
    per = runs.get(seed, {})
    return stop_criterion(*(per[a] for a in arms if a in per))


def cum_upload_at(method_metrics: Mapping[str, Any], round_: int) -> float | None:
    """Cumulative upload bytes after round ``round_`` (``None`` when the run has no such round).

    Example:
        >>> cum_upload_at({"rounds": [{"round": 1, "upload_bytes": 5}, {"round": 2, "upload_bytes": 7}]}, 2)
        12.0
    """
    for row in round_rows(method_metrics):
        if row.get("round") == round_:
            return float(row["cum_upload_bytes"])
    return None


def pair_rows(runs: Runs, candidates: Sequence[str], horizons: Sequence[int],
              baselines: Sequence[str] = PAIRED_WITH) -> list[dict[str, Any]]:
    """Per candidate, baseline and horizon: paired differences per seed (candidate - baseline) of the held-out
    perplexity at the round, early-stopped, and at equal upload bytes (the smaller of the two cumulative uploads at
    that round; each side interpolated between its evaluated rounds), with the wins (seeds where the difference is
    negative).

    Example:
        >>> row_a = {"round": 1, "heldout_ppl": 9.0, "client_val_ppl": 1.0, "upload_bytes": 4}
        >>> row_b = {"round": 1, "heldout_ppl": 10.0, "client_val_ppl": 1.0, "upload_bytes": 8}
        >>> runs = {0: {"a": {"rounds": [row_a]}, "b": {"rounds": [row_b]}}}
        >>> row = pair_rows(runs, ["a"], [1], ["b"])[0]
        >>> row["at_round"]["diffs"], row["early_stopped"]["wins"], row["equal_bytes"]["diffs"]
        ([-1.0], 1, [])
    """
    out = []
    for cand in candidates:
        for base in baselines:
            if base == cand or not any(base in per for per in runs.values()):
                continue
            for h in horizons:
                kinds: dict[str, dict[str, list]] = {k: {"seeds": [], "diffs": []}
                                                     for k in ("at_round", "early_stopped", "equal_bytes")}
                kinds["early_stopped"]["criteria"] = []
                for seed, per in runs.items():
                    a, b = per.get(cand), per.get(base)
                    if a is None or b is None:
                        continue
                    criterion = pair_criterion(runs, seed, [cand, base])
                    pairs = {"at_round": (heldout_at(a, h), heldout_at(b, h)),
                             "early_stopped": (_es(runs, seed, cand, h, criterion),
                                               _es(runs, seed, base, h, criterion))}
                    bytes_a, bytes_b = cum_upload_at(a, h), cum_upload_at(b, h)
                    if bytes_a is not None and bytes_b is not None and min(bytes_a, bytes_b) > 0:
                        budget = min(bytes_a, bytes_b)
                        pa, pb = ppl_at_upload(round_rows(a), budget), ppl_at_upload(round_rows(b), budget)
                        pairs["equal_bytes"] = (None if math.isnan(pa) else pa, None if math.isnan(pb) else pb)
                    for kind, (x, y) in pairs.items():
                        if x is not None and y is not None:
                            kinds[kind]["seeds"].append(seed)
                            kinds[kind]["diffs"].append(x - y)
                            if kind == "early_stopped":
                                kinds[kind]["criteria"].append(criterion)
                row: dict[str, Any] = {"candidate": cand, "baseline": base, "round": h}
                for kind, got in kinds.items():
                    diffs = got["diffs"]
                    row[kind] = {**got, "mean": float(np.mean(diffs)) if diffs else None,
                                 "wins": sum(d < 0 for d in diffs), "n": len(diffs)}
                out.append(row)
    return out


def target_rows(runs: Runs, candidates: Sequence[str], horizons: Sequence[int]) -> list[dict[str, Any]]:
    """The targets table: per candidate, seed and horizon ``h >= 5`` (of ``horizons``), with early stopping.

    ``beats_capable`` / ``beats_rmin``: its early-stopped held-out ppl is below HomLoRA(r_max, capable clients
    only)'s / HomLoRA(r_min)'s, both early-stopped up to ``h``; ``within_1pct_rmax``: at ``h == 20`` only, its
    early-stopped value is at most 1.01 x HomLoRA(r_max)'s (``None`` elsewhere or when a side is missing).

    Example:
        >>> runs = {0: {"x": {"rounds": [{"round": 20, "client_val_ppl": 1.0, "heldout_ppl": 10.1}]},
        ...             "homlora_rmax": {"rounds": [{"round": 20, "client_val_ppl": 1.0, "heldout_ppl": 10.0}]}}}
        >>> target_rows(runs, ["x"], [20])[0]["within_1pct_rmax"]
        True
    """
    rows = []
    for cand in candidates:
        for seed in runs:
            if cand not in runs[seed]:
                continue
            for h in (h for h in horizons if h >= 5):
                criterion = pair_criterion(runs, seed, [cand, CAPABLE, RMIN, *([RMAX] if h == FINAL_ROUND else [])])
                mine = _es(runs, seed, cand, h, criterion)
                if mine is None:
                    continue
                cap, rmin = _es(runs, seed, CAPABLE, h, criterion), _es(runs, seed, RMIN, h, criterion)
                rmax = _es(runs, seed, RMAX, h, criterion) if h == FINAL_ROUND else None
                rows.append({
                    "candidate": cand, "seed": seed, "round": h, "ppl": mine, "criterion": criterion,
                    "capable": cap, "rmin": rmin, "rmax": rmax,
                    "beats_capable": None if cap is None else mine < cap,
                    "beats_rmin": None if rmin is None else mine < rmin,
                    "within_1pct_rmax": None if rmax is None else mine <= (1 + WITHIN) * rmax,
                })
    return rows


def _mark(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "**no**")


def targets_markdown(rows: Sequence[Mapping[str, Any]], corpus: str) -> str:
    """Markdown of :func:`target_rows` for one corpus.

    Example:
        >>> print(targets_markdown([], "c").splitlines()[0])
        | Candidate | Corpus | Seed | Round | ppl (early-stopped) | beats capable-only r_max | beats r_min | within 1 % of r_max (round 20) |
    """  # noqa: E501
    lines = ["| Candidate | Corpus | Seed | Round | ppl (early-stopped) | beats capable-only r_max | beats r_min "
             "| within 1 % of r_max (round 20) |", "|---|---|---|---:|---:|---|---|---|"]

    def cell(r: Mapping[str, Any], flag: str, other: str) -> str:
        return _mark(r[flag]) + ("" if r[other] is None else f" ({r[other]:.2f})")

    for r in rows:
        mark = "" if r.get("criterion", FIXED_VAL) == FIXED_VAL else " (client_val)"
        lines.append(f"| {r['candidate']} | {corpus} | {r['seed']} | {r['round']} | {r['ppl']:.2f}{mark} | "
                     f"{cell(r, 'beats_capable', 'capable')} | {cell(r, 'beats_rmin', 'rmin')} | "
                     f"{cell(r, 'within_1pct_rmax', 'rmax')} |")
    return "\n".join(lines)


def pairs_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown of :func:`pair_rows`: mean paired difference and wins, at the round / early-stopped / equal bytes.

    Example:
        >>> print(pairs_markdown([]).splitlines()[0])
        | Candidate | vs | Round | Δ at round (wins) | Δ early-stopped (wins) | Δ at equal upload bytes (wins) |
    """
    lines = ["| Candidate | vs | Round | Δ at round (wins) | Δ early-stopped (wins) "
             "| Δ at equal upload bytes (wins) |", "|---|---|---:|---:|---:|---:|"]

    def cell(info: Mapping[str, Any]) -> str:
        if not info["n"]:
            return "—"
        per_seed = ", ".join(f"{d:+.2f}" for d in info["diffs"])
        fallback = sum(c != FIXED_VAL for c in info.get("criteria", [FIXED_VAL]))
        mark = "" if not fallback else (" client_val" if fallback == info["n"] else f" client_val on {fallback}")
        return f"{info['mean']:+.2f} ({info['wins']}/{info['n']}; {per_seed}){mark}"

    for r in rows:
        lines.append(f"| {r['candidate']} | {r['baseline']} | {r['round']} | {cell(r['at_round'])} | "
                     f"{cell(r['early_stopped'])} | {cell(r['equal_bytes'])} |")
    return "\n".join(lines)


def available_horizons(runs: Runs, candidates: Sequence[str], wanted: Sequence[int] = REPORT_ROUNDS) -> list[int]:
    """The reported rounds some candidate reached.

    Example:
        >>> available_horizons({0: {"a": {"rounds": [{"round": 10}]}}}, ["a"])
        [3, 5, 10]
    """
    reached = max((int(r.get("round", 0)) for per in runs.values() for arm, m in per.items() if arm in candidates
                   for r in m.get("rounds", [])), default=0)
    return [h for h in wanted if h <= reached]


def plot_corpus(runs_by_corpus: Mapping[str, Runs], arms: Sequence[str], path: Path) -> Path:
    """PNG: per corpus, mean held-out ppl over seeds per round (top) and per cumulative upload MB (bottom)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    corpora = list(runs_by_corpus)
    fig = Figure(figsize=(6.0 * len(corpora), 8.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(corpora), squeeze=False)
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}  # one colour per arm in every panel
    for col, corpus in enumerate(corpora):
        runs = runs_by_corpus[corpus]
        for arm in arms:
            curves = [round_rows(per[arm]) for per in runs.values() if arm in per]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            rounds = [c[:length] for c in curves]
            x = [r["round"] for r in rounds[0]]
            y = np.nanmean([[float(r.get("heldout_ppl") or np.nan) for r in c] for c in rounds], axis=0)
            mb = np.mean([[r["cum_upload_bytes"] / 2**20 for r in c] for c in rounds], axis=0)
            style = {"linewidth": 2.2} if arm not in PAIRED_WITH and arm != "flexlora_held" else {"linewidth": 1.2}
            style["color"] = colors[arm]
            axes[0][col].plot(x, y, label=arm, **style)
            axes[1][col].plot(mb, y, label=arm, **style)
        axes[0][col].set(title=f"{corpus}: held-out ppl (mean over seeds)", xlabel="round", ylabel="held-out ppl")
        axes[1][col].set(xlabel="cumulative upload (MiB)", ylabel="held-out ppl")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.set_yscale("log")
        axes[0][col].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def plot_targets(rows_by_corpus: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """PNG: the targets as a grid (rows: candidate / corpus / seed, columns: round); green = both beaten."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted({(r["candidate"], c, r["seed"]) for c, rows in rows_by_corpus.items() for r in rows},
                  key=lambda k: (k[0], k[1], str(k[2])))
    rounds = sorted({r["round"] for rows in rows_by_corpus.values() for r in rows})
    grid = np.full((max(len(keys), 1), max(len(rounds), 1)), np.nan)
    for c, rows in rows_by_corpus.items():
        for r in rows:
            score = int(bool(r["beats_capable"])) + int(bool(r["beats_rmin"]))
            grid[keys.index((r["candidate"], c, r["seed"])), rounds.index(r["round"])] = score
    fig = Figure(figsize=(1.2 + 0.9 * max(len(rounds), 1), 1.0 + 0.35 * max(len(keys), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=2, aspect="auto")
    ax.set_xticks(range(len(rounds)), [f"r{h}" for h in rounds])
    ax.set_yticks(range(len(keys)), [f"{a} / {c} / s{s}" for a, c, s in keys], fontsize=7)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{int(grid[i, j])}/2", ha="center", va="center", fontsize=7)
    ax.set_title("targets beaten (capable-only r_max, r_min), early-stopped", fontsize=9)
    fig.savefig(path, dpi=110)
    return path


def corpus_sections(corpus: str, runs: Runs, candidates: Sequence[str], horizons: Sequence[int]
                    ) -> tuple[list[str], dict[str, Any]]:
    """The markdown lines and the JSON record of one corpus."""
    seeds = list(runs)
    shown = [*candidates, *(b for b in PAIRED_WITH if b not in candidates)]
    table = horizon_table([{a: runs[s][a] for a in shown if a in runs[s]} for s in seeds], horizons, seeds=seeds)
    pairs = pair_rows(runs, candidates, horizons)
    targets = target_rows(runs, candidates, horizons)
    lines = [f"## {corpus}", "",
             "### Held-out perplexity at each round / early-stopped on validation data (round chosen)", "",
             criteria_note(table) + " A pair or target row is stopped on one criterion for both sides: the fixed set "
             "when both have it, else client validation, marked `client_val`.", "",
             early_stopping_markdown(table), "",
             "### Paired per seed (candidate − baseline; wins: seeds where the candidate is lower)", "",
             pairs_markdown(pairs), "", "### Targets (early stopping allowed on both sides)", "",
             targets_markdown(targets, corpus), ""]
    return lines, {"horizons": table, "pairs": pairs, "targets": targets}
