"""Validation of one untrusted client upload before anything of it is loaded into memory as tensors.

A client upload folder holds `adapter_model.safetensors` and `client.json` (and optionally
`adapter_config.json`, which is only checked to be small, valid JSON). Everything else, pickle
files above all, is refused: nothing here ever calls `torch.load`. The safetensors header is parsed
by hand (8-byte little-endian length, bounded JSON header) and checked against the global adapter's
key set, the dtype whitelist, the shapes implied by the declared rank and consistent data offsets;
only then are the tensors decoded (from the bytes already read, so the file cannot change between
check and load) and checked to be finite.

Example:
    ```py
    >>> spec = UploadSpec.from_state_dict(global_state_dict, r_min=2, r_max=16)  # doctest: +SKIP
    >>> try:
    ...     update = validate_upload(folder, spec, client_id="alice", round_idx=3)  # doctest: +SKIP
    ... except RejectedUpload as err:
    ...     print(err.reason)
    ```
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from ...utils.constants import ADAPTER_FILE, CLIENT_FILE, CONFIG_FILE
from ...utils.errors import RankError
from ...utils.ranks import check_rank, is_rank
from ...utils.untrusted_text import brief, one_line
from ..adapter import CORE_SUFFIX, check_components, is_prefix
from ..aggregation import ClientUpdate, all_finite
from .bytes import RejectedUpload, TensorInfo, loads_strict_json, parse_header_json, read_safetensors_header
from .formats import (
    DEFAULT_MESSAGE_FORMAT,
    MESSAGE_FORMAT_FIELD,
    MessageFormatError,
    MessageSpec,
    decode_message,
    message_spec,
    parse_message_format,
)

__all__ = [
    "ALLOWED_DTYPES",
    "ALLOWED_FILES",
    "DEFAULT_MAX_EXAMPLES",
    "DEFAULT_MAX_JSON_BYTES",
    "LORA_A_SUFFIX",
    "LORA_B_SUFFIX",
    "PICKLE_SUFFIXES",
    "UploadSpec",
    "check_report",
    "update_from_bytes",
    "validate_client_json",
    "validate_update",
]

#: the only files an upload may hold (everything else, pickle above all, is refused)
ALLOWED_FILES = (ADAPTER_FILE, CLIENT_FILE, CONFIG_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".h5", ".msgpack")

# dtypes of an upload that declares no message_format (I8 only travels in a declared int8 message)
ALLOWED_DTYPES = frozenset({"F32", "F16", "BF16"})

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"

DEFAULT_MAX_EXAMPLES = 10**9
DEFAULT_MAX_JSON_BYTES = 64 * 1024
_HEADER_BASE_BYTES = 4096
_HEADER_BYTES_PER_KEY = 512



def _split_module_keys(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, int]], dict]:
    """(modules {name: (d_in, d_out)}, extras {key: shape}) from the shapes of a saved-format adapter."""
    modules: dict[str, tuple[int, int]] = {}
    extras: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if key.endswith(LORA_A_SUFFIX):
            name = key[: -len(LORA_A_SUFFIX)]
            b_key = name + LORA_B_SUFFIX
            if b_key not in shapes:
                raise ValueError(f"Adapter has {key} but no {b_key}.")
            a_shape, b_shape = tuple(shape), tuple(shapes[b_key])
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise ValueError(f"Module {name}: A {a_shape} and B {b_shape} are not (r, d_in) and (d_out, r).")
            modules[name] = (int(a_shape[1]), int(b_shape[0]))
        elif key.endswith(LORA_B_SUFFIX):
            if key[: -len(LORA_B_SUFFIX)] + LORA_A_SUFFIX not in shapes:
                raise ValueError(f"Adapter has {key} but no matching lora_A weight.")
        else:
            extras[key] = tuple(int(d) for d in shape)
    if not modules:
        raise ValueError("Adapter has no `*.lora_A.weight` / `*.lora_B.weight` pairs.")
    return modules, extras


@dataclass(frozen=True)
class UploadSpec:
    """What a valid upload of this federation looks like.

    `modules` maps each LoRA module (key prefix before `.lora_A.weight`) to (d_in, d_out); `extras`
    maps dense extra keys to their exact shapes. `max_upload_bytes=None` means twice the size of an
    r_max adapter stored as F32 (plus header room). `message_formats` lists the compressed message formats
    (`formats.parse_message_format` names) a client may declare in client.json; None allows all. Build it
    from the global adapter with `from_state_dict` or `from_safetensors`.

    Example:
        ```py
        >>> import torch
        >>> sd = {"m.lora_A.weight": torch.zeros(8, 32), "m.lora_B.weight": torch.zeros(16, 8)}
        >>> spec = UploadSpec.from_state_dict(sd, r_min=1, r_max=8)
        >>> spec.modules, spec.max_upload_bytes
        ({'m': (32, 16)}, 8200)
        ```
    """

    modules: Mapping[str, tuple[int, int]]
    r_min: int
    r_max: int
    extras: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    max_upload_bytes: int | None = None
    max_header_bytes: int | None = None
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES
    max_examples: int = DEFAULT_MAX_EXAMPLES
    allow_per_module_ranks: bool = False
    dtypes: frozenset = ALLOWED_DTYPES
    message_formats: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.message_formats is not None:
            names = tuple(parse_message_format(name).name for name in self.message_formats)
            if not names:
                raise ValueError("message_formats must name at least one format (or None for all).")
            object.__setattr__(self, "message_formats", names)
        check_rank(self.r_max, 1, 1 << 30, what="r_max")
        check_rank(self.r_min, 1, self.r_max, what="r_min", hi_name="r_max")
        unknown = set(self.dtypes) - ALLOWED_DTYPES
        if unknown:
            raise ValueError(f"Unsupported dtypes {sorted(unknown)}; choose among {sorted(ALLOWED_DTYPES)}.")
        if self.max_header_bytes is None:
            n_keys = 2 * len(self.modules) + len(self.extras)
            object.__setattr__(self, "max_header_bytes", _HEADER_BASE_BYTES + _HEADER_BYTES_PER_KEY * n_keys)
        if self.max_upload_bytes is None:
            object.__setattr__(self, "max_upload_bytes", 2 * self.r_max_adapter_bytes() + 8 + self.max_header_bytes)

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, tuple[int, ...]], *, r_min: int, r_max: int, **kwargs: Any
    ) -> UploadSpec:
        """Spec from {key: shape} of the global adapter (saved key format)."""
        modules, extras = _split_module_keys(shapes)
        return cls(modules=modules, extras=extras, r_min=r_min, r_max=r_max, **kwargs)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], *, r_min: int, r_max: int, **kwargs: Any
    ) -> UploadSpec:
        """Spec from the global adapter's state dict."""
        return cls.from_shapes({k: tuple(v.shape) for k, v in state_dict.items()}, r_min=r_min, r_max=r_max, **kwargs)

    @classmethod
    def from_safetensors(cls, path: str | Path, *, r_min: int, r_max: int, **kwargs: Any) -> UploadSpec:
        """Spec from the header of the global adapter's safetensors file (no tensor is loaded)."""
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes).")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 2**20:
                raise ValueError(f"{path}: safetensors header of {n} bytes is implausibly large.")
            header = f.read(n)
        entries = parse_header_json(header)
        return cls.from_shapes({k: v.shape for k, v in entries.items()}, r_min=r_min, r_max=r_max, **kwargs)

    @property
    def expected_core_keys(self) -> set[str]:
        """Every key a valid core upload holds (docs/methods.md#core-clients): one core per module plus the extras."""
        return set(self.extras) | {name + CORE_SUFFIX for name in self.modules}

    @property
    def expected_keys(self) -> set[str]:
        """Every key a valid upload holds: A and B of each module plus the dense extras."""
        keys = set(self.extras)
        for name in self.modules:
            keys.add(name + LORA_A_SUFFIX)
            keys.add(name + LORA_B_SUFFIX)
        return keys

    def r_max_adapter_bytes(self) -> int:
        """Bytes of the tensors of an r_max adapter in F32."""
        lora = self.r_max * sum(d_in + d_out for d_in, d_out in self.modules.values())
        extra = sum(math.prod(shape) for shape in self.extras.values())
        return 4 * (lora + extra)


