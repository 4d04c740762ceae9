"""The federated core: framework-free pieces shared by the Trainer callbacks, the coordinator and Flower.

Everything works on plain `dict[str, torch.Tensor]` adapter state dicts in PEFT's saved key format.

Example:
    ```py
    >>> from peft_hetlora.federated import ClientUpdate, aggregate
    >>> result = aggregate(updates, method="hetlora", r_max=16)  # doctest: +SKIP
    >>> result.state_dict, result.weights  # doctest: +SKIP
    ```
"""

from ..utils.ranks import check_rank
from .adapter import lora_module_names, pad, truncate, update_norm
from .aggregation import (
    AGGREGATION_METHODS,
    AggregationMethod,
    AggregationResult,
    ClientUpdate,
    RobustMethod,
    StreamingAggregator,
    aggregate,
    aggregation_methods,
    get_aggregation,
    register_aggregation,
    unregister_aggregation,
)
from .coordinator import Coordinator
from .policies import RankPolicy, sample_clients
from .round import RoundPlan, RoundSettings, close_round
from .settings import FederationSettings
from .stores import AdapterStore, GlobalAdapter, HubStore, LocalStore, validate_client_id
from .upload import RejectedUpload, validate_update, validate_upload

__all__ = [
    "AGGREGATION_METHODS",
    "AdapterStore",
    "AggregationMethod",
    "AggregationResult",
    "ClientUpdate",
    "Coordinator",
    "FederationSettings",
    "GlobalAdapter",
    "HubStore",
    "LocalStore",
    "RankPolicy",
    "RejectedUpload",
    "RobustMethod",
    "RoundPlan",
    "RoundSettings",
    "StreamingAggregator",
    "aggregate",
    "aggregation_methods",
    "check_rank",
    "close_round",
    "get_aggregation",
    "lora_module_names",
    "pad",
    "register_aggregation",
    "sample_clients",
    "truncate",
    "unregister_aggregation",
    "update_norm",
    "validate_client_id",
    "validate_update",
    "validate_upload",
]
