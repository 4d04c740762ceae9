"""Multi-seed evidence: mean ± std per method and per-seed paired differences to a reference method.

The held-out owners differ per seed and move perplexity more than the methods do
(docs/design.md#evaluating-the-claim), so methods are
compared *paired per seed*: for every seed s, ``d_s = final_ppl(method, s) - final_ppl(reference, s)``; the
report gives the mean and sample std (ddof=1) of d over seeds and the *wins*, the seeds where ``d_s < 0``
(the method ends with a lower held-out perplexity than the reference on the same owners, data and sampling).

:func:`merge_run_folders` combines several run folders (corpora and/or seed batches) into one table;
``hetlora report DIR...`` is its command line (:func:`main_report`).

Example:
    >>> stats = seed_statistics([{"a": 10.0, "ref": 11.0}, {"a": 12.0, "ref": 11.5}], seeds=[0, 1], reference="ref")
    >>> stats["methods"]["a"]["paired"]["diffs"], stats["methods"]["a"]["paired"]["wins"]
    ([-1.0, 0.5], 1)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peft_hetlora.utils import HetLoRAError

#: the default reference: HomLoRA at r_max on all clients (what a user runs when every device can afford it)
DEFAULT_REFERENCE = "homlora_rmax"


class ReportInputError(HetLoRAError, ValueError):
    """A run folder or metrics file that cannot be merged into a report."""


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0


def choose_reference(methods: Sequence[str], reference: str | None = None) -> str:
    """``reference`` if given (it must be a method), else ``homlora_rmax`` when present, else the first method.

    Example:
        >>> choose_reference(["hetlora", "homlora_rmin"])
        'hetlora'
    """
    if reference is not None:
        if reference not in methods:
            raise ReportInputError(f"--reference {reference!r} is not among the methods {list(methods)}.")
        return reference
    if not methods:
        raise ReportInputError("No methods to compare.")
    return DEFAULT_REFERENCE if DEFAULT_REFERENCE in methods else methods[0]


def seed_statistics(
    final_ppl_per_seed: Sequence[Mapping[str, float]],
    *,
    seeds: Sequence[Any] | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """Mean ± std and paired differences of each method's final held-out perplexity over seeds.

    Args:
        final_ppl_per_seed: one ``{method: final_ppl}`` per seed.
        reference: the method every other is paired with (see :func:`choose_reference`).

    Returns:
        ``{"reference", "seeds", "methods": {m: {"final_ppl": {"values", "mean", "std", "n"},
        "paired": {"diffs", "mean", "std", "wins", "n"}}}}``; a seed where either side is missing or not finite
        is left out of that method's pairs.

    Example:
        >>> s = seed_statistics([{"a": 3.0, "b": 4.0}, {"a": 5.0, "b": 4.0}, {"a": 1.0, "b": 4.0}], reference="b")
        >>> s["methods"]["a"]["final_ppl"]["mean"], s["methods"]["a"]["paired"]["wins"]
        (3.0, 2)
    """
    if not final_ppl_per_seed:
        raise ReportInputError("No seeds to summarise.")
    methods: list[str] = []
    for per_seed in final_ppl_per_seed:
        methods += [m for m in per_seed if m not in methods]
    ref = choose_reference(methods, reference)
    labels = list(seeds) if seeds is not None else list(range(len(final_ppl_per_seed)))
    if len(labels) != len(final_ppl_per_seed):
        raise ReportInputError(f"{len(labels)} seed labels for {len(final_ppl_per_seed)} seeds.")
    out: dict[str, Any] = {"reference": ref, "seeds": labels, "methods": {}}
    for method in methods:
        values = [_finite(s.get(method)) for s in final_ppl_per_seed]
        mean, std = _mean_std(values)
        diffs, pair_seeds = [], []
        for label, s in zip(labels, final_ppl_per_seed):
            a, b = _finite(s.get(method)), _finite(s.get(ref))
            if a is not None and b is not None:
                diffs.append(a - b)
                pair_seeds.append(label)
        d_mean, d_std = _mean_std(diffs)
        out["methods"][method] = {
            "final_ppl": {"values": values, "mean": mean, "std": std, "n": sum(v is not None for v in values)},
            "paired": {
                "diffs": diffs,
                "seeds": pair_seeds,
                "mean": d_mean,
                "std": d_std,
                "wins": sum(d < 0 for d in diffs),
                "n": len(diffs),
            },
        }
    return out


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _pm(mean: float, std: float, n: int) -> str:
    if not math.isfinite(mean):
        return "—"
    return f"{mean:.2f}" if n <= 1 else f"{mean:.2f} ± {std:.2f}"


def paired_table(stats: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """Markdown: per method, final ppl mean ± std, paired difference to the reference, wins, per-seed diffs.

    Example:
        >>> print(paired_table(seed_statistics([{"a": 1.0, "b": 2.0}], reference="b")))  # doctest: +SKIP
    """
    ref = stats["reference"]
    labels = labels or {}
    head = [
        "Method",
        "Final held-out ppl (mean ± std)",
        f"Δ vs {labels.get(ref, ref)} (mean ± std)",
        "Wins",
        "Δ per seed",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---|"]
    for method, info in stats["methods"].items():
        f, p = info["final_ppl"], info["paired"]
        if method == ref:
            delta, wins, per_seed = "(reference)", "—", "—"
        else:
            delta = "—" if not p["n"] else (f"{p['mean']:+.2f}" + (f" ± {p['std']:.2f}" if p["n"] > 1 else ""))
            wins = f"{p['wins']}/{p['n']}"
            per_seed = ", ".join(f"{s}: {d:+.2f}" for s, d in zip(p["seeds"], p["diffs"]))
        lines.append(
            f"| {labels.get(method, method)} | {_pm(f['mean'], f['std'], f['n'])} | {delta} | {wins} | {per_seed} |"
        )
    return "\n".join(lines)


def plot_paired(stats_by_group: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """PNG: per group (corpus), each method's paired difference to the reference (bar = mean, whisker = ± std,
    dots = seeds); below zero means a lower perplexity than the reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(stats_by_group)
    fig = Figure(figsize=(max(5.0, 1.0 + 5.0 * len(groups)), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, group in zip(axes, groups):
        stats = stats_by_group[group]
        methods = [m for m in stats["methods"] if m != stats["reference"]]
        for i, method in enumerate(methods):
            p = stats["methods"][method]["paired"]
            if not p["n"]:
                continue
            ax.bar(i, p["mean"], yerr=p["std"] if p["n"] > 1 else None, color="tab:blue", alpha=0.5, capsize=4)
            ax.scatter(np.full(p["n"], i, dtype=float) + np.linspace(-0.15, 0.15, p["n"]), p["diffs"], s=12, color="k")
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=f"final ppl − {stats['reference']} (paired per seed)", title=str(group))
        ax.grid(alpha=0.3, axis="y")
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Early stopping on validation data (issue 24): held-out data is never used to choose a round
# ----------------------------------------------------------------------------------------------------------------


#: the rounds reports give per-round and early-stopped values at (those a run reached), issue 24
REPORT_ROUNDS: tuple[int, ...] = (3, 5, 10, 15, 20)


def report_horizons(last_round: int, wanted: Sequence[int] = REPORT_ROUNDS) -> list[int]:
    """The reported rounds up to ``last_round``, and ``last_round`` itself when it is none of them.

    Example:
        >>> report_horizons(12), report_horizons(5), report_horizons(0)
        ([3, 5, 10, 12], [3, 5], [])
    """
    out = [h for h in wanted if h <= last_round]
    if last_round >= 1 and last_round not in out:
        out.append(last_round)
    return out


def _rows(method_metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    rows = method_metrics.get("rounds", []) if isinstance(method_metrics, Mapping) else method_metrics
    return sorted((r for r in rows if isinstance(r, Mapping)), key=lambda r: r.get("round", 0))


def heldout_at(method_metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]], round_: int) -> float | None:
    """The held-out perplexity evaluated after round ``round_`` (``None`` when the run has no such round).

    Example:
        >>> heldout_at({"rounds": [{"round": 1, "heldout_ppl": 9.0}, {"round": 2, "heldout_ppl": 8.0}]}, 2)
        8.0
    """
    for row in _rows(method_metrics):
        if row.get("round") == round_:
            return _finite(row.get("heldout_ppl"))
    return None


