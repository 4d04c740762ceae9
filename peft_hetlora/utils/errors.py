"""One exception hierarchy for the whole project: catch :class:`HetLoRAError` to catch them all.

Every error says what went wrong and what to do. Classes also derive from the builtin a caller would
naturally catch (``ValueError`` for bad input, ``OSError`` for storage), so existing ``except`` clauses keep
working.

Example:
    ```py
    >>> from peft_hetlora.utils.errors import HetLoRAError, RankError
    >>> try:
    ...     raise RankError("rank 20 is above r_max=16: pick a rank in [1, 16]")
    ... except HetLoRAError as err:
    ...     print(err)
    rank 20 is above r_max=16: pick a rank in [1, 16]
    ```
"""

from __future__ import annotations

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
    "UnsupportedQuantizationError",
]


class HetLoRAError(Exception):
    """Base class of every error raised on purpose by peft-hetlora."""


class RankError(HetLoRAError, ValueError):
    """A rank (or component index set) outside what the federation allows."""


class ConfigMismatchError(HetLoRAError, ValueError):
    """A client's adapter settings differ from the federation's in something that changes the math."""


class StoreError(HetLoRAError, OSError):
    """A store (local folder or Hub repo) could not be read or written."""


class StoreFullError(StoreError):
    """The store's disk (or quota) is full: free space and rerun; nothing was half-written."""


class CoordinatorError(HetLoRAError, RuntimeError):
    """The coordinator cannot go on (a broken store, an impossible round)."""


class FederationMismatch(CoordinatorError):
    """The store holds a federation created with other settings than the ones given."""


class AggregationError(HetLoRAError, ValueError):
    """Client updates that cannot be aggregated together, an adapter state dict in the wrong key format, or a bad
    aggregation setting (unknown method, bad ``r_max`` / ``clip_norm`` / weight cap)."""


class AggregationRankError(AggregationError, RankError):
    """A rank or r_max the aggregation cannot use: both an `AggregationError` and a `RankError`."""


class UnsupportedQuantizationError(HetLoRAError, ValueError):
    """A quantised base (layer or mode) HetLoRA has no layer for; the message names the supported ones."""
