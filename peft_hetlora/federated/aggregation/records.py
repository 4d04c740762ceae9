"""The aggregation's records: one client's upload (`ClientUpdate`) and the result (`AggregationResult`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ...utils.errors import AggregationError, AggregationRankError, RankError
from ...utils.ranks import MAX_RANK, check_rank
from ..adapter import is_int, is_prefix, unique_indices

__all__ = ["AggregationResult", "ClientUpdate"]


@dataclass
class ClientUpdate:
    """One client's upload for a round.

    Args:
        client_id: unique id of the client within the round.
        state_dict: the client's adapter in PEFT's saved key format, at the client's rank (``A`` is ``r_k x d_in``).
        rank: the rank the client reports (``rank_out`` of its ``client.json``); no module may exceed it.
        num_examples: local examples behind the update (the data-size weight ``n_k``); ``0`` is allowed.
        metadata: free-form extras (loss, tail norms, ...); not used by the aggregation.
        components: the global component index of each uploaded slot, per client (docs/design.md#component-rule):
        uploaded row ``i``
            of every module's ``A`` (column ``i`` of ``B``) is global component ``components[i]``. Its length is the
            declared ``rank``; a module with a lower rank ``r_km`` (it self-pruned further) holds the first ``r_km``
            slots, ``components[:r_km]``. ``None`` (default) is the prefix ``range(rank)``, the HetLoRA / RBLA case,
            and a prefix given explicitly is normalised to ``None``, so prefix uploads aggregate bit for bit as
            before. Indices are checked here for type, uniqueness and length; ``< r_max`` is checked by the
            aggregator (:func:`~peft_hetlora.federated.adapter.components.check_components`).

    Example:
        >>> import torch
        >>> sd = {"m.lora_A.weight": torch.zeros(2, 8), "m.lora_B.weight": torch.zeros(4, 2)}
        >>> ClientUpdate("client-0", sd, rank=2, num_examples=100).rank
        2
        >>> ClientUpdate("client-1", sd, rank=2, num_examples=100, components=[5, 1]).components
        (5, 1)
    """

    client_id: str
    state_dict: Mapping[str, torch.Tensor]
    rank: int
    num_examples: int
    metadata: dict[str, Any] = field(default_factory=dict)
    components: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.client_id, str) or not self.client_id:
            raise AggregationError(f"ClientUpdate.client_id must be a non-empty string, got {self.client_id!r}")
        check_rank(self.rank, 1, MAX_RANK, what=f"ClientUpdate {self.client_id!r}: rank", error=AggregationRankError)
        if not is_int(self.num_examples) or self.num_examples < 0:
            raise AggregationError(
                f"ClientUpdate {self.client_id!r}: num_examples must be an int >= 0, got {self.num_examples!r}"
            )
        if not isinstance(self.state_dict, Mapping):
            raise TypeError(
                f"ClientUpdate {self.client_id!r}: state_dict must be a mapping of key -> torch.Tensor, "
                f"got {type(self.state_dict).__name__}"
            )
        if self.components is not None:
            try:
                indices = unique_indices(self.components, budget=self.rank)
            except RankError as err:
                raise AggregationError(f"ClientUpdate {self.client_id!r}: {err}") from None
            if len(indices) != self.rank:
                raise AggregationError(
                    f"ClientUpdate {self.client_id!r}: components lists {len(indices)} indices but rank is "
                    f"{self.rank}; give one index per uploaded slot (len(components) == rank)"
                )
            self.components = None if is_prefix(indices) else indices


@dataclass
class AggregationResult:
    """The new global adapter and how it was weighted.

    Attributes:
        state_dict: the global adapter, float32 on CPU, every module at ``r_max``, in the first client's key order.
        weights: ``client_id -> p_k``, the client weights actually used (they sum to 1). For ``hetlora`` /
            ``rankwise`` these are the sparsity weights of components every client covers and of the dense
            extras; with ``weighting="per_module"`` see ``module_weights`` for the LoRA factors.
        norms: ``client_id -> S_k = ||s B A||_F`` over all modules, as uploaded (before clipping).
        clip_scales: ``client_id -> c_k``, the smaller of the two factors applied to the client's differences from
            the factors it was sent (1.0 = unclipped; see the influence bound in the module docstring).
        ranks: ``client_id -> declared rank``.
        method: the aggregation method.
        weighting: ``"per_client"`` or ``"per_module"``.
        fallback: ``None`` when the method's own weights were used; ``"data_size"`` when every relevant norm was zero
            (e.g. all ``B`` still zero at round start) and data-size weights ``n_k / N`` were used instead;
            ``"uniform"`` when in addition every ``num_examples`` was 0.
        fallback_modules: modules whose weights fell back (per-module weighting and ``rankwise`` can fall back for
            some modules only; with per-client weighting every module falls back together).
        module_weights: ``module -> {client_id: p_km}`` for ``weighting="per_module"``, else ``None``.
        messages: human-readable notes about the round (fallbacks, clipping, weight caps).
        capped: ``client_id -> n_k`` actually used, for clients whose data-size weight the cap lowered.
        components: ``client_id -> component indices`` of the clients that uploaded a non-prefix index set (empty
            when every client uploaded a prefix).
        coverage: how many clients trained each global component ``0 .. r_max - 1`` (by their declared rank or
            index set; a module that self-pruned below the declared rank covers fewer).
        influence: the influence bound of the round (``mode`` ``"adaptive"`` / ``"fixed"`` / ``"off"``; for
            ``"adaptive"``: ``multiplier``, ``median_step_a`` / ``median_step_b``, the radii ``radius_a`` /
            ``radius_b``, and ``clipped``: ``client_id -> {"a": scale, "b": scale}``), None when not applied.
        factorization: per module, how a method that factorises the weighted sum computed it (``flexlora`` /
            ``flexlora_held``: ``path`` ``"exact"`` / ``"randomized"`` / ``"sketch"``, ``components`` added, and the
            sketch's ``range_size`` / ``corange_size``); empty for the other methods.
        weight_cap: the weight cap of the round (``max_weight_ratio``, ``median_num_examples``, ``limit``,
            ``capped``), None when no cap could apply (off, or fewer than two clients with examples).

    Example:
        >>> import torch
        >>> sd = {"m.lora_A.weight": torch.ones(1, 3), "m.lora_B.weight": torch.ones(2, 1)}
        >>> from peft_hetlora.federated import aggregate
        >>> res = aggregate([ClientUpdate("a", sd, 1, 10)], r_max=2)
        >>> res.weights, tuple(res.state_dict["m.lora_A.weight"].shape)
        ({'a': 1.0}, (2, 3))
    """

    state_dict: dict[str, torch.Tensor]
    weights: dict[str, float]
    norms: dict[str, float] = field(default_factory=dict)
    clip_scales: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    method: str = "hetlora"
    weighting: str = "per_client"
    fallback: str | None = None
    fallback_modules: list[str] = field(default_factory=list)
    module_weights: dict[str, dict[str, float]] | None = None
    messages: list[str] = field(default_factory=list)
    capped: dict[str, float] = field(default_factory=dict)
    components: dict[str, tuple[int, ...]] = field(default_factory=dict)
    coverage: list[int] = field(default_factory=list)
    influence: dict[str, Any] | None = None
    weight_cap: dict[str, Any] | None = None
    factorization: dict[str, dict[str, Any]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-ready Python types (for a round's ``summary.json``).

        ``components`` and ``coverage`` are included only when some client uploaded a non-prefix index set, so a
        prefix round's summary is unchanged.
        """
        out = {
            "method": self.method,
            "weighting": self.weighting,
            "weights": dict(self.weights),
            "norms": dict(self.norms),
            "clip_scales": dict(self.clip_scales),
            "ranks": dict(self.ranks),
            "fallback": self.fallback,
            "fallback_modules": list(self.fallback_modules),
            "messages": list(self.messages),
        }
        if self.influence is not None:
            out["influence_bound"] = self.influence
        if self.weight_cap is not None:
            out["weight_cap"] = self.weight_cap
        if self.factorization:
            out["factorization"] = {name: dict(info) for name, info in self.factorization.items()}
        if self.components:
            out["components"] = {cid: list(idx) for cid, idx in self.components.items()}
            out["coverage"] = list(self.coverage)
        return out
