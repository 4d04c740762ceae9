"""Compressed adapter messages: fp32, bf16, fp16 and blockwise int8 encodings of a state dict.

A client declares its message format in its report (``client.json`` field ``message_format``, see
`MESSAGE_FORMAT_FIELD`); the server checks every tensor against `message_spec(format)` (the allowed
safetensors dtypes and extra keys), decodes to float32 with `decode_state_dict` and accumulates in
float32. Bytes are counted as sent: `encode_message` returns the exact safetensors bytes.

Formats (`parse_message_format`):

- ``"fp32"`` (default), ``"bf16"``, ``"fp16"``: every tensor cast to that dtype (round to nearest even).
  bf16 halves the payload; fp16 too, but overflows above 65504 (rejected, not silently turned to inf).
- ``"int8-block<B>"`` (e.g. ``"int8-block64"``): each tensor flattened in row-major order and cut into
  blocks of B values (the last one may be shorter); per block the absmax ``m`` is stored in float32 and
  every value as the int8 code ``round(127 * x / m)`` (0 for an all-zero block); decoding is
  ``code * m / 127``, an error of at most ``m / 254`` per value. The scales of tensor ``key`` travel as
  the extra float32 tensor ``key + SCALE_SUFFIX`` of shape ``(ceil(numel / B),)``. Payload: 1 byte per
  value plus 4 bytes per block, about a quarter of fp32 (0.266 with B = 64). This is the blockwise
  absmax scheme of 8-bit optimizers (Dettmers et al., arXiv 2110.02861), also used by NVIDIA FLARE's
  blockwise-8 message filter.

Optional client-side error feedback (`ErrorFeedback`; Seide et al. 2014, Karimireddy et al., arXiv
1901.09847) adds the previous rounds' quantisation residual before encoding, so that the decoded
messages sum to the true ones up to the last residual.

Example:
    ```py
    >>> import torch
    >>> state = {"m.lora_A.weight": torch.randn(4, 32), "m.lora_B.weight": torch.randn(16, 4)}
    >>> data = encode_message(state, "int8-block64")
    >>> decoded = decode_message(data, "int8-block64")
    >>> sorted(decoded), decoded["m.lora_A.weight"].dtype
    (['m.lora_A.weight', 'm.lora_B.weight'], torch.float32)
    ```
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ...utils.errors import HetLoRAError
from ..aggregation import all_finite

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MESSAGE_FORMAT",
    "MESSAGE_FORMATS",
    "MESSAGE_FORMAT_FIELD",
    "SCALE_SUFFIX",
    "ErrorFeedback",
    "MessageFormat",
    "MessageFormatError",
    "MessageSpec",
    "decode_message",
    "decode_state_dict",
    "encode_message",
    "encode_state_dict",
    "message_spec",
    "parse_message_format",
    "payload_nbytes",
]

#: the client report (client.json) field declaring how the upload is encoded
MESSAGE_FORMAT_FIELD = "message_format"
DEFAULT_MESSAGE_FORMAT = "fp32"
DEFAULT_BLOCK_SIZE = 64
#: suffix of the per-block absmax tensor that accompanies each int8 tensor
SCALE_SUFFIX = ".int8_absmax"
#: the format families (the int8 one takes a block size: "int8-block64")
MESSAGE_FORMATS = ("fp32", "bf16", "fp16", "int8-block<B>")
#: safetensors header metadata key recording the format (checked against the declaration when present)
METADATA_KEY = "hetlora_message_format"
_MIN_BLOCK, _MAX_BLOCK = 8, 1 << 20
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8"}
_INT8_RE = re.compile(r"int8-block(\d+)")


class MessageFormatError(HetLoRAError, ValueError):
    """A message format name, or a message that does not match its declared format."""


@dataclass(frozen=True)
class MessageFormat:
    """A parsed message format: `kind` in {"fp32", "bf16", "fp16", "int8"}, `block_size` for int8.

    Example:
        ```py
        >>> parse_message_format("int8-block128")
        MessageFormat(name='int8-block128', kind='int8', block_size=128)
        ```
    """

    name: str
    kind: str
    block_size: int | None = None


def parse_message_format(name: str | MessageFormat | None) -> MessageFormat:
    """Parse a declared message format (None means ``"fp32"``); ``"int8"`` means ``"int8-block64"``.

    Example:
        ```py
        >>> parse_message_format("bf16").kind
        'bf16'
        ```
    """
    if isinstance(name, MessageFormat):
        return name
    if name is None:
        name = DEFAULT_MESSAGE_FORMAT
    if not isinstance(name, str):
        raise MessageFormatError(f"message_format must be a string such as 'bf16', got {type(name).__name__}.")
    if name in _FLOAT_DTYPES:
        return MessageFormat(name, name)
    if name == "int8":
        name = f"int8-block{DEFAULT_BLOCK_SIZE}"
    match = _INT8_RE.fullmatch(name)
    if match is None:
        raise MessageFormatError(
            f"Unknown message_format {name[:40]!r}; use one of fp32, bf16, fp16 or int8-block<B> "
            f"(e.g. int8-block{DEFAULT_BLOCK_SIZE})."
        )
    block = int(match.group(1))
    if not _MIN_BLOCK <= block <= _MAX_BLOCK:
        raise MessageFormatError(
            f"int8 block size must be between {_MIN_BLOCK} and {_MAX_BLOCK}, got {block}; e.g. int8-block64."
        )
    return MessageFormat(f"int8-block{block}", "int8", block)


@dataclass(frozen=True)
class MessageSpec:
    """What a message of one format may contain, for validating uploads before decoding them.

    `value_dtypes` are the safetensors dtype strings allowed for the adapter's tensors; with int8, every
    tensor ``key`` must come with ``key + scale_suffix`` (dtype in `scale_dtypes`, shape
    `scale_shape(value_shape)`) and no other extra key is allowed.

    Example:
        ```py
        >>> spec = message_spec("int8-block64")
        >>> spec.value_dtypes, spec.scale_key("m.lora_A.weight"), spec.scale_shape((4, 100))
        (frozenset({'I8'}), 'm.lora_A.weight.int8_absmax', (7,))
        ```
    """

    format: MessageFormat
    value_dtypes: frozenset[str]
    scale_suffix: str | None = None
    scale_dtypes: frozenset[str] = frozenset()

    def scale_key(self, key: str) -> str:
        if self.scale_suffix is None:
            raise MessageFormatError(f"Format {self.format.name} carries no scale tensors.")
        return key + self.scale_suffix

    def scale_shape(self, value_shape: tuple[int, ...]) -> tuple[int, ...]:
        block = self.format.block_size
        if block is None:
            raise MessageFormatError(f"Format {self.format.name} carries no scale tensors.")
        return (math.ceil(math.prod(value_shape) / block),)

    def expected_keys(self, adapter_keys: list[str] | set[str]) -> set[str]:
        """The exact key set of a message carrying `adapter_keys`."""
        keys = set(adapter_keys)
        if self.scale_suffix is not None:
            keys |= {self.scale_key(key) for key in adapter_keys}
        return keys

    def is_scale_key(self, key: str) -> bool:
        return self.scale_suffix is not None and key.endswith(self.scale_suffix)


def message_spec(fmt: str | MessageFormat | None) -> MessageSpec:
    """The dtype whitelist and extra keys of format `fmt` (for `validation.py`).

    Example:
        ```py
        >>> sorted(message_spec("bf16").value_dtypes)
        ['BF16']
        ```
    """
    parsed = parse_message_format(fmt)
    if parsed.kind == "int8":
        return MessageSpec(parsed, frozenset({"I8"}), SCALE_SUFFIX, frozenset({"F32"}))
    return MessageSpec(parsed, frozenset({_SAFETENSORS_DTYPE[_FLOAT_DTYPES[parsed.kind]]}))


# ----------------------------------------------------------------------------- int8 blockwise
def _quantize_blockwise(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().to(torch.float32).reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.round(blocks * (127.0 / safe)[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(-1)[: flat.numel()].reshape(x.shape), absmax


def _dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    flat = codes.reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    values = blocks * (absmax.to(torch.float32) / 127.0)[:, None]
    return values.reshape(-1)[: flat.numel()].reshape(codes.shape)


# ----------------------------------------------------------------------------- error feedback
class ErrorFeedback:
    """Client-side error-feedback memory: what quantisation dropped is added to the next message.

    `encode_state_dict(..., error_feedback=ef)` encodes ``x + e`` and stores the new residual
    ``e = (x + e) - decode(encode(x + e))`` per key, so over rounds the decoded messages sum to the
    true ones minus the last residual (Karimireddy et al., arXiv 1901.09847). A key whose shape changed
    (the client pruned its rank) keeps the residual of its surviving leading rows / columns.

    Example:
        ```py
        >>> ef = ErrorFeedback()
        >>> msg = encode_state_dict({"w": torch.randn(8, 8)}, "int8-block16", error_feedback=ef)
        >>> sorted(ef.residual)
        ['w']
        ```
    """

    def __init__(self) -> None:
        self.residual: dict[str, torch.Tensor] = {}

    def add(self, key: str, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().to(torch.float32)
        residual = self.residual.get(key)
        if residual is None:
            return value
        if residual.shape != value.shape:
            if residual.dim() != value.dim():
                return value
            fitted = torch.zeros_like(value)
            common = tuple(slice(0, min(a, b)) for a, b in zip(residual.shape, value.shape))
            fitted[common] = residual[common]
            residual = fitted
        return value + residual.to(value.device)

    def update(self, key: str, sent: torch.Tensor, decoded: torch.Tensor) -> None:
        self.residual[key] = (sent - decoded).detach()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The residuals, to persist between a client's rounds (e.g. with safetensors)."""
        return dict(self.residual)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.residual = {key: value.detach().to(torch.float32) for key, value in state.items()}


