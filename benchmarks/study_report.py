"""The study's reports: per-corpus reports at each horizon, the gap-by-horizon, settings-across-seeds and
per-component norm tables, and ``study.md`` / ``study.json`` that gather them (see `study.py` for the phases).

Example:
    ```py
    >>> from study_report import adapter_component_norms
    >>> import torch
    >>> w = {"m.lora_A.weight": torch.tensor([[3.0, 4.0]]), "m.lora_B.weight": torch.tensor([[2.0]])}
    >>> adapter_component_norms(w)
    [10.0]
    ```
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from study_plan import (
    CORE_ARMS,
    WINDOW_ARMS,
    best_window,
    choose_settings,
    declared_settings,
    horizons,
    long_arms,
    plateau_arms,
    reached,
    read_rows,
    setting_name,
    validation_score,
)


def compose(out: Path, corpus: str, seeds: list[int], sources: dict[str, str], rounds: int) -> list[dict[str, Any]]:
    """Per seed ``{arm: {"rounds": rows[:rounds]}}`` from each arm's source setting folder."""
    per_seed = []
    for seed in seeds:
        metrics = {}
        for arm, setting in sources.items():
            rows = read_rows(out / corpus / setting / f"s{seed}" / f"seed-{seed}" / arm)
            rows = [r for r in rows if r["round"] <= rounds]
            if not rows or rows[-1]["round"] != rounds:
                raise SystemExit(
                    f"{corpus}/{setting}/s{seed}/{arm} has not reached round {rounds}; run the study first."
                )
            metrics[arm] = {"rounds": rows}
        per_seed.append(metrics)
    return per_seed


def settings_across_seeds(
    out: Path, corpus: str, seeds: list[int], settings: list[str], arms: list[str], rounds: int
) -> list[dict[str, Any]]:
    """Per arm and setting that every seed ran to `rounds`: the mean over seeds of the tuning criterion
    (`validation_score`) and of the held-out perplexity at `rounds`, and on how many seeds the setting has the
    arm's lowest validation score among those settings."""
    table = []
    for arm in arms:
        scores: dict[str, list[float]] = {}
        heldout: dict[str, list[float]] = {}
        for setting in settings:
            per_seed = [read_rows(out / corpus / setting / f"s{seed}" / f"seed-{seed}" / arm) for seed in seeds]
            if all(any(r["round"] == rounds for r in rows) for rows in per_seed):
                scores[setting] = [validation_score(rows, rounds) for rows in per_seed]
                heldout[setting] = [next(r["heldout_ppl"] for r in rows if r["round"] == rounds) for rows in per_seed]
        for setting in scores:
            wins = sum(all(scores[setting][i] <= scores[other][i] for other in scores) for i in range(len(seeds)))
            table.append(
                {
                    "arm": arm,
                    "setting": setting,
                    "client_val_ppl": sum(scores[setting]) / len(seeds),
                    "heldout_ppl": sum(heldout[setting]) / len(seeds),
                    "best_on_seeds": wins,
                }
            )
    return table


def gap_by_horizon(
    out: Path,
    corpus: str,
    seeds: list[int],
    sources: dict[str, str],
    rounds: list[int],
    window: str,
    span: int = 5,
) -> list[dict[str, Any]]:
    """Per horizon: each arm's mean held-out perplexity over seeds; the window arm's gap to HomLoRA(r_max) in %
    (mean of the per-seed ratios) at the horizon and over its last `span` rounds (each arm's mean perplexity over
    rounds horizon-span+1 .. horizon: a single round moves by several % with the 4 clients it sampled); and how
    much HomLoRA(r_max) improved since the previous horizon (its plateau)."""
    table = []
    previous = None
    for horizon in rounds:
        per_seed = compose(out, corpus, seeds, sources, horizon)
        final = {arm: [m[arm]["rounds"][-1]["heldout_ppl"] for m in per_seed] for arm in sources}
        recent = {
            arm: [
                sum(r["heldout_ppl"] for r in rows) / len(rows)
                for rows in (m[arm]["rounds"][-span:] for m in per_seed)
            ]
            for arm in sources
        }
        ref = final["homlora_rmax"]
        row: dict[str, Any] = {"round": horizon, **{arm: sum(v) / len(v) for arm, v in final.items()}}
        row["gap_pct"] = 100 * sum(w / r - 1 for w, r in zip(final[window], ref)) / len(ref)
        pairs = zip(recent[window], recent["homlora_rmax"])
        row["gap_span_pct"] = 100 * sum(w / r - 1 for w, r in pairs) / len(ref)
        row["rmax_gain_pct"] = None if previous is None else 100 * (1 - row["homlora_rmax"] / previous)
        previous = row["homlora_rmax"]
        table.append(row)
    return table


