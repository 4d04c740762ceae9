"""The Hub side of `HubStore`: retried requests, commits with optimistic concurrency, snapshots and downloads.

`HubRepoAccess` is the base class of [`HubStore`][peft_hetlora.federated.hub_store.HubStore]: it owns how one
request to the Hub is made (429 / 5xx answers retried after `Retry-After` with bounded exponential backoff; a
commit made with `parent_commit` and rebuilt on 412), and how a commit's files are read and downloaded. What the
files mean (rounds, clients, the model card) stays in `hub_store.py`.

Example:
    ```python
    from peft_hetlora.federated.hub_store import HubStore

    store = HubStore("my-org/hetlora-fed")
    head = store._snapshot(store.repo_id)   # path -> RepoSibling of main's head
    ```
"""

from __future__ import annotations

import email.utils
import errno
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoSibling

from ..utils.errors import StoreFullError
from .store import MODEL_CARD, file_sha256

__all__ = ["HubRepoAccess"]

logger = logging.getLogger("peft_hetlora.federated.hub_store")  # the store's log name, unchanged by the split

T = TypeVar("T")
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class _Snapshot:
    """The files of one commit of a repo: path -> RepoSibling (size, blob id, LFS sha256)."""

    sha: str
    files: dict[str, RepoSibling]



class HubRepoAccess:
    """Retried Hub requests, commits and reads for one endpoint; the base of `HubStore`.

    Subclasses set `api`, `endpoint`, `private`, `max_retries`, `backoff_s`, `max_wait_s`, `cache_dir`,
    `_sleep`, `_ready_repos`, `_json_cache` and implement `_card(snap, adds)` (the model card of a commit).
    """

    api: HfApi
    endpoint: str
    private: bool
    max_retries: int
    backoff_s: float
    max_wait_s: float
    cache_dir: str | None
    _sleep: Callable[[float], None]
    _ready_repos: set[str]
    _json_cache: dict[tuple[str, str, str], Any]

    def _card(self, snap: _Snapshot, adds: dict[str, Any]) -> str:
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- the commit
    def _commit(
        self,
        repo: str,
        build: Callable[[_Snapshot], tuple[dict[str, Any], list[str]]],
        message: str,
        *,
        card: bool = True,
    ) -> str:
        """Commit `build(head)` on `main` with `parent_commit=head`; on 412 re-read the head and rebuild.

        `build` returns (additions path -> bytes | local Path, deletions). Files whose content is unchanged are
        skipped by huggingface_hub, so a commit that changes nothing returns the head without committing.
        Returns the commit oid.
        """
        self._ensure_repo(repo)
        attempt = 0
        while True:
            snap = self._snapshot(repo)
            adds, deletes = build(snap)
            if card:
                adds = {**adds, MODEL_CARD: self._card(snap, adds).encode()}
            try:
                info = self.api.create_commit(
                    repo, _operations(adds, deletes), commit_message=message, parent_commit=snap.sha
                )
                return info.oid
            except HfHubHTTPError as e:
                status = e.response.status_code if e.response is not None else None
                if status == 412 and attempt < self.max_retries:
                    logger.info("%s moved while committing %r (412): re-reading the head and retrying.", repo, message)
                elif status in _RETRY_STATUSES and attempt < self.max_retries:
                    self._wait(e, attempt, f"commit {message!r}")
                else:
                    raise
            attempt += 1

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        """Call `fn`, retrying 429 (after Retry-After) and 5xx answers with bounded exponential backoff."""
        for attempt in range(self.max_retries + 1):
            try:
                return fn()
            except HfHubHTTPError as e:
                status = e.response.status_code if e.response is not None else None
                if status not in _RETRY_STATUSES or attempt >= self.max_retries:
                    raise
                self._wait(e, attempt, what)
        raise AssertionError("unreachable")

    def _wait(self, error: HfHubHTTPError, attempt: int, what: str) -> None:
        retry_after = _retry_after_s(error.response.headers)
        wait = retry_after if retry_after is not None else min(self.max_wait_s, self.backoff_s * 2**attempt)
        if wait > self.max_wait_s:
            error.append_to_message(
                f"\nThe Hub asks to wait {wait:.0f} s before retrying ({what}); that is over max_wait_s="
                f"{self.max_wait_s}. The Hub caps commits per repo per hour: retry later, or raise max_wait_s."
            )
            raise error
        logger.warning(
            "%s answered %s to %s; retrying in %.2f s (%d/%d).",
            self.endpoint, error.response.status_code, what, wait, attempt + 1, self.max_retries,
        )
        self._sleep(wait)

    def _ensure_repo(self, repo: str) -> None:
        if repo not in self._ready_repos:
            self._retry(lambda: self.api.create_repo(repo, private=self.private, exist_ok=True), f"create {repo}")
            self._ready_repos.add(repo)

    # -------------------------------------------------------------------------------------------- reading
    def _snapshot(self, repo: str, revision: str = "main") -> _Snapshot:
        info = self._retry(
            lambda: self.api.repo_info(repo, revision=revision, files_metadata=True), f"read {repo}@{revision}"
        )
        return _Snapshot(sha=info.sha, files={s.rfilename: s for s in info.siblings or []})

    def _snapshot_or_none(self, repo: str, revision: str = "main") -> _Snapshot | None:
        try:
            return self._snapshot(repo, revision)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return None

    def _file_exists(self, repo: str, path: str, revision: str) -> bool:
        return self._retry(
            lambda: self.api.file_exists(repo, path, revision=revision), f"look for {path} in {repo}@{revision}"
        )

    def _download(self, repo: str, path: str, revision: str) -> Path:
        try:
            return Path(
                self._retry(
                    lambda: hf_hub_download(
                        repo,
                        path,
                        revision=revision,
                        cache_dir=self.cache_dir,
                        endpoint=self.endpoint,
                        token=self.api.token,
                    ),
                    f"download {path} from {repo}@{revision}",
                )
            )
        except OSError as e:
            if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise _cache_full(self.cache_dir or "the Hugging Face cache") from e
            raise

    def _json_at(self, repo: str, snap: _Snapshot, path: str) -> Any:
        entry = snap.files[path]
        key = (repo, path, entry.blob_id or snap.sha)
        if key not in self._json_cache:
            self._json_cache[key] = json.loads(self._download(repo, path, snap.sha).read_text())
        return self._json_cache[key]

    def _read_json(self, repo: str, path: str) -> Any:
        snap = self._snapshot_or_none(repo)
        return self._json_at(repo, snap, path) if snap and path in snap.files else None


