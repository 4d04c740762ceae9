"""``rankwise``: per-component sparsity averages over the clients covering each component (RBLA, arXiv 2408.08699)."""

from __future__ import annotations

from typing import ClassVar

from .base import AggregationMethod, PaddedSum

__all__ = ["RankWise"]


class RankWise(AggregationMethod):
    """Component ``j`` is the sparsity-weighted average over only the clients whose module rank exceeds ``j``.

    Components no client covers keep their ``previous`` global value (zeros without one). Prior art: RBLA,
    "Rank-Based LoRA Aggregation", arXiv 2408.08699; the prefix case of the general component rule of
    docs/design.md#component-rule. Given component-indexed uploads it applies that rule (a client covers its
    ``components``), exactly as
    ``component`` does.

    Example:
        >>> RankWise().uses_previous
        True
    """

    name: ClassVar[str] = "rankwise"
    weights: ClassVar[str] = "sparsity"
    uses_previous: ClassVar[bool] = True
    accepts_components: ClassVar[bool] = True

    def accumulator(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> PaddedSum:
        return PaddedSum(a_shape, b_shape, r_max, covered_only=True)
