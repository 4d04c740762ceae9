"""What a simulated client does to its upload before it leaves the device: attacks and message encoding.

`UploadTransform` wraps the federation's store for one client: `upload_client` rewrites the adapter file
in the client's own temporary folder (attacker transformation, then the message format's encode / decode
round trip) and only then hands the folder to the real store. Everything else is delegated unchanged.
The coordinator therefore sees exactly what the client sent, as in a real deployment.

Bytes are counted as sent: ``sent_bytes`` is the length of the encoded safetensors message and
``payload_bytes`` its tensor bytes (`compression.payload_nbytes`); bf16 halves fp32's payload.

When the client callback encoded the upload itself (``message_format`` declared in ``client.json``), the
attack is applied in that format and the message sent as is. Otherwise (a callback without the option) the
message is encoded here, decoded again and stored as float32 (the server's view is the same: it decodes to
float32 and accumulates in float32); the bytes recorded are those of the encoded message.

Example:
    ```py
    >>> store = UploadTransform(LocalStore("runs/x/store"), message_format="bf16")  # doctest: +SKIP
    >>> FederatedClientCallback(store, "c1")  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from peft_hetlora.federated.upload import (
    MESSAGE_FORMAT_FIELD,
    decode_message,
    encode_message,
    parse_message_format,
    payload_nbytes,
)
from peft_hetlora.utils import ADAPTER_FILE, CLIENT_FILE

from .attacks import poison_upload


class UploadTransform:
    """A store proxy for one client that transforms the adapter file before `upload_client` sends it.

    Args:
        store: the federation's store.
        message_format: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8-block<B>"`` (encode / decode round trip).
        attack: None (honest) or an attack of `attacks.poison_upload` with ``attack_scale``.
        honest_copy: where to keep the honest upload of an attacker (so tests and reports can compare).
    """

    def __init__(
        self,
        store: Any,
        *,
        message_format: str = "fp32",
        attack: str | None = None,
        attack_scale: float = 10.0,
        honest_copy: str | Path | None = None,
    ) -> None:
        self._store = store
        self.message_format = parse_message_format(message_format)
        self.attack = attack
        self.attack_scale = attack_scale
        self.honest_copy = Path(honest_copy) if honest_copy is not None else None
        self.sent_bytes: int | None = None
        self.payload_bytes: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def upload_client(self, round_idx: int, client_id: str, folder: str | Path) -> None:
        folder = Path(folder)
        path = folder / ADAPTER_FILE
        meta_path = folder / CLIENT_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        # a client callback that encodes its own messages declares the format in client.json
        declared = meta.get(MESSAGE_FORMAT_FIELD) if isinstance(meta, dict) else None
        if declared is not None:
            fmt = parse_message_format(declared)
            state = decode_message(path.read_bytes(), fmt)
        else:
            fmt = self.message_format
            state = load_file(str(path))
        if self.attack is not None:
            if self.honest_copy is not None:
                self.honest_copy.parent.mkdir(parents=True, exist_ok=True)
                save_file(state, str(self.honest_copy))
            state = poison_upload(state, self.attack, self.attack_scale)
        message = path.read_bytes() if declared is not None and self.attack is None else encode_message(state, fmt)
        if declared is not None:
            path.write_bytes(message)  # already in its declared format: send as is
        elif self.attack is not None or fmt.kind != "fp32":
            decoded = decode_message(message, fmt)
            save_file({k: v.contiguous() for k, v in decoded.items()}, str(path))
        self.sent_bytes = len(message) + sum(f.stat().st_size for f in folder.iterdir() if f.name != ADAPTER_FILE)
        self.payload_bytes = payload_nbytes(load_bytes(message))
        self._store.upload_client(round_idx, client_id, folder)
