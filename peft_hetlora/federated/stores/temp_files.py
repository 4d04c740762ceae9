"""Temporary files that name their writer, so a restart removes what a killed writer left and nothing else.

Every temporary file or folder the federation creates (`.tmp-*` / `.trash-*` in a `LocalStore`,
`hetlora-global-*` in the system temp folder) carries its writer's process id and host in its name:
`<kind>p<pid>@<host>~<label>-<random>`. `remove_abandoned` deletes an entry only when its writer is certainly
gone:

- same host and the process id is not running: removed at once (a live writer is never touched; a reused
  pid only keeps the file longer);
- another host (a shared network folder) or an old name without a pid: removed once older than
  `foreign_max_age_s` (24 h by default), far longer than any write takes.

Example:
    ```py
    >>> import tempfile
    >>> prefix = temp_prefix(".tmp-", "alice")
    >>> prefix.startswith(".tmp-p") and prefix.endswith("~alice-")
    True
    >>> remove_abandoned(tempfile.gettempdir(), ("hetlora-global-",))  # doctest: +SKIP
    []
    ```
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
from pathlib import Path

__all__ = ["FOREIGN_MAX_AGE_S", "is_abandoned", "remove_abandoned", "temp_prefix"]

FOREIGN_MAX_AGE_S = 24 * 3600.0
_HOST = re.sub(r"[^A-Za-z0-9.]", "", socket.gethostname())[:64] or "host"
_OWNER_RE = re.compile(r"p(\d+)@([A-Za-z0-9.]*)~")


def temp_prefix(kind: str, label: str = "") -> str:
    """`kind` + this process's owner tag + `label`, for `tempfile.mkstemp` / `mkdtemp(prefix=...)`.

    Example:
        ```py
        >>> temp_prefix("hetlora-global-", "r3").startswith("hetlora-global-p")
        True
        ```
    """
    return f"{kind}p{os.getpid()}@{_HOST}~{label}-"


def _pid_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's process) or cannot tell: keep the file
    return True


def is_abandoned(name: str, kind: str, mtime: float, *, now: float | None = None,
                 foreign_max_age_s: float = FOREIGN_MAX_AGE_S) -> bool:
    """Whether the temporary entry `name` (starting with `kind`) was left by a writer that is gone.

    Example:
        ```py
        >>> is_abandoned(temp_prefix(".tmp-", "x") + "abc", ".tmp-", mtime=0.0)  # this process: alive
        False
        ```
    """
    if not name.startswith(kind):
        return False
    age = (time.time() if now is None else now) - mtime
    owner = _OWNER_RE.match(name, len(kind))
    if owner is None or owner[2] != _HOST:
        return age > foreign_max_age_s
    return not _pid_running(int(owner[1]))


def remove_abandoned(folder: str | Path, kinds: tuple[str, ...], *,
                     foreign_max_age_s: float = FOREIGN_MAX_AGE_S) -> list[Path]:
    """Delete the entries of `folder` whose names start with one of `kinds` and whose writer is gone.

    Returns the removed paths. Never follows links (a link named like a temporary file is itself removed,
    not its target).
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        kind = next((k for k in kinds if entry.name.startswith(k)), None)
        if kind is None:
            continue
        with contextlib.suppress(FileNotFoundError):
            mtime = entry.stat(follow_symlinks=False).st_mtime
            if not is_abandoned(entry.name, kind, mtime, now=now, foreign_max_age_s=foreign_max_age_s):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed
