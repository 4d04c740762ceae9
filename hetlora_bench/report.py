"""Simulation reports: a paper-style comparison table, ``metrics.json`` and plots.

Input: per method, the list of evaluated rounds::

    {"hetlora": {"rounds": [{"round": 1, "heldout_ppl": 61.2, "client_val_ppl": 58.0, "upload_bytes": 3.4e6,
                             "download_bytes": 6.7e6, "cum_upload_bytes": 3.4e6, "ranks": {"c1": 4, "c2": 9},
                             "wall_s": 12.5}, ...],
                 "label": "HetLoRA", "homogeneous_rank": None},   # optional keys
     "homlora_r2": {...}, ...}

Several seeds: pass a list of such dicts (one per seed); the table then shows mean ± std over seeds and the
plots a mean curve with a ±1 std band. A round 0 entry (the base model, zero bytes) is welcome: it anchors the
curves and the per-byte interpolation.

The table reports, per method: final held-out perplexity, the best one and its round, the rounds (and upload
bytes) needed to reach a target perplexity, total upload bytes, and each method's held-out perplexity at equal
cumulative upload bytes (linearly interpolated at the smallest total upload among the methods). The default
target is the final perplexity of HomLoRA at the smallest rank (the method whose clients all train one fixed
rank, the lowest such rank), i.e. "how fast does each method match what the weakest devices reach alone".

Example:
    >>> path = write_report(metrics, "runs/quick")  # doctest: +SKIP
    >>> sorted(p.name for p in path.parent.iterdir())  # doctest: +SKIP
    ['metrics.json', 'ppl_vs_round.png', 'ppl_vs_upload.png', 'ranks.png', 'report.md']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peft_hetlora.federated.stores import json_text

from .arm_report import extra_sections
from .figures import new_figure
from .method_numbers import (  # noqa: F401  (re-exported: callers import these from report)
    NAN,
    as_number,
    default_target_method,
    format_bytes,
    homogeneous_rank,
    ppl_at_upload,
    rank_values,
    round_rows,
    summarize,
)
from .seed_stats import (
    criteria_note,
    early_stopping_markdown,
    horizon_table,
    json_safe,
    paired_table,
    plot_paired,
    report_horizons,
    seed_statistics,
)

# ----------------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------------

_NUMERIC_FIELDS = (
    "final_ppl",
    "best_ppl",
    "total_upload_bytes",
    "total_download_bytes",
    "ppl_at_equal_upload",
    "final_client_val_ppl",
    "final_rank_mean",
    "wall_s",
    "upload_to_target",
    "rounds_to_target",
    "best_round",
)


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not finite:
        return NAN, NAN, 0
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return float(np.mean(finite)), std, len(finite)


def _fmt(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _cell(seed_summaries: list[dict[str, Any]], method: str, key: str, kind: str) -> str:
    values = [s["methods"][method].get(key) for s in seed_summaries if method in s["methods"]]
    values = [NAN if v is None else float(v) for v in values]
    mean, std, n = _mean_std(values)
    if n == 0:
        return "—"
    if kind == "bytes":
        text = format_bytes(mean)
        extra = f" ± {std / 1e6:.2f}" if len(values) > 1 else ""
        return text.replace(" MB", f"{extra} MB")
    if kind == "int":
        text = f"{mean:.0f}" if len(values) == 1 else f"{mean:.1f} ± {std:.1f}"
    elif kind == "wall":
        text = f"{mean:.0f}" if len(values) == 1 else f"{mean:.0f} ± {std:.0f}"
    else:
        text = _fmt(mean) if len(values) == 1 else f"{_fmt(mean)} ± {_fmt(std)}"
    if n < len(values):
        text += f" ({n}/{len(values)})"
    return text


def markdown_table(seed_summaries: list[dict[str, Any]]) -> str:
    """The comparison table (GitHub markdown) for one summary or several seeds' summaries (mean ± std).

    Example:
        >>> print(markdown_table([summarize({"a": {"rounds": [{"round": 1, "heldout_ppl": 5.0}]}})]))  # doctest: +SKIP
    """
    first = seed_summaries[0]
    target = [s["target_ppl"] for s in seed_summaries]
    t_mean, _, t_n = _mean_std(target)
    equal = [s["equal_upload_bytes"] for s in seed_summaries]
    e_mean, _, _ = _mean_std(equal)
    target_head = f"Rounds to ppl ≤ {_fmt(t_mean)}" if t_n else "Rounds to target"
    header = [
        "Method",
        "Final held-out ppl",
        "Best ppl",
        "Best round",
        target_head,
        "Upload to target",
        "Total upload",
        f"Ppl at {format_bytes(e_mean)} uploaded",
        "Client val ppl",
        "Final rank mean [min–max]",
        "Wall (s)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for method, info in first["methods"].items():
        rank_range = ""
        if info.get("final_rank_min") is not None:
            lows = [s["methods"][method]["final_rank_min"] for s in seed_summaries if method in s["methods"]]
            highs = [s["methods"][method]["final_rank_max"] for s in seed_summaries if method in s["methods"]]
            rank_range = f" [{min(x for x in lows if x is not None)}–{max(x for x in highs if x is not None)}]"
        rank_cell = _cell(seed_summaries, method, "final_rank_mean", "float")
        row = [
            info["label"] + (" (target)" if method == first.get("target_method") else ""),
            _cell(seed_summaries, method, "final_ppl", "float"),
            _cell(seed_summaries, method, "best_ppl", "float"),
            _cell(seed_summaries, method, "best_round", "int"),
            _cell(seed_summaries, method, "rounds_to_target", "int") if t_n else "—",
            _cell(seed_summaries, method, "upload_to_target", "bytes") if t_n else "—",
            _cell(seed_summaries, method, "total_upload_bytes", "bytes"),
            _cell(seed_summaries, method, "ppl_at_equal_upload", "float"),
            _cell(seed_summaries, method, "final_client_val_ppl", "float"),
            (rank_cell + rank_range) if rank_cell != "—" else "—",
            _cell(seed_summaries, method, "wall_s", "wall"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend change)
# ----------------------------------------------------------------------------------------------------------------


#: line colours: matplotlib's ten "tab" colours, then three more that none of them resembles
_COLOURS = (
    "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
    "tab:olive", "tab:cyan", "black", "gold", "navy",
)
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")


def method_styles(methods: Sequence[str]) -> dict[str, dict[str, str]]:
    """Each method's own colour, line style and marker, in the order given (the same in every plot of a report).

    Methods ``i`` and ``j`` differ in colour while both are below 13, and in (colour, line style) while both are
    below 52, so the eleven arms of the main job are told apart by colour alone and again by line style.

    Example:
        >>> styles = method_styles(["flexlora_held", "flexlora", "centralized"])
        >>> styles["flexlora_held"]
        {'color': 'tab:blue', 'linestyle': '-', 'marker': 'o'}
        >>> styles["centralized"]["color"] != styles["flexlora_held"]["color"]
        True
    """
    return {
        method: {
            "color": _COLOURS[i % len(_COLOURS)],
            "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
            "marker": _MARKERS[i % len(_MARKERS)],
        }
        for i, method in enumerate(methods)
    }


def _legend_below(fig, axes, ncols: int = 4) -> None:
    """One legend for the figure, below its axes (never over the data); duplicate labels shown once."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(
            list(entries.values()), list(entries), loc="outside lower center", ncols=min(ncols, len(entries)),
            fontsize=8, frameon=False,
        )


