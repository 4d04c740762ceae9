"""Initial client ranks (uniform, explicit, constant, device budget, tiers) and per-round client sampling
(uniform, or in proportion to each client's rank: `CLIENT_SAMPLING`, `choose_participants`).

A HetLoRA federation gives every client a rank r_k in [r_min, r_max] (docs/design.md#rank-assignment). The policies
here
decide the *initial* ranks; after that, a client's rank follows what it reports after self-pruning.

Example:
    ```py
    >>> policy = RankPolicy("uniform")
    >>> ranks = policy.assign(["a", "b", "c"], r_min=2, r_max=16, seed=0)
    >>> all(2 <= r <= 16 for r in ranks.values())
    True
    >>> sample_clients(["a", "b", "c"], 2, seed=0, round_idx=0)  # doctest: +SKIP
    ['a', 'c']
    ```
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ...utils.ranks import check_rank
from ..adapter import is_int

__all__ = [
    "ADAM_STATE_COPIES",
    "BUDGET_KINDS",
    "CLIENT_SAMPLING",
    "DEFAULT_CLIENT_SAMPLING",
    "DEFAULT_TIERS",
    "ModuleDims",
    "RANK_POLICIES",
    "RankPolicy",
    "adapter_params",
    "budget_cost",
    "budget_ranks",
    "cap_ranks",
    "check_client_sampling",
    "check_rank_sampling_rounds",
    "choose_participants",
    "default_tier_ranks",
    "explicit_ranks",
    "parse_bytes",
    "poisson_sample",
    "rank_for_budget",
    "rank_sample_clients",
    "sample_clients",
    "sampling_for_round",
    "tier_ranks",
    "training_memory_bytes",
    "uniform_ranks",
]

RANK_POLICIES = ("uniform", "explicit", "constant", "budget", "tiers")
BUDGET_KINDS = ("memory", "params")
DEFAULT_TIERS = {"small": 0.5, "medium": 0.3, "large": 0.2}
#: How a round's ``clients_per_round`` participants are drawn (`choose_participants`): ``"uniform"`` (every client
#: equally likely, `sample_clients`) or ``"rank"`` (in proportion to the client's current rank, `rank_sample_clients`:
#: capability-aware selection, docs/methods.md#client-sampling).
CLIENT_SAMPLING = ("uniform", "rank")
#: The client sampling of a federation that names none (and of a federation.json written before it was recorded).
DEFAULT_CLIENT_SAMPLING = "uniform"

# Adam keeps, per trainable parameter: the weight, its gradient and two moment estimates.
ADAM_STATE_COPIES = 1 + 1 + 2

ModuleDims = Mapping[str, tuple[int, int]]  # module name -> (d_in, d_out)


def _check_rank_bounds(r_min: int, r_max: int) -> None:
    check_rank(r_max, 1, 1 << 30, what="r_max")
    check_rank(r_min, 1, r_max, what="r_min", hi_name="r_max")


def _check_rank(client_id: str, rank: object, r_min: int, r_max: int) -> int:
    return check_rank(rank, r_min, r_max, what=f"Client {client_id!r}: rank", lo_name="r_min", hi_name="r_max",
                      hint="choose a rank in that range or change the federation's r_min / r_max.")


def adapter_params(rank: int, module_dims: ModuleDims) -> int:
    """Number of trainable LoRA parameters at `rank`: params(r) = r * sum_m (d_in + d_out).

    Example:
        ```py
        >>> adapter_params(4, {"q": (64, 64), "v": (64, 32)})
        896
        ```
    """
    return int(rank) * sum(int(d_in) + int(d_out) for d_in, d_out in module_dims.values())


def training_memory_bytes(rank: int, module_dims: ModuleDims, *, bytes_per_param: int = 4) -> int:
    """Training memory of the adapter at `rank` with Adam: params * bytes * (weight + grad + 2 moments).

    Activations and the frozen base model are not counted: the budget is what the rank changes.

    Example:
        ```py
        >>> training_memory_bytes(4, {"q": (64, 64), "v": (64, 32)})
        14336
        ```
    """
    return adapter_params(rank, module_dims) * bytes_per_param * ADAM_STATE_COPIES


def budget_cost(rank: int, module_dims: ModuleDims, *, kind: str = "memory", bytes_per_param: int = 4) -> int:
    """Bytes a client needs at `rank`: `kind="memory"` (Adam training state) or `"params"` (the weights).

    Example:
        ```py
        >>> budget_cost(4, {"q": (64, 64)}, kind="params")
        2048
        ```
    """
    if kind == "memory":
        return training_memory_bytes(rank, module_dims, bytes_per_param=bytes_per_param)
    if kind == "params":
        return adapter_params(rank, module_dims) * bytes_per_param
    raise ValueError(f"Unknown budget kind {kind!r}; use one of {BUDGET_KINDS}.")


def rank_for_budget(
    budget_bytes: int,
    module_dims: ModuleDims,
    *,
    r_min: int,
    r_max: int,
    kind: str = "memory",
    bytes_per_param: int = 4,
    client_id: str = "?",
) -> int:
    """Largest rank in [r_min, r_max] whose cost (see `budget_cost`) fits in `budget_bytes`.

    Raises `ValueError` naming the client and the minimum budget when even r_min does not fit.

    Example:
        ```py
        >>> dims = {"q": (64, 64)}  # 128 params per rank -> 2048 bytes of Adam state per rank
        >>> rank_for_budget(10_000, dims, r_min=1, r_max=16)
        4
        >>> rank_for_budget(10**9, dims, r_min=1, r_max=16)
        16
        ```
    """
    _check_rank_bounds(r_min, r_max)
    if not module_dims:
        raise ValueError("Cannot size ranks from a budget without the adapter's module shapes (module_dims is empty).")
    per_rank = budget_cost(1, module_dims, kind=kind, bytes_per_param=bytes_per_param)
    rank = min(r_max, int(budget_bytes) // per_rank)
    if rank < r_min:
        needed = budget_cost(r_min, module_dims, kind=kind, bytes_per_param=bytes_per_param)
        raise ValueError(
            f"Client {client_id!r}: a budget of {int(budget_bytes):,} bytes ({kind}) fits no rank >= r_min={r_min}; "
            f"it needs at least {needed:,} bytes. Raise its budget, lower r_min, or leave the client out."
        )
    return rank


def _stable_int(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def uniform_ranks(client_ids: Sequence[str], *, r_min: int, r_max: int, seed: int = 0) -> dict[str, int]:
    """Ranks drawn uniformly from the integers in [r_min, r_max], seeded per client.

    A client's rank depends only on (seed, client_id), so adding clients leaves the others' ranks alone.

    Example:
        ```py
        >>> uniform_ranks(["a", "b"], r_min=4, r_max=4)
        {'a': 4, 'b': 4}
        ```
    """
    _check_rank_bounds(r_min, r_max)
    return {
        cid: int(np.random.default_rng(_stable_int(seed, cid)).integers(r_min, r_max + 1)) for cid in client_ids
    }


def explicit_ranks(
    ranks: Mapping[str, int], client_ids: Sequence[str], *, r_min: int, r_max: int
) -> dict[str, int]:
    """Check an explicit {client_id: rank} map covers exactly `client_ids` with ranks in [r_min, r_max].

    Example:
        ```py
        >>> explicit_ranks({"a": 2, "b": 8}, ["a", "b"], r_min=2, r_max=8)
        {'a': 2, 'b': 8}
        ```
    """
    _check_rank_bounds(r_min, r_max)
    missing = [cid for cid in client_ids if cid not in ranks]
    if missing:
        raise ValueError(f"Explicit rank policy has no rank for client(s) {missing}; add them to the rank map.")
    unknown = sorted(set(ranks) - set(client_ids))
    if unknown:
        raise ValueError(
            f"Explicit rank policy names unknown client(s) {unknown}; remove them or add them as clients."
        )
    return {cid: _check_rank(cid, ranks[cid], r_min, r_max) for cid in client_ids}


def budget_ranks(
    budgets: Mapping[str, int],
    client_ids: Sequence[str],
    module_dims: ModuleDims,
    *,
    r_min: int,
    r_max: int,
    kind: str = "memory",
    bytes_per_param: int = 4,
) -> dict[str, int]:
    """Largest rank that fits each client's device budget (bytes; see `rank_for_budget`).

    Example:
        ```py
        >>> budget_ranks({"phone": 10_000, "laptop": 10**9}, ["phone", "laptop"], {"q": (64, 64)}, r_min=1, r_max=16)
        {'phone': 4, 'laptop': 16}
        ```
    """
    missing = [cid for cid in client_ids if cid not in budgets]
    if missing:
        raise ValueError(f"Budget rank policy has no budget for client(s) {missing}; give every client a budget.")
    return {
        cid: rank_for_budget(
            budgets[cid], module_dims, r_min=r_min, r_max=r_max, kind=kind, bytes_per_param=bytes_per_param,
            client_id=cid,
        )
        for cid in client_ids
    }


def default_tier_ranks(tiers: Sequence[str], *, r_min: int, r_max: int) -> dict[str, int]:
    """Ranks spread geometrically from r_min (first tier) to r_max (last tier).

    Example:
        ```py
        >>> default_tier_ranks(["small", "medium", "large"], r_min=2, r_max=16)
        {'small': 2, 'medium': 6, 'large': 16}
        ```
    """
    _check_rank_bounds(r_min, r_max)
    n = len(tiers)
    if n == 1:
        return {tiers[0]: r_max}
    return {
        name: round(r_min * (r_max / r_min) ** (i / (n - 1))) for i, name in enumerate(tiers)
    }


def tier_ranks(
    client_ids: Sequence[str],
    *,
    r_min: int,
    r_max: int,
    fractions: Mapping[str, float] | None = None,
    ranks: Mapping[str, int] | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Split clients into device tiers by `fractions` (e.g. small/medium/large) and give each tier its rank.

    Tier sizes use largest-remainder rounding of fraction * number of clients; clients are shuffled
    (seeded) before being dealt into tiers. `ranks` defaults to `default_tier_ranks`.

    Example:
        ```py
        >>> ranks = {"small": 2, "medium": 8, "large": 16}
        >>> r = tier_ranks([f"c{i}" for i in range(10)], r_min=2, r_max=16, ranks=ranks)
        >>> sorted(r.values())
        [2, 2, 2, 2, 2, 8, 8, 8, 16, 16]
        ```
    """
    fractions = dict(DEFAULT_TIERS if fractions is None else fractions)
    if not fractions or any(
        isinstance(f, bool) or not isinstance(f, (int, float)) or f < 0 or not math.isfinite(f)
        for f in fractions.values()
    ):
        raise ValueError(f"Tier fractions must be non-negative numbers, got {fractions}.")
    total = float(sum(fractions.values()))
    if total <= 0:
        raise ValueError(f"Tier fractions must not all be zero, got {fractions}.")
    names = list(fractions)
    tier_rank = dict(ranks) if ranks is not None else default_tier_ranks(names, r_min=r_min, r_max=r_max)
    missing = [name for name in names if name not in tier_rank]
    if missing:
        raise ValueError(f"No rank given for tier(s) {missing}; pass ranks for every tier in fractions.")
    for name in names:
        _check_rank(f"tier {name}", tier_rank[name], r_min, r_max)
    n = len(client_ids)
    quotas = [fractions[name] / total * n for name in names]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(names)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    order = sorted(client_ids)
    np.random.default_rng(_stable_int(seed, "tiers")).shuffle(order)
    assignment: dict[str, int] = {}
    start = 0
    for name, count in zip(names, counts):
        for cid in order[start : start + count]:
            assignment[cid] = int(tier_rank[name])
        start += count
    return {cid: assignment[cid] for cid in client_ids}


