"""The records a `StreamingAggregator` keeps: one per client, the dense extras' running sums, retained clients.

Split out of [`aggregation`][peft_hetlora.federated.aggregation], which uses them; nothing here is public.

Example:
    ```py
    >>> import torch
    >>> sums = _ExtraSum({"head.weight": (2,)})
    >>> sums.add(1, 2.0, {"head.weight": torch.ones(2)})
    >>> sums.mean("head.weight").tolist()
    [1.0, 1.0]
    ```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .methods.base import NONE


@dataclass
class _ClientRecord:
    client_id: str
    rank: int
    num_examples: int
    norm: float
    clip_scale: float
    level: int
    weight: float
    module_sq_norms: dict[str, float]  # ||s B A||^2 per module, after clipping
    components: tuple[int, ...] | None  # None = the prefix range(rank)


class _ExtraSum:
    """Weighted running sums of the dense extras, at the best weighting level seen (like a module's components)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.sums = {key: torch.zeros(shape, dtype=torch.float32) for key, shape in shapes.items()}
        self.level = NONE
        self.den = 0.0

    def add(self, level: int, weight: float, tensors: Mapping[str, torch.Tensor]) -> None:
        if level < self.level:
            return
        if level > self.level:
            for tensor in self.sums.values():
                tensor.zero_()
            self.level, self.den = level, 0.0
        self.den += weight
        for key, value in tensors.items():
            self.sums[key].add_(value, alpha=weight)

    def mean(self, key: str) -> torch.Tensor:
        return self.sums[key] * (1.0 / self.den)

    def clone(self) -> _ExtraSum:
        copy = _ExtraSum({})
        copy.sums = {key: value.clone() for key, value in self.sums.items()}
        copy.level, copy.den = self.level, self.den
        return copy


@dataclass(order=True)
class _Retained:
    """A data-weighted client's (clipped) factors and extras, kept so the weight cap can lower its weight."""

    weight: float
    client_id: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(compare=False)
    extras: dict[str, torch.Tensor] = field(compare=False)
    components: tuple[int, ...] | None = field(default=None, compare=False)
