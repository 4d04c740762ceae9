"""Where a federation keeps its adapters: the `AdapterStore` protocol and what both backends share.

Two backends implement the protocol and pass the same contract tests (`peft_hetlora.federated.stores`):

- `LocalStore` (`stores/local.py`): a folder (the embedded default).
- `HubStore` (`stores/hub.py`): a Hugging Face Hub model repo per federation.

Layout (both backends; the file names come from `peft_hetlora.utils.constants`)::

    federation.json                      base model, adapter config, r_min, r_max, method, round policy
    README.md                            model card with the round history
    adapter_model.safetensors, adapter_config.json, round.json     the latest global adapter
    rounds/<t>/global/                   the global adapter clients of round t start from (+ round.json)
    rounds/<t>/staged-global/            the aggregate of round t - 1, staged before it is published
    rounds/<t>/clients/<id>/             adapter_model.safetensors + client.json (+ adapter_config.json)
    rounds/<t>/summary.json              the coordinator's decision record for round t

Round protocol: the coordinator publishes global `t` (with `round.json` naming the participants), clients
upload to `rounds/t/clients/<id>/`, the coordinator writes `summary.json` of round `t` first and then publishes
global `t + 1`.

Example:
    ```py
    >>> validate_client_id("alice-01"), check_round(3)
    ('alice-01', 3)
    >>> CLIENT_FILES
    ('adapter_model.safetensors', 'client.json', 'adapter_config.json')
    ```
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ...utils.constants import ADAPTER_FILE, CLIENT_FILE, CONFIG_FILE, ROUND_FILE
from ...utils.errors import HetLoRAError

__all__ = [
    "CLIENT_FILES",
    "STAGED_GLOBAL",
    "AdapterStore",
    "ClientUploadNotFoundError",
    "GlobalAdapter",
    "GlobalNotPublishedError",
    "StoreNotFoundError",
    "check_round",
    "client_files",
    "dump_json",
    "file_sha256",
    "global_files",
    "json_text",
    "validate_client_id",
]

# The only files a client upload may carry (no pickle, nothing else travels).
CLIENT_FILES = (ADAPTER_FILE, CLIENT_FILE, CONFIG_FILE)
#: the folder of a round that holds its aggregate before it is published (`rounds/<t>/staged-global/`)
STAGED_GLOBAL = "staged-global"

_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class StoreNotFoundError(HetLoRAError, FileNotFoundError):
    """The store (folder or Hub repo) does not exist yet."""


class GlobalNotPublishedError(HetLoRAError, LookupError):
    """No global adapter is published for the requested round (the coordinator publishes first)."""


class ClientUploadNotFoundError(HetLoRAError, LookupError):
    """No complete upload from this client for this round."""


@dataclass(frozen=True)
class GlobalAdapter:
    """A published global adapter.

    Attributes:
        round: the round whose clients start from this adapter.
        revision: sha256 (hex) of `adapter_model.safetensors`; clients report it as `global_revision`.
        path: a local folder with `adapter_model.safetensors`, `adapter_config.json` and `round.json`.

    Example:
        ```python
        g = store.latest_global()
        model = PeftModel.from_pretrained(base, g.path)
        ```
    """

    round: int
    revision: str
    path: Path


@runtime_checkable
class AdapterStore(Protocol):
    """What the coordinator and the clients need from a store. See the module docstring for the layout.

    Optional methods the coordinator uses when a store has them (both built-in stores do):
    `stage_global(round_idx, folder) -> sha256` and `staged_global(round_idx) -> Path | None` (the aggregate is
    staged before the summary names it, so a restart finishes the publish without re-reading uploads), and
    `clean_temporary_files() -> list[Path]` (what killed writers left behind).

    A store need not subclass this: any class with these methods is one. `get_global` and `latest_global` take the
    keyword `server_state` (the clients pass False); a store written before it existed still works with the
    client callbacks, which call it without the keyword and warn once (`FutureWarning`: add
    `*, server_state: bool = True`).
    """

    def read_federation(self) -> dict | None:
        """The federation's `federation.json`, or None before the coordinator wrote it."""

    def write_federation(self, federation: dict) -> None:
        """Write (or replace) `federation.json`."""

    def publish_global(self, round_idx: int, folder: str | Path) -> str:
        """Publish the global adapter clients of round `round_idx` start from; return its revision (sha256).

        Writes `rounds/<t>/global/` and, when `t` is the highest published round, refreshes the copy at the root.
        Idempotent: publishing the same adapter again returns the same revision; a different adapter for an
        already published round raises ValueError.
        """

    def latest_global(self, *, server_state: bool = True) -> GlobalAdapter | None:
        """The highest published round, or None when nothing is published yet (`server_state`: see `get_global`)."""

    def get_global(self, round_idx: int, *, server_state: bool = True) -> GlobalAdapter:
        """The global adapter of round `round_idx`; raises GlobalNotPublishedError if there is none.

        `server_state=False` is the clients' view: the folder need not hold `SERVER_STATE_FILE` (the server
        optimizer's state, which only the coordinator reads; a remote store does not download it).
        """

    def upload_client(self, round_idx: int, client_id: str, folder: str | Path) -> None:
        """Upload a client's result (all-or-nothing; a re-upload replaces the previous one)."""

    def list_client_uploads(self, round_idx: int) -> list[str]:
        """Sorted ids of the clients with a complete upload for the round."""

    def download_client(self, round_idx: int, client_id: str) -> Path:
        """A local folder with the client's (untrusted) files; raises ClientUploadNotFoundError if absent."""

    def write_summary(self, round_idx: int, summary: dict) -> None:
        """Write `rounds/<t>/summary.json` (the coordinator's decision record of round t)."""

    def read_summary(self, round_idx: int) -> dict | None:
        """The summary of round t, or None."""