def _check_tensors_against_spec(
    entries: Mapping[str, TensorInfo], spec: UploadSpec, *, rank_in: int, rank_out: int,
    message: MessageSpec | None = None,
) -> dict[str, int]:
    """Keys, dtypes and shapes against the spec (and the declared message format); returns {module: rank}."""
    keys = set(entries)
    expected = spec.expected_keys if message is None else message.expected_keys(spec.expected_keys)
    _check_keys_dtypes_extras(entries, spec, keys, expected, message,
                              mismatch="adapter keys do not match the global adapter")
    ranks: dict[str, int] = {}
    for name, (d_in, d_out) in spec.modules.items():
        a, b = entries[name + LORA_A_SUFFIX].shape, entries[name + LORA_B_SUFFIX].shape
        if len(a) != 2 or len(b) != 2 or a[1] != d_in or b[0] != d_out or a[0] != b[1]:
            raise RejectedUpload(
                f"module {name}: lora_A {list(a)} / lora_B {list(b)} are not (k, {d_in}) / ({d_out}, k)"
            )
        k = _rank_or_reject(a[0], 1, spec.r_max, what=f"module {name}: rank")
        if spec.allow_per_module_ranks:
            if k > rank_in:
                raise RejectedUpload(f"module {name}: rank {k} above the declared rank_in={rank_in}")
        elif k != rank_out:
            raise RejectedUpload(f"module {name}: rank {k} differs from the declared rank_out={rank_out}")
        ranks[name] = k
    return ranks



