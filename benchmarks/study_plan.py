"""The study's plan: its arms and settings, the pieces it runs, and the choice of each arm's setting.

One piece is one `hetlora simulate` call into ``OUT/<corpus>/<setting>/s<seed>`` (see `study.py`); this module
knows which pieces a study needs, which are finished, and which setting each arm won on client validation.

Example:
    ```py
    >>> from study_plan import horizons, setting_name
    >>> horizons(5, 20, 5)
    [10, 15, 20]
    >>> setting_name({"learning_rate": 0.004})
    'learning_rate=0.004'
    ```
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    candidates = tuned_arms(args)
    for setting_dir in sorted(p for p in base.iterdir() if p.is_dir() and p.name in declared) if base.is_dir() else []:
        overrides = parse_setting(setting_dir.name)
        for arm_dir in sorted((setting_dir / f"s{args.tune_seed}" / f"seed-{args.tune_seed}").glob("*")):
            if arm_dir.name not in candidates:
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


def tuned_arms(args) -> tuple[str, ...]:
    """The arms whose setting is chosen on validation: the window rules, the core arms and `--extra-long-arms`."""
    return tuple(dict.fromkeys([*WINDOW_ARMS, *CORE_ARMS, *getattr(args, "extra_long_arms", [])]))


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
    tune_arms = tuned_arms(args)
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


def plateau_arms(args, window: str) -> tuple[str, ...]:
    """The arms run on towards HomLoRA(r_max)'s plateau (``window`` in `--plateau-arms` is the chosen window rule)."""
    return tuple(dict.fromkeys(window if arm == "window" else arm for arm in args.plateau_arms))


def horizons(start: int, stop: int, step: int) -> list[int]:
    """Every `step` rounds after `start`, ending exactly at `stop` (empty when stop <= start)."""
    return [*range(start + step, stop, step), stop] if stop > start else []


def reached(out: Path, corpus: str, seeds: list[int], sources: dict[str, str]) -> int:
    """The last round that every arm (in its source setting folder) recorded on every seed."""
    last = [
        max((r["round"] for r in read_rows(out / corpus / setting / f"s{seed}" / f"seed-{seed}" / arm)), default=0)
        for arm, setting in sources.items()
        for seed in seeds
    ]
    return min(last, default=0)