def validate_client_id(client_id: str) -> str:
    """Check that a client id is safe to use as a path component and a repo-name part; return it.

    Allowed: 1 to 64 characters from letters, digits, `_`, `.`, `-`, starting with a letter or a digit, no `..`.

    Example:
        ```python
        validate_client_id("alice-01")   # "alice-01"
        validate_client_id("../etc")     # ValueError
        ```
    """
    if not isinstance(client_id, str) or not _CLIENT_ID_RE.fullmatch(client_id) or ".." in client_id:
        raise ValueError(
            f"Invalid client id {client_id!r}: use 1 to 64 characters from letters, digits, '_', '.' and '-', "
            "starting with a letter or a digit, without '..'."
        )
    return client_id


def check_round(round_idx: int) -> int:
    """Check that a round index is a non-negative int; return it.

    Example:
        ```py
        >>> check_round(0)
        0
        >>> check_round(-1)
        Traceback (most recent call last):
        ValueError: Invalid round index -1: rounds are numbered 0, 1, 2, ...
        ```
    """
    if isinstance(round_idx, bool) or not isinstance(round_idx, int) or round_idx < 0:
        raise ValueError(f"Invalid round index {round_idx!r}: rounds are numbered 0, 1, 2, ...")
    return round_idx


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file, read in chunks.

    Example:
        ```py
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = path.write_bytes(b"abc")
        >>> file_sha256(path)[:16]
        'ba7816bf8f01cfea'
        ```
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_text(
    obj: Any, *, indent: int | None = None, sort_keys: bool = False, default: Any = None, nonfinite: str = "error"
) -> str:
    """The one JSON writer of the project: strict JSON (RFC 8259), never `NaN` / `Infinity`.

    `nonfinite="error"` raises `ValueError` naming where a non-finite number sits (fix the producer);
    `"null"` writes those numbers as `null` (for logs of measurements that may legitimately overflow).

    Example:
        ```py
        >>> json_text({"loss": 1.5})
        '{"loss": 1.5}'
        >>> json_text({"ppl": float("inf")}, nonfinite="null")
        '{"ppl": null}'
        ```
    """
    if nonfinite not in ("error", "null"):
        raise ValueError(f"nonfinite must be 'error' or 'null', got {nonfinite!r}.")
    if nonfinite == "null":
        obj = _nonfinite_to_null(obj)
    try:
        return json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default, allow_nan=False)
    except ValueError as err:
        where = _first_nonfinite(obj)
        if where is None:
            raise
        raise ValueError(f"Refusing to write non-finite number {where[1]!r} at {where[0] or '<root>'} as JSON "
                         "(strict JSON has no NaN/Infinity): compute it safely or record null with a reason.") from err