def adapter_component_norms(weights: dict[str, Any]) -> list[float]:
    """Per component j: the sum over LoRA modules of ||B[:, j]|| * ||A[j, :]|| (modules of different rank: the
    shorter ones count as zero beyond their rank)."""
    from peft_hetlora.federated.adapter import flat_a, flat_b, split_lora_keys

    modules, _ = split_lora_keys(weights)
    norms: list[float] = []
    for name, (a_key, b_key) in modules.items():
        a, b = flat_a(weights[a_key]).double(), flat_b(name, weights[b_key]).double()
        term = (b.norm(dim=0) * a.norm(dim=1)).tolist()
        norms += [0.0] * (len(term) - len(norms))
        for j, value in enumerate(term):
            norms[j] += value
    return norms


def component_norms(
    out: Path, corpus: str, seeds: list[int], sources: dict[str, str], rounds: int
) -> dict[str, list[float]]:
    """Per arm, the mean over seeds of :func:`adapter_component_norms` of the global after `rounds` rounds."""
    from safetensors.torch import load_file

    from peft_hetlora.federated.stores import LocalStore

    result = {}
    for arm, setting in sources.items():
        per_seed = []
        for seed in seeds:
            store = LocalStore(out / corpus / setting / f"s{seed}" / f"seed-{seed}" / arm / "store")
            latest = store.latest_global()
            if latest is not None and latest.round >= rounds:
                weights = load_file(str(store.get_global(rounds).path / "adapter_model.safetensors"))
                per_seed.append(adapter_component_norms(weights))
        if per_seed:
            width = min(len(n) for n in per_seed)
            result[arm] = [sum(n[j] for n in per_seed) / len(per_seed) for j in range(width)]
    return result


def horizon_report(
    out: Path, report_dir: Path, corpus: str, seeds: list[int], sources: dict[str, str], rounds: int, title: str
) -> Path:
    """Write one corpus's report at one horizon into ``report_dir/r<rounds>/<corpus>``; return that folder."""
    from hetlora_bench.report import write_report

    folder = report_dir / f"r{rounds}" / corpus
    per_seed = compose(out, corpus, seeds, sources, rounds)
    write_report(per_seed, folder, seeds=seeds, reference="homlora_rmax", title=title)
    return folder