@dataclass(frozen=True)
class RankPolicy:
    """How the federation picks each client's initial rank.

    kinds: `"uniform"` (seeded uniform integers in [r_min, r_max]), `"explicit"` (`ranks`
    {client_id: rank}), `"constant"` (every client at `rank`, default r_max: homogeneous baselines),
    `"budget"` (`budgets` {client_id: bytes} of `budget_kind` "memory" (Adam state) or "params"),
    `"tiers"` (`tiers` {name: fraction}, optional `tier_ranks` {name: rank}).

    Measured memory: with `budget_kind="memory"` and `memory_model` (e.g. "smollm2-135m"), a client's budget is the
    peak memory of its whole local round (base weights, activations, optimizer state), and its rank is the largest
    whose measured peak fits: `device_memory.DeviceMemoryTable.rank_for_budget` on the shipped
    `device_memory.default_table()` or on `memory_table` (a ``benchmarks/bench_memory.py --out`` JSON file),
    for the base's `quantize` mode ("float32", "8bit", "4bit"). This is HetLoRA's rank-from-device-capability
    assignment (Cho et al., arXiv 2401.06432).

    Example:
        ```py
        >>> RankPolicy("explicit", ranks={"a": 2, "b": 8}).assign(["a", "b"], r_min=2, r_max=8)
        {'a': 2, 'b': 8}
        >>> RankPolicy("constant", rank=4).assign(["a", "b"], r_min=1, r_max=8)
        {'a': 4, 'b': 4}
        >>> RankPolicy("budget", budgets={"a": 2 * 2**30}, memory_model="smollm2-135m",
        ...            quantize="4bit").assign(["a"], r_min=2, r_max=16)
        {'a': 16}
        ```
    """

    kind: str = "uniform"
    ranks: Mapping[str, int] | None = None
    rank: int | None = None
    budgets: Mapping[str, int] | None = None
    budget_kind: str = "memory"
    bytes_per_param: int = 4
    tiers: Mapping[str, float] | None = None
    tier_ranks: Mapping[str, int] | None = None
    memory_model: str | None = None
    quantize: str = "float32"
    memory_table: str | None = None

    def __post_init__(self) -> None:
        if (self.memory_model is not None or self.memory_table is not None) and self.budget_kind != "memory":
            raise ValueError("memory_model / memory_table size ranks from measured peak memory: use them with "
                             "budget_kind='memory'.")
        if self.memory_table is not None and self.memory_model is None:
            raise ValueError("memory_table needs memory_model=... (the model name inside the table).")
        if self.kind not in RANK_POLICIES:
            raise ValueError(f"Unknown rank policy {self.kind!r}; use one of {RANK_POLICIES}.")
        if self.kind == "explicit" and not self.ranks:
            raise ValueError("The explicit rank policy needs `ranks={client_id: rank}`.")
        if self.kind == "budget" and not self.budgets:
            raise ValueError("The budget rank policy needs `budgets={client_id: bytes}`.")
        if self.budget_kind not in BUDGET_KINDS:
            raise ValueError(f"Unknown budget kind {self.budget_kind!r}; use one of {BUDGET_KINDS}.")

    @classmethod
    def coerce(cls, value: RankPolicy | str | Mapping[str, int] | None) -> RankPolicy:
        """Accept a `RankPolicy`, a kind name, or a {client_id: rank} map (explicit).

        Example:
            ```py
            >>> RankPolicy.coerce({"a": 4}).kind
            'explicit'
            ```
        """
        if value is None:
            return cls()
        if isinstance(value, RankPolicy):
            return value
        if isinstance(value, str):
            return cls(kind=value)
        if isinstance(value, Mapping):
            return cls(kind="explicit", ranks=dict(value))
        raise TypeError(
            f"rank_policy must be a RankPolicy, a policy name or a {{client_id: rank}} map, got {value!r}."
        )

    def assign(
        self,
        client_ids: Sequence[str],
        *,
        r_min: int,
        r_max: int,
        module_dims: ModuleDims | None = None,
        seed: int = 0,
    ) -> dict[str, int]:
        """Initial {client_id: rank} for `client_ids` (module_dims is needed by the budget policy)."""
        _check_rank_bounds(r_min, r_max)
        if self.kind == "uniform":
            return uniform_ranks(client_ids, r_min=r_min, r_max=r_max, seed=seed)
        if self.kind == "explicit":
            return explicit_ranks(self.ranks or {}, client_ids, r_min=r_min, r_max=r_max)
        if self.kind == "constant":
            rank = r_max if self.rank is None else self.rank
            return {cid: _check_rank(cid, rank, r_min, r_max) for cid in client_ids}
        if self.kind == "budget" and self.memory_model is not None:
            return self._measured_ranks(client_ids, r_min=r_min, r_max=r_max)
        if self.kind == "budget":
            return budget_ranks(
                self.budgets or {}, client_ids, module_dims or {}, r_min=r_min, r_max=r_max,
                kind=self.budget_kind, bytes_per_param=self.bytes_per_param,
            )
        return tier_ranks(client_ids, r_min=r_min, r_max=r_max, fractions=self.tiers, ranks=self.tier_ranks, seed=seed)

    def _measured_ranks(self, client_ids: Sequence[str], *, r_min: int, r_max: int) -> dict[str, int]:
        from .device_memory import DeviceMemoryTable, default_table

        table = DeviceMemoryTable.from_json(self.memory_table) if self.memory_table is not None else default_table()
        budgets = self.budgets or {}
        missing = [cid for cid in client_ids if cid not in budgets]
        if missing:
            raise ValueError(f"Budget rank policy has no budget for client(s) {missing}; give every client a budget.")
        return {
            cid: table.rank_for_budget(int(budgets[cid]), model=self.memory_model, quantize=self.quantize,
                                       r_min=r_min, r_max=r_max, client_id=cid)
            for cid in client_ids
        }

    def to_dict(self) -> dict:
        """JSON-friendly description (recorded in federation.json)."""
        out: dict = {"kind": self.kind}
        for name in ("ranks", "rank", "budgets", "tiers", "tier_ranks"):
            value = getattr(self, name)
            if value is not None:
                out[name] = dict(value) if isinstance(value, Mapping) else value
        if self.kind == "budget":
            out["budget_kind"] = self.budget_kind
            out["bytes_per_param"] = self.bytes_per_param
            if self.memory_model is not None:
                out["memory_model"] = self.memory_model
                out["quantize"] = self.quantize
            if self.memory_table is not None:
                out["memory_table"] = self.memory_table
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> RankPolicy:
        """Inverse of `to_dict`."""
        known = {"kind", "ranks", "rank", "budgets", "budget_kind", "bytes_per_param", "tiers", "tier_ranks",
                 "memory_model", "quantize", "memory_table"}
        return cls(**{k: v for k, v in data.items() if k in known})


