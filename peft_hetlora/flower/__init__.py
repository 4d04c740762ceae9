"""HetLoRA on Flower (`flwr`, Message API): a strategy and a client app.

Install with ``pip install "peft-hetlora[flower]"``. Importing this package sets ``FLWR_TELEMETRY_ENABLED=0`` unless
the variable is already set (opt in to Flower's telemetry by setting it to 1 yourself).

- `HetLoRAStrategy`: a `flwr.serverapp.strategy.FedAvg` subclass: per-client ranks, the global adapter truncated to
  each node's rank, validated replies aggregated with `peft_hetlora.federated.aggregate`, failures reported, optional
  mirroring to a `LocalStore` / `HubStore`.
- `make_client_app(task_fn)`: a `flwr.clientapp.ClientApp` that trains a local round with `transformers.Trainer` +
  `HetLoRACallback` at the node's rank and replies with only the active components.
- `initial_global_state(model, adapter_config)` (the first global) and `PartitionClientIds` (node -> client id).

The simulations (`run_flower_simulation`, the in-process engine, the toy task) are the bench's:
`hetlora_bench.engines` (``pip install "peft-hetlora[bench]"``).

The local round (`train_local_round`, `ClientTask`, `LocalTrainingConfig`) works without Flower installed; the
strategy and the client app need it.

Example:
    ```py
    >>> LocalTrainingConfig(local_steps=2).local_steps
    2
    ```
"""

import os
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from .deployment import PartitionClientIds, initial_global_state  # noqa: E402
from .local_round import ClientTask, LocalRoundResult, LocalTrainingConfig, train_local_round  # noqa: E402

_NEEDS_FLOWER = {"HetLoRAStrategy": ".strategy", "make_client_app": ".client_app"}

__all__ = [
    "ClientTask",
    "HetLoRAStrategy",
    "LocalRoundResult",
    "LocalTrainingConfig",
    "PartitionClientIds",
    "initial_global_state",
    "make_client_app",
    "train_local_round",
]


def __getattr__(name: str) -> Any:
    if name in _NEEDS_FLOWER:
        try:
            import flwr  # noqa: F401
        except ImportError as err:
            raise ImportError(
                f"peft_hetlora.flower.{name} needs Flower: pip install \"peft-hetlora[flower]\" "
                "(or pip install \"flwr[simulation]\")."
            ) from err
        import importlib

        value = getattr(importlib.import_module(_NEEDS_FLOWER[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