# ----------------------------------------------------------------------------- encode / decode
def encode_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    fmt: str | MessageFormat | None = DEFAULT_MESSAGE_FORMAT,
    *,
    error_feedback: ErrorFeedback | None = None,
) -> dict[str, torch.Tensor]:
    """Encode floating-point tensors into the tensors of a `fmt` message (contiguous, on CPU).

    Example:
        ```py
        >>> encode_state_dict({"w": torch.ones(2, 2)}, "bf16")["w"].dtype
        torch.bfloat16
        ```
    """
    parsed = parse_message_format(fmt)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise MessageFormatError(f"Cannot encode {key!r}: only floating-point tensors travel in adapter messages.")
        if key.endswith(SCALE_SUFFIX):
            raise MessageFormatError(f"Key {key!r} ends with the reserved suffix {SCALE_SUFFIX!r}; rename it.")
        value = error_feedback.add(key, tensor) if error_feedback is not None else tensor.detach().to(torch.float32)
        value = value.cpu()
        if not all_finite(value):
            raise MessageFormatError(f"Cannot encode {key!r}: it holds NaN or inf values.")
        if parsed.kind == "int8":
            codes, absmax = _quantize_blockwise(value, parsed.block_size)
            out[key] = codes.contiguous()
            out[key + SCALE_SUFFIX] = absmax.contiguous()
            decoded = _dequantize_blockwise(codes, absmax, parsed.block_size)
        else:
            dtype = _FLOAT_DTYPES[parsed.kind]
            cast = value.to(dtype)
            if not all_finite(cast):
                raise MessageFormatError(
                    f"Cannot encode {key!r} as {parsed.name}: values exceed its range "
                    f"(max {torch.finfo(dtype).max:g}); use bf16 or fp32."
                )
            out[key] = cast.contiguous()
            decoded = cast.to(torch.float32)
        if error_feedback is not None:
            error_feedback.update(key, value, decoded)
    return out