def cap_ranks(ranks: Mapping[str, int], max_ranks: Mapping[str, int], *, r_min: int) -> dict[str, int]:
    """Ranks no client can exceed: each rank lowered to the client's reported `max_rank` (never below r_min).

    Whatever policy gave the initial ranks, a client that reported the largest rank its device can train
    (`max_rank` in client.json) is never assigned more. Validation refuses a `max_rank` below r_min.

    Example:
        ```py
        >>> cap_ranks({"phone": 8, "laptop": 16}, {"phone": 4}, r_min=2)
        {'phone': 4, 'laptop': 16}
        ```
    """
    return {cid: max(r_min, min(int(rank), int(max_ranks[cid]))) if cid in max_ranks else int(rank)
            for cid, rank in ranks.items()}


def _sample_pool(client_ids: Sequence[str], clients_per_round: int) -> list[str]:
    """The sorted pool of a per-round draw, after the checks every draw shares."""
    pool = sorted(set(client_ids))
    if len(pool) != len(client_ids):
        raise ValueError("Client ids must be unique.")
    if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, int) or clients_per_round < 1:
        raise ValueError(f"clients_per_round must be a positive integer, got {clients_per_round!r}.")
    if clients_per_round > len(pool):
        raise ValueError(
            f"clients_per_round={clients_per_round} exceeds the {len(pool)} clients of the federation; lower it."
        )
    return pool


