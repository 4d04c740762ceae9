"""Strict parsing of an upload's untrusted bytes: JSON without duplicate keys or NaN, and the safetensors header.

Nothing here loads a tensor: `read_safetensors_header` parses the 8-byte little-endian length and the bounded JSON
header by hand and checks the offsets tile the data region; anything malformed raises `RejectedUpload` with a
reason fit for the round summary. [`validation`][peft_hetlora.federated.upload.validation] builds on these.

Example:
    ```py
    >>> import torch
    >>> from safetensors.torch import save
    >>> read_safetensors_header(save({"x": torch.zeros(2, 3)}), max_header_bytes=1024)["x"].dtype
    'F32'
    ```
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from ...utils.constants import ADAPTER_FILE
from ...utils.errors import HetLoRAError
from ...utils.untrusted_text import brief, one_line

__all__ = [
    "DTYPE_SIZES",
    "MAX_REASON_CHARS",
    "RejectedUpload",
    "TensorInfo",
    "loads_strict_json",
    "parse_header_json",
    "read_safetensors_header",
]

DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1}

MAX_REASON_CHARS = 500


class RejectedUpload(HetLoRAError):
    """A client upload that failed validation; `reason` says why in words fit for the round summary.

    The reason is one line of at most `MAX_REASON_CHARS` characters; it quotes untrusted values only in
    short form (`brief`) and never the bytes of a file.

    Example:
        ```py
        >>> RejectedUpload("rank 32 above r_max=16").reason
        'rank 32 above r_max=16'
        ```
    """

    def __init__(self, reason: str):
        reason = one_line(reason, limit=MAX_REASON_CHARS)
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int



def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise RejectedUpload(f"duplicate JSON key {brief(key)}")
        out[key] = value
    return out


def _reject_constant(name: str) -> None:
    raise RejectedUpload(f"non-finite JSON number {name}")


def loads_strict_json(raw: bytes, what: str) -> Any:
    """Parse untrusted JSON bytes strictly: UTF-8, no duplicate keys, no NaN/Infinity, bounded nesting.

    Anything else raises `RejectedUpload` whose reason starts with `what` (the file's name).

    Example:
        ```py
        >>> loads_strict_json(b'{"rank_in": 4}', "client.json")
        {'rank_in': 4}
        >>> loads_strict_json(b'{"a": 1, "a": 2}', "client.json")
        Traceback (most recent call last):
        peft_hetlora.federated.upload.bytes.RejectedUpload: client.json: duplicate JSON key 'a'
        ```
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RejectedUpload(f"{what} is not UTF-8 (invalid byte at offset {err.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant)
    except RejectedUpload as err:
        raise RejectedUpload(f"{what}: {err.reason}") from None
    except RecursionError:
        raise RejectedUpload(f"{what} is nested too deeply") from None
    except ValueError as err:
        raise RejectedUpload(f"{what} is not valid JSON ({err})") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header_json(header: bytes) -> dict[str, TensorInfo]:
    """Parse and type-check the JSON header of a safetensors file (without checking it against a spec).

    Example:
        ```py
        >>> parse_header_json(b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}')["x"].shape
        (2,)
        ```
    """
    parsed = loads_strict_json(header, "safetensors header")
    if not isinstance(parsed, dict):
        raise RejectedUpload("safetensors header is not a JSON object")
    entries: dict[str, TensorInfo] = {}
    for key, info in parsed.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise RejectedUpload("safetensors __metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise RejectedUpload(f"safetensors entry {brief(key)} must hold exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise RejectedUpload(f"tensor {brief(key)}: dtype must be a string")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise RejectedUpload(f"tensor {brief(key)}: shape must be a list of non-negative integers, got "
                                 f"{brief(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise RejectedUpload(f"tensor {brief(key)}: data_offsets must be [begin, end] with 0 <= begin <= end")
        entries[key] = TensorInfo(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])
    return entries


def read_safetensors_header(data: bytes, *, max_header_bytes: int) -> dict[str, TensorInfo]:
    """Parse the header of safetensors `data` and check its offsets tile the data region exactly.

    Checks: the 8-byte little-endian length is within `max_header_bytes` and the file; the header is a
    JSON object of {key: {dtype, shape, data_offsets}}; every tensor's byte length matches its dtype and
    shape; the tensors lie back to back from the start of the data region to the end of the file.

    Example:
        ```py
        >>> import torch
        >>> from safetensors.torch import save
        >>> read_safetensors_header(save({"x": torch.zeros(2, 3)}), max_header_bytes=1024)["x"].shape
        (2, 3)
        ```
    """
    if len(data) < 8:
        raise RejectedUpload(f"{ADAPTER_FILE} is truncated ({len(data)} bytes, no header length)")
    (n,) = struct.unpack("<Q", data[:8])
    # The declared length is file content: it is never echoed (a linked text file would leak its first bytes).
    if n > max_header_bytes:
        raise RejectedUpload(f"{ADAPTER_FILE} declares a header above the {max_header_bytes}-byte limit "
                             "(not a safetensors file?)")
    if 8 + n > len(data):
        raise RejectedUpload(f"{ADAPTER_FILE} declares a header longer than the file ({len(data)} bytes)")
    entries = parse_header_json(data[8 : 8 + n])
    data_len = len(data) - 8 - n
    cursor = 0
    for key, info in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.dtype in DTYPE_SIZES:
            expected = math.prod(info.shape) * DTYPE_SIZES[info.dtype]
            if info.end - info.begin != expected:
                raise RejectedUpload(
                    f"tensor {brief(key)}: data_offsets span {info.end - info.begin} bytes but {info.dtype} "
                    f"{list(info.shape)} needs {expected}"
                )
        if info.begin != cursor:
            raise RejectedUpload(f"tensor {brief(key)}: data_offsets overlap or leave a gap (starts at {info.begin}, "
                                 f"expected {cursor})")
        if info.end > data_len:
            raise RejectedUpload(f"tensor {brief(key)}: data_offsets end at {info.end}, past the end of the file "
                                 f"(data region is {data_len} bytes)")
        cursor = info.end
    if cursor != data_len:
        raise RejectedUpload(f"{ADAPTER_FILE} has {data_len - cursor} trailing bytes after its tensors")
    return entries