def decode_state_dict(
    tensors: Mapping[str, torch.Tensor], fmt: str | MessageFormat | None = DEFAULT_MESSAGE_FORMAT
) -> dict[str, torch.Tensor]:
    """Check `tensors` against format `fmt` and decode them to float32 (hostile input: every check raises).

    Raises `MessageFormatError` for a dtype the format does not allow, a missing or extra scale tensor,
    a scale tensor of the wrong shape / dtype or with negative / NaN / inf entries, int8 codes of -128,
    or decoded values that are not finite.

    Example:
        ```py
        >>> decode_state_dict({"w": torch.ones(2, dtype=torch.bfloat16)}, "bf16")["w"].dtype
        torch.float32
        ```
    """
    spec = message_spec(fmt)
    name = spec.format.name
    values = {key: t for key, t in tensors.items() if not spec.is_scale_key(key)}
    scales = {key: t for key, t in tensors.items() if spec.is_scale_key(key)}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in values.items():
        dtype = _SAFETENSORS_DTYPE.get(tensor.dtype, str(tensor.dtype))
        if dtype not in spec.value_dtypes:
            raise MessageFormatError(
                f"{key!r} is {dtype} but the declared message_format {name!r} allows only "
                f"{sorted(spec.value_dtypes)}; encode the upload with peft_hetlora.federated.upload.encode_message."
            )
        if spec.scale_suffix is None:
            decoded = tensor.to(torch.float32)
        else:
            scale_key = spec.scale_key(key)
            scale = scales.pop(scale_key, None)
            if scale is None:
                raise MessageFormatError(f"{key!r} is int8 but its scale tensor {scale_key!r} is missing.")
            want = spec.scale_shape(tuple(tensor.shape))
            if _SAFETENSORS_DTYPE.get(scale.dtype) not in spec.scale_dtypes or tuple(scale.shape) != want:
                raise MessageFormatError(
                    f"{scale_key!r} must be float32 of shape {want} (one absmax per block of "
                    f"{spec.format.block_size}), got {scale.dtype} {tuple(scale.shape)}."
                )
            if not all_finite(scale) or (scale < 0).any():
                raise MessageFormatError(f"{scale_key!r} holds NaN, inf or negative scales; rejecting the upload.")
            if (tensor == -128).any():
                raise MessageFormatError(f"{key!r} holds the int8 code -128; symmetric codes lie in [-127, 127].")
            decoded = _dequantize_blockwise(tensor, scale, spec.format.block_size)
        if not all_finite(decoded):
            raise MessageFormatError(f"{key!r} decodes to NaN or inf values; rejecting the upload.")
        out[key] = decoded
    if scales:
        raise MessageFormatError(
            f"Scale tensors without a matching int8 tensor: {sorted(scales)[:3]}; every '<key>{SCALE_SUFFIX}' "
            "needs '<key>'."
        )
    return out