def sample_clients(client_ids: Sequence[str], clients_per_round: int, *, seed: int, round_idx: int) -> list[str]:
    """Seeded sample of `clients_per_round` distinct clients for round `round_idx` (sorted).

    The draw depends only on (seed, round_idx, the set of client ids), so a resumed coordinator picks
    the same participants.

    Example:
        ```py
        >>> sample_clients(["a", "b", "c"], 3, seed=0, round_idx=5)
        ['a', 'b', 'c']
        ```
    """
    pool = _sample_pool(client_ids, clients_per_round)
    rng = np.random.default_rng([_stable_int(seed, "sample"), int(round_idx)])
    chosen = rng.choice(len(pool), size=clients_per_round, replace=False)
    return sorted(pool[i] for i in chosen)


def _sampling_ranks(pool: Sequence[str], ranks: Mapping[str, int] | None) -> np.ndarray:
    if not isinstance(ranks, Mapping):
        raise ValueError("client_sampling='rank' needs every client's current rank ({client_id: rank}), got "
                         f"{type(ranks).__name__}.")
    missing = [cid for cid in pool if cid not in ranks]
    if missing:
        raise ValueError(f"client_sampling='rank' has no rank for client(s) {missing[:5]}; give every client of the "
                         "pool its current rank.")
    bad = {cid: ranks[cid] for cid in pool if not is_int(ranks[cid]) or ranks[cid] < 1}
    if bad:
        raise ValueError(f"client_sampling='rank' draws in proportion to ranks, which must be positive integers; got "
                         f"{dict(list(bad.items())[:5])}.")
    return np.array([int(ranks[cid]) for cid in pool], dtype=np.float64)