def data_signature(rows: list[dict[str, Any]]) -> tuple[float, tuple[str, ...]] | None:
    """What identifies the data a run saw: its round-0 held-out perplexity (the base model on the held-out set) and
    its clients (the round-0 rank map's keys). ``None`` when the run has no round 0.

    Example:
        >>> data_signature([{"round": 0, "heldout_ppl": 24.5, "ranks": {"b": 2, "a": 16}}])
        (24.5, ('a', 'b'))
    """
    for row in rows:
        if row.get("round") == 0 and isinstance(row.get("heldout_ppl"), (int, float)):
            return float(row["heldout_ppl"]), tuple(sorted(row.get("ranks") or {}))
    return None


def same_data(a: tuple[float, tuple[str, ...]] | None, b: tuple[float, tuple[str, ...]] | None) -> bool:
    """Whether two runs saw the same data: round-0 held-out perplexity within 1e-6 relative, and the clients of one
    among the other's (capable-only trains a subset of the federation's clients).

    Example:
        >>> same_data((24.5, ("a",)), (24.5, ("a", "b"))), same_data((24.5, ("a",)), (20.1, ("c",)))
        (True, False)
    """
    if a is None or b is None or abs(a[0] - b[0]) > 1e-6 * max(abs(b[0]), 1.0):
        return False
    return set(a[1]) <= set(b[1]) or set(b[1]) <= set(a[1])


