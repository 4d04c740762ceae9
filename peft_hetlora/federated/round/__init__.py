"""One round, pure (the public face of the round): its records, how it is planned, how it closes, its summary.

`plan` (`RoundPlan` = ``round.json``, `ClientReport` = ``client.json``, `plan_round`, `round_status`), `settings`
(`RoundSettings`, the round's slice of the federation's settings, and the checks that refuse what the engine cannot
run), `server_step` (the server optimizer on the product and error feedback, after aggregation),
`close` (`close_round`: validated updates -> the new global, the summary and the next ranks) and `summary`
(``summary.json``). Nothing here reads or writes files: the coordinator, the Flower strategy and the in-process
runner move the bytes and call the same functions.

Example:
    ```py
    >>> from peft_hetlora.federated.round import plan_round
    >>> plan_round(0, ["a", "b"], {"a": 2, "b": 4}, clients_per_round=2, seed=0).ranks
    {'a': 2, 'b': 4}
    ```
"""

from .close import Rejection, RoundOutcome, close_round, next_client_ranks
from .plan import FEDERATION_FORMAT, ClientReport, CollectStatus, RoundPlan, plan_round, round_status
from .server_step import SERVER_OPTIMIZERS, ServerOptimizer, ServerStep, parse_server_optimizer
from .settings import (
    CLIENT_TRAINING,
    DEFAULT_DP_METHOD,
    DEFAULT_METHOD,
    DEFAULT_SELECTION,
    NEXT_RANK_RULES,
    RoundSettings,
    check_client_training,
    check_dp,
    check_selection,
    check_server_step,
    core_methods,
    default_method_and_selection,
    dp_method_for,
    dp_methods,
    window_methods,
)
from .summary import NON_FINITE_REASON, build_summary, client_details, finite_or_null, weighted_mean

__all__ = [
    "CLIENT_TRAINING",
    "DEFAULT_DP_METHOD",
    "DEFAULT_METHOD",
    "DEFAULT_SELECTION",
    "FEDERATION_FORMAT",
    "NEXT_RANK_RULES",
    "NON_FINITE_REASON",
    "SERVER_OPTIMIZERS",
    "ClientReport",
    "CollectStatus",
    "Rejection",
    "RoundOutcome",
    "RoundPlan",
    "RoundSettings",
    "ServerOptimizer",
    "ServerStep",
    "build_summary",
    "check_client_training",
    "check_dp",
    "check_selection",
    "check_server_step",
    "client_details",
    "close_round",
    "core_methods",
    "default_method_and_selection",
    "dp_method_for",
    "dp_methods",
    "finite_or_null",
    "next_client_ranks",
    "parse_server_optimizer",
    "plan_round",
    "round_status",
    "weighted_mean",
    "window_methods",
]