def _check_keys_dtypes_extras(entries: Mapping[str, TensorInfo], spec: UploadSpec, keys: set[str],
                              expected: set[str], message: MessageSpec | None, *, mismatch: str) -> None:
    """The checks every upload kind shares: exactly the expected keys (``mismatch`` opens the error), the allowed
    dtypes (or the declared message format's) and the shapes of the dense extras."""
    missing, extra = sorted(expected - keys), sorted(keys - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[:3]}")
        if extra:
            parts.append(f"unexpected {len(extra)} key(s) e.g. {', '.join(brief(k) for k in extra[:3])}")
        raise RejectedUpload(f"{mismatch}: " + "; ".join(parts))
    if message is None:
        for key, info in entries.items():
            if info.dtype not in spec.dtypes:
                raise RejectedUpload(
                    f"tensor {brief(key)} has dtype {one_line(info.dtype, limit=16)}; allowed: {sorted(spec.dtypes)}"
                )
    else:
        _check_message_tensors(entries, message)
    for key, shape in spec.extras.items():
        if entries[key].shape != tuple(shape):
            raise RejectedUpload(f"tensor {key!r} has shape {list(entries[key].shape)}, expected {list(shape)}")

def _check_core_tensors(entries: Mapping[str, TensorInfo], spec: UploadSpec, *, core_rank: int,
                        message: MessageSpec | None = None) -> None:
    """A core upload: exactly one ``(core_rank, core_rank)`` core per module (``<module>.lora_core.weight``) and the
    extras, in the allowed (or declared) dtypes."""
    keys = set(entries)
    expected = spec.expected_core_keys if message is None else message.expected_keys(spec.expected_core_keys)
    _check_keys_dtypes_extras(entries, spec, keys, expected, message,
                              mismatch="core upload keys do not match the global adapter's modules (one "
                                       f"'<module>{CORE_SUFFIX}' each)")
    for name in spec.modules:
        shape = list(entries[name + CORE_SUFFIX].shape)
        if shape != [core_rank, core_rank]:
            raise RejectedUpload(f"module {name}: core {shape} is not the declared core_rank x core_rank "
                                 f"[{core_rank}, {core_rank}]")


