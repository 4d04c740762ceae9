"""The upload folder reader: one untrusted folder -> one consistent snapshot of its bytes -> `validate_update`.

Everything about files lives here: the folder is opened once without following links, only ``ALLOWED_FILES`` are
read (pickle never), each through its own descriptor, so a re-upload in the middle cannot mix two uploads. What the
bytes must look like is `validation`'s business (`check_report`, then `update_from_bytes`, as `validate_update` does).

Example:
    ```py
    >>> update = validate_upload("rounds/3/clients/alice", spec, client_id="alice", round_idx=3)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from ...utils.constants import ADAPTER_FILE, CLIENT_FILE, CONFIG_FILE
from ...utils.untrusted_text import brief
from ..aggregation import ClientUpdate
from .bytes import RejectedUpload, loads_strict_json
from .validation import ALLOWED_FILES, PICKLE_SUFFIXES, UploadSpec, check_report, update_from_bytes

__all__ = ["UploadSnapshot", "open_upload_snapshot", "validate_upload"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) | _NOFOLLOW | getattr(
    os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_SNAPSHOT_ATTEMPTS = 64
_RETRY_PAUSE_S = 0.001  # grows linearly with the attempt: at most ~2 s in all, only while the upload keeps changing


class _UploadChanged(Exception):
    """The upload folder was replaced while its files were being opened (a re-upload): open it again."""


def _link_refused(name: str) -> RejectedUpload:
    return RejectedUpload(f"{name} is a symbolic link; links are never followed (upload the file itself)")


def _open_upload_dir(folder: Path) -> int:
    """Open the upload folder itself without following a link (O_DIRECTORY | O_NOFOLLOW)."""
    try:
        return os.open(folder, _DIR_FLAGS)
    except OSError as err:
        if os.path.islink(folder) or err.errno == errno.ELOOP:
            raise _link_refused("the upload folder") from None
        if err.errno == errno.ENOTDIR:
            raise RejectedUpload("the upload is not a folder") from None
        if err.errno == errno.ENOENT:
            raise _UploadChanged from None
        raise RejectedUpload(f"cannot open the upload folder ({err.strerror})") from None


def _is_current(dir_fd: int, folder: Path) -> bool:
    """Whether the folder open as `dir_fd` is still the one at `folder` (not replaced by a re-upload).

    A store installs an upload folder whole (one rename) and only ever removes files from a folder after it was
    replaced, never from the current one; so while this holds, the listing of `dir_fd` is the whole upload.
    """
    try:
        now = os.stat(folder, follow_symlinks=False)
    except OSError:
        return False
    opened = os.fstat(dir_fd)
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


def _open_snapshot(dir_fd: int, folder: Path, ignore: frozenset[str]) -> dict[str, int]:
    """Open every file of the upload, relative to the folder's descriptor: {name: fd} of regular files.

    All names are checked first (only ALLOWED_FILES, never pickle); each is lstat-ed (a link or anything but
    a regular file is refused before it is opened, so opening a FIFO or a device never happens) and opened
    with O_NOFOLLOW, and the opened inode must be the one lstat saw. Once every file is open, a re-upload
    that replaces the folder can no longer change what is read: the bytes all come from this snapshot. A folder
    replaced while it was listed or opened (`_is_current` false) raises `_UploadChanged`: the caller opens the
    new one, so a re-upload is read whole, old or new, and never refused as incomplete.
    """
    names = sorted(set(os.listdir(dir_fd)) - ignore)
    for name in names:
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise RejectedUpload(
                f"file {brief(name)} is a pickle-based format that is never loaded; upload {ADAPTER_FILE} instead"
            )
        if name not in ALLOWED_FILES:
            raise RejectedUpload(
                f"unexpected file {brief(name)}; an upload holds only {ADAPTER_FILE}, {CLIENT_FILE} "
                f"and optionally {CONFIG_FILE}"
            )
    for required in (ADAPTER_FILE, CLIENT_FILE):
        if required not in names:
            if not _is_current(dir_fd, folder):  # a replaced upload being removed: read the new one
                raise _UploadChanged
            raise RejectedUpload(f"upload has no {required}")
    fds: dict[str, int] = {}
    try:
        for name in names:
            try:
                seen = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise _UploadChanged from None
            if stat.S_ISLNK(seen.st_mode):
                raise _link_refused(name)
            if not stat.S_ISREG(seen.st_mode):
                raise RejectedUpload(f"{name} is not a regular file")
            try:
                fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                raise _UploadChanged from None
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise _link_refused(name) from None
                raise RejectedUpload(f"cannot open {name} ({err.strerror})") from None
            fds[name] = fd
            opened = os.fstat(fd)
            if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino):
                raise _UploadChanged
        if not _is_current(dir_fd, folder):  # replaced meanwhile: its listing may miss files already removed
            raise _UploadChanged
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def _read_regular_file(fd: int, limit: int, what: str) -> bytes:
    """Read an open regular file of at most `limit` bytes (size checked on the descriptor, then a bounded read)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise RejectedUpload(f"{what} is not a regular file")
    if st.st_size > limit:
        raise RejectedUpload(f"{what} is {st.st_size:,} bytes, above the {limit:,}-byte limit")
    chunks, size = [], 0
    while size <= limit:
        chunk = os.pread(fd, min(1 << 20, limit + 1 - size), size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise RejectedUpload(f"{what} grew past the {limit:,}-byte limit while being read")
    return b"".join(chunks)


class UploadSnapshot:
    """The open files of one upload (see `open_upload_snapshot`): every read comes from the same upload."""

    def __init__(self, fds: Mapping[str, int]) -> None:
        self._fds = dict(fds)

    @property
    def names(self) -> frozenset[str]:
        """The files the upload holds."""
        return frozenset(self._fds)

    def read(self, name: str, limit: int) -> bytes:
        """The bytes of file `name` (at most `limit`, else `RejectedUpload`)."""
        return _read_regular_file(self._fds[name], limit, name)


@contextlib.contextmanager
def open_upload_snapshot(
    folder: str | Path, *, ignore_files: frozenset[str] = frozenset()
) -> Iterator[UploadSnapshot]:
    """Open one upload folder as a consistent snapshot: whatever is read later comes from the same upload.

    The folder is opened once without following links and every file is opened relative to it before any is
    read; a folder replaced by a re-upload in the middle of the opening (even one already being removed) is
    opened again, the new upload read whole (up to 64 times, pausing a little longer each time).
    Links, FIFOs, devices and sub-folders are refused, and so are files not in `ALLOWED_FILES`.

    Example:
        ```py
        >>> with open_upload_snapshot("rounds/3/clients/alice") as upload:  # doctest: +SKIP
        ...     meta = upload.read("client.json", 65536)
        ...     weights = upload.read("adapter_model.safetensors", 10**8)  # the same upload as meta
        ```
    """
    folder = Path(folder)
    for attempt in range(_SNAPSHOT_ATTEMPTS):
        if attempt:
            time.sleep(_RETRY_PAUSE_S * attempt)  # a writer between its two renames (no RENAME_EXCHANGE)
        if not os.path.lexists(folder) and attempt == 0:
            raise RejectedUpload("the upload folder does not exist (anymore)")
        try:
            dir_fd = _open_upload_dir(folder)
            try:
                fds = _open_snapshot(dir_fd, folder, frozenset(ignore_files))
            finally:
                os.close(dir_fd)
        except _UploadChanged:
            continue
        try:
            yield UploadSnapshot(fds)
        finally:
            for fd in fds.values():
                os.close(fd)
        return
    if not os.path.lexists(folder):
        raise RejectedUpload("the upload folder does not exist (anymore)")
    raise RejectedUpload("the upload kept changing while being read (re-uploaded repeatedly); it is read again "
                         "when the round is closed again")


def validate_upload(
    folder: str | Path,
    spec: UploadSpec,
    *,
    client_id: str,
    round_idx: int,
    assigned_rank: int | None = None,
    required_rank: int | None = None,
    ignore_files: frozenset[str] = frozenset(),
    assigned_components: Sequence[int] | None = None,
    assigned_core: int | None = None,
    current_revision: str | None = None,
) -> ClientUpdate:
    """Validate one client upload folder and return it as a `ClientUpdate` (float32 tensors on CPU).

    Raises `RejectedUpload(reason)` on the first problem. `assigned_rank` (the rank the coordinator
    gave this client for the round) bounds the declared rank_in; `required_rank` forces rank_out
    (homogeneous methods such as fedavg); `assigned_components` (the round plan's window for this client) bounds
    the reported ``components``; `assigned_core` (the plan's core rank for this client) makes it a core upload, whose
    ``global_revision`` must be `current_revision` (docs/methods.md#core-clients). `ignore_files` names files a
    store keeps beside the upload.
    `ClientUpdate.rank` is the declared rank_out; `metadata` is client.json plus `upload_bytes`
    (bytes of the files read) and `sha256` (of the safetensors file).

    Example:
        ```py
        >>> update = validate_upload("rounds/3/clients/alice", spec, client_id="alice", round_idx=3)  # doctest: +SKIP
        >>> update.rank, update.num_examples  # doctest: +SKIP
        (4, 120)
        ```
    """
    with open_upload_snapshot(folder, ignore_files=frozenset(ignore_files)) as upload:
        # client.json first: what it declares is checked before the (large) weights are read
        raw_meta = upload.read(CLIENT_FILE, spec.max_json_bytes)
        meta = check_report(raw_meta, spec, client_id=client_id, round_idx=round_idx, assigned_rank=assigned_rank,
                               required_rank=required_rank, assigned_components=assigned_components,
                               assigned_core=assigned_core, current_revision=current_revision)
        upload_bytes = len(raw_meta)
        if CONFIG_FILE in upload.names:
            raw_config = upload.read(CONFIG_FILE, spec.max_json_bytes)
            if not isinstance(loads_strict_json(raw_config, CONFIG_FILE), dict):
                raise RejectedUpload(f"{CONFIG_FILE} is not a JSON object")
            upload_bytes += len(raw_config)
        data = upload.read(ADAPTER_FILE, int(spec.max_upload_bytes))
    return update_from_bytes(data, meta, spec, client_id=client_id, other_bytes=upload_bytes)