#: the early-stopping criteria, best first: the fixed federation validation set (every client's validation
#: examples, the same for every arm and round of a seed), then the round's sampled clients' validation
FIXED_VAL, CLIENT_VAL = "fixed_val_ppl", "client_val_ppl"
STOP_CRITERIA: tuple[str, ...] = (FIXED_VAL, CLIENT_VAL)


def stop_criterion(*method_metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """The validation column early stopping reads for these runs (one criterion for all of them, so that paired
    arms are stopped alike): ``fixed_val_ppl`` when every trained round (round >= 1) of every run has a finite
    one, else ``client_val_ppl`` (run folders written before the fixed set, the flower engine).

    Example:
        >>> stop_criterion([{"round": 1, "fixed_val_ppl": 3.0, "client_val_ppl": 4.0}])
        'fixed_val_ppl'
        >>> stop_criterion([{"round": 1, "fixed_val_ppl": 3.0}], [{"round": 1, "client_val_ppl": 4.0}])
        'client_val_ppl'
    """
    trained = [r for m in method_metrics for r in _rows(m) if (r.get("round") or 0) >= 1]
    if trained and all(_finite(r.get(FIXED_VAL)) is not None for r in trained):
        return FIXED_VAL
    return CLIENT_VAL


def early_stopped(method_metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]], horizon: int,
                  criterion: str | None = None) -> dict[str, Any] | None:
    """The round up to ``horizon`` with the lowest validation perplexity, and its held-out perplexity.

    Early stopping on validation data the clients hold: the round is chosen on ``criterion`` alone (default
    :func:`stop_criterion` of this run: the fixed federation validation set ``fixed_val_ppl`` when every round has
    it, else the sampled clients' ``client_val_ppl``; ties: the earliest round); held-out perplexity is only read at
    the chosen round. Round 0 (the untrained global) is never chosen, nor a round without a finite value. ``None``
    when the run has no such round ``<= horizon``, or has not reached ``horizon`` (a horizon the run never got to
    is not reported as early-stopped).

    Returns:
        ``{"round", <criterion>, "heldout_ppl"}``: the criterion's column name holds the chosen round's validation
        value (``heldout_ppl`` ``None`` if that round has none).

    Example:
        >>> rows = [{"round": 1, "client_val_ppl": 30.0, "heldout_ppl": 40.0},
        ...         {"round": 2, "client_val_ppl": 25.0, "heldout_ppl": 41.0},
        ...         {"round": 3, "client_val_ppl": 26.0, "heldout_ppl": 35.0}]
        >>> early_stopped(rows, 3)
        {'round': 2, 'client_val_ppl': 25.0, 'heldout_ppl': 41.0}
        >>> rows = [dict(r, fixed_val_ppl=v) for r, v in zip(rows, (29.0, 28.0, 27.0))]
        >>> early_stopped(rows, 3)
        {'round': 3, 'fixed_val_ppl': 27.0, 'heldout_ppl': 35.0}
    """
    if criterion is None:
        criterion = stop_criterion(method_metrics)
    if criterion not in STOP_CRITERIA:
        raise ValueError(f"criterion must be one of {STOP_CRITERIA}, got {criterion!r}.")
    rows = _rows(method_metrics)
    if not any(r.get("round") is not None and r.get("round") >= horizon for r in rows):
        return None
    best: Mapping[str, Any] | None = None
    best_val = math.inf
    for row in rows:
        round_, val = row.get("round"), _finite(row.get(criterion))
        if round_ is None or round_ < 1 or round_ > horizon or val is None:
            continue
        if val < best_val:
            best, best_val = row, val
    if best is None:
        return None
    return {"round": best["round"], criterion: best_val, "heldout_ppl": _finite(best.get("heldout_ppl"))}