def _check_message_tensors(entries: Mapping[str, TensorInfo], message: MessageSpec) -> None:
    """Every value tensor in the declared format's dtypes; every int8 scale float32 of one entry per block."""
    name = message.format.name
    for key, info in entries.items():
        if message.is_scale_key(key):
            value = entries[key[: -len(message.scale_suffix)]]
            want = message.scale_shape(value.shape)
            if info.dtype not in message.scale_dtypes or info.shape != want:
                raise RejectedUpload(
                    f"tensor {brief(key)} is {one_line(info.dtype, limit=16)} {list(info.shape)} but message_format "
                    f"{name!r} needs float32 scales of shape {list(want)} (one absmax per block)"
                )
        elif info.dtype not in message.value_dtypes:
            raise RejectedUpload(
                f"tensor {brief(key)} is {one_line(info.dtype, limit=16)} but client.json declares message_format "
                f"{name!r}, which allows only {sorted(message.value_dtypes)}; encode the upload with "
                "peft_hetlora.federated.upload.encode_message (or declare the format it has)"
            )


def _rank_or_reject(value: Any, lo: int, hi: int, *, what: str, lo_name: str = "") -> int:
    try:
        return check_rank(value, lo, hi, what=what, lo_name=lo_name, hi_name="r_max")
    except RankError as err:
        raise RejectedUpload(str(err)) from None


def _check_number(meta: Mapping, name: str, *, non_negative: bool = False) -> None:
    value = meta.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        raise RejectedUpload(f"client.json {name} must be a finite number or null, got {brief(value)}")
    if non_negative and value < 0:
        raise RejectedUpload(f"client.json {name} must be >= 0, got {brief(value)}")


def validate_client_json(
    meta: Any,
    spec: UploadSpec,
    *,
    client_id: str,
    round_idx: int,
    assigned_rank: int | None = None,
    assigned_components: Sequence[int] | None = None,
    assigned_core: int | None = None,
) -> dict:
    """Check the fields of a parsed client.json; returns it (a dict) or raises `RejectedUpload`.

    ``core_rank`` (a core client's r_c, docs/methods.md#core-clients) is accepted only when the round asked this
    client for a core (``assigned_core``), as an integer in ``[1, assigned_core]``; a client asked for a core must
    report one, and a core upload has no ``components``.

    The optional ``components`` field (a window client's global index of each uploaded slot,
    docs/design.md#component-rule) must
    pass `components.check_components` with budget ``rank_in`` and, when the round assigned components
    (``assigned_components``; else the prefix ``range(assigned_rank)``), only those; its length must equal
    ``rank_out``. A client the round assigned a window (not a prefix) must report ``components``.

    Example:
        ```py
        >>> spec = UploadSpec(modules={"m": (4, 4)}, r_min=1, r_max=8)
        >>> meta = {"client_id": "a", "round": 0, "rank_in": 4, "rank_out": 3, "num_examples": 10}
        >>> validate_client_json(meta, spec, client_id="a", round_idx=0)["rank_out"]
        3
        ```
    """
    if not isinstance(meta, dict):
        raise RejectedUpload("client.json is not a JSON object")
    if meta.get("client_id") != client_id:
        raise RejectedUpload(
            f"client.json client_id {brief(meta.get('client_id'))} does not match the upload's {brief(client_id)}"
        )
    if not is_rank(meta.get("round"), round_idx, round_idx):  # an integer (not a bool) equal to round_idx
        raise RejectedUpload(f"client.json round {brief(meta.get('round'))} does not match round {round_idx}")
    num = meta.get("num_examples")
    if not is_rank(num, 1, spec.max_examples):
        raise RejectedUpload(f"client.json num_examples must be an integer in [1, {spec.max_examples}], got "
                             f"{brief(num)}")
    for name in ("rank_in", "rank_out"):
        _rank_or_reject(meta.get(name), spec.r_min, spec.r_max, what=f"client.json {name}", lo_name="r_min")
    if meta["rank_out"] > meta["rank_in"]:
        raise RejectedUpload(f"client.json rank_out {meta['rank_out']} is above rank_in {meta['rank_in']}")
    if assigned_rank is not None and meta["rank_in"] > assigned_rank:
        raise RejectedUpload(f"client.json rank_in {meta['rank_in']} is above the rank {assigned_rank} assigned "
                             "to this client for the round")
    max_rank = meta.get("max_rank")
    if max_rank is not None:
        _rank_or_reject(max_rank, 1, spec.r_max, what="client.json max_rank (or leave it out)")
        if max_rank < spec.r_min:
            raise RejectedUpload(f"client.json max_rank {max_rank} is below the federation's r_min={spec.r_min}: this "
                                 "device cannot train the smallest rank the federation allows")
    _check_report_components(meta, spec, assigned_rank, assigned_components)
    _check_report_core(meta, assigned_core)
    _check_message_format(meta, spec)
    _check_number(meta, "train_loss")
    _check_number(meta, "tail_norm_start", non_negative=True)
    _check_number(meta, "tail_norm_end", non_negative=True)
    for name in ("global_revision", "peft_hetlora_version"):
        value = meta.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 256):
            raise RejectedUpload(f"client.json {name} must be a string of at most 256 characters or null")
    return meta


