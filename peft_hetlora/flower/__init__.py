"""HetLoRA on Flower (`flwr`, Message API): a strategy, a client app and a simulation runner.

Install with ``pip install "peft-hetlora[flower]"``. Importing this package sets ``FLWR_TELEMETRY_ENABLED=0`` unless
the variable is already set (opt in to Flower's telemetry by setting it to 1 yourself).

- `HetLoRAStrategy`: a `flwr.serverapp.strategy.FedAvg` subclass: per-client ranks, the global adapter truncated to
  each node's rank, validated replies aggregated with `peft_hetlora.federated.aggregate`, failures reported, optional
  mirroring to a `LocalStore` / `HubStore`.
- `make_client_app(task_fn)`: a `flwr.clientapp.ClientApp` that trains a local round with `transformers.Trainer` +
  `HetLoRACallback` at the node's rank and replies with only the active components.
- `run_flower_simulation(...)` / `run_inprocess_simulation(...)`: the same experiment on Flower (Ray virtual clients)
  or in this process.

The local round (`train_local_round`, `ClientTask`, `LocalTrainingConfig`), `run_inprocess_simulation` and the toy
task work without Flower installed; the strategy, the client app and `run_flower_simulation` need it.

Example:
    ```py
    from peft_hetlora import HetLoRAConfig
    from peft_hetlora.flower import run_flower_simulation
    from peft_hetlora.flower.toy import ToyTask

    run = run_flower_simulation(ToyTask(), num_clients=10, rounds=2, local_steps=2,
                                adapter_config=HetLoRAConfig(r=8, r_min=2, target_modules=["q_proj", "v_proj"]))
    ```
"""

import os
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from .local_round import ClientTask, LocalRoundResult, LocalTrainingConfig, train_local_round  # noqa: E402
from .simulation import (  # noqa: E402
    DatasetTask,
    FederationRun,
    initial_global_state,
    run_flower_simulation,
    run_inprocess_simulation,
)

_NEEDS_FLOWER = {"HetLoRAStrategy": ".strategy", "make_client_app": ".client_app"}

__all__ = [
    "ClientTask",
    "DatasetTask",
    "FederationRun",
    "HetLoRAStrategy",
    "LocalRoundResult",
    "LocalTrainingConfig",
    "initial_global_state",
    "make_client_app",
    "run_flower_simulation",
    "run_inprocess_simulation",
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
