"""The file names of a saved adapter and of a federation's store: the one source for each name.

A saved adapter is PEFT's pair (`ADAPTER_FILE`, `CONFIG_FILE`); a store adds `FEDERATION_FILE` at its root,
`ROUND_FILE` (and, with a server step, `SERVER_STATE_FILE`) beside each global, `CLIENT_FILE` in each upload and
`SUMMARY_FILE` per closed round
(the layout: docs/design.md#store-layout).

Example:
    ```py
    >>> from pathlib import Path
    >>> Path("rounds/3/clients/alice") / ADAPTER_FILE
    PosixPath('rounds/3/clients/alice/adapter_model.safetensors')
    ```
"""

from __future__ import annotations

__all__ = ["ADAPTER_FILE", "CLIENT_FILE", "CONFIG_FILE", "FEDERATION_FILE", "ROUND_FILE", "SERVER_STATE_FILE",
           "SUMMARY_FILE"]

#: an adapter's weights (safetensors only: pickle formats are never loaded)
ADAPTER_FILE = "adapter_model.safetensors"
#: an adapter's PEFT config (``"peft_type": "HETLORA"`` for a HetLoRA adapter)
CONFIG_FILE = "adapter_config.json"
#: a federation's record, at the store's root
FEDERATION_FILE = "federation.json"
#: the plan of round t, published with global t
ROUND_FILE = "round.json"
#: a client's report, beside its upload
CLIENT_FILE = "client.json"
#: the decision record of a closed round
SUMMARY_FILE = "summary.json"
#: the server step's state (momentum, second moments, truncation residual) kept beside the global it produced
SERVER_STATE_FILE = "server_state.safetensors"
