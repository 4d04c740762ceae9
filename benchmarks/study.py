"""The multi-seed study behind issues 12 and 13: resumable, parallel workers, one report per corpus and horizon.

Every piece is a `hetlora simulate` call (`--profile cpu`: SmolLM2-135M, 20 clients, 4 a round, `tiers` ranks
2/6/16) into its own run folder ``OUT/<corpus>/<setting>/s<seed>``, so a killed study resumes where it stopped
(finished folders are skipped without loading the model; unfinished ones resume inside `hetlora simulate`).

Phases (``--phase all`` runs them in this order):

1. ``seeds``: the default arms plus ``window_coverage`` at the cpu profile's 5 rounds, on every corpus and seed
   (and ``window_rolling`` on the tuning corpus and seed, to pick the better window rule);
   ``tune``: on the tuning corpus and seed, the core arms at the other learning rates, and the
   self-pruning arms (``hetlora``, ``rankwise``) at other HetLoRA ``prune_lambda`` / ``prune_gamma`` values.
   Both run together on the worker pool.
2. ``long``: the core arms, each at the setting it won on *client validation* data (mean client-validation
   perplexity over the last two tuning rounds; held-out data is never used to choose), extended to
   ``--long-rounds`` on the long corpora and every seed. Rounds are result-neutral in a run folder, so the
   5-round runs are extended, not redone.
3. ``report``: ``OUT/report/r<R>/<corpus>/`` (report.md, metrics.json, plots with ±1 std bands, paired wins per
   seed) for the 5-round and long horizons, a merged table over corpora, the tuning table and the per-component
   norms of the long runs' final global adapters (``OUT/report/study.md``).

Run (about 1.5 h with two workers on an idle 2-core machine; see benchmarks/README.md):

    PYTHONPATH=$PWD python benchmarks/study.py --out runs/study --workers 2

Example with a smaller study (a smoke test of the machinery on the tiny model):

    PYTHONPATH=$PWD python benchmarks/study.py --profile quick --corpora chitchat --seeds 0,1 \
        --long-corpora chitchat --long-rounds 3 --tune-rounds 2 --lrs 1e-3 --prune-variants '' --out runs/study-quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from peft_hetlora.simulation.config import PROFILES, SimulationConfig

WINDOW_ARMS = ("window_coverage", "window_rolling", "window_fedavg")
#: the arms of the seeds phase (the "default" folders): the simulator's default arms when the study began, pinned
#: like BASE_SETTING so that later changes of the default list never make a finished study incomplete
BASE_ARMS = (
    "window_coverage",
    "rankwise",
    "hetlora",
    "hetlora_noprune",
    "zero_pad",
    "flexlora",
    "homlora_rmin",
    "homlora_rmax",
    "homlora_rmax_capable",
    "centralized",
)
#: the issue's core arms; the window rule is chosen on validation among WINDOW_ARMS
CORE_ARMS = ("rankwise", "hetlora", "flexlora", "homlora_rmin", "homlora_rmax", "homlora_rmax_capable")
#: arms whose results depend on HetLoRA's self-pruning settings (lambda, gamma)
PRUNING_ARMS = ("hetlora", "rankwise")
PRUNE_KEYS = {"lam": "prune_lambda", "gam": "prune_gamma"}
#: the study's base setting ("default" folders): the cpu profile as it stood when the study began; pinned so that
#: the profile's later defaults (chosen by this study: lr 1e-3) never change what a "default" folder resumes with
BASE_SETTING = {"learning_rate": 3e-4}


@dataclass(frozen=True)
class Piece:
    """One `hetlora simulate` call: a corpus, a setting (overrides of the profile), a seed, arms and rounds."""

    corpus: str
    setting: tuple[tuple[str, float], ...]
    seed: int
    methods: tuple[str, ...]
    rounds: int
    cost: float = field(default=1.0, compare=False)

    @property
    def setting_name(self) -> str:
        return setting_name(dict(self.setting))

    def folder(self, out: Path) -> Path:
        return out / self.corpus / self.setting_name / f"s{self.seed}"


def setting_name(overrides: dict[str, float]) -> str:
    """A folder name for a setting: ``default`` or e.g. ``learning_rate=0.001``."""
    return "default" if not overrides else ",".join(f"{k}={v:g}" for k, v in sorted(overrides.items()))


def read_rows(arm_dir: Path) -> list[dict[str, Any]]:
    path = arm_dir / "rounds.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_done(piece: Piece, out: Path) -> bool:
    folder = piece.folder(out)
    return all(
        any(r.get("round") == piece.rounds for r in read_rows(folder / f"seed-{piece.seed}" / arm))
        for arm in piece.methods
    )


def run_piece(piece: Piece, out: Path, profile: str, threads: int) -> Piece:
    """Run (or resume) one piece in a child process with `threads` math threads; raise if it fails."""
    folder = piece.folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "peft_hetlora.cli",
        "simulate",
        "--profile",
        profile,
        "--out",
        str(folder),
        "--dataset",
        piece.corpus,
        "--seeds",
        str(piece.seed),
        "--methods",
        ",".join(piece.methods),
        "--rounds",
        str(piece.rounds),
    ]
    for key, value in sorted({**BASE_SETTING, **dict(piece.setting)}.items()):
        command += [f"--{key.replace('_', '-')}", f"{value:g}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    with open(folder / "study.log", "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {code}); see {folder / 'study.log'}")
    return piece


def run_pieces(pieces: list[Piece], out: Path, profile: str, workers: int, desc: str) -> None:
    todo = [p for p in pieces if not is_done(p, out)]
    if not todo:
        return
    threads = max(1, (os.cpu_count() or 2) // workers)
    todo.sort(key=lambda p: -p.cost)  # longest first: the pool finishes together
    failures = []
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(todo), desc=desc, unit="run") as bar:
        futures = {pool.submit(run_piece, p, out, profile, threads): p for p in todo}
        for future in as_completed(futures):
            try:
                future.result()
            except RuntimeError as err:
                failures.append(str(err))
            bar.update()
    if failures:
        raise SystemExit("\n".join(failures))


def validation_score(rows: list[dict[str, Any]], rounds: int) -> float:
    """Mean client-validation perplexity over the last two rounds up to `rounds` (the tuning criterion)."""
    values = [
        r["client_val_ppl"] for r in rows if r.get("client_val_ppl") is not None and rounds - 1 <= r["round"] <= rounds
    ]
    return sum(values) / len(values) if values else math.inf


def choose_settings(args, out: Path) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Each core arm's winning setting on client validation, and the table of every candidate's score."""
    base = out / args.tune_corpus
    table = []
    declared = declared_settings(args)
    for setting_dir in sorted(p for p in base.iterdir() if p.is_dir() and p.name in declared) if base.is_dir() else []:
        overrides = parse_setting(setting_dir.name)
        for arm_dir in sorted((setting_dir / f"s{args.tune_seed}" / f"seed-{args.tune_seed}").glob("*")):
            if arm_dir.name not in (*WINDOW_ARMS, *CORE_ARMS):
                continue
            rows = read_rows(arm_dir)
            if any(r["round"] == args.tune_rounds for r in rows):
                table.append(
                    {
                        "arm": arm_dir.name,
                        "setting": setting_dir.name,
                        "overrides": overrides,
                        "client_val_ppl": validation_score(rows, args.tune_rounds),
                    }
                )
    chosen: dict[str, dict[str, float]] = {}
    for arm in {row["arm"] for row in table}:
        candidates = sorted(
            (row for row in table if row["arm"] == arm),
            key=lambda row: (row["client_val_ppl"], row["setting"] != "default"),
        )
        chosen[arm] = candidates[0]["overrides"]
    for row in table:
        row["chosen"] = chosen[row["arm"]] == row["overrides"]
    return chosen, table


