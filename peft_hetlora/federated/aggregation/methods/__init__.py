"""Aggregation methods, one per file, behind a registry users extend with :func:`register_aggregation`.

Built-ins: ``hetlora`` (arXiv 2401.06432), ``zero_pad``, ``fedavg`` (arXiv 1602.05629), ``flexlora``
(arXiv 2402.11505), ``rankwise`` (RBLA, arXiv 2408.08699), ``component`` / ``component_data`` (the general
component rule of docs/design.md#component-rule for component-indexed uploads), ``component_fedavg`` (the same
placement with
FedAvg's step), ``flexlora_held`` (FlexLoRA over the adapters clients held, frozen rest included), ``raflora``
(arXiv 2602.13486: each component averaged over its contributors, then FlexLoRA's SVD). See
docs/aggregation.md.
"""

from .base import AggregationMethod, ModuleAccumulator, PaddedSum
from .component import ComponentFedAvg, ComponentRule, ComponentRuleData
from .fedavg import FedAvg
from .flexlora import FlexLoRA, FlexLoRAHeld
from .hetlora import HetLoRA
from .raflora import RaFLoRA
from .rankwise import RankWise
from .registry import (
    AGGREGATION_METHODS,
    aggregation_methods,
    get_aggregation,
    is_builtin,
    register_aggregation,
    register_builtin,
    unregister_aggregation,
)
from .zero_pad import ZeroPad

for _method in (HetLoRA(), ZeroPad(), FedAvg(), FlexLoRA(), RankWise(), ComponentRule(), ComponentRuleData(),
                ComponentFedAvg(), FlexLoRAHeld(), RaFLoRA()):
    register_builtin(_method)
del _method

__all__ = [
    "AGGREGATION_METHODS",
    "AggregationMethod",
    "ComponentFedAvg",
    "ComponentRule",
    "ComponentRuleData",
    "FedAvg",
    "FlexLoRA",
    "FlexLoRAHeld",
    "HetLoRA",
    "ModuleAccumulator",
    "PaddedSum",
    "RaFLoRA",
    "RankWise",
    "ZeroPad",
    "aggregation_methods",
    "get_aggregation",
    "is_builtin",
    "register_aggregation",
    "register_builtin",
    "unregister_aggregation",
]
