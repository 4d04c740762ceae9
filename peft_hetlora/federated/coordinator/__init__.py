"""The coordinator (the public face): moves bytes between a store and the round, resumable at any point.

`Coordinator(store, settings)` publishes global t with its plan, collects and validates the uploads, calls
`round.close_round`, stages the new global, writes ``summary.json`` and publishes global t+1; it holds a
`GlobalPublisher(store)` (``coordinator.publisher``) that writes a global through a temporary folder.

Example:
    ```py
    >>> from peft_hetlora.federated.coordinator import Coordinator, read_json
    >>> Coordinator.__name__
    'Coordinator'
    ```
"""

from .coordinator import Coordinator
from .publisher import GLOBAL_TEMP_KIND, GlobalPublisher, read_json

__all__ = ["GLOBAL_TEMP_KIND", "Coordinator", "GlobalPublisher", "read_json"]
