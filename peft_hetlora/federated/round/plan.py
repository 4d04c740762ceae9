"""The round protocol, written once: the records a round reads and writes and how a round is planned.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..adapter import core_rank
from ..policies import (
    DEFAULT_CLIENT_SAMPLING,
    check_client_sampling,
    choose_participants,
    poisson_sample,
    sampling_for_round,
    select_components,
)
from .settings import RoundSettings

__all__ = [
    "FEDERATION_FORMAT",
    "ClientReport",
    "CollectStatus",
    "RoundPlan",
    "plan_round",
    "round_status",
]

# The version of ``federation.json``'s layout.
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
    cores: dict[str, int] | None = None
    client_sampling: str = DEFAULT_CLIENT_SAMPLING

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
        if self.cores is not None:
            out["client_training"] = "core"
            out["cores"] = {cid: int(self.cores[cid]) for cid in self.participants if cid in self.cores}
        if self.client_sampling != DEFAULT_CLIENT_SAMPLING:  # a uniform round's round.json stays as it was
            out["client_sampling"] = self.client_sampling
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
            cores=({k: int(v) for k, v in info["cores"].items()} if isinstance(info.get("cores"), Mapping) else None),
            client_sampling=str(info.get("client_sampling") or DEFAULT_CLIENT_SAMPLING),
        )

    def components_of(self, client_id: str) -> tuple[int, ...] | None:
        """The components assigned to ``client_id`` this round (None: the prefix of its rank)."""
        return None if self.components is None else self.components.get(client_id)

    def core_of(self, client_id: str) -> int | None:
        """The core rank r_c ``client_id`` trains this round (None: it trains factors; docs/methods.md#core-clients).

        Example:
            ```py
            >>> RoundPlan(0, ["a", "b"], {"a": 2, "b": 8}, cores={"a": 7}).core_of("a")
            7
            ```
        """
        return None if self.cores is None else self.cores.get(client_id)


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
    client_training: str = "factors",
    module_dims: Any = None,
    client_sampling: str = DEFAULT_CLIENT_SAMPLING,
    rank_sampling_rounds: int | None = None,
) -> RoundPlan:
    """The plan of round ``round_idx``: a seeded sample of ``clients`` and their ranks.

    ``sampling_rate`` (DP rounds) switches to Poisson sampling at that rate, which is what the privacy accountant
    assumes; otherwise exactly ``clients_per_round`` clients are drawn by ``client_sampling``
    (`policies.choose_participants`: ``"uniform"``, `sample_clients`, the default; ``"rank"``, in proportion to each
    client's rank in ``client_ranks``, refused with ``sampling_rate``; with ``rank_sampling_rounds = N`` only rounds
    ``0 .. N-1`` are drawn by rank and later ones uniformly, `policies.sampling_for_round`; the plan's
    ``client_sampling`` is the policy that drew this round). A window
    ``component_selection`` (``"rolling"`` / ``"coverage"``, needs ``r_max``) also assigns each participant the
    global components it trains (`select_components` over the sampled clients and their ranks), recorded as
    ``RoundPlan.components``; ``"prefix"`` leaves it None (every client trains ``range(rank)``).
    ``client_training="core"`` (needs ``r_max`` and ``module_dims``, the global's ``(d_in, d_out)`` per module) gives
    every participant of rank ``k < r_max`` the core rank ``core_rank(k, r_max, module_dims)`` of the budget rule,
    recorded as ``RoundPlan.cores``.

    Example:
        ```py
        >>> plan_round(0, ["a", "b"], {"a": 2, "b": 4}, clients_per_round=2, seed=0).ranks
        {'a': 2, 'b': 4}
        ```
    """
    check_client_sampling(client_sampling, poisson=sampling_rate is not None)
    client_sampling = sampling_for_round(client_sampling, round_idx, rank_sampling_rounds)
    if sampling_rate is not None:
        participants = poisson_sample(clients, sampling_rate, seed=seed, round_idx=round_idx)
    else:
        participants = choose_participants(client_sampling, list(clients), clients_per_round, ranks=client_ranks,
                                           seed=seed, round_idx=round_idx)
    ranks = {cid: int(client_ranks[cid]) for cid in participants}
    components = None
    if component_selection != "prefix":
        if r_max is None:
            raise ValueError(f"plan_round: component_selection={component_selection!r} needs r_max=...")
        components = select_components(component_selection, ranks, r_max=r_max, round_idx=round_idx, seed=seed,
                                       anchor=anchor) if ranks else {}
    cores = None
    if client_training == "core":
        if r_max is None or not module_dims:
            raise ValueError("plan_round: client_training='core' needs r_max=... and module_dims=...")
        cores = {cid: core_rank(k, r_max, module_dims) for cid, k in ranks.items() if k < r_max}
    return RoundPlan(round_idx, participants, ranks, revision, opened_at, final, components, cores, client_sampling)
