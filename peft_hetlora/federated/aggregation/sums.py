"""The records a `StreamingAggregator` keeps: one per client and the dense extras' running sums.

Split out of [`streaming`][peft_hetlora.federated.aggregation.streaming], their one user; not exported by the
`aggregation` face.

Example:
    ```py
    >>> import torch
    >>> sums = ExtraSum({"head.weight": (2,)})
    >>> sums.add(1, 2.0, {"head.weight": torch.ones(2)})
    >>> sums.mean("head.weight").tolist()
    [1.0, 1.0]
    ```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .methods.base import NONE

__all__ = ["ClientRecord", "ExtraSum"]


@dataclass
class ClientRecord:
    """What the aggregator keeps of one accepted client: weights, norms, scales (its factors are summed, not kept).

    Example:
        >>> ClientRecord("a", 2, 10, 1.0, 1.0, 0, 1.0, {"m": 1.0}, None).components is None
        True
    """

    client_id: str
    rank: int
    num_examples: int
    norm: float
    clip_scale: float
    level: int
    weight: float
    module_sq_norms: dict[str, float]  # ||s B A||^2 per module, after clipping
    components: tuple[int, ...] | None  # None = the prefix range(rank)
    factor_scales: tuple[float, float] = (1.0, 1.0)  # the influence bound's scales of the A and B steps


class ExtraSum:
    """Weighted running sums of the dense extras, at the best weighting level seen (like a module's components).

    Example:
        >>> import torch
        >>> sums = ExtraSum({"b": (1,)})
        >>> sums.add(0, 3.0, {"b": torch.ones(1)})
        >>> sums.mean("b").tolist()
        [1.0]
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        # float64: a weighted sum of finite float32 extras cannot overflow (weights up to the cap times 1e38)
        self.sums = {key: torch.zeros(shape, dtype=torch.float64) for key, shape in shapes.items()}
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
            self.sums[key].add_(value.to(torch.float64), alpha=weight)

    def mean(self, key: str) -> torch.Tensor:
        return (self.sums[key] / self.den).to(torch.float32)

    def clone(self) -> ExtraSum:
        copy = ExtraSum({})
        copy.sums = {key: value.clone() for key, value in self.sums.items()}
        copy.level, copy.den = self.level, self.den
        return copy
