"""How a round closes, written once for every engine: `close_round` (the pure function) and its records.

`close_round` turns the validated updates, the global the clients were sent and the `RoundSettings` into the new
global, the round's summary (``summary.json``) and the next ranks (``next_rank`` rule, ``max_rank`` caps, ``r_min``).
Nothing here reads or writes files or talks to a network: the callers only move bytes.

Example:
    ```py
    >>> outcome = close_round(plan, updates, previous_global, RoundSettings(method="hetlora", r_max=8, r_min=2,
    ...                       scaling=2.0), client_ranks=ranks, initial_ranks=ranks)  # doctest: +SKIP
    >>> outcome.state_dict, outcome.summary["accepted"], outcome.client_ranks  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..aggregation import (
    OFF,
    AggregationResult,
    ClientUpdate,
    StreamingAggregator,
    get_aggregation,
    non_finite_tensors,
)
from ..policies import cap_ranks
from .plan import RoundPlan
from .server_step import ServerStep
from .settings import RoundSettings, dp_method_for
from .summary import build_summary, client_details

logger = logging.getLogger(__name__)

__all__ = ["Rejection", "RoundOutcome", "close_round", "next_client_ranks"]

@dataclass(frozen=True)
class Rejection:
    """An upload refused before aggregation (validation, download): its reason goes to the summary."""

    client_id: str
    reason: str


@dataclass
class RoundOutcome:
    """What `close_round` decided: the new global, the summary, the next ranks and caps, and the server step's state
    to keep beside the new global (``None`` without a server step; the given state when the global is carried
    over)."""

    state_dict: dict[str, torch.Tensor]
    summary: dict[str, Any]
    client_ranks: dict[str, int]
    max_ranks: dict[str, int]
    result: AggregationResult | None = None
    server_state: dict[str, torch.Tensor] | None = None

    @property
    def accepted(self) -> list[str]:
        return list(self.summary["accepted"])




def next_client_ranks(
    current: Mapping[str, int],
    reports: Mapping[str, Mapping[str, Any]],
    *,
    initial: Mapping[str, int],
    rule: str,
    max_ranks: Mapping[str, int],
    r_min: int,
) -> tuple[dict[str, int], dict[str, int]]:
    """Next ranks after a round: accepted clients get their ``rank_out`` (or their initial rank), capped.

    Returns ``(ranks, max_ranks)``; a ``max_rank`` in a report replaces the client's previous cap.

    Example:
        ```py
        >>> next_client_ranks({"a": 8, "b": 4}, {"a": {"rank_out": 6, "max_rank": 5}}, initial={"a": 8, "b": 4},
        ...                   rule="rank_out", max_ranks={}, r_min=2)
        ({'a': 5, 'b': 4}, {'a': 5})
        ```
    """
    ranks = {cid: int(r) for cid, r in current.items()}
    caps = {cid: int(r) for cid, r in max_ranks.items()}
    for cid, report in reports.items():
        if report.get("max_rank") is not None:
            caps[cid] = int(report["max_rank"])
        ranks[cid] = int(report["rank_out"] if rule == "rank_out" else initial[cid])
    return cap_ranks(ranks, caps, r_min=r_min), caps


def _dp_generator(settings: RoundSettings, round_idx: int) -> torch.Generator | None:
    if not settings.dp_noise_seed:
        return None  # privacy.dp_aggregate draws a secret seed
    digest = hashlib.sha256(f"{settings.seed}:dp:{round_idx}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _replayable(updates: Iterable[ClientUpdate | Rejection] | Callable[[], Iterable[ClientUpdate | Rejection]]
                ) -> Callable[[], Iterable[ClientUpdate | Rejection]]:
    """A zero-argument callable giving the round's items anew for each pass (a one-shot iterable is kept in a list)."""
    if callable(updates):
        return updates
    items = updates if isinstance(updates, (list, tuple)) else list(updates)
    return lambda: items


