"""The federated core: framework-free pieces shared by the Trainer callbacks, the coordinator and Flower.

Everything works on plain `dict[str, torch.Tensor]` adapter state dicts in PEFT's saved key format.

Example:
    ```py
    >>> from peft_hetlora.federated import ClientUpdate, aggregate
    >>> result = aggregate(updates, method="hetlora", r_max=16)  # doctest: +SKIP
    >>> result.state_dict, result.weights  # doctest: +SKIP
    ```
"""

from .aggregation import (
    AGGREGATION_METHODS,
    AggregationResult,
    ClientUpdate,
    StreamingAggregator,
    aggregate,
    lora_module_names,
    pad,
    truncate,
    update_norm,
)
from .coordinator import Coordinator
from .local_store import LocalStore
from .rank_policy import RankPolicy, sample_clients
from .store import AdapterStore, GlobalAdapter, HubStore, validate_client_id
from .validation import RejectedUpload, validate_upload

__all__ = [
    "AGGREGATION_METHODS",
    "AdapterStore",
    "AggregationResult",
    "ClientUpdate",
    "Coordinator",
    "GlobalAdapter",
    "HubStore",
    "LocalStore",
    "RankPolicy",
    "RejectedUpload",
    "StreamingAggregator",
    "aggregate",
    "lora_module_names",
    "pad",
    "sample_clients",
    "truncate",
    "update_norm",
    "validate_client_id",
    "validate_upload",
]
