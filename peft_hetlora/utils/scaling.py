"""The scale rule of HetLoRA (Cho et al., arXiv 2401.06432) and the start of the self-pruning tail.

Every client and the server use one rank-independent scale s, so truncating an adapter keeps exactly its first
components (docs/design.md#scale-rule): s = lora_alpha / r_max (``rank_scaling="fixed"``) or
lora_alpha / sqrt(r_max) (``"rslora"``, rank-stabilised LoRA, Kalajdzievski, arXiv 2312.03732).

Example:
    ```py
    >>> scaling_for(32, 16), scaling_for(32, 16, "rslora")
    (2.0, 8.0)
    ```
"""

from __future__ import annotations

import math

__all__ = ["RANK_SCALINGS", "scaling_for", "tail_start"]

#: the accepted values of ``rank_scaling``
RANK_SCALINGS = ("fixed", "rslora")


def scaling_for(lora_alpha: float, r_max: int, rank_scaling: str = "fixed") -> float:
    """Scale s of the HetLoRA update delta W = s * B A: ``lora_alpha / r_max``, or ``/ sqrt(r_max)`` for rsLoRA.

    Example:
        ```py
        >>> scaling_for(32, 16)
        2.0
        ```
    """
    if rank_scaling == "rslora":
        return lora_alpha / math.sqrt(r_max)
    return lora_alpha / r_max


def tail_start(rank: int, gamma: float) -> int:
    """First index of the regularised tail: t = min(floor(gamma * rank), rank - 1) (docs/design.md#self-pruning).

    Example:
        ```py
        >>> tail_start(16, 0.99), tail_start(1, 0.5)
        (15, 0)
        ```
    """
    return min(math.floor(gamma * rank), rank - 1)
