"""``zero_pad``: zero-padding with data-size weights (the HetLoRA paper's baseline, arXiv 2401.06432)."""

from __future__ import annotations

from typing import ClassVar

from .base import AggregationMethod, PaddedSum

__all__ = ["ZeroPad"]


class ZeroPad(AggregationMethod):
    """Pad every client to ``r_max`` and average the factors with data-size weights ``n_k / N``.

    The baseline of Cho et al., arXiv 2401.06432 (HetLoRA without sparsity weighting). Component-indexed uploads
    are scattered to their indices, then zero-padded (like ``hetlora``).

    Example:
        >>> ZeroPad().weights
        'data'
    """

    name: ClassVar[str] = "zero_pad"
    weights: ClassVar[str] = "data"
    accepts_components: ClassVar[bool] = True  # scatter to the indices, then zero-pad the rest

    def accumulator(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> PaddedSum:
        return PaddedSum(a_shape, b_shape, r_max, covered_only=False)