def _cache_full(where: str | Path) -> StoreFullError:
    err = StoreFullError(
        f"The local disk holding {where} is full while downloading from the Hub: free some space there (or pass "
        "another cache_dir) and run the same command again to resume."
    )
    err.errno = errno.ENOSPC
    return err


def _as_bytes(value: bytes | Path) -> bytes:
    return value if isinstance(value, bytes) else Path(value).read_bytes()


def _operations(adds: dict[str, bytes | Path], deletes: list[str]) -> list:
    ops: list = [CommitOperationDelete(path_in_repo=p) for p in deletes]
    for path, value in adds.items():
        content = value if isinstance(value, bytes) else str(value)
        ops.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=content))
    return ops


def _git_blob_oid(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _same_blob(entry: RepoSibling, local: Path) -> bool:
    """Whether a file in the repo holds the same bytes as a local file (LFS sha256 or git blob oid)."""
    if entry.lfs is not None:
        return entry.lfs.sha256 == file_sha256(local)
    return entry.blob_id == _git_blob_oid(local)


def _retry_after_s(headers: Any) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds or an HTTP date), else from a `RateLimit` header."""
    value = headers.get("Retry-After") if headers is not None else None
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
            except (TypeError, ValueError):
                pass
    try:
        from huggingface_hub.utils._http import parse_ratelimit_headers

        info = parse_ratelimit_headers(headers)
    except Exception:  # the private helper may move between huggingface_hub versions
        return None
    return float(info.reset_in_seconds) if info is not None and info.remaining == 0 else None