def _check_report_core(meta: dict, assigned_core: int | None) -> None:
    raw = meta.get("core_rank")
    if assigned_core is None:
        if raw is not None:
            raise RejectedUpload("client.json reports a core_rank but the round did not ask this client for a core; "
                                 "train its rank-k factors and upload lora_A / lora_B")
        return
    if raw is None:
        raise RejectedUpload(f"the round asked this client for a core of rank <= {assigned_core} but client.json "
                             f"reports no core_rank; train the core and upload '<module>{CORE_SUFFIX}' tensors")
    _rank_or_reject(raw, 1, assigned_core, what="client.json core_rank", lo_name="1")
    if meta.get("components") is not None:
        raise RejectedUpload("client.json reports components with a core_rank; a core upload has no components")


def _format_not_allowed(name: str, spec: UploadSpec, *, omitted: bool = False) -> RejectedUpload:
    how = (f" (client.json has no {MESSAGE_FORMAT_FIELD}, which means {name!r})" if omitted else "")
    return RejectedUpload(f"client.json message_format {name!r} is not allowed by this federation (allowed: "
                          f"{list(spec.message_formats or ())}){how}; encode the upload in one of those")


def _check_message_format(meta: dict, spec: UploadSpec) -> None:
    raw = meta.get(MESSAGE_FORMAT_FIELD)
    if raw is None:  # no format declared: a plain fp32 upload, restricted as a declared "fp32" is
        if spec.message_formats is not None and DEFAULT_MESSAGE_FORMAT not in spec.message_formats:
            raise _format_not_allowed(DEFAULT_MESSAGE_FORMAT, spec, omitted=True)
        return
    if not isinstance(raw, str) or len(raw) > 40:
        raise RejectedUpload(f"client.json {MESSAGE_FORMAT_FIELD} must be a short string such as 'bf16', got "
                             f"{brief(raw)}")
    try:
        name = parse_message_format(raw).name
    except MessageFormatError as err:
        raise RejectedUpload(f"client.json {err}") from None
    if spec.message_formats is not None and name not in spec.message_formats:
        raise _format_not_allowed(name, spec)
    meta[MESSAGE_FORMAT_FIELD] = name


def _check_report_components(meta: dict, spec: UploadSpec, assigned_rank: int | None,
                             assigned_components: Sequence[int] | None) -> None:
    raw = meta.get("components")
    if raw is None:
        if assigned_components is not None and not is_prefix(list(assigned_components)):
            raise RejectedUpload(
                f"the round assigned this client the components {list(assigned_components)[:16]} but client.json "
                "reports none (it trained the prefix); train the assigned window and report `components`"
            )
        return
    if assigned_components is not None:
        allowed: Sequence[int] | None = list(assigned_components)
    else:
        allowed = range(assigned_rank) if assigned_rank is not None else None
    try:
        indices = check_components(raw, r_max=spec.r_max, budget=meta["rank_in"], allowed=allowed)
    except RankError as err:
        raise RejectedUpload(f"client.json {err}") from None
    if len(indices) != meta["rank_out"]:
        raise RejectedUpload(f"client.json components lists {len(indices)} indices but rank_out is "
                             f"{meta['rank_out']}; report one global index per uploaded component")
    meta["components"] = list(indices)


