"""Where a federation lives: the `AdapterStore` protocol and its two backends (a folder, the Hugging Face Hub).

The public face of the stores (docs/architecture.md): other parts of the package import from here.

* ``base``: the `AdapterStore` protocol, `GlobalAdapter`, the store errors, client-id and round checks, the
  one strict JSON writer (`json_text`, `dump_json`) and the checks of a folder to publish or upload.
* ``model_card``: the federation's `README.md` (`render_model_card`).
* ``local``: `LocalStore`, a folder safe for several processes at once.
* ``hub``: `HubStore`, one Hub model repo per federation; it composes a ``hub_requests.HubRepo`` (retried requests,
  commits with `parent_commit`, snapshots).
* ``temp_files``: temporary files that name their writer, so a restart removes only what dead writers left.

The file names of the layout come from `peft_hetlora.utils.constants` (docs/design.md#store-layout).

Example:
    ```py
    >>> import tempfile
    >>> store = LocalStore(tempfile.mkdtemp() + "/fed", create=True)
    >>> isinstance(store, AdapterStore), store.latest_global(), store.list_client_uploads(0)
    (True, None, [])
    ```
"""

from __future__ import annotations

from .base import (
    CLIENT_FILES,
    STAGED_GLOBAL,
    AdapterStore,
    ClientUploadNotFoundError,
    GlobalAdapter,
    GlobalNotPublishedError,
    StoreNotFoundError,
    check_round,
    client_files,
    dump_json,
    file_sha256,
    global_files,
    json_text,
    validate_client_id,
)
from .hub import HubStore, UploadTooLargeError
from .hub_requests import HubRepo, RetryPolicy
from .local import LocalStore
from .model_card import CARD_CELL_CHARS, CARD_LIST_ITEMS, MODEL_CARD, render_model_card
from .temp_files import FOREIGN_MAX_AGE_S, is_abandoned, remove_abandoned, temp_prefix

__all__ = [
    "CARD_CELL_CHARS",
    "CARD_LIST_ITEMS",
    "CLIENT_FILES",
    "FOREIGN_MAX_AGE_S",
    "MODEL_CARD",
    "STAGED_GLOBAL",
    "AdapterStore",
    "ClientUploadNotFoundError",
    "GlobalAdapter",
    "GlobalNotPublishedError",
    "HubRepo",
    "HubStore",
    "LocalStore",
    "RetryPolicy",
    "StoreNotFoundError",
    "UploadTooLargeError",
    "check_round",
    "client_files",
    "dump_json",
    "file_sha256",
    "global_files",
    "is_abandoned",
    "json_text",
    "remove_abandoned",
    "render_model_card",
    "temp_prefix",
    "validate_client_id",
]
