"""Validated client updates -> the new global adapter: the streaming aggregator, the methods and their registry,
the robust rules, the influence bound, and (in `privacy`) DP and secure sums.

`records` holds the data types (`ClientUpdate`, `AggregationResult`), `streaming` the one-pass aggregator every
method shares, `methods/` one file per method behind a registry, `component_view` the all-in-memory view the robust,
DP and secure-sum paths share. See docs/aggregation.md.

Example:
    >>> import torch
    >>> from peft_hetlora.federated.aggregation import ClientUpdate, aggregate
    >>> sd = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2)}
    >>> result = aggregate([ClientUpdate("a", sd, rank=2, num_examples=10)], method="hetlora", r_max=4)
    >>> tuple(result.state_dict["m.lora_A.weight"].shape)
    (4, 3)
"""

from .checks import UpdateChecks, all_finite
from .component_view import UpdateShapeError, validate_round
from .influence import (
    ADAPTIVE,
    DEFAULT_BOUND_MULTIPLIER,
    DEFAULT_INFLUENCE_BOUND,
    INFLUENCE_BOUNDS,
    OFF,
    clip_to_sent_factors,
    parse_influence_bound,
)
from .methods import (
    AGGREGATION_METHODS,
    AggregationMethod,
    ModuleAccumulator,
    PaddedSum,
    aggregation_methods,
    get_aggregation,
    register_aggregation,
    unregister_aggregation,
)
from .methods.robust import ROBUST_RULES, RobustConfigError, RobustMethod, robust_aggregate
from .records import AggregationResult, ClientUpdate
from .streaming import (
    DEFAULT_MAX_WEIGHT_RATIO,
    MAX_UPDATE_NORM,
    WEIGHTINGS,
    StreamingAggregator,
    aggregate,
    capped_weights,
    non_finite_tensors,
)

__all__ = [
    "ADAPTIVE",
    "AGGREGATION_METHODS",
    "DEFAULT_BOUND_MULTIPLIER",
    "DEFAULT_INFLUENCE_BOUND",
    "DEFAULT_MAX_WEIGHT_RATIO",
    "INFLUENCE_BOUNDS",
    "MAX_UPDATE_NORM",
    "OFF",
    "ROBUST_RULES",
    "WEIGHTINGS",
    "AggregationMethod",
    "AggregationResult",
    "ClientUpdate",
    "ModuleAccumulator",
    "PaddedSum",
    "RobustConfigError",
    "RobustMethod",
    "StreamingAggregator",
    "UpdateChecks",
    "all_finite",
    "UpdateShapeError",
    "aggregate",
    "aggregation_methods",
    "capped_weights",
    "clip_to_sent_factors",
    "get_aggregation",
    "non_finite_tensors",
    "parse_influence_bound",
    "register_aggregation",
    "robust_aggregate",
    "unregister_aggregation",
    "validate_round",
]