def check_report(raw: bytes, spec: UploadSpec, *, client_id: str, round_idx: int, assigned_rank: int | None = None,
                 required_rank: int | None = None, assigned_components: Sequence[int] | None = None,
                 assigned_core: int | None = None, current_revision: str | None = None) -> dict:
    """Check the raw bytes of a client.json (size, strict JSON, `validate_client_json`, `required_rank`).

    A core upload (``assigned_core``) must name ``current_revision`` (when given) as its ``global_revision``: a
    core means something only in the bases of the global it was trained in.

    The first half of `validate_update` (and of `folder.validate_upload`): what the report declares is checked
    before the (large) weights are read. Returns the parsed report or raises `RejectedUpload`.

    Example:
        ```py
        >>> spec = UploadSpec(modules={"m": (4, 4)}, r_min=1, r_max=8)
        >>> raw = b'{"client_id": "a", "round": 0, "rank_in": 4, "rank_out": 4, "num_examples": 10}'
        >>> check_report(raw, spec, client_id="a", round_idx=0)["num_examples"]
        10
        >>> check_report(raw, spec, client_id="a", round_idx=0, required_rank=8)
        Traceback (most recent call last):
        peft_hetlora.federated.upload.bytes.RejectedUpload: rank_out 4 differs from the rank 8 this method requires
        ```
    """
    if len(raw) > spec.max_json_bytes:
        raise RejectedUpload(f"{CLIENT_FILE} is {len(raw):,} bytes, above the {spec.max_json_bytes:,}-byte limit")
    meta = validate_client_json(loads_strict_json(raw, CLIENT_FILE), spec, client_id=client_id, round_idx=round_idx,
                                assigned_rank=assigned_rank, assigned_components=assigned_components,
                                assigned_core=assigned_core)
    if assigned_core is not None and current_revision is not None and meta.get("global_revision") != current_revision:
        raise RejectedUpload(f"core trained from global revision {brief(meta.get('global_revision'))}, not the "
                             f"round's {brief(current_revision)}; retrain the core from the current global")
    if required_rank is not None and meta["rank_out"] != required_rank:
        raise RejectedUpload(f"rank_out {meta['rank_out']} differs from the rank {required_rank} this method "
                             "requires")
    return meta


def update_from_bytes(data: bytes, meta: dict, spec: UploadSpec, *, client_id: str, other_bytes: int) -> ClientUpdate:
    """Check the safetensors bytes of an upload against `spec` and its checked report `meta` (`check_report`).

    The second half of `validate_update`: size, header, keys, dtypes (or the declared message format), shapes for
    the declared ranks, decoding, finite values. `other_bytes` (the report's and config's bytes) is added to the
    recorded `upload_bytes`. Returns the `ClientUpdate` (float32 tensors) or raises `RejectedUpload`.

    Example:
        ```py
        >>> import torch
        >>> from safetensors.torch import save
        >>> spec = UploadSpec(modules={"m": (4, 4)}, r_min=1, r_max=8)
        >>> meta = {"client_id": "a", "round": 0, "rank_in": 2, "rank_out": 2, "num_examples": 10}
        >>> data = save({"m.lora_A.weight": torch.ones(2, 4), "m.lora_B.weight": torch.ones(4, 2)})
        >>> update = update_from_bytes(data, meta, spec, client_id="a", other_bytes=0)
        >>> update.rank, update.metadata["upload_bytes"] == len(data)
        (2, True)
        ```
    """
    if len(data) > int(spec.max_upload_bytes):
        raise RejectedUpload(f"{ADAPTER_FILE} is {len(data):,} bytes, above the {int(spec.max_upload_bytes):,}-byte "
                             "limit")
    declared = meta.get(MESSAGE_FORMAT_FIELD)
    message = message_spec(declared) if declared is not None else None
    # int8 messages carry one scale tensor per value tensor: room for twice the keys
    header_limit = int(spec.max_header_bytes) * (2 if message is not None and message.scale_suffix else 1)
    entries = read_safetensors_header(data, max_header_bytes=header_limit)
    if meta.get("core_rank") is not None:
        _check_core_tensors(entries, spec, core_rank=meta["core_rank"], message=message)
    else:
        _check_tensors_against_spec(entries, spec, rank_in=meta["rank_in"], rank_out=meta["rank_out"],
                                    message=message)
    try:
        if message is None:
            tensors = load_safetensors_bytes(data)
        else:  # checked against the declared format, decoded to float32 before anything else sees it
            tensors = decode_message(data, message.format)
    except MessageFormatError as err:
        raise RejectedUpload(f"{ADAPTER_FILE} does not match its declared message_format: {err}") from None
    except Exception as err:  # noqa: BLE001 - any decoding failure is a rejection, never a crash
        raise RejectedUpload(f"{ADAPTER_FILE} could not be decoded: {err}") from None
    if message is not None:
        entries = {k: v for k, v in entries.items() if not message.is_scale_key(k)}
    if set(tensors) != set(entries):
        raise RejectedUpload(f"{ADAPTER_FILE} decoded to other keys than its header lists")
    state_dict: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        tensor = tensors[key]
        if not all_finite(tensor):  # one aminmax; the count only for the message
            bad = int((~torch.isfinite(tensor)).sum())
            raise RejectedUpload(f"tensor {key!r} has {bad} non-finite value(s) (NaN or Inf)")
        state_dict[key] = tensor.to(torch.float32)
    metadata = dict(meta)
    metadata["upload_bytes"] = other_bytes + len(data)
    metadata["sha256"] = hashlib.sha256(data).hexdigest()
    return ClientUpdate(
        client_id=client_id,
        state_dict=state_dict,
        rank=int(meta["rank_out"]),
        num_examples=int(meta["num_examples"]),
        metadata=metadata,
        components=meta.get("components"),
    )