def _nonfinite_to_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _nonfinite_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nonfinite_to_null(v) for v in obj]
    return obj


def _first_nonfinite(obj: Any, path: str = "") -> tuple[str, float] | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return path, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _first_nonfinite(v, f"{path}.{k}" if path else str(k))
        if found is not None:
            return found
    return None


def dump_json(obj: Any, *, sort_keys: bool = False) -> bytes:
    """The bytes the stores write for a JSON document (strict, indented, trailing newline); see `json_text`.

    Example:
        ```py
        >>> dump_json({"round": 3}).splitlines()
        [b'{', b'  "round": 3', b'}']
        ```
    """
    return (json_text(obj, indent=2, sort_keys=sort_keys) + "\n").encode()


def global_files(folder: str | Path, round_idx: int) -> dict[str, Path]:
    """The files of a global adapter folder to publish (top-level regular files, no hidden ones), checked.

    Requires `adapter_model.safetensors` and `adapter_config.json`; a `round.json`, if present, must be a JSON
    object whose "round" (if given) equals `round_idx`.

    Example:
        ```py
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("adapter_model.safetensors", "adapter_config.json"):
        ...     _ = (folder / name).write_bytes(b"{}")
        >>> sorted(global_files(folder, 0))
        ['adapter_config.json', 'adapter_model.safetensors']
        ```
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Global adapter folder {folder} does not exist.")
    files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    missing = [name for name in (ADAPTER_FILE, CONFIG_FILE) if name not in files]
    if missing:
        raise FileNotFoundError(
            f"Global adapter folder {folder} lacks {', '.join(missing)}: save the adapter there with "
            "`save_pretrained` (safetensors) before publishing."
        )
    if ROUND_FILE in files:
        info = json.loads(files[ROUND_FILE].read_text())
        if not isinstance(info, dict) or info.get("round", round_idx) != round_idx:
            raise ValueError(
                f"{files[ROUND_FILE]} says round {info.get('round')!r}, but round {round_idx} is being published."
            )
    return files


def client_files(folder: str | Path) -> dict[str, Path]:
    """The files of a client upload folder (only the names in CLIENT_FILES travel), checked.

    Example:
        ```py
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "adapter_model.safetensors").write_bytes(b"")
        >>> _ = (folder / "client.json").write_text('{"client_id": "alice"}')
        >>> sorted(client_files(folder))
        ['adapter_model.safetensors', 'client.json']
        ```
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Client upload folder {folder} does not exist.")
    files = {name: folder / name for name in CLIENT_FILES if (folder / name).is_file()}
    missing = [name for name in (ADAPTER_FILE, CLIENT_FILE) if name not in files]
    if missing:
        raise FileNotFoundError(
            f"Client upload folder {folder} lacks {', '.join(missing)}: save the adapter with `save_pretrained` "
            "and write client.json (see FederatedClientCallback) before uploading."
        )
    try:
        info = json.loads(files[CLIENT_FILE].read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{files[CLIENT_FILE]} is not valid JSON: {e}") from e
    if not isinstance(info, dict):
        raise ValueError(f"{files[CLIENT_FILE]} must hold a JSON object.")
    return files