def encode_message(
    state_dict: Mapping[str, torch.Tensor],
    fmt: str | MessageFormat | None = DEFAULT_MESSAGE_FORMAT,
    *,
    error_feedback: ErrorFeedback | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """The safetensors bytes of a `fmt` message (its length is what the upload costs).

    The format is recorded in the header metadata (`METADATA_KEY`); the client still declares it in
    ``client.json`` (`MESSAGE_FORMAT_FIELD`), and the server trusts the declaration, not the file.

    Example:
        ```py
        >>> len(encode_message({"w": torch.zeros(64)}, "bf16")) < len(encode_message({"w": torch.zeros(64)}))
        True
        ```
    """
    parsed = parse_message_format(fmt)
    tensors = encode_state_dict(state_dict, parsed, error_feedback=error_feedback)
    header = {"format": "pt", **dict(metadata or {}), METADATA_KEY: parsed.name}
    return save_safetensors(tensors, metadata=header)


def decode_message(data: bytes, fmt: str | MessageFormat | None = DEFAULT_MESSAGE_FORMAT) -> dict[str, torch.Tensor]:
    """Parse safetensors `data` declared as format `fmt` and decode it to float32 (see `decode_state_dict`).

    Example:
        ```py
        >>> decode_message(encode_message({"w": torch.ones(3)}, "fp16"), "fp16")["w"]
        tensor([1., 1., 1.])
        ```
    """
    spec = message_spec(fmt)
    try:
        tensors = load_safetensors(bytes(data))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise MessageFormatError(f"The message is not a valid safetensors file: {err}") from None
    recorded = _header_metadata(data).get(METADATA_KEY)
    if recorded is not None and recorded != spec.format.name:
        raise MessageFormatError(
            f"The message says it is {recorded[:40]!r} but the client declared {spec.format.name!r}; they must agree."
        )
    return decode_state_dict(tensors, spec.format)


def _header_metadata(data: bytes) -> dict[str, str]:
    size = int.from_bytes(bytes(data[:8]), "little")
    try:
        meta = json.loads(bytes(data[8 : 8 + size])).get("__metadata__") or {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def payload_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data (no header) in an encoded message: sum of numel * itemsize.

    Example:
        ```py
        >>> payload_nbytes(encode_state_dict({"w": torch.zeros(128)}, "int8-block64"))  # 128 + 2 * 4
        136
        ```
    """
    return sum(t.numel() * t.element_size() for t in tensors.values())