def rank_sample_clients(client_ids: Sequence[str], ranks: Mapping[str, int], clients_per_round: int, *, seed: int,
                        round_idx: int) -> list[str]:
    """Seeded sample of `clients_per_round` distinct clients, each draw in proportion to rank (sorted).

    Successive sampling without replacement: the first participant is client ``k`` with probability
    ``r_k / sum_j r_j``, each next one in proportion to rank among the clients not yet drawn. Capability-aware
    participant selection (FedCS, Nishio & Yonetani, arXiv 1804.08333; Oort, Lai et al., OSDI 2021): a round holds
    more of the clients that can train the high components. Updates are *not* reweighted by ``1 / pi_k``
    (Chen, Horvath & Richtarik, arXiv 2010.13723, for that view): the federation's objective leans toward the
    capable clients' data (docs/methods.md#client-sampling). Like `sample_clients`, the draw depends only on
    (seed, round_idx, the set of client ids) and the ranks, so a resumed coordinator picks the same participants.

    Raises:
        ValueError: duplicate ids, ``clients_per_round`` not in ``[1, len(client_ids)]``, or a client without a
            positive integer rank in ``ranks``.

    Example:
        ```py
        >>> rank_sample_clients(["a", "b", "c"], {"a": 2, "b": 16, "c": 6}, 3, seed=0, round_idx=1)
        ['a', 'b', 'c']
        >>> len(rank_sample_clients(["a", "b", "c"], {"a": 2, "b": 16, "c": 6}, 2, seed=0, round_idx=1))
        2
        ```
    """
    pool = _sample_pool(client_ids, clients_per_round)
    weights = _sampling_ranks(pool, ranks)
    rng = np.random.default_rng([_stable_int(seed, "sample-rank"), int(round_idx)])
    # numpy's weighted draw without replacement: a draw that repeats a chosen client is redrawn, which is
    # successive sampling in distribution
    chosen = rng.choice(len(pool), size=clients_per_round, replace=False, p=weights / weights.sum())
    return sorted(pool[int(i)] for i in chosen)


