"""`HubStore`: a federation in a Hugging Face Hub model repo (one repo per federation).

The federation repo's `main` holds `federation.json`, the model card, the latest global adapter at the root (so
`PeftModel.from_pretrained(repo_id)` loads it), `rounds/<t>/global/` and `rounds/<t>/summary.json`; every
published round is tagged `round-<t>`. Only the coordinator writes `main`, one round per commit, each commit made
with `parent_commit` (optimistic concurrency: a 412 answer re-reads the head and rebuilds the commit), 429
answers are retried after `Retry-After` with bounded exponential backoff, and the listing and download requests
are paced on the Hub's `RateLimit` header before a 429 comes (`RatePacer`, keeping `rate_reserve` requests).

Clients never write the federation repo's `main`. Two upload modes:

- `client_mode="client_repo"` (default, scales): each client commits `rounds/<t>/clients/<id>/` to its own repo
  (`client_repo_id`, by default `"{repo_id}-client-{client_id}"`), one commit per client per round, so a
  federation is not bound by the Hub's per-repo commit rate. The coordinator finds uploads with one paginated
  listing of the client repos (`GET /api/models?author=<namespace>&search=<prefix>`, 1000 repos a page, each with
  its head commit sha and file names), keeps only the repos of the participants listed in
  `rounds/<t>/global/round.json`, and downloads each upload's files by that sha (one GET per file, no HEAD, the
  byte cap enforced while streaming). A round of K clients costs the coordinator ceil(K / 1000) listing calls,
  not K probes. When the template does not give the client repos one prefix (a callable `client_repo_id`), or
  the listing is flooded with look-alike repos, it falls back to checking each participant's repo.
- `client_mode="pr"` (small federations): each client opens a pull request on the federation repo
  (`create_pr=True`) titled `hetlora upload: round <t> client <id>`; the coordinator reads the open pull requests
  and downloads from their `refs/pr/<n>` revisions (the newest pull request of a client wins).

Example:
    ```python
    from peft_hetlora.federated.stores import HubStore

    coordinator = HubStore("my-org/hetlora-fed", token=coordinator_token)
    coordinator.write_federation({"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "r_min": 2, "r_max": 16})
    coordinator.publish_global(0, "out/global-0")      # one commit + tag round-0

    alice = HubStore("my-org/hetlora-fed", token=alice_token)
    alice.upload_client(0, "alice", "out/alice")       # commits to my-org/hetlora-fed-client-alice
    ```
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import HfApi
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ...utils.constants import (
    ADAPTER_FILE,
    CLIENT_FILE,
    FEDERATION_FILE,
    ROUND_FILE,
    SERVER_STATE_FILE,
    SUMMARY_FILE,
)
from ...utils.errors import HetLoRAError
from .base import (
    CLIENT_FILES,
    STAGED_GLOBAL,
    ClientUploadNotFoundError,
    GlobalAdapter,
    GlobalNotPublishedError,
    check_round,
    client_files,
    dump_json,
    file_sha256,
    global_files,
    validate_client_id,
)
from .hub_requests import FileTooLargeError, HubRepo, RetryPolicy, Snapshot, cache_full_error, same_blob
from .model_card import MODEL_CARD, render_model_card
from .temp_files import remove_abandoned, temp_prefix

__all__ = ["HubStore", "UploadTooLargeError"]

logger = logging.getLogger(__name__)

_PR_TITLE = "hetlora upload: round {round} client {client_id}"
_PR_TITLE_RE = re.compile(r"hetlora upload: round (\d+) client (\S+)")
_SUMMARY_RE = re.compile(r"rounds/(\d+)/" + re.escape(SUMMARY_FILE))
_GLOBAL_RE = re.compile(r"rounds/(\d+)/global/" + re.escape(ADAPTER_FILE))
_UPLOADS_DIR = ".hetlora-uploads"
_SENTINEL = "HETLORACLIENTIDSENTINEL"
_SHA_RE = re.compile(r"[0-9a-f]{40}")
#: listing entries read per participant (plus a constant) before the listing is judged flooded
_LISTING_SLACK = (4, 1000)


class UploadTooLargeError(HetLoRAError, ValueError):
    """A client upload holds a file larger than `max_client_file_bytes` (it is not downloaded)."""


class HubStore:
    """A federation store on the Hugging Face Hub (or a Hub-compatible endpoint). Implements `AdapterStore`.

    Args:
        repo_id: the federation's model repo, `"namespace/name"`.
        endpoint: the Hub endpoint (default: `HF_ENDPOINT` or https://huggingface.co).
        token: a Hub token (default: the locally saved one). The coordinator's token writes the federation repo;
            a client's token needs read access to it and, in `client_repo` mode, write access to its own repo.
        client_mode: `"client_repo"` (each client writes its own repo) or `"pr"` (pull requests).
        client_repo_id: maps a client id to its repo: a template with `{repo_id}`, `{namespace}`, `{name}` and
            `{client_id}`, or a callable `client_id -> repo_id`. Coordinator and clients must use the same one.
        private: create repos private.
        max_retries: retries of one operation on 429 / 5xx / 412 answers.
        backoff_s: first wait of the exponential backoff when the Hub gives no `Retry-After`.
        max_wait_s: longest wait; a `Retry-After` longer than this fails at once with a clear message.
        cache_dir: where downloads go (default: the Hugging Face cache).
        max_client_file_bytes: refuse to download a client file larger than this (None: no limit).
        max_workers: parallel requests when checking many client repos.
        rate_reserve: requests of a Hub rate-limit bucket kept in reserve: once the `RateLimit` header says only
            this many are left in the window, the store waits for the window to reset (`RatePacer`).

    The Hub requests themselves (retries, commits, snapshots, downloads) go through `self.hub`, a composed
    `HubRepo` built from `endpoint`, `token`, `private`, `cache_dir` and a `RetryPolicy(max_retries, backoff_s,
    max_wait_s)`.

    Example:
        ```python
        store = HubStore("my-org/hetlora-fed", token=token, client_mode="pr")
        store.publish_global(0, "out/global-0")
        for client_id in store.list_client_uploads(0):
            folder = store.download_client(0, client_id)
        ```
    """

    def __init__(
        self,
        repo_id: str,
        endpoint: str | None = None,
        token: str | bool | None = None,
        *,
        client_mode: Literal["client_repo", "pr"] = "client_repo",
        client_repo_id: str | Callable[[str], str] = "{repo_id}-client-{client_id}",
        private: bool = True,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_wait_s: float = 60.0,
        cache_dir: str | Path | None = None,
        max_client_file_bytes: int | None = 1 << 30,
        max_workers: int = 8,
        rate_reserve: int = 10,
    ) -> None:
        if not isinstance(repo_id, str) or repo_id.count("/") != 1:
            raise ValueError(f"repo_id must be 'namespace/name', got {repo_id!r}.")
        validate_repo_id(repo_id)
        if client_mode not in ("client_repo", "pr"):
            raise ValueError(f"client_mode must be 'client_repo' or 'pr', got {client_mode!r}.")
        self.repo_id = repo_id
        self.hub = HubRepo(
            HfApi(endpoint=endpoint, token=token),
            retry=RetryPolicy(max_retries=max_retries, backoff_s=backoff_s, max_wait_s=max_wait_s),
            private=private,
            cache_dir=cache_dir,
            reserve=rate_reserve,
        )
        self.client_mode = client_mode
        self._client_repo_id = client_repo_id
        self.max_client_file_bytes = max_client_file_bytes
        self.max_workers = max_workers
        self._pending_stage: tuple[int, dict[str, bytes]] | None = None
        self._participants_cache: dict[int, list[str]] = {}
        # round -> client id -> (repo, commit sha, its CLIENT_FILES there) of its upload, from the latest listing
        self._listed: dict[int, dict[str, tuple[str, str, tuple[str, ...]]]] = {}

    @property
    def api(self) -> HfApi:
        """The `HfApi` client (endpoint and token) of `self.hub`."""
        return self.hub.api

    @property
    def endpoint(self) -> str:
        """The Hub endpoint."""
        return self.hub.endpoint

    def __repr__(self) -> str:
        return f"HubStore({self.repo_id!r}, endpoint={self.endpoint!r}, client_mode={self.client_mode!r})"

    def client_repo_for(self, client_id: str) -> str:
        """The repo a client uploads to in `client_repo` mode.

        Example:
            ```python
            HubStore("org/fed").client_repo_for("alice")   # "org/fed-client-alice"
            ```
        """
        client_id = validate_client_id(client_id)
        if callable(self._client_repo_id):
            repo = self._client_repo_id(client_id)
        else:
            namespace, name = self.repo_id.split("/")
            repo = self._client_repo_id.format(
                repo_id=self.repo_id, namespace=namespace, name=name, client_id=client_id
            )
        try:
            if not isinstance(repo, str) or repo.count("/") != 1:
                raise HFValidationError("a repo id is 'namespace/name'")
            validate_repo_id(repo)
        except HFValidationError as e:
            raise ValueError(
                f"Client repo id {repo!r} for client {client_id!r} is not a valid Hub repo id ({e}). Pass "
                "client_repo_id=... (a template or a callable) that maps client ids to valid repo ids."
            ) from e
        return repo

    def _commit(
        self, repo: str, build: Callable[[Snapshot], tuple[dict[str, Any], list[str]]], message: str, *,
        card: bool = True,
    ) -> str:
        """`self.hub.commit`, with the federation's model card rebuilt for the new state when `card`."""
        if not card:
            return self.hub.commit(repo, build, message)

        def build_with_card(snap: Snapshot) -> tuple[dict[str, Any], list[str]]:
            adds, deletes = build(snap)
            return {**adds, MODEL_CARD: self._card(snap, adds).encode()}, deletes

        return self.hub.commit(repo, build_with_card, message)

    # ----------------------------------------------------------------------------------------- federation
    def read_federation(self) -> dict | None:
        return self.hub.read_json(self.repo_id, FEDERATION_FILE)

    def write_federation(self, federation: dict) -> None:
        data = dump_json(federation)
        self._commit(self.repo_id, lambda snap: ({FEDERATION_FILE: data}, []), "hetlora: federation settings")

    # --------------------------------------------------------------------------------------------- global
    def publish_global(self, round_idx: int, folder: str | Path) -> str:
        """Publish global `round_idx` in one commit (round folder, root copy, model card), then tag `round-<t>`."""
        round_idx = check_round(round_idx)
        files = global_files(folder, round_idx)
        revision = file_sha256(files[ADAPTER_FILE])
        prefix = f"rounds/{round_idx}/global/"

        def build(snap: Snapshot) -> tuple[dict[str, Any], list[str]]:
            existing = snap.files.get(prefix + ADAPTER_FILE)
            adds: dict[str, Any] = {}
            if existing is None:
                adds = {prefix + name: path for name, path in files.items()}
                published = dict(files)
            elif not same_blob(existing, files[ADAPTER_FILE]):
                raise ValueError(
                    f"Round {round_idx} is already published in {self.repo_id} with another adapter. A published "
                    "round is immutable: publish the next round instead."
                )
            else:  # published before: keep the first publication's files (as LocalStore does)
                published = {
                    p[len(prefix):]: p for p in snap.files if p.startswith(prefix) and "/" not in p[len(prefix):]
                }
            if round_idx >= max(_published_rounds(snap.files), default=round_idx):
                for name, source in published.items():
                    if name == MODEL_CARD:
                        continue
                    if existing is None:
                        adds[name] = source
                    elif name not in snap.files or snap.files[name].blob_id != snap.files[source].blob_id:
                        adds[name] = self.hub.download(self.repo_id, source, snap.sha)
            staged = f"rounds/{round_idx}/{STAGED_GLOBAL}/"
            return adds, [p for p in snap.files if p.startswith(staged)]

        oid = self._commit(self.repo_id, build, f"hetlora: publish global adapter of round {round_idx}")
        self.hub.call(
            lambda: self.api.create_tag(self.repo_id, tag=f"round-{round_idx}", revision=oid, exist_ok=True),
            f"tag round-{round_idx}",
        )
        return revision

    def stage_global(self, round_idx: int, folder: str | Path) -> str:
        """Stage the global adapter of round `round_idx` (`rounds/<t>/staged-global/`) unpublished; return its sha256.

        To spend no extra commit (the Hub caps commits per repo per hour), the staged files travel in the commit
        of the next `write_summary(round_idx - 1, ...)`, which is what the coordinator writes right after
        staging; the publish commit of round `round_idx` removes them again. See `LocalStore.stage_global` for
        why the coordinator stages before it writes a summary.
        """
        round_idx = check_round(round_idx)
        files = global_files(folder, round_idx)
        prefix = f"rounds/{round_idx}/{STAGED_GLOBAL}/"
        self._pending_stage = (round_idx, {prefix + name: Path(path).read_bytes() for name, path in files.items()})
        return file_sha256(files[ADAPTER_FILE])

    def staged_global(self, round_idx: int) -> Path | None:
        """A local folder with the staged global adapter of round `round_idx`, or None."""
        prefix = f"rounds/{check_round(round_idx)}/{STAGED_GLOBAL}/"
        snap = self.hub.snapshot_or_none(self.repo_id)
        if snap is None or prefix + ADAPTER_FILE not in snap.files:
            return None
        names = [p for p in snap.files if p.startswith(prefix) and "/" not in p[len(prefix):]]
        paths = [self.hub.download(self.repo_id, p, snap.sha) for p in names]
        return paths[0].parent

    def clean_temporary_files(self) -> list[Path]:
        """Remove the half-copied upload folders killed coordinators left in the local cache; return them."""
        return remove_abandoned(self._uploads_root(), (".tmp-",))

    def latest_global(self, *, server_state: bool = True) -> GlobalAdapter | None:
        snap = self.hub.snapshot_or_none(self.repo_id)
        rounds = _published_rounds(snap.files) if snap else []
        return self._download_global(snap, max(rounds), server_state) if rounds else None

    def get_global(self, round_idx: int, *, server_state: bool = True) -> GlobalAdapter:
        """The global adapter of round `round_idx`, downloaded into the cache; `server_state=False` (a client)
        skips `SERVER_STATE_FILE`, the server optimizer's state (1-3x the adapter), which only the coordinator
        reads."""
        round_idx = check_round(round_idx)
        snap = self.hub.snapshot_or_none(self.repo_id)
        if snap is None or f"rounds/{round_idx}/global/{ADAPTER_FILE}" not in snap.files:
            raise GlobalNotPublishedError(
                f"Round {round_idx} has no global adapter in {self.repo_id} on {self.endpoint}: the coordinator "
                "must publish it first (or the repo does not exist / your token cannot read it)."
            )
        return self._download_global(snap, round_idx, server_state)

    # -------------------------------------------------------------------------------------------- clients
    def upload_client(self, round_idx: int, client_id: str, folder: str | Path) -> None:
        """Upload a client's result: one commit to the client's repo, or one pull request (`client_mode`)."""
        round_idx, client_id = check_round(round_idx), validate_client_id(client_id)
        files = client_files(folder)
        if not self.hub.file_exists(self.repo_id, f"rounds/{round_idx}/global/{ADAPTER_FILE}", "main"):
            raise GlobalNotPublishedError(
                f"Round {round_idx} has no published global adapter in {self.repo_id} on {self.endpoint}: the "
                f"coordinator must publish round {round_idx} before clients upload to it (or your token cannot "
                "read the federation repo)."
            )
        prefix = f"rounds/{round_idx}/clients/{client_id}/"
        adds = {prefix + name: path for name, path in files.items()}
        title = _PR_TITLE.format(round=round_idx, client_id=client_id)
        if self.client_mode == "pr":
            self.hub.open_pull_request(
                self.repo_id, adds, title, f"Client update of federation round {round_idx} (peft-hetlora).",
                f"open the upload pull request of client {client_id!r}",
            )
            return

        def build(snap: Snapshot) -> tuple[dict[str, Any], list[str]]:
            stale = [p for p in snap.files if p.startswith(prefix) and p not in adds]
            return adds, stale

        self._commit(self.client_repo_for(client_id), build, title, card=False)

    def list_client_uploads(self, round_idx: int) -> list[str]:
        """Client ids with a complete upload: participants' repos (`client_repo`) or open pull requests (`pr`).

        In `client_repo` mode one paginated listing finds the participants' repos (see the module docstring);
        the commit sha of each upload found is kept for `download_client` (no second look-up per client).
        """
        round_idx = check_round(round_idx)
        if self.client_mode == "client_repo":
            participants = self._participants(round_idx)
            if not participants:
                return []
            listed = self._list_uploads(round_idx, participants)
            if listed is not None:
                self._listed[round_idx] = listed
                return sorted(listed)
            self._listed.pop(round_idx, None)  # probed repo by repo: downloads read each repo's head again
            candidates = [(cid, self.client_repo_for(cid), "main") for cid in participants]
        else:
            candidates = [(cid, self.repo_id, f"refs/pr/{num}") for cid, num in self._upload_prs(round_idx).items()]

        def complete(candidate: tuple[str, str, str]) -> bool:
            client_id, repo, revision = candidate
            return self.hub.file_exists(repo, f"rounds/{round_idx}/clients/{client_id}/{CLIENT_FILE}", revision)

        if not candidates:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_workers, len(candidates)))) as pool:
            found = list(pool.map(complete, candidates))
        return sorted(c[0] for c, ok in zip(candidates, found) if ok)

    def client_repo_prefix(self) -> tuple[str, str] | None:
        """`(namespace, name prefix)` shared by every client repo, or None when the mapping gives no such prefix.

        Example:
            ```python
            HubStore("org/fed").client_repo_prefix()   # ("org", "fed-client-")
            ```
        """
        if callable(self._client_repo_id):
            return None
        namespace, name = self.repo_id.split("/")
        try:
            repo = self._client_repo_id.format(
                repo_id=self.repo_id, namespace=namespace, name=name, client_id=_SENTINEL
            )
        except (KeyError, IndexError, ValueError):
            return None
        owner, _, rest = repo.partition("/")
        if _SENTINEL in owner or rest.count(_SENTINEL) != 1 or not rest.endswith(_SENTINEL):
            return None
        return owner, rest[: -len(_SENTINEL)]

    def _list_uploads(
        self, round_idx: int, participants: list[str]
    ) -> dict[str, tuple[str, str, tuple[str, ...]]] | None:
        """Participants with a complete upload -> (repo, sha, files), from one listing; None to probe each repo.

        Every entry of the listing is untrusted: entries that are not a participant's repo, carry no valid
        sha, or list no `client.json` of this round are ignored; a listing longer than
        4 x participants + 1000 entries is not read further (None: the caller checks each participant).
        """
        prefix = self.client_repo_prefix()
        if prefix is None:
            return None
        owner, name_prefix = prefix
        wanted = {self.client_repo_for(cid): cid for cid in participants}
        max_entries = _LISTING_SLACK[0] * len(participants) + _LISTING_SLACK[1]
        entries = self.hub.list_models(owner, name_prefix, ("sha", "siblings"), max_entries)
        if entries is None:
            logger.warning(
                "The listing of %s/%s* holds over %d repos (look-alike repos?): checking the %d participants' "
                "repos one by one instead.", owner, name_prefix, max_entries, len(participants),
            )
            return None
        found: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        for entry in entries:
            repo, sha, siblings = entry.get("id"), entry.get("sha"), entry.get("siblings")
            cid = wanted.get(repo) if isinstance(repo, str) else None
            if cid is None or cid in found or not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
                continue
            prefix = f"rounds/{round_idx}/clients/{cid}/"
            if isinstance(siblings, list):
                names = {s.get("rfilename") for s in siblings if isinstance(s, dict)}
                if prefix + CLIENT_FILE in names:
                    found[cid] = (repo, sha, tuple(n for n in CLIENT_FILES if prefix + n in names))
            elif self.hub.file_exists(repo, prefix + CLIENT_FILE, sha):  # no file names listed: ask this repo
                found[cid] = (repo, sha, CLIENT_FILES)
        return found

    def download_client(self, round_idx: int, client_id: str) -> Path:
        """Download a client's upload (only CLIENT_FILES, each within `max_client_file_bytes`); return the folder."""
        round_idx, client_id = check_round(round_idx), validate_client_id(client_id)
        missing = ClientUploadNotFoundError(f"No complete upload from client {client_id!r} for round {round_idx}.")
        listed = self._listed.get(round_idx, {}).get(client_id) if self.client_mode == "client_repo" else None
        if listed is not None:
            return self._fetch_listed(round_idx, client_id, *listed)
        if self.client_mode == "pr":
            num = self._upload_prs(round_idx).get(client_id)
            if num is None:
                raise missing
            repo, revision = self.repo_id, f"refs/pr/{num}"
        else:
            repo, revision = self.client_repo_for(client_id), "main"
        snap = self.hub.snapshot_or_none(repo, revision)
        prefix = f"rounds/{round_idx}/clients/{client_id}/"
        entries = {name: snap.files[prefix + name] for name in CLIENT_FILES if snap and prefix + name in snap.files}
        if CLIENT_FILE not in entries:
            raise missing
        limit = self.max_client_file_bytes
        for name, entry in entries.items():
            if limit is not None and entry.size is not None and entry.size > limit:
                raise UploadTooLargeError(
                    f"Client {client_id!r} uploaded {name} of {entry.size} bytes for round {round_idx}, over the "
                    f"limit of {limit} bytes (max_client_file_bytes); it was not downloaded."
                )
        return self._materialize(repo, snap.sha, prefix, {name: self.hub.download(repo, prefix + name, snap.sha)
                                                          for name in entries})

    def _fetch_listed(self, round_idx: int, client_id: str, repo: str, sha: str, names: tuple[str, ...]) -> Path:
        """Download an upload found by the listing: one GET per file at its commit sha, each within the cap."""
        prefix = f"rounds/{round_idx}/clients/{client_id}/"
        target = self._uploads_root() / repo.replace("/", "--") / sha / prefix
        if target.is_dir() and not target.is_symlink() and (target / CLIENT_FILE).is_file():
            return target
        with self._staging(target) as staged:
            for name in names:
                try:
                    self.hub.fetch(repo, prefix + name, sha, staged / name, self.max_client_file_bytes)
                except FileTooLargeError:
                    raise UploadTooLargeError(
                        f"Client {client_id!r} uploaded {name} over the limit of {self.max_client_file_bytes} bytes "
                        f"for round {round_idx} (max_client_file_bytes); it was not downloaded."
                    ) from None
                except HfHubHTTPError as e:
                    if e.response is None or e.response.status_code != 404:
                        raise
                    if name == CLIENT_FILE:
                        raise ClientUploadNotFoundError(
                            f"No complete upload from client {client_id!r} for round {round_idx} in {repo}@{sha}."
                        ) from None
        return target

    @contextlib.contextmanager
    def _staging(self, target: Path) -> Iterator[Path]:
        """A private folder to fill with one upload's files; on success it becomes `target` at once (a copy of the
        same commit written meanwhile by another process wins: same bytes). A full disk is `cache_full_error`."""
        self._uploads_root().mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=temp_prefix(".tmp-", "upload"), dir=self._uploads_root()))
        try:
            yield staged
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staged, target)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise cache_full_error(self._uploads_root()) from e
            raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def _uploads_root(self) -> Path:
        from huggingface_hub import constants

        return Path(self.hub.cache_dir or constants.HF_HUB_CACHE) / _UPLOADS_DIR

    def _materialize(self, repo: str, sha: str, prefix: str, downloaded: dict[str, Path]) -> Path:
        """Copy the files of one upload, all from commit `sha`, into a folder of regular files (no links).

        The Hugging Face cache hands out links to blobs; the validator never follows links, so the coordinator
        reads a private copy instead. The copy is keyed by the commit, so it never mixes two uploads.
        """
        target = self._uploads_root() / repo.replace("/", "--") / sha / prefix
        if target.is_dir() and not target.is_symlink():
            return target
        with self._staging(target) as staged:
            for name, source in downloaded.items():
                shutil.copyfile(source, staged / name)  # the cache is ours: its link to the blob is followed
        return target

    # ------------------------------------------------------------------------------------------ summaries
    def write_summary(self, round_idx: int, summary: dict) -> None:
        """Commit `rounds/<t>/summary.json` (with the global staged for round t + 1, if any: one commit)."""
        round_idx = check_round(round_idx)
        data = dump_json(summary)
        path = f"rounds/{round_idx}/{SUMMARY_FILE}"
        adds: dict[str, Any] = {path: data}
        pending = self._pending_stage
        if pending is not None and pending[0] == round_idx + 1:
            adds.update(pending[1])
        prefix = f"rounds/{round_idx + 1}/{STAGED_GLOBAL}/"

        def build(snap: Snapshot) -> tuple[dict[str, Any], list[str]]:
            return adds, [p for p in snap.files if p.startswith(prefix) and p not in adds] if len(adds) > 1 else []

        self._commit(self.repo_id, build, f"hetlora: summary of round {round_idx}")
        if pending is not None and pending[0] == round_idx + 1:
            self._pending_stage = None

    def read_summary(self, round_idx: int) -> dict | None:
        return self.hub.read_json(self.repo_id, f"rounds/{check_round(round_idx)}/{SUMMARY_FILE}")

    def _card(self, snap: Snapshot, adds: dict[str, Any]) -> str:
        """The model card for the state `snap` + `adds`: federation settings and the summaries of all rounds."""

        def load(path: str) -> Any:
            if path in adds:
                return json.loads(_as_bytes(adds[path]))
            return self.hub.json_at(self.repo_id, snap, path)

        paths = set(snap.files) | set(adds)
        federation = load(FEDERATION_FILE) if FEDERATION_FILE in paths else None
        summaries = {int(m[1]): load(p) for p in paths if (m := _SUMMARY_RE.fullmatch(p))}
        latest = max(_published_rounds(paths), default=None)
        return render_model_card(self.repo_id, federation, latest, summaries)


    def _download_global(self, snap: Snapshot, round_idx: int, server_state: bool = True) -> GlobalAdapter:
        prefix = f"rounds/{round_idx}/global/"
        names = [p for p in snap.files if p.startswith(prefix) and "/" not in p[len(prefix):]
                 and (server_state or p[len(prefix):] != SERVER_STATE_FILE)]
        paths = {Path(p).name: self.hub.download(self.repo_id, p, snap.sha) for p in names}
        weights = paths[ADAPTER_FILE]
        return GlobalAdapter(round=round_idx, revision=file_sha256(weights), path=weights.parent)

    def _participants(self, round_idx: int) -> list[str]:
        if round_idx in self._participants_cache:  # round.json of a published round never changes
            return self._participants_cache[round_idx]
        snap = self.hub.snapshot_or_none(self.repo_id)
        path = f"rounds/{round_idx}/global/{ROUND_FILE}"
        if snap is None or path not in snap.files:
            return []
        participants = self.hub.json_at(self.repo_id, snap, path).get("participants")
        if not isinstance(participants, list):
            raise ValueError(
                f"{path} in {self.repo_id} has no 'participants' list: in client_repo mode the coordinator finds "
                "uploads by checking each participant's repo, so write the participants into round.json."
            )
        self._participants_cache[round_idx] = [validate_client_id(c) for c in participants]
        return self._participants_cache[round_idx]

    def _upload_prs(self, round_idx: int) -> dict[str, int]:
        """Open upload pull requests of the round: client id -> newest pull request number."""
        try:
            discussions = self.hub.call(
                lambda: list(
                    self.api.get_repo_discussions(
                        self.repo_id, discussion_type="pull_request", discussion_status="open"
                    )
                ),
                f"list the pull requests of {self.repo_id}",
            )
        except RepositoryNotFoundError:
            return {}
        prs: dict[str, int] = {}
        for d in discussions:
            m = _PR_TITLE_RE.fullmatch(d.title)
            if m and int(m[1]) == round_idx:
                try:
                    client_id = validate_client_id(m[2])
                except ValueError:
                    continue
                prs[client_id] = max(prs.get(client_id, -1), d.num)
        return prs


# ---------------------------------------------------------------------------------------------------- helpers
def _as_bytes(value: bytes | Path) -> bytes:
    return value if isinstance(value, bytes) else Path(value).read_bytes()


def _published_rounds(paths: Iterable[str]) -> list[int]:
    return [int(m[1]) for p in paths if (m := _GLOBAL_RE.fullmatch(p))]