def _aggregate(plan, items, previous, settings, rejected, details, strict):
    """The round's aggregation: one pass (each update read once, observed and added) when the aggregator settles
    on it (nobody capped or clipped: the two-pass sums bit for bit), else two passes over the round's items:
    observe every update (the round's statistics), then add each one.

    Every refusal of one update, in either pass, becomes a rejection of that client with the aggregator's reason
    (the one place a client's problem is turned into a decision); returns (result, accepted).
    """
    def make(one_pass: bool) -> StreamingAggregator:
        return StreamingAggregator(
            settings.method, r_max=settings.r_max, scaling=settings.scaling, previous=previous,
            clip_norm=OFF if settings.dp is not None else settings.clip_norm, weighting=settings.weighting,
            bound_multiplier=settings.bound_multiplier, prefix_only=settings.dp is not None, one_pass=one_pass,
        )

    source = _replayable(items)
    if settings.dp is None:
        one = make(True)
        accepted = _add_all(plan, one, source(), rejected, details, strict, None)
        if not accepted:
            return None, accepted, {}
        if one.settle():
            return one.result(), accepted, one.product_factors()
        logger.info("Round %d: a client was capped or clipped; aggregating in two passes", plan.round)
        rejected.clear()
        details.clear()
    aggregator = make(False)
    for item in source():
        if isinstance(item, ClientUpdate):
            try:
                aggregator.observe(item)
            except ValueError:
                pass  # remembered: add() below raises the same reason, where the rejection is recorded
    kept: list[ClientUpdate] | None = [] if settings.dp is not None else None
    accepted = _add_all(plan, aggregator, source(), rejected, details, strict, kept)
    if not accepted:
        return None, accepted, {}
    if settings.dp is None:
        return aggregator.result(), accepted, aggregator.product_factors()
    from ..aggregation.privacy import dp_aggregate  # lazy: Opacus is an optional dependency

    result = dp_aggregate(
        kept, config=settings.dp, r_max=settings.r_max, previous=previous, method=dp_method_for(settings.method),
        rounds_so_far=plan.round + 1, scaling=settings.scaling, generator=_dp_generator(settings, plan.round),
    )
    return result, accepted, {}


def _add_all(plan, aggregator, items, rejected, details, strict, kept):
    """Add every update of ``items`` (a refusal is a rejection with the aggregator's reason); the accepted ids."""
    accepted: list[str] = []
    for item in items:
        if isinstance(item, Rejection):
            rejected[item.client_id] = item.reason
            continue
        try:
            aggregator.add(item)  # checks before it changes anything: a refusal leaves the sums as-is
        except ValueError as err:
            if strict:
                raise
            rejected[item.client_id] = f"aggregation refused it: {err}"
            logger.warning("Round %d: rejected %s: aggregation refused it: %s", plan.round, item.client_id, err)
            continue
        accepted.append(item.client_id)
        details[item.client_id] = client_details(item, plan.revision)
        if kept is not None:
            kept.append(item)
    return accepted


def _server_step(settings: RoundSettings, previous: Mapping[str, torch.Tensor], result: AggregationResult,
                 products: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 state: Mapping[str, torch.Tensor] | None) -> tuple[dict, dict, dict[str, Any]]:
    """The server step on the method's aggregate (`server_step.ServerStep`): new global, new state, its record."""
    step = ServerStep(settings.server_optimizer, settings.error_feedback, settings.r_max, settings.scaling)
    return step.apply(previous, result.state_dict, products, state)