def _curve(seeds: list[Mapping[str, Mapping[str, Any]]], method: str, x_key: str, y_key: str):
    """Mean / std of y (and mean of x) per round over the seeds that ran ``method``."""
    per_round: dict[Any, tuple[list[float], list[float]]] = {}
    for metrics in seeds:
        if method not in metrics:
            continue
        for r in round_rows(metrics[method]):
            y = as_number(r.get(y_key))
            if math.isnan(y):
                continue
            x = as_number(r.get("round")) if x_key == "round" else as_number(r.get(x_key))
            xs, ys = per_round.setdefault(r.get("round"), ([], []))
            xs.append(x)
            ys.append(y)
    keys = sorted(per_round, key=lambda k: (k is None, k))
    x = np.array([np.mean(per_round[k][0]) for k in keys])
    y = np.array([np.mean(per_round[k][1]) for k in keys])
    s = np.array([np.std(per_round[k][1], ddof=1) if len(per_round[k][1]) > 1 else 0.0 for k in keys])
    return x, y, s


def _plot_lines(ax, seeds, methods, labels, x_key, y_key, x_scale=1.0):
    styles = method_styles(methods)
    for method in methods:
        x, y, s = _curve(seeds, method, x_key, y_key)
        if len(x) == 0:
            continue
        ax.plot(x / x_scale, y, markersize=4, linewidth=1.4, label=labels[method], **styles[method])
        if np.any(s > 0):
            ax.fill_between(x / x_scale, y - s, y + s, alpha=0.15, color=styles[method]["color"])


