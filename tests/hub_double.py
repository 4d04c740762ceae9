"""A Hugging Face Hub HTTP test double: a loopback server answering the routes huggingface_hub 2.4 uses.

It keeps repos in memory (every commit is a full snapshot of the files), answers the way the Hub does where
`huggingface_hub` looks (status codes, `X-Error-Code` / `X-Error-Message` headers, JSON shapes, `X-Repo-Commit`
and `ETag` on `resolve`, `%Y-%m-%dT%H:%M:%S.%fZ` dates, URL-encoded `refs%2Fpr%2F1` revisions), and answers every
preupload as "regular" so file contents travel inline (base64) in the NDJSON commit: no LFS or Xet server.

Auth: `Authorization: Bearer <token>`; an unknown token gets 401. Each token belongs to a user and may write the
repos matching its `write` patterns (fnmatch) and read those matching `read`; a commit to a branch needs write
access (403 otherwise), a pull request (`create_pr=1`) only read access, as on the Hub.

Faults for tests: `inject(route, status, times=..., headers=...)` answers the next calls of a route with an error
(e.g. 429 with `Retry-After`); `before(route, fn)` runs `fn` inside the server just before a call is handled
(e.g. `double.commit(...)` to make a concurrent writer win a race, so the client's `parent_commit` is stale).

Listing: `GET /api/models?author=&search=` answers the readable model repos of `author` whose id contains
`search`, `page_size` a page with a `Link: <...>; rel="next"` header, each entry with `id` plus the `expand`ed
`sha`, `lastModified` and `siblings`. Rate limits: `set_rate_limit(bucket, quota, window_s, clock)` makes every
answer of that bucket ("api", or "resolvers" for `/resolve/`) carry the Hub's `RateLimit` / `RateLimit-Policy`
headers, counted in fixed windows of `clock` (a fake clock in tests), and answer 429 once the quota is spent.

Example:
    ```python
    double = HubDouble().start()
    api = HfApi(endpoint=double.endpoint, token=double.token)
    api.create_repo("org/repo")
    double.inject("commit", 429, times=2, headers={"Retry-After": "0.05"})
    double.stop()
    ```
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # "refs/heads/main", "refs/tags/x", "refs/pr/1" -> oid
    discussions: list[dict] = field(default_factory=list)

    def resolve(self, rev: str) -> str | None:
        if rev in self.commits:
            return rev
        for ref in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}"):
            if ref in self.refs:
                return self.refs[ref]
        return None


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


_REPO = r"/api/(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"
_RESOLVE = r"/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"
ROUTES: list[tuple[str, str, re.Pattern]] = [
    (method, name, re.compile(pattern))
    for method, name, pattern in [
        ("GET", "whoami", r"/api/whoami-v2"),
        ("GET", "models", r"/api/models"),
        ("POST", "validate_yaml", r"/api/validate-yaml"),
        ("POST", "create_repo", r"/api/repos/create"),
        ("GET", "revision", _REPO + r"(?:/revision/(?P<rev>[^/]+))?"),
        ("POST", "preupload", _REPO + r"/preupload/(?P<rev>[^/]+)"),
        ("POST", "commit", _REPO + r"/commit/(?P<rev>[^/]+)"),
        ("GET", "refs", _REPO + r"/refs"),
        ("GET", "commits", _REPO + r"/commits/(?P<rev>[^/]+)"),
        ("GET", "tree", _REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"),
        ("POST", "branch", _REPO + r"/branch/(?P<name>[^/]+)"),
        ("POST", "tag", _REPO + r"/tag/(?P<rev>[^/]+)"),
        ("GET", "discussions", _REPO + r"/discussions"),
        ("HEAD", "resolve", _RESOLVE),
        ("GET", "resolve", _RESOLVE),
    ]
]


class HubDouble:
    """An in-memory Hub behind a loopback HTTP server. See the module docstring.

    Attributes:
        endpoint: `http://127.0.0.1:<port>` once started.
        token: the admin token (user `admin_user`, writes every repo).
    """

    def __init__(self, *, admin_user: str = "federation", admin_token: str = "hf_double_admin") -> None:
        self.token = admin_token
        self.endpoint = ""
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: dict[str, dict] = {}
        self.calls: list[tuple[str, str, str | None, int]] = []  # (method, route, repo_id, status)
        self._faults: list[dict] = []
        self._hooks: list[dict] = []
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self.page_size = 1000
        self._limits: dict[str, dict] = {}  # bucket -> quota, window_s, clock, window start, used
        self.add_token(admin_token, admin_user, write=["*"])

    # ------------------------------------------------------------------------------------ test controls
    def start(self) -> HubDouble:
        handler = type("Handler", (_Handler,), {"double": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def add_token(self, token: str, user: str, *, write: list[str] = (), read: list[str] = ("*",)) -> None:
        """Register a token of `user` that may write repos matching `write` and read those matching `read`."""
        self.tokens[token] = {"user": user, "write": list(write), "read": list(read)}

    def inject(
        self, route: str, status: int, *, times: int = 1, headers: dict | None = None, body: Any = None
    ) -> None:
        """Answer the next `times` calls of `route` with `status` (and `headers`, JSON `body`)."""
        with self._lock:
            self._faults.append({"route": route, "status": status, "times": times, "headers": headers or {},
                                 "body": body if body is not None else {"error": f"injected {status}"}})

    def before(self, route: str, fn: Callable[[HubDouble], None], *, times: int = 1) -> None:
        """Run `fn(double)` inside the server before the next `times` calls of `route` are handled."""
        with self._lock:
            self._hooks.append({"route": route, "fn": fn, "times": times})

    def set_rate_limit(self, bucket: str, quota: int, window_s: float, clock: Callable[[], float]) -> None:
        """Limit `bucket` ("api" or "resolvers") to `quota` answers per fixed window of `window_s` of `clock`."""
        with self._lock:
            self._limits[bucket] = {"quota": quota, "window": window_s, "clock": clock, "start": clock(), "used": 0}

    def _rate(self, name: str) -> tuple[dict, bool]:
        """The RateLimit headers of one answer of route `name`, and whether it is over the quota (429)."""
        bucket = "resolvers" if name == "resolve" else "api"
        limit = self._limits.get(bucket)
        if limit is None:
            return {}, False
        now = limit["clock"]()
        if now >= limit["start"] + limit["window"]:
            limit["start"] += limit["window"] * ((now - limit["start"]) // limit["window"])
            limit["used"] = 0
        over = limit["used"] >= limit["quota"]
        if not over:
            limit["used"] += 1
        reset = max(0, int(-(-(limit["start"] + limit["window"] - now) // 1)))
        headers = {"RateLimit": f'"{bucket}";r={limit["quota"] - limit["used"]};t={reset}',
                   "RateLimit-Policy": f'"fixed window";"{bucket}";q={limit["quota"]};w={int(limit["window"])}'}
        if over:
            headers["Retry-After"] = str(reset)
        return headers, over

    def count(self, route: str, status: int | None = None, repo_id: str | None = None) -> int:
        return sum(
            1 for _, r, rid, s in self.calls
            if r == route and (status is None or s == status) and (repo_id is None or rid == repo_id)
        )

    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> Repo:
        with self._lock:
            repo = Repo(repo_id, repo_type, private, _now())
            self.repos[(repo_type, repo_id)] = repo
            self._new_commit(repo, None, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                             "initial commit", "", "system", "refs/heads/main")
            return repo

    def commit(self, repo_id: str, files: dict[str, bytes | None], message: str = "direct commit", *,
               revision: str = "main", repo_type: str = "model", author: str = "someone-else") -> str:
        """Commit server-side (another writer): `files` maps paths to new bytes, or None to delete."""
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            ref = revision if revision.startswith("refs/") else f"refs/heads/{revision}"
            parent = repo.refs[ref]
            new = dict(repo.commits[parent].files)
            for path, data in files.items():
                if data is None:
                    new.pop(path, None)
                else:
                    new[path] = data
            return self._new_commit(repo, parent, new, message, "", author, ref)

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            repo = self.repos[(repo_type, repo_id)]
            return dict(repo.commits[repo.resolve(revision)].files)

    # ----------------------------------------------------------------------------------------- internals
    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], title: str, message: str,
                    author: str, ref: str) -> str:
        seed = f"{repo.repo_id}\n{parent}\n{title}\n{next(self._counter)}\n" + "\n".join(
            f"{p}:{git_blob_oid(d)}" for p, d in sorted(files.items())
        )
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, files, title, message, author, _now())
        repo.refs[ref] = oid
        return oid

    def _user(self, headers) -> dict | None:
        auth = headers.get("Authorization") or ""
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HttpError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _repo(self, user: dict | None, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        readable = repo is not None and (
            not repo.private or (user is not None and any(fnmatch.fnmatch(repo_id, p) for p in user["read"]))
        )
        if not readable:
            raise HttpError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _check_write(self, user: dict | None, repo_id: str) -> None:
        if user is None or not any(fnmatch.fnmatch(repo_id, p) for p in user["write"]):
            name = user["user"] if user else "anonymous"
            raise HttpError(403, f"You don't have the rights to write to {repo_id} (user {name})")

    def _rev(self, repo: Repo, rev: str) -> str:
        oid = repo.resolve(unquote(rev))
        if oid is None:
            raise HttpError(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
        return oid

    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        url = urlsplit(raw_path)
        query: dict[str, Any] = {k: v[-1] for k, v in parse_qs(url.query).items()}
        query["_multi"] = parse_qs(url.query)
        found = next(((n, m) for verb, n, p in ROUTES if verb == method and (m := p.fullmatch(url.path))), None)
        if found is None:
            return _json(404, {"error": f"double: no route for {method} {url.path}"})
        name, match = found
        params = {k: v for k, v in match.groupdict().items() if v is not None}
        repo_id = unquote(params["repo"]) if "repo" in params else None
        with self._lock:
            fault = next((f for f in self._faults if f["route"] == name and f["times"] > 0), None)
            if fault:
                fault["times"] -= 1
            hooks = [h for h in self._hooks if h["route"] == name and h["times"] > 0]
            for h in hooks:
                h["times"] -= 1
        for h in hooks:
            h["fn"](self)
        with self._lock:
            rate_headers, over = self._rate(name)
        if fault:
            status, out_headers, out = _json(fault["status"], fault["body"])
            out_headers.update(fault["headers"])
        elif over:
            status, out_headers, out = _json(429, {"error": "rate limit reached"})
        else:
            try:
                with self._lock:
                    status, out_headers, out = getattr(self, f"_route_{name}")(
                        self._user(headers), params, query, body, repo_id=repo_id
                    )
            except HttpError as e:
                out_headers = {"X-Error-Message": e.message, **e.headers}
                if e.code:
                    out_headers["X-Error-Code"] = e.code
                status, hdrs, out = _json(e.status, {"error": e.message})
                out_headers.update(hdrs)
        out_headers = {**rate_headers, **out_headers}
        with self._lock:
            self.calls.append((method, name, repo_id, status))
        return status, out_headers, out

    # ------------------------------------------------------------------------------------------- routes
    def _route_whoami(self, user, params, query, body, **_):
        if user is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        return _json(200, {"type": "user", "id": user["user"], "name": user["user"], "fullname": user["user"],
                           "orgs": [], "auth": {"type": "access_token",
                                                "accessToken": {"displayName": "double", "role": "fineGrained"}}})

    def _route_models(self, user, params, query, body, **_):
        author, search = query.get("author"), query.get("search", "")
        expand = set(query["_multi"].get("expand", []))
        found = []
        for (repo_type, rid), repo in sorted(self.repos.items()):
            if repo_type != "model" or (author and rid.split("/")[0] != author) or search not in rid:
                continue
            if repo.private and not (user is not None and any(fnmatch.fnmatch(rid, p) for p in user["read"])):
                continue
            head = repo.commits[repo.refs["refs/heads/main"]]
            entry: dict[str, Any] = {"_id": rid, "id": rid}
            if "sha" in expand:
                entry["sha"] = head.oid
            if "lastModified" in expand:
                entry["lastModified"] = head.date
            if "siblings" in expand:
                entry["siblings"] = [{"rfilename": p} for p in sorted(head.files)]
            found.append(entry)
        start = int(query.get("cursor", 0))
        page = found[start:start + self.page_size]
        status, headers, out = _json(200, page)
        if start + self.page_size < len(found):
            rest = {k: v for k, v in query["_multi"].items() if k != "cursor"}
            rest["cursor"] = [str(start + self.page_size)]
            headers["Link"] = f'<{self.endpoint}/api/models?{urlencode(rest, doseq=True)}>; rel="next"'
        return status, headers, out

    def _route_validate_yaml(self, user, params, query, body, **_):
        return _json(200, {"errors": [], "warnings": []})

    def _route_create_repo(self, user, params, query, body, **_):
        payload = json.loads(body or b"{}")
        if user is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user['user']}/{payload['name']}"
        url = f"{self.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            return _json(409, {"error": "You already created this model repo", "url": url})
        self._check_write(user, repo_id)
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        self.create_repo(repo_id, repo_type=repo_type, private=private)
        return _json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _route_revision(self, user, params, query, body, *, repo_id):
        repo = self._repo(user, params["type"], repo_id)
        commit = repo.commits[self._rev(repo, params.get("rev", "main"))]
        return _json(200, {
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": commit.oid,
            "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "lastModified": commit.date, "createdAt": repo.created_at,
            "siblings": [
                {"rfilename": p, "size": len(d), "blobId": git_blob_oid(d)} for p, d in sorted(commit.files.items())
            ],
        })

    def _route_preupload(self, user, params, query, body, *, repo_id):
        repo = self._repo(user, params["type"], repo_id)
        if query.get("create_pr") != "1":
            self._check_write(user, repo_id)
        files = repo.commits[self._rev(repo, params["rev"])].files
        out = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None}
               for f in json.loads(body)["files"]]
        return _json(200, {"files": out, "commitOid": repo.resolve(unquote(params["rev"]))})

    def _route_commit(self, user, params, query, body, *, repo_id):
        repo = self._repo(user, params["type"], repo_id)
        rev = unquote(params["rev"])
        create_pr = query.get("create_pr") == "1"
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item["key"] == "header"), {})
        if create_pr:
            parent = self._rev(repo, rev)
            num = len(repo.discussions) + 1
            ref = f"refs/pr/{num}"
        else:
            ref = rev if rev.startswith("refs/pr/") else f"refs/heads/{rev}"
            if ref not in repo.refs:
                raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            if not ref.startswith("refs/pr/"):
                self._check_write(user, repo_id)
            parent = repo.refs[ref]
            if header.get("parentCommit") not in (None, parent):
                raise HttpError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[parent].files)
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                path = value["path"].rstrip("/")
                gone = [p for p in files if p == path or (key == "deletedFolder" and p.startswith(path + "/"))]
                if not gone:
                    raise HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del files[p]
            elif key == "lfsFile":
                raise HttpError(400, "The Hub double stores no LFS objects (preupload answers 'regular').")
        title = header.get("summary", "")
        oid = self._new_commit(repo, parent, files, title, header.get("description", ""), user and user["user"], ref)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        out = {"success": True, "commitOid": oid, "commitUrl": f"{self.endpoint}/{prefix}{repo_id}/commit/{oid}",
               "hookOutput": ""}
        if create_pr:
            repo.discussions.append({"num": num, "title": title, "status": "open", "isPullRequest": True,
                                     "author": {"name": user["user"] if user else "anonymous"}, "createdAt": _now()})
            out["pullRequestUrl"] = f"{self.endpoint}/{prefix}{repo_id}/discussions/{num}"
        return _json(200, out)

    def _route_refs(self, user, params, query, body, *, repo_id):
        repo = self._repo(user, params["type"], repo_id)

        def refs(prefix: str, strip: bool) -> list[dict]:
            return [{"name": r[len(prefix):] if strip else r, "ref": r, "targetCommit": oid}
                    for r, oid in sorted(repo.refs.items()) if r.startswith(prefix)]

        out = {"branches": refs("refs/heads/", True), "converts": [], "tags": refs("refs/tags/", True)}
        if query.get("include_prs") == "1":
            out["pullRequests"] = refs("refs/pr/", False)
        return _json(200, out)

    def _route_commits(self, user, params, query, body, *, repo_id):
        repo = self._repo(user, params["type"], repo_id)
        oid, out = self._rev(repo, params["rev"]), []
        while oid is not None:
            c = repo.commits[oid]
            out.append({"id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                        "authors": [{"user": c.author, "avatar": None}]})
            oid = c.parent
        return _json(200, out)

    def _route_tree(self, user, params, query, body, *, repo_id):
        repo = self._repo(user, params["type"], repo_id)
        oid = self._rev(repo, params["rev"])
        files = repo.commits[oid].files
        base = unquote(params.get("path", "")).strip("/")
        prefix = base + "/" if base else ""
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        entries: dict[str, dict] = {}
        for path, data in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else 1):
                d = prefix + "/".join(parts[:depth])
                entries[d] = {"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(d.encode()).hexdigest()}
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
            else:
                d = prefix + parts[0]
                entries[d] = {"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(d.encode()).hexdigest()}
        if base and not entries:
            raise HttpError(404, f"{base} does not exist on {unquote(params['rev'])}", "EntryNotFound",
                            {"X-Repo-Commit": oid})
        return _json(200, list(entries.values()))

    def _route_branch(self, user, params, query, body, *, repo_id):
        repo = self._repo(user, params["type"], repo_id)
        self._check_write(user, repo_id)
        ref = f"refs/heads/{unquote(params['name'])}"
        if ref in repo.refs:
            raise HttpError(409, "Reference already exists")
        repo.refs[ref] = self._rev(repo, json.loads(body or b"{}").get("startingPoint") or "main")
        return _json(200, {})

    def _route_tag(self, user, params, query, body, *, repo_id):
        repo = self._repo(user, params["type"], repo_id)
        self._check_write(user, repo_id)
        payload = json.loads(body)
        ref = f"refs/tags/{payload['tag']}"
        if ref in repo.refs:
            raise HttpError(409, "Tag already exists")
        repo.refs[ref] = self._rev(repo, params["rev"])
        return _json(200, {})

    def _route_discussions(self, user, params, query, body, *, repo_id):
        repo = self._repo(user, params["type"], repo_id)
        kind, status = query.get("type", "all"), query.get("status", "all")
        found = [
            {**d, "repo": {"name": repo_id, "type": repo.repo_type}, "numComments": 1, "pinned": False}
            for d in reversed(repo.discussions)
            if (kind == "all" or d["isPullRequest"] == (kind == "pull_request"))
            and (status == "all" or d["status"] == status)
            and query.get("author") in (None, d["author"]["name"])
        ]
        start = int(query.get("p", 0)) * 50
        return _json(200, {"discussions": found[start:start + 50], "count": len(found), "start": start,
                           "numClosedDiscussions": sum(d["status"] == "closed" for d in repo.discussions)})

    def _route_resolve(self, user, params, query, body, *, repo_id):
        repo = self._repo(user, params.get("type", "model"), repo_id)
        oid = self._rev(repo, params["rev"])
        path = unquote(params["path"])
        files = repo.commits[oid].files
        if path not in files:
            raise HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        data = files[path]
        headers = {"X-Repo-Commit": oid, "ETag": f'"{git_blob_oid(data)}"', "Content-Type": "application/octet-stream"}
        return 200, headers, data


def _json(status: int, obj: Any) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in separate writes: avoid 40 ms delayed-ACK stalls
    double: HubDouble

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        body = self._read_body()
        status, headers, out = self.double.handle(self.command, self.path, self.headers, body)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _serve
