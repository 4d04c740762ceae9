"""Re-export of `peft_hetlora.utils.errors` (the one exception hierarchy), kept so existing imports work.

New code imports from `peft_hetlora.utils.errors`; this module goes when the federated core is regrouped.

Example:
    ```py
    >>> from peft_hetlora.federated.errors import RankError
    >>> from peft_hetlora.utils.errors import RankError as LeafRankError
    >>> RankError is LeafRankError
    True
    ```
"""

from __future__ import annotations

from ..utils.errors import (
    AggregationError,
    AggregationRankError,
    ConfigMismatchError,
    CoordinatorError,
    FederationMismatch,
    HetLoRAError,
    RankError,
    StoreError,
    StoreFullError,
)

__all__ = [
    "AggregationError",
    "AggregationRankError",
    "ConfigMismatchError",
    "CoordinatorError",
    "FederationMismatch",
    "HetLoRAError",
    "RankError",
    "StoreError",
    "StoreFullError",
]