def declared_settings(args) -> set[str]:
    """The setting folders the command line declares (``default``, ``--lrs``, ``--prune-variants``): only these
    compete in the choice, so a study with a shorter grid ignores folders a longer one left behind."""
    names = {"default", *(setting_name({"learning_rate": lr}) for lr in args.lrs)}
    for variant in args.prune_variants:
        names.add(setting_name({PRUNE_KEYS[k]: float(v) for k, v in (kv.split("=") for kv in variant.split(":"))}))
    return names


def parse_setting(name: str) -> dict[str, float]:
    if name == "default":
        return {}
    return {k: float(v) for k, v in (item.split("=") for item in name.split(","))}


def best_window(chosen_table: list[dict[str, Any]]) -> str:
    scores = {row["arm"]: row["client_val_ppl"] for row in chosen_table if row["chosen"] and row["arm"] in WINDOW_ARMS}
    return min(scores, key=scores.get) if scores else WINDOW_ARMS[0]


def plan(args) -> tuple[list[Piece], list[Piece]]:
    """The `seeds` and `tune` phases' pieces."""
    base_arms = tuple(dict.fromkeys([*args.methods, WINDOW_ARMS[0]]))
    cost = {"chitchat": 1.0, "pycode": 1.5}
    seeds = []
    for corpus in args.corpora:
        for seed in args.seeds:
            arms = base_arms
            if corpus == args.tune_corpus and seed == args.tune_seed:
                arms = tuple(dict.fromkeys([*base_arms, *WINDOW_ARMS]))
            seeds.append(Piece(corpus, (), seed, arms, args.rounds, cost.get(corpus, 1.5) * len(arms) * args.rounds))
    tune = []
    tune_arms = (*WINDOW_ARMS, *CORE_ARMS)
    for lr in args.lrs:
        tune.append(
            Piece(
                args.tune_corpus,
                (("learning_rate", lr),),
                args.tune_seed,
                tune_arms,
                args.tune_rounds,
                len(tune_arms) * args.tune_rounds,
            )
        )
    for variant in args.prune_variants:
        overrides = tuple(sorted((PRUNE_KEYS[k], float(v)) for k, v in (kv.split("=") for kv in variant.split(":"))))
        tune.append(
            Piece(
                args.tune_corpus,
                overrides,
                args.tune_seed,
                PRUNING_ARMS,
                args.tune_rounds,
                len(PRUNING_ARMS) * args.tune_rounds,
            )
        )
    return seeds, tune


