"""`LocalStore`: a federation in a folder, safe for several client processes at once.

Every write is staged next to its destination (a hidden `.tmp-*` file or folder in the same directory) and then
renamed into place, so readers never see a half-written file: a client upload is a folder
`rounds/<t>/clients/<id>/` that appears, or is replaced, in one rename (Linux swaps it with `renameat2`
`RENAME_EXCHANGE`; elsewhere the old folder is moved aside first). A published round is immutable.

Example:
    ```python
    from peft_hetlora.federated.stores import LocalStore

    store = LocalStore("runs/fed", create=True)        # the coordinator creates it; clients open it
    store.publish_global(0, "out/global-0")
    PeftModel.from_pretrained(base_model, "runs/fed")  # the root holds the latest global adapter
    ```
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ...utils.constants import ADAPTER_FILE, CLIENT_FILE, CONFIG_FILE, FEDERATION_FILE, ROUND_FILE, SUMMARY_FILE
from ...utils.errors import StoreFullError
from .base import (
    STAGED_GLOBAL,
    ClientUploadNotFoundError,
    GlobalAdapter,
    GlobalNotPublishedError,
    StoreNotFoundError,
    check_round,
    client_files,
    dump_json,
    file_sha256,
    global_files,
    validate_client_id,
)
from .model_card import MODEL_CARD, render_model_card
from .temp_files import remove_abandoned, temp_prefix

__all__ = ["LocalStore"]

F = TypeVar("F", bound=Callable[..., Any])
_TEMP_KINDS = (".tmp-", ".trash-")
_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _store_full(what: str) -> Callable[[F], F]:
    """Turn a full disk (ENOSPC, EDQUOT) met anywhere in a write into one `StoreFullError` sentence."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(self: LocalStore, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except StoreFullError:
                raise
            except OSError as e:
                if e.errno not in _FULL_ERRNOS:
                    raise
                raise _full_error(self.path, what) from e

        return wrapper  # type: ignore[return-value]

    return decorate


def _full_error(path: Path, what: str) -> StoreFullError:
    err = StoreFullError(
        f"The disk of store {path} is full while writing {what}: nothing was half-written (temporary files were "
        "removed); free some space there and run the same command again to resume."
    )
    err.errno = errno.ENOSPC
    return err


