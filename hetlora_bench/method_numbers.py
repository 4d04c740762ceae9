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

_NAN = float("nan")


def _num(value: Any) -> float:
    if value is None:
        return _NAN
    if isinstance(value, Mapping):  # e.g. per-client validation perplexities: their mean
        vals = [float(v) for v in value.values() if v is not None]
        return float(np.mean(vals)) if vals else _NAN
    try:
        return float(value)
    except (TypeError, ValueError):
        return _NAN


def _rounds(method_metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    rounds = [dict(r) for r in method_metrics.get("rounds", [])]
    rounds.sort(key=lambda r: r.get("round", 0))
    cum = 0.0
    for r in rounds:
        cum += _num(r.get("upload_bytes")) if not math.isnan(_num(r.get("upload_bytes"))) else 0.0
        if r.get("cum_upload_bytes") is None:
            r["cum_upload_bytes"] = cum
    return rounds


def _rank_values(ranks: Any) -> list[int]:
    if ranks is None:
        return []
    if isinstance(ranks, Mapping):
        return [int(v) for v in ranks.values() if v is not None]
    return [int(v) for v in ranks if v is not None]


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
    seen = {v for r in method_metrics.get("rounds", []) for v in _rank_values(r.get("ranks"))}
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


def _final(rounds: list[dict[str, Any]], key: str) -> float:
    for r in reversed(rounds):
        value = _num(r.get(key))
        if not math.isnan(value):
            return value
    return _NAN


def ppl_at_upload(rounds: list[dict[str, Any]], upload_bytes: float) -> float:
    """Held-out perplexity at ``upload_bytes`` cumulative upload, linearly interpolated between evaluated rounds.

    ``nan`` outside the evaluated range (no extrapolation).

    Example:
        >>> ppl_at_upload([{"heldout_ppl": 10.0, "cum_upload_bytes": 0},
        ...                {"heldout_ppl": 8.0, "cum_upload_bytes": 100}], 50)
        9.0
    """
    points = sorted(
        (_num(r.get("cum_upload_bytes")), _num(r.get("heldout_ppl")))
        for r in rounds
        if not math.isnan(_num(r.get("heldout_ppl"))) and not math.isnan(_num(r.get("cum_upload_bytes")))
    )
    if not points or math.isnan(upload_bytes):
        return _NAN
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    if upload_bytes < xs[0] - 1e-9 or upload_bytes > xs[-1] + 1e-9:
        return _NAN
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
            target_ppl = _final(_rounds(metrics[target_method]), "heldout_ppl")
    else:
        target_method = None
    all_rounds = {name: _rounds(m) for name, m in metrics.items()}
    totals = [_final(r, "cum_upload_bytes") for r in all_rounds.values()]
    positive = [t for t in totals if not math.isnan(t) and t > 0]
    equal_bytes = min(positive) if positive else _NAN

    methods: dict[str, dict[str, Any]] = {}
    for name, rounds in all_rounds.items():
        evaluated = [r for r in rounds if not math.isnan(_num(r.get("heldout_ppl")))]
        best = min(evaluated, key=lambda r: _num(r["heldout_ppl"])) if evaluated else None
        reach = None
        if target_ppl is not None and not math.isnan(target_ppl):
            reach = next((r for r in evaluated if _num(r["heldout_ppl"]) <= target_ppl + 1e-9), None)
        last_ranks = next((_rank_values(r.get("ranks")) for r in reversed(rounds) if _rank_values(r.get("ranks"))), [])
        wall = [_num(r.get("wall_s")) for r in rounds]
        methods[name] = {
            "label": metrics[name].get("label", name),
            "num_rounds": len(rounds),
            "final_ppl": _final(rounds, "heldout_ppl"),
            "best_ppl": _num(best["heldout_ppl"]) if best else _NAN,
            "best_round": best.get("round") if best else None,
            "rounds_to_target": reach.get("round") if reach else None,
            "upload_to_target": _num(reach.get("cum_upload_bytes")) if reach else _NAN,
            "total_upload_bytes": _final(rounds, "cum_upload_bytes"),
            "total_download_bytes": float(np.nansum([_num(r.get("download_bytes")) for r in rounds]))
            if rounds
            else _NAN,
            "ppl_at_equal_upload": ppl_at_upload(rounds, equal_bytes),
            "final_client_val_ppl": _final(rounds, "client_val_ppl"),
            "final_rank_mean": float(np.mean(last_ranks)) if last_ranks else _NAN,
            "final_rank_min": min(last_ranks) if last_ranks else None,
            "final_rank_max": max(last_ranks) if last_ranks else None,
            "homogeneous_rank": homogeneous_rank(metrics[name]),
            "wall_s": float(np.nansum(wall)) if wall and not all(math.isnan(w) for w in wall) else _NAN,
        }
    return {
        "target_ppl": _NAN if target_ppl is None else float(target_ppl),
        "target_method": target_method,
        "equal_upload_bytes": equal_bytes,
        "methods": methods,
    }
