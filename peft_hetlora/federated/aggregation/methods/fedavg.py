"""``fedavg``: homogeneous LoRA with data-size weights (McMahan et al., arXiv 1602.05629)."""

from __future__ import annotations

from typing import ClassVar

from .base import AggregationMethod, PaddedSum

__all__ = ["FedAvg"]


class FedAvg(AggregationMethod):
    """Every client at the same rank; factors averaged with data-size weights ``n_k / N``.

    FedAvg (McMahan et al., arXiv 1602.05629) applied to LoRA factors ("HomLoRA" in arXiv 2401.06432).

    Example:
        >>> FedAvg().homogeneous
        True
    """

    name: ClassVar[str] = "fedavg"
    weights: ClassVar[str] = "data"
    homogeneous: ClassVar[bool] = True

    def accumulator(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> PaddedSum:
        return PaddedSum(a_shape, b_shape, r_max, covered_only=False)