def close_round(
    plan: RoundPlan,
    updates: Iterable[ClientUpdate | Rejection] | Callable[[], Iterable[ClientUpdate | Rejection]],
    previous: Mapping[str, torch.Tensor],
    settings: RoundSettings,
    *,
    client_ranks: Mapping[str, int],
    initial_ranks: Mapping[str, int],
    max_ranks: Mapping[str, int] | None = None,
    failed: Mapping[str, str] | None = None,
    started: float | None = None,
    clock: Any = time.time,
    strict: bool = False,
    server_state: Mapping[str, torch.Tensor] | None = None,
) -> RoundOutcome:
    """Close one round: aggregate the accepted updates into the new global and write the decision record.

    Args:
        plan: the round's plan (participants, assigned ranks, revision).
        updates: validated `ClientUpdate`s (their ``metadata`` is the validated report plus ``upload_bytes`` /
            ``sha256``) and `Rejection`s, consumed one at a time. The round reads them once (each update observed
            and added in one pass) unless a client is capped or clipped, then twice more (first pass: the
            statistics of the weight cap and the adaptive bound; second: the aggregation): pass a zero-argument
            callable that yields them anew to keep memory flat; any other iterable is kept in a list.
        previous: the global the clients were sent (kept components, the clip's reference, DP's ``theta``).
        settings: the `RoundSettings`.
        client_ranks: every client's current rank; initial_ranks: the federation's initial ranks (``next_rank=
            "initial"``); max_ranks: the clients' last reported caps.
        failed: engine-level failures (no reply, node error) to record; None for engines that have none.
        started, clock: the round's start time and the clock (for ``seconds`` and ``closed_at``).
        strict: re-aggregating a decided round: an aggregator refusal raises instead of rejecting.
        server_state: the server step's state kept beside ``previous`` (``settings.server_optimizer`` /
            ``error_feedback``: momentum, second moments, residual; None or empty at the first round).

    Returns:
        `RoundOutcome` (``state_dict`` is ``previous`` when nothing was accepted, fewer than
        ``settings.min_accepted`` uploads were, or the aggregate was not finite; ``summary["note"]`` says which).
        Nothing one update can cause escapes as an exception: it is a rejection of that client.

    Raises:
        AggregationError: a bad setting (unknown method, DP with a method that has no DP form).

    Example:
        ```py
        >>> out = close_round(plan, [update_a, Rejection("b", "bad shape")], previous, settings,
        ...                   client_ranks={"a": 4, "b": 8}, initial_ranks={"a": 4, "b": 8})  # doctest: +SKIP
        >>> out.summary["rejected"]  # doctest: +SKIP
        {'b': 'bad shape'}
        ```
    """
    get_aggregation(settings.method)
    started = clock() if started is None else started
    rejected: dict[str, str] = {}
    details: dict[str, dict[str, Any]] = {}
    result, accepted, products = _aggregate(plan, updates, previous, settings, rejected, details, strict)
    note = None
    stepped = None
    bad = non_finite_tensors(result.state_dict) if result is not None else []
    if result is not None and not bad and (settings.server_optimizer is not None or settings.error_feedback):
        try:
            stepped = _server_step(settings, previous, result, products, server_state)
        except (RuntimeError, ValueError) as err:  # an SVD that does not converge: the global is carried over
            bad = [f"server step: {err}"]
        else:
            result.state_dict = stepped[0]
            bad = non_finite_tensors(result.state_dict) + non_finite_tensors(stepped[1])
    if bad:
        note = (f"the aggregate is not finite ({len(bad)} tensor(s), e.g. {bad[0]!r}): no new global is published, "
                "the previous global adapter is carried over unchanged")
        logger.warning("Round %d: %s", plan.round, note)
        result = None
    elif result is not None and len(accepted) < settings.min_accepted:
        note = (f"only {len(accepted)} accepted upload(s), below min_replies={settings.min_accepted}: the global "
                "adapter is carried over unchanged")
        result = None
    elif result is None:
        note = "no accepted upload: the global adapter is carried over unchanged"
    ranks, caps = next_client_ranks(client_ranks, {c: details[c] for c in accepted}, initial=initial_ranks,
                                    rule=settings.next_rank, max_ranks=max_ranks or {}, r_min=settings.r_min)
    summary = build_summary(plan, settings, result, accepted, rejected, details, ranks, failed, note,
                            clock() - started, clock())
    if caps:
        summary["client_max_ranks"] = dict(sorted(caps.items()))
    state = dict(result.state_dict) if result is not None else dict(previous)
    new_server_state = None if server_state is None else dict(server_state)
    if stepped is not None and result is not None:
        summary["server_step"] = stepped[2]
        new_server_state = stepped[1]
    return RoundOutcome(state, summary, ranks, caps, result, new_server_state)