def plot_perplexity(seeds, out_dir: Path, summaries) -> list[Path]:
    """``ppl_vs_round.png`` (held-out, and client validation when present) and ``ppl_vs_upload.png``."""
    from matplotlib.ticker import MaxNLocator

    methods = list(seeds[0])
    labels = {m: seeds[0][m].get("label", m) for m in methods}
    target, _, t_n = _mean_std([s["target_ppl"] for s in summaries])
    has_val = any(
        not math.isnan(as_number(r.get("client_val_ppl")))
        for m in seeds for mm in m.values() for r in mm.get("rounds", [])
    )
    paths = []
    fig, axes = new_figure(ncols=2 if has_val else 1, height=5.2)
    ax = axes[0][0]
    _plot_lines(ax, seeds, methods, labels, "round", "heldout_ppl")
    if t_n:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.2f}")
    ax.set(xlabel="round", ylabel="held-out perplexity (unseen clients)", title="Held-out perplexity")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if has_val:
        ax2 = axes[0][1]
        _plot_lines(ax2, seeds, methods, labels, "round", "client_val_ppl")
        ax2.set(xlabel="round", ylabel="client validation perplexity", title="Participants' local validation")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.grid(alpha=0.3)
    _legend_below(fig, axes[0], ncols=6 if has_val else 3)
    paths.append(out_dir / "ppl_vs_round.png")
    fig.savefig(paths[-1], dpi=120)

    fig, axes = new_figure(height=5.2)
    ax = axes[0][0]
    _plot_lines(ax, seeds, methods, labels, "cum_upload_bytes", "heldout_ppl", x_scale=1e6)
    equal, _, e_n = _mean_std([s["equal_upload_bytes"] for s in summaries])
    if e_n:
        ax.axvline(equal / 1e6, color="grey", linestyle=":", linewidth=1, label="equal-upload comparison")
    if t_n:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="cumulative client upload (MB)", ylabel="held-out perplexity", title="Perplexity per uploaded byte")
    ax.grid(alpha=0.3)
    _legend_below(fig, axes[0], ncols=3)
    paths.append(out_dir / "ppl_vs_upload.png")
    fig.savefig(paths[-1], dpi=120)
    return paths


