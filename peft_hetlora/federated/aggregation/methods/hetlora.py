"""``hetlora``: zero-padding with sparsity weights (Cho et al., arXiv 2401.06432, docs/design.md#aggregation)."""

from __future__ import annotations

from typing import ClassVar

from .base import AggregationMethod, PaddedSum

__all__ = ["HetLoRA"]


class HetLoRA(AggregationMethod):
    """Pad every client to ``r_max``; ``A = sum_k p_k pad(A_k)``, ``B = sum_k p_k pad(B_k)``, ``p_k ~ S_k``.

    ``S_k = ||s B_k A_k||_F`` over all modules (per module with ``weighting="per_module"``). From HetLoRA,
    Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", arXiv 2401.06432.
    A component-indexed upload (``ClientUpdate.components``) is scattered to its indices and zero-padded elsewhere,
    so it pulls every component it did not train towards zero, exactly as padding does for a prefix.

    Example:
        >>> HetLoRA().weights
        'sparsity'
    """

    name: ClassVar[str] = "hetlora"
    weights: ClassVar[str] = "sparsity"
    accepts_components: ClassVar[bool] = True  # scatter to the indices, then zero-pad the rest

    def accumulator(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> PaddedSum:
        return PaddedSum(a_shape, b_shape, r_max, covered_only=False)
