"""The round protocol, written once: the records a round reads and writes, and the pure function that closes it.

One HetLoRA round, whatever moves the bytes (the store-backed `Coordinator`, the Flower `HetLoRAStrategy`, the
in-process simulation runner):

1. the server publishes global ``t`` with its **plan** (`RoundPlan`, the file ``round.json``): who trains, at
   which rank, from which revision;
2. each participant uploads its adapter and its **report** (`ClientReport`, the file ``client.json``: rank in/out,
   examples, loss, tail norms, ...); validation turns the pair into a `ClientUpdate` or a `Rejection`
   (`peft_hetlora.federated.upload`);
3. `close_round` turns the validated updates, the global the clients were sent and the `RoundSettings` into the
   new global, the round's **summary** (``summary.json``) and the next ranks (``next_rank`` rule, ``max_rank``
   caps, ``r_min``); `plan_round` turns those ranks into the next plan.

Nothing here reads or writes files or talks to a network: the callers only move bytes.

Example:
    ```py
    >>> plan = plan_round(0, ["a", "b", "c"], {"a": 4, "b": 8, "c": 2}, clients_per_round=2, seed=0)  # doctest: +SKIP
    >>> outcome = close_round(plan, updates, previous_global, RoundSettings(method="hetlora", r_max=8, r_min=2,
    ...                       scaling=2.0), client_ranks=ranks, initial_ranks=ranks)  # doctest: +SKIP
    >>> outcome.state_dict, outcome.summary["accepted"], outcome.client_ranks  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .aggregation import OFF, AggregationResult, ClientUpdate, StreamingAggregator, non_finite_tensors
from .aggregation.methods import get_aggregation
from .component_selection import select_components
from .rank_policy import cap_ranks, poisson_sample, sample_clients
from .round_settings import (  # noqa: F401  (re-exported: part of the protocol's public names)
    _DP_METHOD,
    NEXT_RANK_RULES,
    RoundSettings,
    check_dp,
    check_selection,
    dp_method_for,
)
from .round_summary import build_summary, client_details, weighted_mean

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_FILE",
    "CLIENT_FILE",
    "CONFIG_FILE",
    "FEDERATION_FILE",
    "FEDERATION_FORMAT",
    "NEXT_RANK_RULES",
    "ROUND_FILE",
    "SUMMARY_FILE",
    "ClientReport",
    "CollectStatus",
    "Rejection",
    "RoundOutcome",
    "RoundPlan",
    "RoundSettings",
    "check_dp",
    "check_selection",
    "close_round",
    "dp_method_for",
    "next_client_ranks",
    "plan_round",
    "poisson_sample",
    "round_status",
    "weighted_mean",
]

# The file names of the layout (docs/design.md#store-layout), shared by every store and engine.
FEDERATION_FILE = "federation.json"
ROUND_FILE = "round.json"
SUMMARY_FILE = "summary.json"
CLIENT_FILE = "client.json"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
FEDERATION_FORMAT = 1


@dataclass(frozen=True)
class RoundPlan:
    """What global t announces for round t (``round.json``): who trains, at which rank, from which revision."""

    round: int
    participants: list[str]
    ranks: dict[str, int]
    revision: str = ""
    opened_at: float | None = None
    final: bool = False
    components: dict[str, tuple[int, ...]] | None = None

    def to_json(self, settings: RoundSettings, *, deadline_s: float | None = None) -> dict[str, Any]:
        """The ``round.json`` record (``revision`` is the store's business: it is not part of the file)."""
        out = {
            "round": self.round,
            "participants": list(self.participants),
            "ranks": {cid: int(self.ranks[cid]) for cid in self.participants},
            "r_max": settings.r_max,
            "r_min": settings.r_min,
            "method": settings.method,
            "scaling": settings.scaling,
            "opened_at": self.opened_at,
            "deadline_s": deadline_s,
            "final": self.final,
        }
        if settings.engine is not None:
            out["engine"] = settings.engine
        if self.components is not None:
            out["component_selection"] = settings.component_selection
            out["components"] = {cid: [int(j) for j in self.components[cid]] for cid in self.participants
                                 if cid in self.components}
        return out

    @classmethod
    def from_json(cls, info: Mapping[str, Any], *, round_idx: int, revision: str) -> RoundPlan:
        """Inverse of `to_json` (the store gives the revision)."""
        return cls(
            round=round_idx,
            participants=list(info.get("participants", [])),
            ranks={k: int(v) for k, v in info.get("ranks", {}).items()},
            revision=revision,
            opened_at=info.get("opened_at"),
            final=bool(info.get("final", False)),
            components=({k: tuple(int(j) for j in v) for k, v in info["components"].items()}
                        if isinstance(info.get("components"), Mapping) else None),
        )

    def components_of(self, client_id: str) -> tuple[int, ...] | None:
        """The components assigned to ``client_id`` this round (None: the prefix of its rank)."""
        return None if self.components is None else self.components.get(client_id)


@dataclass(frozen=True)
class ClientReport:
    """What a client reports with its upload (``client.json``); validated by `validation.validate_client_json`."""

    client_id: str
    round: int
    rank_in: int
    rank_out: int
    num_examples: int
    train_loss: float | None = None
    tail_norm_start: float | None = None
    tail_norm_end: float | None = None
    global_revision: str | None = None
    max_rank: int | None = None
    components: tuple[int, ...] | None = None
    message_format: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``client.json`` dict (``max_rank``, ``components`` and ``message_format`` only when set)."""
        out = {k: getattr(self, k) for k in ("client_id", "round", "rank_in", "rank_out", "num_examples",
                                             "train_loss", "tail_norm_start", "tail_norm_end", "global_revision")}
        if self.max_rank is not None:
            out["max_rank"] = self.max_rank
        if self.components is not None:
            out["components"] = [int(j) for j in self.components]
        if self.message_format is not None:
            out["message_format"] = self.message_format
        return out


@dataclass(frozen=True)
class Rejection:
    """An upload refused before aggregation (validation, download): its reason goes to the summary."""

    client_id: str
    reason: str


@dataclass
class RoundOutcome:
    """What `close_round` decided: the new global, the summary, the next ranks and caps."""

    state_dict: dict[str, torch.Tensor]
    summary: dict[str, Any]
    client_ranks: dict[str, int]
    max_ranks: dict[str, int]
    result: AggregationResult | None = None

    @property
    def accepted(self) -> list[str]:
        return list(self.summary["accepted"])


@dataclass(frozen=True)
class CollectStatus:
    """Uploads seen for a round: `ready` says the round can close."""

    round: int
    participants: list[str]
    uploaded: list[str]
    others: list[str] = field(default_factory=list)
    ready: bool = False
    deadline_passed: bool = False


def round_status(plan: RoundPlan, listed: Sequence[str], *, min_clients: int, deadline_s: float | None, now: float,
                 start: float) -> CollectStatus:
    """Can the round close? When every participant uploaded, or ``min_clients`` did and the deadline (if any) passed.

    Example:
        ```py
        >>> plan = RoundPlan(0, ["a", "b"], {"a": 2, "b": 2}, opened_at=0.0)
        >>> round_status(plan, ["a"], min_clients=1, deadline_s=60.0, now=61.0, start=0.0).ready
        True
        ```
    """
    participants = set(plan.participants)
    uploaded = sorted(set(listed) & participants)
    others = sorted(set(listed) - participants)
    opened = plan.opened_at if plan.opened_at is not None else start
    deadline_passed = deadline_s is not None and now >= opened + float(deadline_s)
    need = min(min_clients, len(participants))
    ready = len(uploaded) == len(participants) or (len(uploaded) >= need and (deadline_s is None or deadline_passed))
    return CollectStatus(plan.round, sorted(participants), uploaded, others, ready, deadline_passed)


def plan_round(
    round_idx: int,
    clients: Sequence[str],
    client_ranks: Mapping[str, int],
    *,
    clients_per_round: int,
    seed: int,
    sampling_rate: float | None = None,
    revision: str = "",
    opened_at: float | None = None,
    final: bool = False,
    component_selection: str = "prefix",
    anchor: int = 0,
    r_max: int | None = None,
) -> RoundPlan:
    """The plan of round ``round_idx``: a seeded sample of ``clients`` and their ranks.

    ``sampling_rate`` (DP rounds) switches to Poisson sampling at that rate, which is what the privacy accountant
    assumes; otherwise exactly ``clients_per_round`` clients are drawn (`sample_clients`). A window
    ``component_selection`` (``"rolling"`` / ``"coverage"``, needs ``r_max``) also assigns each participant the
    global components it trains (`select_components` over the sampled clients and their ranks), recorded as
    ``RoundPlan.components``; ``"prefix"`` leaves it None (every client trains ``range(rank)``).

    Example:
        ```py
        >>> plan_round(0, ["a", "b"], {"a": 2, "b": 4}, clients_per_round=2, seed=0).ranks
        {'a': 2, 'b': 4}
        ```
    """
    if sampling_rate is not None:
        participants = poisson_sample(clients, sampling_rate, seed=seed, round_idx=round_idx)
    else:
        participants = sample_clients(list(clients), clients_per_round, seed=seed, round_idx=round_idx)
    ranks = {cid: int(client_ranks[cid]) for cid in participants}
    components = None
    if component_selection != "prefix":
        if r_max is None:
            raise ValueError(f"plan_round: component_selection={component_selection!r} needs r_max=...")
        components = select_components(component_selection, ranks, r_max=r_max, round_idx=round_idx, seed=seed,
                                       anchor=anchor) if ranks else {}
    return RoundPlan(round_idx, participants, ranks, revision, opened_at, final, components)


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
    """Two passes over the round's items: observe every update (the round's statistics), then add each one.

    Every refusal of one update, in either pass, becomes a rejection of that client with the aggregator's reason
    (the one place a client's problem is turned into a decision); returns (result, accepted).
    """
    aggregator = StreamingAggregator(
        settings.method, r_max=settings.r_max, scaling=settings.scaling, previous=previous,
        clip_norm=OFF if settings.dp is not None else settings.clip_norm, weighting=settings.weighting,
        bound_multiplier=settings.bound_multiplier, prefix_only=settings.dp is not None,
    )
    source = _replayable(items)
    for item in source():
        if isinstance(item, ClientUpdate):
            try:
                aggregator.observe(item)
            except ValueError:
                pass  # remembered: add() below raises the same reason, where the rejection is recorded
    accepted: list[str] = []
    kept: list[ClientUpdate] = []
    for item in source():
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
        if settings.dp is not None:
            kept.append(item)
    if not accepted:
        return None, accepted
    if settings.dp is None:
        return aggregator.result(), accepted
    from .aggregation.privacy import dp_aggregate  # lazy: Opacus is an optional dependency

    result = dp_aggregate(
        kept, config=settings.dp, r_max=settings.r_max, previous=previous, method=dp_method_for(settings.method),
        rounds_so_far=plan.round + 1, scaling=settings.scaling, generator=_dp_generator(settings, plan.round),
    )
    return result, accepted


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
) -> RoundOutcome:
    """Close one round: aggregate the accepted updates into the new global and write the decision record.

    Args:
        plan: the round's plan (participants, assigned ranks, revision).
        updates: validated `ClientUpdate`s (their ``metadata`` is the validated report plus ``upload_bytes`` /
            ``sha256``) and `Rejection`s, consumed one at a time. The round reads them twice (first pass: the
            statistics of the weight cap and the adaptive bound; second: the aggregation): pass a zero-argument
            callable that yields them anew to keep memory flat; any other iterable is kept in a list.
        previous: the global the clients were sent (kept components, the clip's reference, DP's ``theta``).
        settings: the `RoundSettings`.
        client_ranks: every client's current rank; initial_ranks: the federation's initial ranks (``next_rank=
            "initial"``); max_ranks: the clients' last reported caps.
        failed: engine-level failures (no reply, node error) to record; None for engines that have none.
        started, clock: the round's start time and the clock (for ``seconds`` and ``closed_at``).
        strict: re-aggregating a decided round: an aggregator refusal raises instead of rejecting.

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
    result, accepted = _aggregate(plan, updates, previous, settings, rejected, details, strict)
    note = None
    bad = non_finite_tensors(result.state_dict) if result is not None else []
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
    return RoundOutcome(state, summary, ranks, caps, result)