def validate_update(
    adapter: bytes | Mapping[str, torch.Tensor],
    report: bytes | Mapping[str, Any],
    spec: UploadSpec,
    *,
    client_id: str,
    round_idx: int,
    assigned_rank: int | None = None,
    required_rank: int | None = None,
    assigned_components: Sequence[int] | None = None,
    assigned_core: int | None = None,
    current_revision: str | None = None,
) -> ClientUpdate:
    """Validate one in-memory upload: the adapter (safetensors bytes, or a state dict) and its report (client.json).

    The same checks as `validate_upload` (which reads a folder and calls this): the report first (strict JSON,
    ids, round, ranks, examples), then the weights (header, keys, dtypes, shapes for the declared rank, finite
    values, size). A state dict is serialised to safetensors bytes in memory first, so it is checked exactly as a
    file would be (and ``sha256`` is that of those bytes); a report dict is checked as its JSON text.

    Raises:
        RejectedUpload: with the reason for the round summary.

    Example:
        ```py
        >>> update = validate_update(state_dict, {"client_id": "a", "round": 0, "rank_in": 4, "rank_out": 4,
        ...                          "num_examples": 10}, spec, client_id="a", round_idx=0)  # doctest: +SKIP
        ```
    """
    if isinstance(report, (bytes, bytearray)):
        raw_meta = bytes(report)
    else:
        try:
            raw_meta = json.dumps(dict(report), allow_nan=True).encode()
        except (TypeError, ValueError) as err:
            raise RejectedUpload(f"{CLIENT_FILE} is not JSON-serialisable ({err})") from None
    meta = check_report(raw_meta, spec, client_id=client_id, round_idx=round_idx, assigned_rank=assigned_rank,
                        required_rank=required_rank, assigned_components=assigned_components,
                        assigned_core=assigned_core, current_revision=current_revision)
    if isinstance(adapter, (bytes, bytearray)):
        data = bytes(adapter)
    else:
        try:
            data = save_safetensors_bytes({k: v.detach().to("cpu").contiguous() for k, v in adapter.items()},
                                          metadata={"format": "pt"})
        except Exception as err:  # noqa: BLE001
            raise RejectedUpload(f"arrays are not a valid adapter state dict: {err}") from None
    return update_from_bytes(data, meta, spec, client_id=client_id, other_bytes=len(raw_meta))

