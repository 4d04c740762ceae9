"""One client's untrusted upload -> a validated `ClientUpdate`: the public face of the upload checks.

Everything from a client is hostile until it has passed through here (docs/design.md#validation):

* ``bytes``: strict JSON (`loads_strict_json`) and the hand-parsed safetensors header (`read_safetensors_header`);
  every refusal is a `RejectedUpload` whose reason goes into the round summary.
* ``formats``: the compressed message formats (fp32, bf16, fp16, blockwise int8): `encode_message`,
  `decode_message`, `message_spec`, `ErrorFeedback`.
* ``validation``: what a valid upload of a federation looks like (`UploadSpec`) and the in-memory checks
  (`validate_client_json`, `check_report`, `update_from_bytes`, `validate_update`).
* ``folder``: an upload folder read as one consistent snapshot, never following links (`validate_upload`).

Example:
    ```py
    >>> import torch
    >>> spec = UploadSpec(modules={"m": (4, 4)}, r_min=1, r_max=8)
    >>> adapter = {"m.lora_A.weight": torch.ones(2, 4), "m.lora_B.weight": torch.ones(4, 2)}
    >>> report = {"client_id": "a", "round": 0, "rank_in": 2, "rank_out": 2, "num_examples": 10}
    >>> validate_update(adapter, report, spec, client_id="a", round_idx=0).rank
    2
    >>> try:
    ...     validate_update(adapter, {**report, "rank_out": 3}, spec, client_id="a", round_idx=0)
    ... except RejectedUpload as err:
    ...     print(err.reason)
    client.json rank_out 3 is above rank_in 2
    ```
"""

from __future__ import annotations

from .bytes import (
    DTYPE_SIZES,
    MAX_REASON_CHARS,
    RejectedUpload,
    TensorInfo,
    loads_strict_json,
    parse_header_json,
    read_safetensors_header,
)
from .folder import UploadSnapshot, open_upload_snapshot, validate_upload
from .formats import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MESSAGE_FORMAT,
    MESSAGE_FORMAT_FIELD,
    MESSAGE_FORMATS,
    METADATA_KEY,
    SCALE_SUFFIX,
    ErrorFeedback,
    MessageFormat,
    MessageFormatError,
    MessageSpec,
    decode_message,
    decode_state_dict,
    encode_message,
    encode_state_dict,
    message_spec,
    parse_message_format,
    payload_nbytes,
)
from .validation import (
    ALLOWED_DTYPES,
    ALLOWED_FILES,
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_MAX_JSON_BYTES,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    PICKLE_SUFFIXES,
    UploadSpec,
    check_report,
    update_from_bytes,
    validate_client_json,
    validate_update,
)

__all__ = [
    "ALLOWED_DTYPES",
    "ALLOWED_FILES",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MAX_EXAMPLES",
    "DEFAULT_MAX_JSON_BYTES",
    "DEFAULT_MESSAGE_FORMAT",
    "DTYPE_SIZES",
    "LORA_A_SUFFIX",
    "LORA_B_SUFFIX",
    "MAX_REASON_CHARS",
    "MESSAGE_FORMATS",
    "MESSAGE_FORMAT_FIELD",
    "METADATA_KEY",
    "PICKLE_SUFFIXES",
    "SCALE_SUFFIX",
    "ErrorFeedback",
    "MessageFormat",
    "MessageFormatError",
    "MessageSpec",
    "RejectedUpload",
    "TensorInfo",
    "UploadSnapshot",
    "UploadSpec",
    "check_report",
    "decode_message",
    "decode_state_dict",
    "encode_message",
    "encode_state_dict",
    "loads_strict_json",
    "message_spec",
    "open_upload_snapshot",
    "parse_header_json",
    "parse_message_format",
    "payload_nbytes",
    "read_safetensors_header",
    "update_from_bytes",
    "validate_client_json",
    "validate_update",
    "validate_upload",
]
