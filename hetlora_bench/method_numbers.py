"""The numbers a simulation report shows per method: final / best perplexity, rounds and bytes to a target,
perplexity at equal upload (`summarize`), and the helpers that read a method's evaluated rounds.

Split out of [`report`][hetlora_bench.report], which re-exports every name here.

Example:
    >>> rounds = [{"round": 0, "heldout_ppl": 80.0, "cum_upload_bytes": 0}, {"round": 1, "heldout_ppl": 60.0,
    ...           "cum_upload_bytes": 100}]
    >>> ppl_at_upload(rounds, 50)
    70.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

#: a missing number in a table or a curve
NAN = float("nan")


def as_number(value: Any) -> float:
    """A metric as a float: ``nan`` when missing or not a number, the mean of a per-client mapping.

    Example:
        ```py
        >>> as_number("2.5"), as_number({"a": 1.0, "b": 3.0}), math.isnan(as_number(None))
        (2.5, 2.0, True)
        ```
    """
    if value is None:
        return NAN
    if isinstance(value, Mapping):  # e.g. per-client validation perplexities: their mean
        vals = [float(v) for v in value.values() if v is not None]
        return float(np.mean(vals)) if vals else NAN
    try:
        return float(value)
    except (TypeError, ValueError):
        return NAN


def round_rows(method_metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """An arm's round rows sorted by round, with ``cum_upload_bytes`` filled in where the row lacks it.

    Example:
        ```py
        >>> rows = round_rows({"rounds": [{"round": 1, "upload_bytes": 5}, {"round": 0, "upload_bytes": 0}]})
        >>> [(r["round"], r["cum_upload_bytes"]) for r in rows]
        [(0, 0.0), (1, 5.0)]
        ```
    """
    rounds = [dict(r) for r in method_metrics.get("rounds", [])]
    rounds.sort(key=lambda r: r.get("round", 0))
    cum = 0.0
    for r in rounds:
        cum += as_number(r.get("upload_bytes")) if not math.isnan(as_number(r.get("upload_bytes"))) else 0.0
        if r.get("cum_upload_bytes") is None:
            r["cum_upload_bytes"] = cum
    return rounds


def rank_values(ranks: Any) -> list[int]:
    """The ranks of a row's ``ranks`` field (a {client: rank} mapping or a list), as ints, missing ones left out.

    Example:
        ```py
        >>> rank_values({"a": 2, "b": None, "c": 8}), rank_values(None)
        ([2, 8], [])
        ```
    """
    if ranks is None:
        return []
    if isinstance(ranks, Mapping):
        return [int(v) for v in ranks.values() if v is not None]
    return [int(v) for v in ranks if v is not None]


def format_bytes(num_bytes: float) -> str:
    """Bytes as decimal megabytes (``"33.6 MB"``), ``"—"`` when unknown.

    Example:
        >>> format_bytes(33_600_000)
        '33.6 MB'
    """
    if num_bytes is None or math.isnan(num_bytes):
        return "—"
    mb = num_bytes / 1e6
    return f"{mb:.2f} MB" if mb < 10 else f"{mb:.1f} MB"


def homogeneous_rank(method_metrics: Mapping[str, Any]) -> int | None:
    """The single rank every client trains at in every round, or ``None`` for a heterogeneous method.

    ``method_metrics["homogeneous_rank"]``, when present, decides; otherwise it is read from the rounds' ranks.

    Example:
        >>> homogeneous_rank({"rounds": [{"round": 1, "ranks": {"a": 2, "b": 2}}]})
        2
    """
    if "homogeneous_rank" in method_metrics:
        value = method_metrics["homogeneous_rank"]
        return None if value is None else int(value)
    seen = {v for r in method_metrics.get("rounds", []) for v in rank_values(r.get("ranks"))}
    return next(iter(seen)) if len(seen) == 1 else None


def default_target_method(metrics: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The method whose final perplexity is the default target: one marked ``"reference": True``, else the
    homogeneous method with the smallest rank (HomLoRA at r_min), else ``None``.

    Example:
        >>> default_target_method({"hom16": {"rounds": [{"ranks": {"a": 16}}]},
        ...                        "hom2": {"rounds": [{"ranks": {"a": 2}}]}})
        'hom2'
    """
    for name, m in metrics.items():
        if m.get("reference"):
            return name
    candidates = [(rank, i, name) for i, (name, m) in enumerate(metrics.items()) if (rank := homogeneous_rank(m))]
    return min(candidates)[2] if candidates else None


def final_value(rounds: list[dict[str, Any]], key: str) -> float:
    """The last finite value of ``key`` over the rows (``nan`` if none).

    Example:
        ```py
        >>> final_value([{"ppl": 9.0}, {"ppl": 7.0}, {"ppl": None}], "ppl")
        7.0
        ```
    """
    for r in reversed(rounds):
        value = as_number(r.get(key))
        if not math.isnan(value):
            return value
    return NAN