class LocalStore:
    """A federation store in a local (or shared network) folder. Implements `AdapterStore`.

    Args:
        path: the store folder.
        create: create the folder if it does not exist (the coordinator does; clients should not, so a typo in
            a client's path fails loudly instead of starting an empty federation).

    Example:
        ```python
        store = LocalStore("runs/fed", create=True)
        store.write_federation({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "r_min": 2, "r_max": 16})
        revision = store.publish_global(0, "out/global-0")
        store.upload_client(0, "alice", "out/alice-round-0")
        assert store.list_client_uploads(0) == ["alice"]
        ```
    """

    def __init__(self, path: str | Path, *, create: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            if self.path.exists():
                raise NotADirectoryError(f"Store path {self.path} exists but is not a folder.")
            if not create:
                raise StoreNotFoundError(
                    f"Store folder {self.path} does not exist. The coordinator creates it with "
                    f"LocalStore({str(self.path)!r}, create=True) (or `mkdir -p {self.path}`); clients open an "
                    "existing store."
                )
            self.path.mkdir(parents=True, exist_ok=True)
        self._sha_cache: dict[Path, tuple[int, int, str]] = {}

    def __repr__(self) -> str:
        return f"LocalStore({str(self.path)!r})"

    # ----------------------------------------------------------------------------------------- federation
    def read_federation(self) -> dict | None:
        return _read_json(self.path / FEDERATION_FILE)

    @_store_full(FEDERATION_FILE)
    def write_federation(self, federation: dict) -> None:
        _atomic_write(self.path / FEDERATION_FILE, dump_json(federation))
        self._write_card()

    # --------------------------------------------------------------------------------------------- global
    @_store_full("a global adapter")
    def publish_global(self, round_idx: int, folder: str | Path) -> str:
        round_idx = check_round(round_idx)
        files = global_files(folder, round_idx)
        revision = file_sha256(files[ADAPTER_FILE])
        round_dir = self._round_dir(round_idx)
        target = round_dir / "global"
        if not target.is_dir():
            round_dir.mkdir(parents=True, exist_ok=True)
            staged = Path(tempfile.mkdtemp(prefix=temp_prefix(".tmp-", "global"), dir=round_dir))
            with _cleanup_on_error(target, staged):
                for name, src in files.items():
                    _copy_file(src, staged / name)
                _fsync_dir(staged)
                try:
                    os.rename(staged, target)
                except OSError as e:  # published meanwhile by another process: compared below
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    shutil.rmtree(staged, ignore_errors=True)
            _fsync_dir(round_dir)
        existing = self._revision(target / ADAPTER_FILE)
        if existing != revision:
            raise ValueError(
                f"Round {round_idx} is already published in {self.path} with another adapter (revision "
                f"{existing[:12]}, this one is {revision[:12]}). A published round is immutable: publish the "
                "next round instead."
            )
        if round_idx >= max(self._published_rounds()):
            self._refresh_root(target)
        shutil.rmtree(round_dir / STAGED_GLOBAL, ignore_errors=True)
        return revision

    @_store_full("a staged global adapter")
    def stage_global(self, round_idx: int, folder: str | Path) -> str:
        """Keep the global adapter of round `round_idx` in the store before it is published; return its sha256.

        The coordinator stages the aggregate, then writes the summary that names its sha256, then publishes it:
        a coordinator killed in between finishes the publish from the staged copy without re-reading uploads.
        Staging again replaces the staged copy (a round closed again after its summary was deleted).

        Example:
            ```python
            sha = store.stage_global(4, "out/global-4")
            store.staged_global(4)   # Path to rounds/4/staged-global
            ```
        """
        round_idx = check_round(round_idx)
        files = global_files(folder, round_idx)
        round_dir = self._round_dir(round_idx)
        round_dir.mkdir(parents=True, exist_ok=True)
        target = round_dir / STAGED_GLOBAL
        staged = Path(tempfile.mkdtemp(prefix=temp_prefix(".tmp-", "staged"), dir=round_dir))
        with _cleanup_on_error(target, staged):
            for name, src in files.items():
                _copy_file(src, staged / name)
            _fsync_dir(staged)
            _install_dir(staged, target)
        _fsync_dir(round_dir)
        return file_sha256(target / ADAPTER_FILE)

    def staged_global(self, round_idx: int) -> Path | None:
        """The folder of the staged (not yet published) global adapter of round `round_idx`, or None."""
        folder = self._round_dir(check_round(round_idx)) / STAGED_GLOBAL
        return folder if (folder / ADAPTER_FILE).is_file() else None

    def clean_temporary_files(self) -> list[Path]:
        """Remove the temporary files and folders that killed writers left in the store; return them.

        Only entries whose writer is gone are removed (see `peft_hetlora.federated.stores.temp_files`): a live
        client's or coordinator's temporary file is never touched.

        Example:
            ```python
            LocalStore("runs/fed").clean_temporary_files()   # [] when nothing was left behind
            ```
        """
        folders = [self.path]
        for t in self._rounds():
            round_dir = self._round_dir(t)
            folders += [round_dir, round_dir / "clients"]
        removed: list[Path] = []
        for folder in folders:
            if _is_real_dir(folder):
                removed += remove_abandoned(folder, _TEMP_KINDS)
        return removed

    def latest_global(self, *, server_state: bool = True) -> GlobalAdapter | None:
        rounds = self._published_rounds()
        return self.get_global(max(rounds), server_state=server_state) if rounds else None

    def get_global(self, round_idx: int, *, server_state: bool = True) -> GlobalAdapter:
        """The published folder itself (nothing is copied, so `server_state` changes nothing here: a client that
        passes False reads only the adapter files, as on the Hub)."""
        round_idx = check_round(round_idx)
        folder = self._round_dir(round_idx) / "global"
        if not (folder / ADAPTER_FILE).is_file():
            raise GlobalNotPublishedError(
                f"Round {round_idx} has no global adapter in {self.path}: the coordinator must publish it first "
                f"(store.publish_global({round_idx}, folder))."
            )
        return GlobalAdapter(round=round_idx, revision=self._revision(folder / ADAPTER_FILE), path=folder)

    # -------------------------------------------------------------------------------------------- clients
    @_store_full("a client upload")
    def upload_client(self, round_idx: int, client_id: str, folder: str | Path) -> None:
        round_idx, client_id = check_round(round_idx), validate_client_id(client_id)
        files = client_files(folder)
        round_dir = self._round_dir(round_idx)
        if not (round_dir / "global").is_dir():
            raise GlobalNotPublishedError(
                f"Round {round_idx} has no published global adapter in {self.path}: the coordinator must publish "
                f"round {round_idx} before clients upload to it."
            )
        clients = round_dir / "clients"
        clients.mkdir(exist_ok=True)
        target = clients / client_id
        staged = Path(tempfile.mkdtemp(prefix=temp_prefix(".tmp-", client_id), dir=clients))
        with _cleanup_on_error(target, staged):
            for name in sorted(files, key=lambda n: n == CLIENT_FILE):  # client.json last
                _copy_file(files[name], staged / name)
            _fsync_dir(staged)
            _install_dir(staged, target)
        _fsync_dir(clients)
        remove_abandoned(clients, _TEMP_KINDS)

    def list_client_uploads(self, round_idx: int) -> list[str]:
        """Ids with a complete upload: a real folder (not a link) holding a regular `client.json` (not a link)."""
        clients = self._clients_dir(check_round(round_idx))
        if clients is None:
            return []
        return sorted(d.name for d in clients.iterdir() if _is_client_id(d.name) and _is_upload_dir(d))

    def download_client(self, round_idx: int, client_id: str) -> Path:
        """The client's upload folder inside the store (untrusted files: validate before use).

        Nothing on the way is a link: `rounds/<t>/clients/<id>` and every folder above it (below the store root)
        must be real folders, so a client cannot point the coordinator at a file outside the store.
        """
        round_idx, client_id = check_round(round_idx), validate_client_id(client_id)
        clients = self._clients_dir(round_idx)
        folder = (clients if clients is not None else self._round_dir(round_idx) / "clients") / client_id
        if clients is None or not _is_upload_dir(folder):
            raise ClientUploadNotFoundError(
                f"No complete upload from client {client_id!r} for round {round_idx} in {self.path}."
            )
        return folder

    # ------------------------------------------------------------------------------------------ summaries
    @_store_full("a round summary")
    def write_summary(self, round_idx: int, summary: dict) -> None:
        round_dir = self._round_dir(check_round(round_idx))
        round_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(round_dir / SUMMARY_FILE, dump_json(summary))
        self._write_card()

    def read_summary(self, round_idx: int) -> dict | None:
        return _read_json(self._round_dir(check_round(round_idx)) / SUMMARY_FILE)

    # ---------------------------------------------------------------------------------------------- inner
    def _round_dir(self, round_idx: int) -> Path:
        return self.path / "rounds" / str(round_idx)

    def _clients_dir(self, round_idx: int) -> Path | None:
        """`rounds/<t>/clients` if it and the folders above it (below the root) are real folders, else None."""
        path = self.path
        for part in ("rounds", str(round_idx), "clients"):
            path = path / part
            if not _is_real_dir(path):
                return None
        return path

    def _rounds(self) -> list[int]:
        rounds = self.path / "rounds"
        if not rounds.is_dir():
            return []
        return sorted(int(d.name) for d in rounds.iterdir() if d.name.isdigit() and str(int(d.name)) == d.name)

    def _published_rounds(self) -> list[int]:
        return [t for t in self._rounds() if (self._round_dir(t) / "global" / ADAPTER_FILE).is_file()]

    def _revision(self, weights: Path) -> str:
        st = weights.stat()
        cached = self._sha_cache.get(weights)
        if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        sha = file_sha256(weights)
        self._sha_cache[weights] = (st.st_size, st.st_mtime_ns, sha)
        return sha

    def _refresh_root(self, global_dir: Path) -> None:
        # Config first and round.json last: a reader of the root sees, at worst, a new config with old weights
        # for a moment (each file is replaced atomically); latest_global() reads rounds/<t>/global instead.
        names = [p.name for p in global_dir.iterdir() if p.is_file() and p.name != MODEL_CARD]
        order = {CONFIG_FILE: 0, ADAPTER_FILE: 1, ROUND_FILE: 3}
        for name in sorted(names, key=lambda n: (order.get(n, 2), n)):
            src, dst = global_dir / name, self.path / name
            if dst.is_file() and _same_file_content(src, dst):
                continue
            _atomic_copy(src, dst)
        self._write_card()

    def _write_card(self) -> None:
        summaries = {t: s for t in self._rounds() if (s := self.read_summary(t)) is not None}
        published = self._published_rounds()
        card = render_model_card(self.path.name, self.read_federation(), max(published, default=None), summaries)
        dst = self.path / MODEL_CARD
        if not (dst.is_file() and dst.read_text() == card):
            _atomic_write(dst, card.encode())


# -------------------------------------------------------------------------------------------- file helpers
def _is_client_id(name: str) -> bool:
    try:
        validate_client_id(name)
    except ValueError:
        return False
    return True


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_upload_dir(folder: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(folder).st_mode) and stat.S_ISREG(os.lstat(folder / CLIENT_FILE).st_mode)
    except OSError:
        return False


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _cleanup_on_error(target: Path, temp: Path) -> Iterator[None]:
    """Remove `temp` if the block fails; a full disk becomes an error that names `target`."""
    try:
        yield
    except BaseException as e:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        if isinstance(e, OSError) and not isinstance(e, StoreFullError) and e.errno in _FULL_ERRNOS:
            err = StoreFullError(
                f"No space left on the device while writing {target}: nothing was changed there (the temporary "
                "files were removed); free some space and run the same command again."
            )
            err.errno = errno.ENOSPC
            raise err from e
        raise


def _copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(".tmp-", path.name), dir=path.parent)
    with _cleanup_on_error(path, Path(tmp)):
        _write_fd(fd, data)
        os.replace(tmp, path)


def _write_fd(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_copy(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(".tmp-", dst.name), dir=dst.parent)
    os.close(fd)
    with _cleanup_on_error(dst, Path(tmp)):
        _copy_file(src, Path(tmp))
        os.replace(tmp, dst)


def _same_file_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    return file_sha256(a) == file_sha256(b)


def _fsync_dir(path: Path) -> None:
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux); False where the platform or file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _install_dir(staged: Path, target: Path) -> None:
    """Move the complete folder `staged` to `target`, replacing what is there in one step where possible."""
    for _ in range(100):  # retried only when another process replaces `target` at the same moment
        try:
            os.rename(staged, target)  # atomic when `target` does not exist
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                raise
        try:
            if _exchange(staged, target):  # `staged` now holds the previous upload
                shutil.rmtree(staged, ignore_errors=True)
                return
            trash = target.with_name(temp_prefix(".trash-", target.name) + uuid.uuid4().hex[:8])
            os.rename(target, trash)  # fallback: `target` is absent until the next rename
            shutil.rmtree(trash, ignore_errors=True)
        except FileNotFoundError:
            continue
    raise RuntimeError(f"Could not replace {target}: it keeps changing under concurrent writers.")