def check_client_sampling(client_sampling: object, *, poisson: bool = False) -> str:
    """``client_sampling`` if it names a policy of `CLIENT_SAMPLING` the round can run, else a ValueError that says
    what to do. ``poisson``: the round Poisson-samples for a DP accountant (``dp.sampling_rate``), which assumes
    every client is equally likely: only ``"uniform"`` goes with it.

    Example:
        ```py
        >>> check_client_sampling("rank")
        'rank'
        ```
    """
    if not isinstance(client_sampling, str) or client_sampling not in CLIENT_SAMPLING:
        raise ValueError(f"client_sampling must be one of {CLIENT_SAMPLING}, got {client_sampling!r}.")
    if poisson and client_sampling != "uniform":
        raise ValueError(f"client_sampling={client_sampling!r} with dp=...: the privacy accountant assumes uniform "
                         "Poisson sampling of clients at dp.sampling_rate; use client_sampling='uniform' (the "
                         "default) for a DP federation, or drop dp.")
    return client_sampling


def check_rank_sampling_rounds(rank_sampling_rounds: object, client_sampling: str | None) -> int | None:
    """``rank_sampling_rounds`` if it is None or a positive integer given with ``client_sampling="rank"``, else a
    ValueError that says what to do.

    Example:
        ```py
        >>> check_rank_sampling_rounds(5, "rank")
        5
        >>> check_rank_sampling_rounds(None, "uniform") is None
        True
        ```
    """
    if rank_sampling_rounds is None:
        return None
    if not is_int(rank_sampling_rounds) or rank_sampling_rounds < 1:
        raise ValueError("rank_sampling_rounds must be a positive integer (the rounds drawn by rank before the draw "
                         f"turns uniform) or None (every round by rank), got {rank_sampling_rounds!r}.")
    if client_sampling != "rank":
        raise ValueError(f"rank_sampling_rounds={rank_sampling_rounds} schedules client_sampling='rank', but "
                         f"client_sampling is {client_sampling!r}; set client_sampling='rank' or drop "
                         "rank_sampling_rounds.")
    return int(rank_sampling_rounds)