def report(args, out: Path) -> Path:
    from hetlora_bench.seed_stats import merge_run_folders

    chosen, table = choose_settings(args, out)
    window = best_window(table)
    report_dir = args.report_dir or out / "report"
    lines = ["# The multi-seed study (issues 12 and 13)", ""]
    base_arms = list(dict.fromkeys([*args.methods, WINDOW_ARMS[0]]))
    horizon_dirs = []
    for corpus in args.corpora:
        sources = {arm: "default" for arm in base_arms}
        title = f"{corpus}: every arm at the cpu profile ({args.rounds} rounds, profile settings)"
        horizon_dirs.append(horizon_report(out, report_dir, corpus, args.seeds, sources, args.rounds, title))
    merged = merge_run_folders(horizon_dirs, report_dir / f"r{args.rounds}" / "merged", reference="homlora_rmax")
    lines += [
        f"## {args.rounds} rounds, every arm at the profile's settings",
        "",
        merged.read_text().split("\n", 2)[2],
    ]
    long_sources = {arm: setting_name(chosen.get(arm, {})) for arm in long_arms(args, window)}
    long_dirs = []
    reached_by_corpus = {}
    for corpus in args.long_corpora:
        # a study stopped early reports each corpus at the round every arm and seed reached
        rounds = min(args.long_rounds, reached(out, corpus, args.seeds, long_sources))
        reached_by_corpus[corpus] = rounds
        title = f"{corpus}: core arms, {rounds} rounds, settings chosen on client validation"
        long_dirs.append(horizon_report(out, report_dir, corpus, args.seeds, long_sources, rounds, title))
        norms = component_norms(out, corpus, args.seeds, long_sources, rounds)
        lines += [
            f"## {corpus}: core arms after {rounds} rounds, at their chosen settings",
            "",
            (long_dirs[-1] / "report.md").read_text().split("\n", 2)[2],
            "",
            f"## {corpus}: per-component norms after {rounds} rounds",
            "",
            "Sum over modules of ||B[:, j]|| ||A[j, :]|| of the final global adapter, mean over seeds.",
            "",
            "| arm | " + " | ".join(str(j + 1) for j in range(max(map(len, norms.values())))) + " |",
            "|---|" + "---:|" * max(map(len, norms.values())),
        ]
        for arm, values in norms.items():
            lines.append(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        lines.append("")
    if len(long_dirs) > 1 and len(set(reached_by_corpus.values())) == 1:
        rounds = next(iter(reached_by_corpus.values()))
        merged_long = merge_run_folders(long_dirs, report_dir / f"r{rounds}" / "merged", reference="homlora_rmax")
        lines += [
            f"## {rounds} rounds, core arms at their chosen settings, every corpus",
            "",
            merged_long.read_text().split("\n", 2)[2],
        ]
    if args.plateau_rounds > args.long_rounds:
        plateau_sources = {arm: setting_name(chosen.get(arm, {})) for arm in plateau_arms(args, window)}
        steps = [args.rounds, *horizons(args.rounds, args.plateau_rounds, args.long_step)]
        for corpus in args.plateau_corpora:
            title = f"{corpus}: {', '.join(plateau_sources)} to round {args.plateau_rounds}"
            horizon_report(out, report_dir, corpus, args.seeds, plateau_sources, args.plateau_rounds, title)
            gaps = gap_by_horizon(out, corpus, args.seeds, plateau_sources, steps, window, span=args.long_step)
            lines += [
                f"## {corpus}: towards HomLoRA(r_max)'s plateau",
                "",
                f"Mean held-out perplexity over seeds; gap = `{window}` / HomLoRA(r_max) - 1 per seed, averaged, at "
                f"the round and over its last {args.long_step} rounds (each arm's mean perplexity over them); "
                "gain = HomLoRA(r_max)'s improvement since the previous row.",
                "",
                "| round | "
                + " | ".join(plateau_sources)
                + f" | gap (%) | gap, last {args.long_step} rounds (%) | HomLoRA(r_max) gain (%) |",
                "|---:|" + "---:|" * (len(plateau_sources) + 3),
            ]
            for row in gaps:
                gain = "" if row["rmax_gain_pct"] is None else f"{row['rmax_gain_pct']:.2f}"
                cells = " | ".join(f"{row[arm]:.2f}" for arm in plateau_sources)
                lines.append(
                    f"| {row['round']} | {cells} | {row['gap_pct']:+.2f} | {row['gap_span_pct']:+.2f} | {gain} |"
                )
            lines.append("")
    across = settings_across_seeds(
        out,
        args.tune_corpus,
        args.seeds,
        sorted(declared_settings(args)),
        [window, *CORE_ARMS],
        args.rounds,
    )
    if len({row["setting"] for row in across}) > 1:
        lines += [
            f"## {args.tune_corpus}: settings across seeds after {args.rounds} rounds",
            "",
            "Every declared setting that all seeds ran: mean over seeds of the tuning criterion (client validation, "
            f"rounds {args.rounds - 1}-{args.rounds}) and of held-out perplexity; best on = seeds where the setting "
            "has the arm's lowest validation score.",
            "",
            "| arm | setting | client-val ppl | held-out ppl | best on |",
            "|---|---|---:|---:|---:|",
        ]
        for row in across:
            lines.append(
                f"| {row['arm']} | {row['setting']} | {row['client_val_ppl']:.2f} | {row['heldout_ppl']:.2f} | "
                f"{row['best_on_seeds']}/{len(args.seeds)} |"
            )
        lines.append("")
    lines += [
        "## Tuning on client validation data",
        "",
        f"{args.tune_corpus}, seed {args.tune_seed}, {args.tune_rounds} rounds; score = mean client-validation "
        "perplexity of the round's participants over the last two rounds (lower is better). Window rule "
        f"chosen: `{window}`.",
        "",
        "| arm | setting | client-val ppl | chosen |",
        "|---|---|---:|:---:|",
    ]
    for row in sorted(table, key=lambda r: (r["arm"], r["client_val_ppl"])):
        lines.append(
            f"| {row['arm']} | {row['setting']} | {row['client_val_ppl']:.2f} | {'yes' if row['chosen'] else ''} |"
        )
    (report_dir / "study.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (report_dir / "study.json").write_text(json.dumps({"chosen": chosen, "window": window, "tuning": table}, indent=2))
    if args.results:
        copy_results(report_dir, args.results)
    return report_dir / "study.md"


def copy_results(report_dir: Path, results: Path) -> None:
    """Copy the small outputs (md, json, png) into the repository's results folder."""
    for path in report_dir.rglob("*"):
        if path.is_file() and path.suffix in (".md", ".json", ".png"):
            target = results / path.relative_to(report_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
