"""The leaf every part of peft-hetlora stands on: errors, rank checks, file names, the scale rule.

Nothing here imports torch, PEFT, transformers or any other module of the package outside ``peft_hetlora.utils``,
so the tuner (``config``, ``layer``, ``model``, ``export``, ``quantization``), the Trainer callbacks and the
federated engine can all import it without pulling in each other (see docs/architecture.md, "The leaf").

* ``errors``: the one exception hierarchy (`HetLoRAError` and its subclasses).
* ``ranks``: the one rank check (`check_rank`, `is_rank`, `MAX_RANK`).
* ``constants``: the file names of a saved adapter and of the store layout (`ADAPTER_FILE`, ...).
* ``scaling``: the scale rule s = lora_alpha / r_max (or / sqrt(r_max)) and the pruning tail start.
* ``federation_fields``: which adapter settings a client must share with its federation, read from a store.
* ``untrusted_text``: client text made safe to show (`brief`, `one_line`, `markdown_text`).

Example:
    ```py
    >>> from peft_hetlora.utils import ADAPTER_FILE, check_rank, scaling_for
    >>> ADAPTER_FILE, check_rank(4, 1, 16), scaling_for(32, 16)
    ('adapter_model.safetensors', 4, 2.0)
    ```
"""

from __future__ import annotations

from .constants import (
    ADAPTER_FILE,
    CLIENT_FILE,
    CONFIG_FILE,
    FEDERATION_FILE,
    ROUND_FILE,
    SUMMARY_FILE,
)
from .errors import (
    AggregationError,
    AggregationRankError,
    ConfigMismatchError,
    CoordinatorError,
    FederationMismatch,
    HetLoRAError,
    RankError,
    StoreError,
    StoreFullError,
    UnsupportedQuantizationError,
)
from .ranks import MAX_RANK, RankTypeError, check_rank, is_rank
from .scaling import RANK_SCALINGS, scaling_for, tail_start

__all__ = [
    "ADAPTER_FILE",
    "CLIENT_FILE",
    "CONFIG_FILE",
    "FEDERATION_FILE",
    "MAX_RANK",
    "RANK_SCALINGS",
    "ROUND_FILE",
    "SUMMARY_FILE",
    "AggregationError",
    "AggregationRankError",
    "ConfigMismatchError",
    "CoordinatorError",
    "FederationMismatch",
    "HetLoRAError",
    "RankError",
    "RankTypeError",
    "StoreError",
    "StoreFullError",
    "UnsupportedQuantizationError",
    "check_rank",
    "is_rank",
    "scaling_for",
    "tail_start",
]
