"""The summary of a round (``summary.json``): the decision record `round.close_round` writes.

Accepted and rejected clients with reasons, engine failures, weights, per-client details (ranks, examples, loss,
bytes, sha256; norms except in DP rounds), the next ranks, round metrics, the aggregation's own summary and, for DP
rounds, the privacy accounting. Non-finite numbers are recorded as null with the reason (strict JSON).

Example:
    ```py
    >>> weighted_mean([(1.0, 1), (3.0, 3)])
    2.5
    ```
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..adapter import update_norm
from ..aggregation import ClientUpdate
from ..policies import DEFAULT_CLIENT_SAMPLING

__all__ = ["NON_FINITE_REASON", "build_summary", "client_details", "finite_or_null", "weighted_mean"]

NON_FINITE_REASON = "not a finite number (overflowed); recorded as null"


def weighted_mean(values: Sequence[tuple[float, int]]) -> float | None:
    """sum_k n_k x_k / sum_k n_k without overflow: fsum of x_k times the normalised weight n_k / sum_j n_j.

    Every term is at most max |x_k| in magnitude, so finite inputs cannot overflow the way x * n can
    (1.7e308 x 1e9 examples). Returns None for no values, or when even the mean is not finite.

    Example:
        ```py
        >>> weighted_mean([(2.0, 3), (6.0, 1)])
        3.0
        >>> weighted_mean([(1.7e308, 10**9), (1.7e308, 1)]) / 1.7e308  # no overflow to inf
        1.0000000000000002
        ```
    """
    total = sum(int(n) for _, n in values)
    if not values or total <= 0:
        return None
    mean = math.fsum(float(x) * (int(n) / total) for x, n in values)
    return mean if math.isfinite(mean) else None


def finite_or_null(value: Any, path: str, found: dict[str, str]) -> Any:
    """`value` with every non-finite float replaced by None; `found` collects {path: reason}."""
    if isinstance(value, float) and not math.isfinite(value):
        found[path] = NON_FINITE_REASON
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


_DETAIL_FIELDS = ("rank_in", "rank_out", "num_examples", "train_loss", "tail_norm_start", "tail_norm_end",
                  "global_revision")


def client_details(update: ClientUpdate, revision: str) -> dict[str, Any]:
    """The summary's record of one accepted client (from its validated report)."""
    meta = update.metadata
    out = {name: meta.get(name) for name in _DETAIL_FIELDS}
    out["from_round_global"] = meta.get("global_revision") in (None, revision)
    out["upload_bytes"] = meta.get("upload_bytes")
    out["sha256"] = meta.get("sha256")
    if update.components is not None:
        out["components"] = [int(j) for j in update.components]
    for optional in ("max_rank", "local_seconds", "message_format"):
        if meta.get(optional) is not None:
            out[optional] = meta[optional]
    return out


def build_summary(plan, settings, result, accepted, rejected, details, client_ranks, failed, note, seconds,
                  now) -> dict:
    """The decision record of a round (``summary.json``, JSON-ready); `round.close_round` calls it."""
    dp = settings.dp is not None
    total_examples = sum(details[c]["num_examples"] for c in accepted)
    losses = [(details[c]["train_loss"], details[c]["num_examples"]) for c in accepted
              if details[c]["train_loss"] is not None]
    metrics: dict[str, Any] = {
        "num_participants": len(plan.participants),
        "num_accepted": len(accepted),
        "num_rejected": len(rejected),
        "num_examples": total_examples,
        "bytes_uploaded": sum(details[c]["upload_bytes"] or 0 for c in accepted),
        "mean_rank_in": (sum(details[c]["rank_in"] for c in accepted) / len(accepted)) if accepted else None,
        "mean_rank_out": (sum(details[c]["rank_out"] for c in accepted) / len(accepted)) if accepted else None,
        "train_loss": weighted_mean(losses),
        "global_update_norm": float(update_norm(result.state_dict, settings.scaling)) if result is not None else None,
        "seconds": seconds,
    }
    if failed is not None:
        metrics["num_failed"] = len(failed)
    if result is not None and not dp:  # per-client norms are data-dependent: never published in a DP round
        for cid, value in (getattr(result, "norms", None) or {}).items():
            if cid in details:
                details[cid]["norm"] = float(value)
    summary: dict[str, Any] = {
        "round": plan.round,
        "method": settings.method,
        "global_revision": plan.revision,
        "participants": list(plan.participants),
        "assigned_ranks": dict(plan.ranks),
        "accepted": list(accepted),
        "rejected": dict(rejected),
        "weights": {cid: float(w) for cid, w in result.weights.items()} if result is not None else {},
        "clients": details,
        "client_ranks": dict(client_ranks),
        "metrics": metrics,
        "aggregation": result.summary() if result is not None else None,
        "closed_at": now,
    }
    if settings.engine is not None:
        summary["engine"] = settings.engine
    if getattr(plan, "components", None) is not None:
        summary["component_selection"] = settings.component_selection
        summary["assigned_components"] = {cid: [int(j) for j in idx] for cid, idx in plan.components.items()}
    if getattr(plan, "client_sampling", DEFAULT_CLIENT_SAMPLING) != DEFAULT_CLIENT_SAMPLING:
        summary["client_sampling"] = plan.client_sampling  # who was drawn, and how (uniform rounds stay as they were)
    aggregation = summary["aggregation"] or {}
    for name in ("components", "coverage"):
        if name in aggregation:
            summary[name] = aggregation[name]
    if failed is not None:
        summary["failed"] = dict(failed)
    if dp:
        summary["privacy"] = dict(getattr(result, "privacy", None) or _privacy_record(settings.dp, plan.round))
    if note:
        summary["note"] = note
    non_finite = {}
    if losses and metrics["train_loss"] is None:
        non_finite["metrics.train_loss"] = ("the example-weighted mean of the reported losses is not finite; "
                                            "recorded as null")
    summary = finite_or_null(summary, "", non_finite)
    if non_finite:
        summary["non_finite"] = non_finite
    return summary


def _privacy_record(config: Any, round_idx: int) -> dict[str, Any]:
    # A round without accepted uploads (e.g. nobody drawn by Poisson sampling) still counts as a round of the
    # mechanism: the accountant's record is that of rounds 0..t, like every other round's.
    from ..aggregation.privacy import privacy_spent

    return privacy_spent(config, round_idx + 1)
