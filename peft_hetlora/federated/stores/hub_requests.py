"""Requests to the Hub for `HubStore`: retried calls, commits with optimistic concurrency, snapshots, downloads.

`HubRepo` is composed into [`HubStore`][peft_hetlora.federated.stores.hub.HubStore] (`store.hub`): it owns how one
request to the Hub is made (429 / 5xx answers retried after `Retry-After` with bounded exponential backoff,
`RetryPolicy`; a commit made with `parent_commit` and rebuilt on 412), and how a commit's files are read and
downloaded. What the files mean (rounds, clients, the model card) stays in `hub.py`.

Example:
    ```py
    >>> RetryPolicy().wait_s(attempt=2, retry_after=None)   # no Retry-After: backoff_s * 2**attempt
    4.0
    >>> retry_after_s({"Retry-After": "7"})
    7.0
    ```
"""

from __future__ import annotations

import email.utils
import errno
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from ...utils.errors import StoreFullError
from .base import file_sha256

__all__ = [
    "RETRY_STATUSES", "FileTooLargeError", "HubRepo", "RatePacer", "RetryPolicy", "Snapshot", "cache_full_error",
    "rate_bucket", "retry_after_s", "same_blob",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: the answers that are retried (rate limit and server errors); 412 (stale parent commit) is retried by commits
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often one Hub request is retried.

    Attributes:
        max_retries: retries of one operation on 429 / 5xx / 412 answers.
        backoff_s: first wait of the exponential backoff when the Hub gives no `Retry-After`.
        max_wait_s: longest wait; a `Retry-After` longer than this fails at once with a clear message.

    Example:
        ```py
        >>> policy = RetryPolicy(max_retries=3, backoff_s=0.5, max_wait_s=1.5)
        >>> [policy.wait_s(attempt, None) for attempt in range(3)], policy.wait_s(0, 30.0)
        ([0.5, 1.0, 1.5], 30.0)
        ```
    """

    max_retries: int = 5
    backoff_s: float = 1.0
    max_wait_s: float = 60.0

    def wait_s(self, attempt: int, retry_after: float | None) -> float:
        """The wait before retry `attempt + 1`: the Hub's `Retry-After` if given, else the capped backoff."""
        return retry_after if retry_after is not None else min(self.max_wait_s, self.backoff_s * 2**attempt)


class FileTooLargeError(ValueError):
    """A streamed download went over its byte cap; nothing of it is kept."""


def rate_bucket(url: str) -> str:
    """The Hub rate-limit bucket of a request: `/resolve/` downloads are "resolvers", the rest "api".

    Example:
        ```py
        >>> rate_bucket("https://huggingface.co/org/m/resolve/abc/x.json"), rate_bucket("https://h/api/models")
        ('resolvers', 'api')
        ```
    """
    return "resolvers" if "/resolve/" in url else "api"


class RatePacer:
    """Pace requests on the Hub's `RateLimit` header, before the Hub answers 429.

    The Hub sends `RateLimit: "<bucket>";r=<remaining>;t=<seconds to reset>` on its answers
    (https://huggingface.co/docs/hub/rate-limits; IETF draft httpapi-ratelimit-headers). `observe` records the
    remaining budget of a bucket and when its window resets; `pace` is called before each request of a bucket
    and, once `reserve` or fewer requests are left in the window, waits until the window resets (the budget left
    is kept for retries and for the clients' own requests). Requests made since the last answer are counted
    down locally, so parallel downloads do not overshoot. `clock` and `sleep` are injectable (tests use a fake
    clock: no real waiting).

    Example:
        ```py
        >>> now = [0.0]
        >>> pacer = RatePacer(reserve=1, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
        >>> pacer.observe({"RateLimit": '"resolvers";r=2;t=30'})
        >>> [pacer.pace("resolvers") for _ in range(3)]   # 2 left, then 1 = reserve: wait for the reset
        [0.0, 30.0, 0.0]
        ```
    """

    def __init__(self, *, reserve: int = 10, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.reserve = reserve
        self.clock = clock
        self.sleep = sleep
        self._state: dict[str, tuple[int, float]] = {}  # bucket -> (remaining, reset at clock time)
        self._lock = threading.Lock()

    def observe(self, headers: Any) -> None:
        """Record the `RateLimit` header of an answer (ignored when absent or malformed)."""
        try:
            from huggingface_hub.utils import parse_ratelimit_headers

            info = parse_ratelimit_headers(headers) if headers is not None else None
        except Exception:  # a malformed header is no reason to fail a round
            return
        if info is None or info.remaining < 0 or info.reset_in_seconds < 0:
            return
        with self._lock:
            self._state[str(info.resource_type)] = (int(info.remaining), self.clock() + float(info.reset_in_seconds))

    def pace(self, bucket: str) -> float:
        """Before one request of `bucket`: wait for the window's reset if the budget is down to `reserve`.

        Returns the seconds waited.
        """
        with self._lock:
            remaining, reset_at = self._state.get(bucket, (None, 0.0))
            now = self.clock()
            if remaining is None or now >= reset_at:
                self._state.pop(bucket, None)
                return 0.0
            wait = reset_at - now if remaining <= self.reserve else 0.0
            self._state[bucket] = (remaining - 1, reset_at) if wait == 0.0 else (remaining, reset_at)
        if wait > 0:
            logger.warning("Hub %s budget down to %d requests in this window: pacing %.0f s until it resets.",
                           bucket, remaining, wait)
            self.sleep(wait)
            with self._lock:
                self._state.pop(bucket, None)
        return wait


@dataclass(frozen=True)
class Snapshot:
    """The files of one commit of a repo: path -> RepoSibling (size, blob id, LFS sha256).

    Example:
        ```py
        >>> Snapshot(sha="0" * 40, files={}).files
        {}
        ```
    """

    sha: str
    files: dict[str, RepoSibling]


class HubRepo:
    """Retried Hub requests, commits and reads on one endpoint (one `HfApi`), for any repo there.

    Args:
        api: the client (endpoint and token).
        retry: how requests are retried (`RetryPolicy`).
        private: create repos private.
        cache_dir: where downloads go (default: the Hugging Face cache).
        sleep: how to wait between retries and when pacing (tests record the waits here).
        clock: the clock the `RateLimit` pacing reads (tests pass a fake one).
        reserve: requests of a bucket kept in reserve when pacing on the `RateLimit` header (`RatePacer`).

    Example:
        ```py
        >>> hub = HubRepo(HfApi(endpoint="https://hub.example"), retry=RetryPolicy(max_retries=2))
        >>> hub.endpoint, hub.retry.max_retries
        ('https://hub.example', 2)
        ```
    """

    def __init__(
        self,
        api: HfApi,
        *,
        retry: RetryPolicy | None = None,
        private: bool = True,
        cache_dir: str | Path | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        reserve: int = 10,
    ) -> None:
        self.api = api
        self.retry = retry if retry is not None else RetryPolicy()
        self.private = private
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.sleep = sleep
        self.clock = clock
        self.pacer = RatePacer(reserve=reserve, clock=lambda: self.clock(), sleep=lambda s: self.sleep(s))
        self._ready_repos: set[str] = set()
        self._json_cache: dict[tuple[str, str, str], Any] = {}

    @property
    def endpoint(self) -> str:
        """The Hub endpoint the requests go to."""
        return self.api.endpoint

    # ----------------------------------------------------------------------------------------- the commit
    def commit(
        self, repo: str, build: Callable[[Snapshot], tuple[dict[str, Any], list[str]]], message: str
    ) -> str:
        """Commit `build(head)` on `main` with `parent_commit=head`; on 412 re-read the head and rebuild.

        `build` returns (additions path -> bytes | local Path, deletions). Files whose content is unchanged are
        skipped by huggingface_hub, so a commit that changes nothing returns the head without committing.
        Returns the commit oid.
        """
        self.ensure_repo(repo)
        attempt = 0
        while True:
            snap = self.snapshot(repo)
            adds, deletes = build(snap)
            try:
                info = self.api.create_commit(
                    repo, _operations(adds, deletes), commit_message=message, parent_commit=snap.sha
                )
                return info.oid
            except HfHubHTTPError as e:
                status = e.response.status_code if e.response is not None else None
                if status == 412 and attempt < self.retry.max_retries:
                    logger.info("%s moved while committing %r (412): re-reading the head and retrying.", repo, message)
                elif status in RETRY_STATUSES and attempt < self.retry.max_retries:
                    self._wait(e, attempt, f"commit {message!r}")
                else:
                    raise
            attempt += 1

    def open_pull_request(self, repo: str, adds: dict[str, bytes | Path], title: str, description: str,
                          what: str) -> None:
        """Open a pull request on `repo` adding `adds` (retried like every request; no parent commit)."""
        self.call(
            lambda: self.api.create_commit(
                repo, _operations(adds, []), commit_message=title, commit_description=description, create_pr=True
            ),
            what,
        )

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Call `fn`, retrying 429 (after Retry-After) and 5xx answers with bounded exponential backoff."""
        for attempt in range(self.retry.max_retries + 1):
            try:
                return fn()
            except HfHubHTTPError as e:
                status = e.response.status_code if e.response is not None else None
                if status not in RETRY_STATUSES or attempt >= self.retry.max_retries:
                    raise
                self._wait(e, attempt, what)
        raise AssertionError("unreachable")

    def _wait(self, error: HfHubHTTPError, attempt: int, what: str) -> None:
        wait = self.retry.wait_s(attempt, retry_after_s(error.response.headers))
        if wait > self.retry.max_wait_s:
            error.append_to_message(
                f"\nThe Hub asks to wait {wait:.0f} s before retrying ({what}); that is over max_wait_s="
                f"{self.retry.max_wait_s}. The Hub caps commits per repo per hour: retry later, or raise max_wait_s."
            )
            raise error
        logger.warning(
            "%s answered %s to %s; retrying in %.2f s (%d/%d).",
            self.endpoint, error.response.status_code, what, wait, attempt + 1, self.retry.max_retries,
        )
        self.sleep(wait)

    def ensure_repo(self, repo: str) -> None:
        """Create `repo` (private if so configured) unless this object already did or saw it."""
        if repo not in self._ready_repos:
            self.call(lambda: self.api.create_repo(repo, private=self.private, exist_ok=True), f"create {repo}")
            self._ready_repos.add(repo)

    # -------------------------------------------------------------------------------------------- reading
    def snapshot(self, repo: str, revision: str = "main") -> Snapshot:
        """The files of `repo` at `revision` (one commit)."""
        info = self.call(
            lambda: self.api.repo_info(repo, revision=revision, files_metadata=True), f"read {repo}@{revision}"
        )
        return Snapshot(sha=info.sha, files={s.rfilename: s for s in info.siblings or []})

    def snapshot_or_none(self, repo: str, revision: str = "main") -> Snapshot | None:
        """`snapshot`, or None when the repo or the revision does not exist."""
        try:
            return self.snapshot(repo, revision)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return None

    def file_exists(self, repo: str, path: str, revision: str) -> bool:
        """Whether `path` exists in `repo` at `revision`."""
        return self.call(
            lambda: self.api.file_exists(repo, path, revision=revision), f"look for {path} in {repo}@{revision}"
        )

    def download(self, repo: str, path: str, revision: str) -> Path:
        """Download one file into the cache; a full disk raises `StoreFullError` saying what to do."""
        try:
            return Path(
                self.call(
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
                raise cache_full_error(self.cache_dir or "the Hugging Face cache") from e
            raise

    # ------------------------------------------------------------------- requests made here (paced, capped)
    def _get(self, url: str, params: dict | None = None) -> Any:
        """One paced GET (the whole body read), its `RateLimit` header observed; errors raise `HfHubHTTPError`."""
        self.pacer.pace(rate_bucket(url))
        response = get_session().get(url, params=params, headers=build_hf_headers(token=self.api.token),
                                     follow_redirects=True)
        self.pacer.observe(response.headers)
        hf_raise_for_status(response)
        return response

    def list_models(self, author: str, search: str, expand: tuple[str, ...], max_entries: int) -> list[dict] | None:
        """The model repos of `author` whose id contains `search` (one paginated listing, 1000 a page).

        Each entry is the Hub's JSON object (`id` and the `expand`ed properties). Returns None when the listing
        holds more than `max_entries` entries (the pages past that are not requested): the caller falls back to
        asking for the repos it knows of, so a flood of look-alike repos costs it at most
        ceil(max_entries / 1000) + 1 listing calls.
        """
        params: dict | None = {"author": author, "search": search, "expand": list(expand)}
        url: str | None = f"{self.endpoint}/api/models"
        found: list[dict] = []
        while url is not None:
            response = self.call(lambda u=url, p=params: self._get(u, p), f"list the models of {author}")
            page = response.json()
            if not isinstance(page, list):
                raise ValueError(f"{self.endpoint}/api/models answered {type(page).__name__}, not a list.")
            found.extend(e for e in page if isinstance(e, dict))
            if len(found) > max_entries:
                return None
            url, params = response.links.get("next", {}).get("url"), None
        return found

    def fetch(self, repo: str, path: str, sha: str, target: Path, max_bytes: int | None) -> Path:
        """GET `repo`'s `path` at commit `sha` into `target` in one request (no HEAD), at most `max_bytes` bytes.

        The commit sha makes the URL immutable. The byte cap is enforced while streaming: a larger file raises
        `FileTooLargeError` and nothing of it is kept. A full disk raises `StoreFullError`.
        """
        url = f"{self.endpoint}/{repo}/resolve/{sha}/{path}"

        def get() -> Path:
            self.pacer.pace("resolvers")
            headers = build_hf_headers(token=self.api.token)
            with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
                self.pacer.observe(response.headers)
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                declared = response.headers.get("Content-Length")
                if max_bytes is not None and declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise FileTooLargeError(f"{path} in {repo}@{sha} is {declared} bytes, over {max_bytes}.")
                written = 0
                try:
                    with open(target, "wb") as out:
                        for chunk in response.iter_bytes():
                            written += len(chunk)
                            if max_bytes is not None and written > max_bytes:
                                raise FileTooLargeError(f"{path} in {repo}@{sha} is over {max_bytes} bytes.")
                            out.write(chunk)
                except BaseException:
                    target.unlink(missing_ok=True)
                    raise
            return target

        try:
            return self.call(get, f"download {path} from {repo}@{sha}")
        except OSError as e:
            if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise cache_full_error(target.parent) from e
            raise

    def json_at(self, repo: str, snap: Snapshot, path: str) -> Any:
        """The JSON document `path` of the commit `snap` (cached by blob)."""
        entry = snap.files[path]
        key = (repo, path, entry.blob_id or snap.sha)
        if key not in self._json_cache:
            self._json_cache[key] = json.loads(self.download(repo, path, snap.sha).read_text())
        return self._json_cache[key]

    def read_json(self, repo: str, path: str) -> Any:
        """The JSON document `path` on `main`, or None when the repo or the file does not exist."""
        snap = self.snapshot_or_none(repo)
        return self.json_at(repo, snap, path) if snap and path in snap.files else None


def cache_full_error(where: str | Path) -> StoreFullError:
    """The error for a full disk under a download: what to free and that the same command resumes.

    Example:
        ```py
        >>> cache_full_error("/cache").errno == errno.ENOSPC
        True
        ```
    """
    err = StoreFullError(
        f"The local disk holding {where} is full while downloading from the Hub: free some space there (or pass "
        "another cache_dir) and run the same command again to resume."
    )
    err.errno = errno.ENOSPC
    return err


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


def same_blob(entry: RepoSibling, local: Path) -> bool:
    """Whether a file in the repo holds the same bytes as a local file (LFS sha256 or git blob oid).

    Example:
        ```py
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "x"
        >>> _ = path.write_bytes(b"hi")
        >>> same_blob(RepoSibling("x", blob_id="32f95c0d1244a1ee8b3ba6e0ad6a5d0a5cd7e2e7"), path)
        False
        ```
    """
    if entry.lfs is not None:
        return entry.lfs.sha256 == file_sha256(local)
    return entry.blob_id == _git_blob_oid(local)


def retry_after_s(headers: Any) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds or an HTTP date), else from a `RateLimit` header.

    Example:
        ```py
        >>> retry_after_s({"Retry-After": "0.05"}), retry_after_s({})
        (0.05, None)
        ```
    """
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