def sampling_for_round(client_sampling: str, round_idx: int, rank_sampling_rounds: int | None = None) -> str:
    """The policy that draws round ``round_idx`` (0-based): ``client_sampling``, except that a ``"rank"`` federation
    with ``rank_sampling_rounds = N`` draws its first ``N`` rounds (``0 .. N-1``) by rank and every later round
    uniformly (docs/methods.md#client-sampling: rank sampling buys the early rounds, uniform sampling the late ones).

    Example:
        ```py
        >>> [sampling_for_round("rank", t, 2) for t in range(4)]
        ['rank', 'rank', 'uniform', 'uniform']
        >>> sampling_for_round("rank", 7)
        'rank'
        ```
    """
    check_client_sampling(client_sampling)
    if check_rank_sampling_rounds(rank_sampling_rounds, client_sampling) is not None and \
            int(round_idx) >= rank_sampling_rounds:
        return "uniform"
    return client_sampling


def choose_participants(client_sampling: str, client_ids: Sequence[str], clients_per_round: int, *,
                        ranks: Mapping[str, int] | None = None, seed: int, round_idx: int) -> list[str]:
    """The participants of round ``round_idx`` under ``client_sampling`` (`CLIENT_SAMPLING`), sorted:
    ``"uniform"`` is `sample_clients` exactly (the same participants as before the policy existed), ``"rank"`` is
    `rank_sample_clients` over ``ranks`` (the round's client ranks).

    Example:
        ```py
        >>> ids = ["a", "b", "c", "d"]
        >>> choose_participants("uniform", ids, 2, seed=3, round_idx=4) == sample_clients(ids, 2, seed=3, round_idx=4)
        True
        >>> len(choose_participants("rank", ids, 2, ranks={"a": 2, "b": 2, "c": 6, "d": 16}, seed=3, round_idx=4))
        2
        ```
    """
    if check_client_sampling(client_sampling) == "rank":
        return rank_sample_clients(client_ids, ranks, clients_per_round, seed=seed, round_idx=round_idx)
    return sample_clients(client_ids, clients_per_round, seed=seed, round_idx=round_idx)


def poisson_sample(client_ids: Sequence[str], rate: float, *, seed: int, round_idx: int) -> list[str]:
    """Each client independently with probability ``rate`` (Poisson sampling, as DP accountants assume); sorted.

    Seeded by (seed, round) so a resumed server draws the same participants.

    Example:
        ```py
        >>> poisson_sample(["a", "b"], 1.0, seed=0, round_idx=3)
        ['a', 'b']
        ```
    """
    pool = sorted(set(client_ids))
    rng = np.random.default_rng([_stable_int(seed, "poisson"), int(round_idx)])
    draws = rng.random(len(pool))
    return [cid for cid, u in zip(pool, draws) if u < rate]


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """Parse a byte size such as `"512MB"`, `"2GiB"` or `"1000"`.

    Example:
        ```py
        >>> parse_bytes("1.5KiB"), parse_bytes("2MB"), parse_bytes(7)
        (1536, 2000000, 7)
        ```
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"Cannot read a byte size from {text!r}; write e.g. 512MB, 2GiB or 1000000.")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