def horizon_table(
    metrics_per_seed: Sequence[Mapping[str, Mapping[str, Any]]],
    horizons: Sequence[int],
    *,
    seeds: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Per arm, seed and horizon: the held-out perplexity at that round and the early-stopped one.

    Each arm and seed is early-stopped on its own :func:`stop_criterion`, recorded in ``"criteria"``.

    Returns:
        ``{"seeds", "horizons", "arms": {arm: {seed: {horizon: {"at_round", "early_stopped"}}}},
        "criteria": {arm: {seed: criterion}}}``.

    Example:
        >>> t = horizon_table([{"a": {"rounds": [{"round": 1, "client_val_ppl": 3.0, "heldout_ppl": 5.0},
        ...                                      {"round": 2, "client_val_ppl": 4.0, "heldout_ppl": 4.5}]}}], [2])
        >>> t["arms"]["a"][0][2]["at_round"], t["arms"]["a"][0][2]["early_stopped"]["heldout_ppl"]
        (4.5, 5.0)
    """
    labels = list(seeds) if seeds is not None else list(range(len(metrics_per_seed)))
    arms: dict[str, dict[Any, dict[int, dict[str, Any]]]] = {}
    criteria: dict[str, dict[Any, str]] = {}
    for label, per_seed in zip(labels, metrics_per_seed):
        for arm, method_metrics in per_seed.items():
            criterion = criteria.setdefault(arm, {})[label] = stop_criterion(method_metrics)
            arms.setdefault(arm, {})[label] = {
                h: {"at_round": heldout_at(method_metrics, h),
                    "early_stopped": early_stopped(method_metrics, h, criterion)}
                for h in horizons
            }
    return {"seeds": labels, "horizons": list(horizons), "arms": arms, "criteria": criteria}


def criteria_note(table: Mapping[str, Any]) -> str:
    """One sentence naming the early-stopping criterion of a :func:`horizon_table` (and the arms that fell back).

    Example:
        >>> print(criteria_note({"criteria": {"a": {0: "fixed_val_ppl"}, "b": {0: "client_val_ppl"}}}))
        Early stopping reads the fixed federation validation set (`fixed_val_ppl`), except for b (seed 0): no fixed_val_ppl in every round, so the sampled clients' validation (`client_val_ppl`).
    """  # noqa: E501
    pairs = [(arm, seed, c) for arm, per in table.get("criteria", {}).items() for seed, c in per.items()]
    fallback = [f"{arm} (seed {seed})" for arm, seed, c in pairs if c != FIXED_VAL]
    if pairs and len(fallback) == len(pairs):
        return ("Early stopping reads the sampled clients' validation (`client_val_ppl`): no run here has the fixed "
                "federation validation set (`fixed_val_ppl`) in every round.")
    text = "Early stopping reads the fixed federation validation set (`fixed_val_ppl`)"
    if not fallback:
        return text + " for every arm and seed."
    return (text + ", except for " + ", ".join(fallback) + ": no fixed_val_ppl in every round, so the sampled "
            "clients' validation (`client_val_ppl`).")


def early_stopping_markdown(table: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """Markdown: per arm and seed, ``held-out at round h / early-stopped held-out (round chosen)`` per horizon; when
    some arms stop on ``fixed_val_ppl`` and others fell back to ``client_val_ppl``, the latter are marked
    ``(client_val)`` (:func:`criteria_note` says it in words).

    Example:
        >>> t = horizon_table([{"a": {"rounds": [{"round": 1, "client_val_ppl": 3.0, "heldout_ppl": 5.0}]}}], [1])
        >>> print(early_stopping_markdown(t).splitlines()[-1])
        | a | 0 | 5.00 / 5.00 (r1) |
    """
    labels = labels or {}
    horizons = table["horizons"]
    criteria = table.get("criteria", {})
    mixed = len({c for per in criteria.values() for c in per.values()}) > 1
    lines = ["| Arm | Seed | " + " | ".join(f"round {h}" for h in horizons) + " |",
             "|---|---|" + "---:|" * len(horizons)]
    for arm, per_seed in table["arms"].items():
        for seed, cells in per_seed.items():
            out = []
            for h in horizons:
                at, es = cells[h]["at_round"], cells[h]["early_stopped"]
                text = "—" if at is None else f"{at:.2f}"
                if es is not None and es["heldout_ppl"] is not None:
                    text += f" / {es['heldout_ppl']:.2f} (r{es['round']})"
                out.append(text)
            # where criteria are mixed, the arms that fell back to the sampled clients' validation are marked
            mark = " (client_val)" if mixed and criteria.get(arm, {}).get(seed) == CLIENT_VAL else ""
            lines.append(f"| {labels.get(arm, arm)}{mark} | {seed} | " + " | ".join(out) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Merging run folders: `hetlora report DIR...`
# ----------------------------------------------------------------------------------------------------------------


def _final_ppl(method_metrics: Mapping[str, Any]) -> float | None:
    rounds = sorted(method_metrics.get("rounds", []), key=lambda r: r.get("round", 0))
    for row in reversed(rounds):
        value = _finite(row.get("heldout_ppl"))
        if value is not None:
            return value
    return None


def read_run_folder(folder: str | Path) -> dict[str, Any]:
    """``{"corpus", "seeds", "per_seed": [{method: final_ppl}], "labels"}`` from a run folder's metrics.json.

    The corpus is the run's ``dataset`` setting (``config.json``), else the folder's name.
    """
    path = Path(folder)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise ReportInputError(f"{path} has no metrics.json; pass a folder written by `hetlora simulate`.")
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportInputError(f"{file} is not valid JSON ({err}).") from err
    metrics = payload.get("metrics")
    if isinstance(metrics, Mapping):
        metrics = [metrics]
    if not isinstance(metrics, list) or not all(isinstance(m, Mapping) for m in metrics) or not metrics:
        raise ReportInputError(f"{file} has no per-method metrics; was it written by `hetlora simulate`?")
    seeds = payload.get("seeds") or list(range(len(metrics)))
    corpus = file.parent.name
    config_file = file.parent / "config.json"
    if config_file.is_file():
        dataset = json.loads(config_file.read_text()).get("settings", {}).get("dataset")
        corpus = dataset if isinstance(dataset, str) else json.dumps(dataset, sort_keys=True)
        seeds = payload.get("seeds") or json.loads(config_file.read_text()).get("settings", {}).get("seeds") or seeds
    labels = {name: m.get("label", name) for per in metrics for name, m in per.items()}
    return {
        "corpus": corpus,
        "seeds": list(seeds),
        "per_seed": [{name: _final_ppl(m) for name, m in per.items()} for per in metrics],
        "labels": labels,
    }


def merge_run_folders(folders: Sequence[str | Path], out_dir: str | Path, *, reference: str | None = None) -> Path:
    """One report over several run folders: a paired table per corpus (seeds pooled across folders of the same
    corpus), a combined table (methods x corpora), ``report.json`` and ``paired.png``. Returns ``report.md``.

    Example:
        >>> merge_run_folders(["runs/chitchat", "runs/pycode"], "runs/merged")  # doctest: +SKIP
        PosixPath('runs/merged/report.md')
    """
    if not folders:
        raise ReportInputError("Name at least one run folder.")
    groups: dict[str, dict[str, Any]] = {}
    labels: dict[str, str] = {}
    for folder in folders:
        run = read_run_folder(folder)
        labels.update(run["labels"])
        group = groups.setdefault(run["corpus"], {"seeds": [], "per_seed": [], "folders": []})
        for seed, per in zip(run["seeds"], run["per_seed"]):
            if seed in group["seeds"]:
                raise ReportInputError(
                    f"Seed {seed} of corpus {run['corpus']!r} appears in two run folders ({folder} and "
                    f"{group['folders']}); merge folders of distinct seeds."
                )
            group["seeds"].append(seed)
            group["per_seed"].append(per)
        group["folders"].append(str(folder))
    stats = {
        corpus: seed_statistics(g["per_seed"], seeds=g["seeds"], reference=reference) for corpus, g in groups.items()
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods: list[str] = []
    for s in stats.values():
        methods += [m for m in s["methods"] if m not in methods]
    lines = ["# Merged simulation report", ""]
    head = ["Method"] + [f"{c} (n={len(groups[c]['seeds'])})" for c in stats]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(stats)]
    for method in methods:
        cells = []
        for s in stats.values():
            info = s["methods"].get(method)
            if info is None:
                cells.append("—")
                continue
            f, p = info["final_ppl"], info["paired"]
            cell = _pm(f["mean"], f["std"], f["n"])
            if method != s["reference"] and p["n"]:
                cell += f" (Δ {p['mean']:+.2f}, wins {p['wins']}/{p['n']})"
            elif method == s["reference"]:
                cell += " (reference)"
            cells.append(cell)
        lines.append(f"| {labels.get(method, method)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Final held-out perplexity, mean ± sample std over seeds; Δ: mean paired difference to the reference "
        "(same seed); wins: seeds where the method ends below the reference.",
        "",
    ]
    for corpus, s in stats.items():
        lines += [f"## {corpus}", "", f"Run folders: {', '.join(groups[corpus]['folders'])}", ""]
        lines += [paired_table(s, labels), ""]
    plot = plot_paired(stats, out / "paired.png")
    lines += [f"![paired differences]({plot.name})", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(json_safe({"corpora": stats}), indent=2), encoding="utf-8")
    return out / "report.md"


def json_safe(value: Any) -> Any:
    """`value` made JSON-ready: non-finite floats -> None, numpy scalars -> Python, mappings keyed by str.

    Example:
        ```py
        >>> json_safe({1: [float("nan"), np.float32(0.5)], "x": (float("inf"),)})
        {'1': [None, 0.5], 'x': [None]}
        ```
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def main_report(argv: Sequence[str] | None = None) -> int:
    """``hetlora report DIR... [--out DIR] [--reference METHOD]``: merge run folders into one report.

    Example:
        >>> main_report(["runs/chitchat", "runs/pycode", "--out", "runs/merged"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(prog="hetlora report", description=merge_run_folders.__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders written by `hetlora simulate`")
    parser.add_argument("--out", type=Path, default=Path("runs/report"), help="where to write the merged report")
    parser.add_argument("--reference", help=f"method to pair with (default {DEFAULT_REFERENCE} or the first)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        report = merge_run_folders(args.folders, args.out, reference=args.reference)
    except ReportInputError as err:
        print(f"hetlora report: error: {err}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"Report: {report}")
    return 0