def long_pieces(
    args,
    chosen: dict[str, dict[str, float]],
    window: str,
    rounds: int | None = None,
    arms: tuple[str, ...] | None = None,
    corpora: list[str] | None = None,
) -> list[Piece]:
    """The long runs to `rounds`: one piece per corpus, seed and chosen setting (default: the window and core arms
    on ``args.long_corpora``)."""
    horizon = rounds or args.long_rounds
    groups: dict[tuple, list[str]] = {}
    for arm in arms or long_arms(args, window):
        groups.setdefault(tuple(sorted(chosen.get(arm, {}).items())), []).append(arm)
    pieces = []
    for corpus in corpora or args.long_corpora:
        for seed in args.seeds:
            for setting, arms in groups.items():
                pieces.append(Piece(corpus, setting, seed, tuple(arms), horizon, len(arms) * horizon))
    return pieces


def long_arms(args, window: str) -> tuple[str, ...]:
    """The long phase's arms: the chosen window rule, `--extra-long-arms`, the core arms."""
    return tuple(dict.fromkeys([window, *getattr(args, "extra_long_arms", []), *CORE_ARMS]))


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


def plateau_arms(args, window: str) -> tuple[str, ...]:
    """The arms run on towards HomLoRA(r_max)'s plateau (``window`` in `--plateau-arms` is the chosen window rule)."""
    return tuple(dict.fromkeys(window if arm == "window" else arm for arm in args.plateau_arms))