def plot_ranks(seeds, out_dir: Path) -> Path | None:
    """``ranks.png``: per heterogeneous method (first seed), the mean client rank at the start and at the end, and
    how many clients self-pruning shrank, one row per method, with the homogeneous arms' ranks as references.

    A per-round line per method hid most methods under each other (the tiers fix the ranks and pruning moves
    them little), and a cloud of dots per method answered nothing; one row per method answers what the reader
    asks of ranks: which methods shrink the clients' ranks, by how much, and where their capacity sits between
    HomLoRA(r_min) and HomLoRA(r_max). Per-client ranks per round stay in ``metrics.json``. ``None`` when no
    method is heterogeneous.
    """
    from matplotlib.ticker import MaxNLocator

    metrics = seeds[0]
    methods = list(metrics)
    hetero = [
        m
        for m in methods
        if homogeneous_rank(metrics[m]) is None
        and any(rank_values(r.get("ranks")) for r in metrics[m].get("rounds", []))
    ]
    if not hetero:
        return None
    styles = method_styles(methods)
    fig, axes = new_figure(height=1.6 + 0.42 * len(hetero))
    ax = axes[0][0]
    for row, method in enumerate(reversed(hetero)):
        ranked = [r.get("ranks") for r in round_rows(metrics[method]) if rank_values(r.get("ranks"))]
        first, last = ranked[0], ranked[-1]
        start_mean, end_mean = float(np.mean(rank_values(first))), float(np.mean(rank_values(last)))
        shrunk = sum(1 for c, v in last.items() if c in first and v < first[c])
        colour = styles[method]["color"]
        ax.plot([start_mean, end_mean], [row, row], color=colour, linewidth=2)
        ax.plot(start_mean, row, marker="o", markerfacecolor="white", markeredgecolor=colour, linestyle="none")
        ax.plot(end_mean, row, marker=styles[method]["marker"], color=colour, linestyle="none")
        ax.annotate(f"{start_mean:.2f} -> {end_mean:.2f}, {shrunk} of {len(last)} clients pruned",
                    (max(start_mean, end_mean), row), xytext=(8, 0), textcoords="offset points", va="center",
                    fontsize=8)
    ax.set_yticks(range(len(hetero)), [metrics[m].get("label", m) for m in reversed(hetero)])
    ax.set_ylim(-0.7, len(hetero) - 0.3)
    for rank in sorted({homogeneous_rank(metrics[m]) for m in methods} - {None}):
        ax.axvline(rank, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"HomLoRA r={rank}", (rank, len(hetero) - 0.3), rotation=90, fontsize=7, va="top", ha="right",
                    color="grey")
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi + 0.45 * (hi - lo))  # room for the annotations
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    rounds = round_rows(metrics[hetero[0]])
    ax.set(xlabel=f"mean client rank: round {rounds[0].get('round')} (open circle) -> round {rounds[-1].get('round')}",
           title="Client ranks: what self-pruning took away")
    ax.grid(alpha=0.3, axis="x")
    path = out_dir / "ranks.png"
    fig.savefig(path, dpi=120)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------


def _as_seeds(metrics: Any) -> list[Mapping[str, Mapping[str, Any]]]:
    if isinstance(metrics, Mapping):
        return [metrics]
    seeds = list(metrics)
    if not seeds:
        raise ValueError("No metrics given: pass {method: {'rounds': [...]}} or a list of those (one per seed).")
    return seeds


