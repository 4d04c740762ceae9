"""Trainer callbacks that make any `transformers.Trainer` script a HetLoRA client.

- `HetLoRACallback`: one local round (self-pruning regulariser bookkeeping, pruning, logging).
- `FederatedClientCallback(store, client_id)`: the same plus pull of the global adapter at train
  begin and upload of the client's adapter at train end.
- `run_client_rounds(trainer, callback, ...)`: several rounds in one script (`resume=True`: a restarted
  client continues its open round's checkpoint).

Example:
    ```py
    >>> from trainer_callbacks import FederatedClientCallback
    >>> trainer = Trainer(..., callbacks=[FederatedClientCallback(store, "alice")])  # doctest: +SKIP
    ```
"""

from .federated_client import CheckpointMismatchError, FederatedClientCallback
from .hetlora_callback import HetLoRACallback, add_callbacks_first, hetlora_peft_model, hetlora_tuner
from .rounds import run_client_rounds

__all__ = [
    "CheckpointMismatchError",
    "FederatedClientCallback",
    "HetLoRACallback",
    "add_callbacks_first",
    "hetlora_peft_model",
    "hetlora_tuner",
    "run_client_rounds",
]