def horizons(start: int, stop: int, step: int) -> list[int]:
    """Every `step` rounds after `start`, ending exactly at `stop` (empty when stop <= start)."""
    return [*range(start + step, stop, step), stop] if stop > start else []


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


def reached(out: Path, corpus: str, seeds: list[int], sources: dict[str, str]) -> int:
    """The last round that every arm (in its source setting folder) recorded on every seed."""
    last = [
        max((r["round"] for r in read_rows(out / corpus / setting / f"s{seed}" / f"seed-{seed}" / arm)), default=0)
        for arm, setting in sources.items()
        for seed in seeds
    ]
    return min(last, default=0)


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


def adapter_component_norms(weights: dict[str, Any]) -> list[float]:
    """Per component j: the sum over LoRA modules of ||B[:, j]|| * ||A[j, :]|| (modules of different rank: the
    shorter ones count as zero beyond their rank)."""
    from peft_hetlora.federated.keys import flat_a, flat_b, split_lora_keys

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

    from peft_hetlora.federated.local_store import LocalStore

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
    from peft_hetlora.simulation.report import write_report

    folder = report_dir / f"r{rounds}" / corpus
    per_seed = compose(out, corpus, seeds, sources, rounds)
    write_report(per_seed, folder, seeds=seeds, reference="homlora_rmax", title=title)
    return folder


def report(args, out: Path) -> Path:
    from peft_hetlora.simulation.seed_stats import merge_run_folders

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


def revalidate(out: Path, settings: list[str] | None = None, corpora: list[str] | None = None) -> int:
    """Redo the client validation of every window arm under `out` (a study folder or one `hetlora simulate` run
    folder) with the model its clients hold (the whole global; `peft_hetlora.simulation.runner.
    refresh_window_rows`), for folders written before that rule. Only for folders no process is writing.
    Returns how many rows changed."""
    from peft_hetlora.simulation.runner import refresh_window_rows
    from peft_hetlora.simulation.workbench import prepare

    changed = 0
    for config_path in sorted([*out.glob("config.json"), *out.glob("*/*/s*/config.json")]):
        folder = config_path.parent
        if (settings and folder.parent.name not in settings) or (corpora and folder.parent.parent.name not in corpora):
            continue
        stored = json.loads(config_path.read_text())["settings"]
        for seed_dir in sorted(folder.glob("seed-*")):
            arm_dirs = [seed_dir / arm for arm in WINDOW_ARMS]
            arm_dirs = [d for d in arm_dirs if any(r["round"] and "client_val_model" not in r for r in read_rows(d))]
            if not arm_dirs:
                continue
            # validation sets are tiny: the uncached model is faster than rebuilding the activation cache
            config = SimulationConfig(**{**stored, "activation_cache": False})
            wb = prepare(config, int(seed_dir.name.split("-")[1]))
            for arm_dir in arm_dirs:
                changed += refresh_window_rows(wb, arm_dir.name, arm_dir)
    return changed