def ppl_at_upload(rounds: list[dict[str, Any]], upload_bytes: float) -> float:
    """Held-out perplexity at ``upload_bytes`` cumulative upload, linearly interpolated between evaluated rounds.

    ``nan`` outside the evaluated range (no extrapolation).

    Example:
        >>> ppl_at_upload([{"heldout_ppl": 10.0, "cum_upload_bytes": 0},
        ...                {"heldout_ppl": 8.0, "cum_upload_bytes": 100}], 50)
        9.0
    """
    points = sorted(
        (as_number(r.get("cum_upload_bytes")), as_number(r.get("heldout_ppl")))
        for r in rounds
        if not math.isnan(as_number(r.get("heldout_ppl"))) and not math.isnan(as_number(r.get("cum_upload_bytes")))
    )
    if not points or math.isnan(upload_bytes):
        return NAN
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    if upload_bytes < xs[0] - 1e-9 or upload_bytes > xs[-1] + 1e-9:
        return NAN
    return float(np.interp(upload_bytes, xs, ys))


def summarize(
    metrics: Mapping[str, Mapping[str, Any]],
    *,
    target_ppl: float | None = None,
    target_method: str | None = None,
) -> dict[str, Any]:
    """The table's numbers for one seed.

    Returns ``{"target_ppl", "target_method", "equal_upload_bytes", "methods": {name: {...}}}`` where each
    method has ``final_ppl``, ``best_ppl``, ``best_round``, ``rounds_to_target``, ``upload_to_target``,
    ``total_upload_bytes``, ``total_download_bytes``, ``ppl_at_equal_upload``, ``final_client_val_ppl``,
    ``final_rank_mean``/``min``/``max``, ``homogeneous_rank``, ``wall_s``, ``num_rounds``.

    Example:
        >>> s = summarize({"a": {"rounds": [{"round": 1, "heldout_ppl": 5.0, "upload_bytes": 10}]}}, target_ppl=6.0)
        >>> s["methods"]["a"]["rounds_to_target"]
        1
    """
    if target_ppl is None:
        target_method = target_method or default_target_method(metrics)
        if target_method is not None:
            if target_method not in metrics:
                raise KeyError(f"target_method={target_method!r} is not among the methods {list(metrics)}.")
            target_ppl = final_value(round_rows(metrics[target_method]), "heldout_ppl")
    else:
        target_method = None
    all_rounds = {name: round_rows(m) for name, m in metrics.items()}
    totals = [final_value(r, "cum_upload_bytes") for r in all_rounds.values()]
    positive = [t for t in totals if not math.isnan(t) and t > 0]
    equal_bytes = min(positive) if positive else NAN

    methods: dict[str, dict[str, Any]] = {}
    for name, rounds in all_rounds.items():
        evaluated = [r for r in rounds if not math.isnan(as_number(r.get("heldout_ppl")))]
        best = min(evaluated, key=lambda r: as_number(r["heldout_ppl"])) if evaluated else None
        reach = None
        if target_ppl is not None and not math.isnan(target_ppl):
            reach = next((r for r in evaluated if as_number(r["heldout_ppl"]) <= target_ppl + 1e-9), None)
        last_ranks = next((rank_values(r.get("ranks")) for r in reversed(rounds) if rank_values(r.get("ranks"))), [])
        wall = [as_number(r.get("wall_s")) for r in rounds]
        methods[name] = {
            "label": metrics[name].get("label", name),
            "num_rounds": len(rounds),
            "final_ppl": final_value(rounds, "heldout_ppl"),
            "best_ppl": as_number(best["heldout_ppl"]) if best else NAN,
            "best_round": best.get("round") if best else None,
            "rounds_to_target": reach.get("round") if reach else None,
            "upload_to_target": as_number(reach.get("cum_upload_bytes")) if reach else NAN,
            "total_upload_bytes": final_value(rounds, "cum_upload_bytes"),
            "total_download_bytes": float(np.nansum([as_number(r.get("download_bytes")) for r in rounds]))
            if rounds
            else NAN,
            "ppl_at_equal_upload": ppl_at_upload(rounds, equal_bytes),
            "final_client_val_ppl": final_value(rounds, "client_val_ppl"),
            "final_rank_mean": float(np.mean(last_ranks)) if last_ranks else NAN,
            "final_rank_min": min(last_ranks) if last_ranks else None,
            "final_rank_max": max(last_ranks) if last_ranks else None,
            "homogeneous_rank": homogeneous_rank(metrics[name]),
            "wall_s": float(np.nansum(wall)) if wall and not all(math.isnan(w) for w in wall) else NAN,
        }
    return {
        "target_ppl": NAN if target_ppl is None else float(target_ppl),
        "target_method": target_method,
        "equal_upload_bytes": equal_bytes,
        "methods": methods,
    }
