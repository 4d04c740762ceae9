"""Privacy of the aggregate: client-level DP (`dp`, `dp_config`) and secure-aggregation-ready sums (`secure_sum`).

DP-FedAvg (McMahan et al., arXiv 1710.06963) adapted to components, accounted by Opacus; secure aggregation
(Bonawitz et al., CCS 2017) needs only the sums that :func:`client_share` makes. See docs/privacy.md.

Example:
    >>> from peft_hetlora.federated.aggregation.privacy import DPConfig
    >>> DPConfig(clip=1.0, noise_multiplier=1.0, sampling_rate=0.5, delta=1e-5).clip
    1.0
"""

from .dp import DP_METHODS, DPAggregationResult, dp_aggregate, privatize_update
from .dp_config import DPConfig, DPConfigError, dp_config_from_dict, privacy_spent
from .secure_sum import LEVELS, SECURE_SUM_METHODS, SecureSumError, client_share, combine, sum_shares

__all__ = [
    "DP_METHODS",
    "DPAggregationResult",
    "DPConfig",
    "DPConfigError",
    "LEVELS",
    "SECURE_SUM_METHODS",
    "SecureSumError",
    "client_share",
    "combine",
    "dp_aggregate",
    "dp_config_from_dict",
    "privacy_spent",
    "privatize_update",
    "sum_shares",
]