def copy_results(report_dir: Path, results: Path) -> None:
    """Copy the small outputs (md, json, png) into the repository's results folder."""
    for path in report_dir.rglob("*"):
        if path.is_file() and path.suffix in (".md", ".json", ".png"):
            target = results / path.relative_to(report_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    floats = lambda text: [float(v) for v in text.split(",") if v]  # noqa: E731
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--profile", default="cpu", choices=list(PROFILES))
    parser.add_argument("--phase", default="all", choices=("all", "seeds", "long", "report", "revalidate"))
    parser.add_argument(
        "--settings",
        type=lambda t: [c for c in t.split(",") if c],
        default=None,
        help="revalidate only these setting folders (e.g. 'default'); default: all",
    )
    parser.add_argument("--workers", type=int, default=2, help="parallel `hetlora simulate` processes")
    parser.add_argument("--corpora", type=lambda t: t.split(","), default=["chitchat", "pycode"])
    parser.add_argument("--long-corpora", type=lambda t: [c for c in t.split(",") if c], default=["chitchat"])
    parser.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1, 2])
    parser.add_argument("--methods", type=lambda t: t.split(","), default=list(BASE_ARMS))
    parser.add_argument(
        "--extra-long-arms",
        type=lambda t: [a for a in t.split(",") if a],
        default=[],
        help="arms run and reported in the long phase beside the chosen window rule and the core arms (each at "
        "its chosen setting), e.g. 'window_coverage' when another window rule won the tuning",
    )
    parser.add_argument("--long-rounds", type=int, default=20)
    parser.add_argument("--long-step", type=int, default=5, help="extend the long runs this many rounds at a time")
    parser.add_argument(
        "--long-from",
        type=int,
        default=None,
        help="the round the long runs already reached (default: the profile's rounds, run by the seeds phase); 0 for "
        "a corpus whose chosen settings never ran",
    )
    parser.add_argument(
        "--plateau-rounds",
        type=int,
        default=0,
        help="run --plateau-arms on past --long-rounds to this round, to see where HomLoRA(r_max) levels off",
    )
    parser.add_argument(
        "--plateau-arms",
        type=lambda t: [a for a in t.split(",") if a],
        default=["window", "homlora_rmax"],
        help="'window' = the window rule chosen on validation; must include homlora_rmax (the reference)",
    )
    parser.add_argument("--plateau-corpora", type=lambda t: [c for c in t.split(",") if c], default=["chitchat"])
    parser.add_argument("--tune-corpus", default="chitchat")
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--tune-rounds", type=int, default=None, help="default: the profile's rounds")
    parser.add_argument("--lrs", type=floats, default=[1e-4, 1e-3], help="learning rates tried besides the profile's")
    parser.add_argument(
        "--prune-variants",
        type=lambda t: [v for v in t.split(",") if v],
        default=["lam=0.5", "gam=0.9"],
        help="HetLoRA self-pruning variants, e.g. 'lam=0.5,gam=0.9' (one each) or 'lam=0.5:gam=0.9'",
    )
    parser.add_argument("--results", type=Path, default=None, help="also copy the report's md/json/png here")
    parser.add_argument("--report-dir", type=Path, default=None, help="where the report goes (default: OUT/report)")
    args = parser.parse_args(argv)
    if args.plateau_rounds and "homlora_rmax" not in args.plateau_arms:
        parser.error("--plateau-arms must include homlora_rmax: the gap is measured against it")
    args.rounds = SimulationConfig.from_sources(profile=args.profile).rounds
    args.tune_rounds = args.tune_rounds or args.rounds
    out = args.out
    if args.phase in ("all", "seeds"):
        seeds, tune = plan(args)
        run_pieces(seeds + tune, out, args.profile, args.workers, "study: seeds + tuning")
    if args.phase in ("all", "long"):
        chosen, table = choose_settings(args, out)
        window = best_window(table)
        # every arm reaches each horizon before any goes further: a study stopped early is still a fair comparison
        start = args.rounds if args.long_from is None else args.long_from
        for horizon in horizons(start, args.long_rounds, args.long_step):
            pieces = long_pieces(args, chosen, window, horizon)
            run_pieces(pieces, out, args.profile, args.workers, f"study: long runs to round {horizon}")
        for horizon in horizons(args.long_rounds, args.plateau_rounds, args.long_step):
            pieces = long_pieces(args, chosen, window, horizon, plateau_arms(args, window), args.plateau_corpora)
            run_pieces(pieces, out, args.profile, args.workers, f"study: towards the plateau, round {horizon}")
    if args.phase == "revalidate":
        print(f"{revalidate(out, args.settings, args.corpora)} rows re-measured")
        return
    if args.phase in ("all", "report"):
        print(report(args, out))


if __name__ == "__main__":
    main()
