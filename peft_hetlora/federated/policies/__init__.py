"""Who gets which rank and which components: pure policies, no round state (the public face of the policies).

`rank_policy` (initial ranks: uniform, explicit, constant, budget, tiers; client sampling: uniform or by rank),
`component_selection`
(which global components each sampled client trains: prefix, rolling, coverage) and `device_memory` (a device's
memory budget -> the largest rank that fits). The settings record and the round import them from here.

Example:
    ```py
    >>> from peft_hetlora.federated.policies import RankPolicy, sample_clients
    >>> ranks = RankPolicy("uniform").assign(["a", "b", "c"], r_min=2, r_max=16, seed=0)
    >>> all(2 <= r <= 16 for r in ranks.values())
    True
    >>> len(sample_clients(["a", "b", "c"], 2, seed=0, round_idx=0))
    2
    >>> len(choose_participants("rank", ["a", "b", "c"], 2, ranks={"a": 2, "b": 6, "c": 16}, seed=0, round_idx=0))
    2
    ```
"""

from .component_selection import SELECTION_POLICIES, select_components
from .device_memory import DeviceMemoryError, DeviceMemoryTable, MemoryPoint, default_table
from .rank_policy import (
    ADAM_STATE_COPIES,
    BUDGET_KINDS,
    CLIENT_SAMPLING,
    DEFAULT_CLIENT_SAMPLING,
    DEFAULT_TIERS,
    RANK_POLICIES,
    ModuleDims,
    RankPolicy,
    adapter_params,
    budget_cost,
    budget_ranks,
    cap_ranks,
    check_client_sampling,
    check_rank_sampling_rounds,
    choose_participants,
    default_tier_ranks,
    explicit_ranks,
    parse_bytes,
    poisson_sample,
    rank_for_budget,
    rank_sample_clients,
    sample_clients,
    sampling_for_round,
    tier_ranks,
    training_memory_bytes,
    uniform_ranks,
)

__all__ = [
    "ADAM_STATE_COPIES",
    "BUDGET_KINDS",
    "CLIENT_SAMPLING",
    "DEFAULT_CLIENT_SAMPLING",
    "DEFAULT_TIERS",
    "RANK_POLICIES",
    "SELECTION_POLICIES",
    "DeviceMemoryError",
    "DeviceMemoryTable",
    "MemoryPoint",
    "ModuleDims",
    "RankPolicy",
    "adapter_params",
    "budget_cost",
    "budget_ranks",
    "cap_ranks",
    "check_client_sampling",
    "check_rank_sampling_rounds",
    "choose_participants",
    "default_table",
    "default_tier_ranks",
    "explicit_ranks",
    "parse_bytes",
    "poisson_sample",
    "rank_for_budget",
    "rank_sample_clients",
    "sample_clients",
    "sampling_for_round",
    "select_components",
    "tier_ranks",
    "training_memory_bytes",
    "uniform_ranks",
]