def write_report(
    metrics: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Mapping[str, Any]]],
    out_dir: str | Path,
    *,
    target_ppl: float | None = None,
    target_method: str | None = None,
    title: str = "Federated fine-tuning with heterogeneous LoRA ranks",
    notes: str | None = None,
    seeds: Sequence[Any] | None = None,
    plots: bool = True,
    reference: str | None = None,
    resources: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``report.md``, ``metrics.json`` and the PNG plots into ``out_dir``; return the report's path.

    Args:
        metrics: ``{method: {"rounds": [...]}}`` for one seed, or a list of those (one per seed, same methods).
        target_ppl: the perplexity "rounds to target" refers to (default: the final perplexity of
            ``target_method``, itself by default HomLoRA at the smallest rank, see :func:`default_target_method`).
        notes: markdown appended under the table (e.g. the run's configuration).
        seeds: labels of the seeds, for ``metrics.json`` (default 0, 1, ...).
        reference: with several seeds, the method the others are paired with per seed (default
            ``homlora_rmax`` or the first method; see :mod:`hetlora_bench.seed_stats`).
        resources: what the run cost (``wall_s``, ``cpu_s``, ...), stored as ``resources`` in ``metrics.json``.

    Example:
        >>> write_report({"hetlora": {"rounds": [{"round": 1, "heldout_ppl": 60.6, "upload_bytes": 3e6}]}},
        ...              "runs/demo")  # doctest: +SKIP
        PosixPath('runs/demo/report.md')
    """
    seed_metrics = _as_seeds(metrics)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(m, target_ppl=target_ppl, target_method=target_method) for m in seed_metrics]
    seed_labels = list(seeds) if seeds is not None else list(range(len(seed_metrics)))

    plot_paths: list[Path] = []
    if plots:
        plot_paths.extend(plot_perplexity(seed_metrics, out, summaries))
        ranks = plot_ranks(seed_metrics, out)
        if ranks is not None:
            plot_paths.append(ranks)

    first = summaries[0]
    lines = [f"# {title}", ""]
    if len(seed_metrics) > 1:
        seed_list = ", ".join(map(str, seed_labels))
        lines += [f"Mean ± standard deviation over {len(seed_metrics)} seeds ({seed_list}).", ""]
    lines += [markdown_table(summaries), ""]
    paired = None
    if len(seed_metrics) > 1:
        paired = seed_statistics(
            [{m: info.get("final_ppl") for m, info in summary["methods"].items()} for summary in summaries],
            seeds=seed_labels,
            reference=reference,
        )
        lines += [
            f"## Paired per seed (reference: {paired['reference']})",
            "",
            paired_table(paired, {m: summaries[0]["methods"][m]["label"] for m in summaries[0]["methods"]}),
            "",
            "Δ: final held-out perplexity minus the reference's on the same seed (same held-out owners, data and "
            "client sampling); wins: seeds where the method ends below the reference.",
            "",
        ]
        if plots:
            plot_paths.append(plot_paired({"final held-out perplexity": paired}, out / "paired.png"))
    last_round = max((int(r.get("round", 0)) for m in seed_metrics for arm in m.values()
                      for r in arm.get("rounds", []) if isinstance(r, Mapping)), default=0)
    stopping = horizon_table(seed_metrics, report_horizons(last_round), seeds=seed_labels)
    if stopping["horizons"]:  # its own page beside the report (per arm and seed, one row each)
        arm_labels = {m: summaries[0]["methods"][m]["label"] for m in summaries[0]["methods"]}
        (out / "early_stopping.md").write_text("\n".join([
            f"# Early stopping on validation data: {title}",
            "",
            "Each cell: held-out perplexity after that round / held-out perplexity at the round up to it with the "
            "lowest validation perplexity (that round in brackets; held-out data never chooses it). "
            + criteria_note(stopping) + " The fixed set is every client's validation examples, the same for every "
            "arm and round of a seed (the federated evaluation over all clients); `client_val_ppl` is measured on "
            "each round's sampled clients only and jumps with who was sampled (docs/benchmarks.md).",
            "",
            early_stopping_markdown(stopping, arm_labels),
            "",
        ]), encoding="utf-8")
        lines += [
            "Early stopping on validation data, per arm and seed at rounds "
            f"{', '.join(map(str, stopping['horizons']))}: [early_stopping.md](early_stopping.md).",
            "",
        ]
    extra_lines, extra_plots = extra_sections(seed_metrics, out, plots=plots)
    lines += extra_lines
    plot_paths.extend(extra_plots)
    explain = [
        "- **Held-out ppl**: token-weighted perplexity on clients that never trained (unseen data owners).",
        "- **Best round**: the round with the lowest held-out perplexity.",
    ]
    if not math.isnan(first["target_ppl"]):
        target_name = first["target_method"]
        source = (
            f"the final held-out perplexity of {seed_metrics[0][target_name].get('label', target_name)}"
            if target_name
            else "given"
        )
        explain.append(f"- **Target**: {source}; **rounds / upload to target**: the first round at or below it.")
    if not math.isnan(first["equal_upload_bytes"]):
        explain.append(
            "- **Ppl at equal upload**: each method's held-out perplexity after the same cumulative client upload "
            "(the smallest total among the methods), linearly interpolated between evaluated rounds (— when that "
            "budget falls outside a method's evaluated range)."
        )
    explain.append("- **Final rank**: the ranks clients reported in the last round (after self-pruning).")
    lines += explain + [""]
    if notes:
        lines += [notes.rstrip(), ""]
    for path in plot_paths:
        lines += [f"![{path.stem}]({path.name})", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")

    payload: dict[str, Any] = {"title": title, "target_method": first["target_method"], "early_stopping": stopping}
    if resources is not None:
        payload["resources"] = dict(resources)
    if len(seed_metrics) == 1:
        payload.update(summary=summaries[0], metrics=seed_metrics[0])
    else:
        payload.update(
            seeds=seed_labels,
            summaries=summaries,
            aggregate={
                method: {
                    key: dict(
                        zip(
                            ("mean", "std", "n"),
                            _mean_std(
                                [
                                    NAN if s["methods"][method].get(key) is None else float(s["methods"][method][key])
                                    for s in summaries
                                    if method in s["methods"]
                                ]
                            ),
                        )
                    )
                    for key in _NUMERIC_FIELDS
                }
                for method in first["methods"]
            },
            metrics=list(seed_metrics),
            paired=paired,
        )
    (out / "metrics.json").write_text(json_text(json_safe(payload), indent=2), encoding="utf-8")
    return out / "report.md"
