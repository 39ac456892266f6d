"""A local Hugging Face hub endpoint for tests: the unmodified ``huggingface_hub`` client downloads from it.

Why: the code under test fetches base models from the hub with ``huggingface_hub.snapshot_download``,
and the hub (huggingface.co) cannot be reached from here (no internet). Mocking the client would test
our guesses about it; this server instead answers the HTTP calls the installed client really makes
(huggingface_hub 2.4, read from its source), so the client's own code runs end to end. Point it here
with ``endpoint=hub.url`` (or ``HF_ENDPOINT``).

What it implements, as the hub does:

* ``GET /api/{models,datasets}/{repo_id}[/revision/{revision}]``: repo info (``sha``, ``siblings``;
  with ``?blobs=true`` their size, blob id and LFS data). ``snapshot_download`` resolves a branch here.
* ``GET /api/{models,datasets}/{repo_id}/tree/{revision}[/{path}]`` (``?recursive=true``): the file
  listing ``snapshot_download`` downloads (one page, so no ``Link`` pagination header).
* ``HEAD``/``GET /[datasets/]{repo_id}/resolve/{revision}/{filename}``: a regular file is answered
  directly (``ETag`` = its git blob id, ``X-Repo-Commit``, ``Content-Length``); an LFS file (by name
  pattern or size, like a repo's ``.gitattributes``) is a ``302`` to a signed URL on a second origin,
  the "CDN", with ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``: the client then downloads from the
  CDN without its ``Authorization`` header, as it does from the real CDN.
* ``Range`` requests (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``: ``206`` + ``Content-Range``, ``416``
  past the end) on both origins: the client resumes an interrupted transfer with one.
* Errors with the ``X-Error-Code`` / ``X-Error-Message`` headers ``hf_raise_for_status`` maps to
  exceptions: ``RepoNotFound`` (``401`` without a valid token, ``404`` with one: the hub does not tell
  anonymous callers which private repos exist) -> ``RepositoryNotFoundError``; ``RevisionNotFound``
  (``404``) -> ``RevisionNotFoundError``; ``EntryNotFound`` (``404``) -> ``RemoteEntryNotFoundError``;
  ``GatedRepo`` (``401`` without a token, ``403`` for a token without access) -> ``GatedRepoError``.
  A gated repo's info and file listing stay public, as on the hub: only its files are gated. An
  unknown token is ``401 Invalid credentials in Authorization header`` (an ``HfHubHTTPError``).
* No Xet: no ``X-Xet-*`` header or ``xetHash`` field is ever sent, so the client (even with
  ``hf_xet`` installed) downloads over plain HTTP.

What it does not: uploads, tags, pull-request refs, pagination, any other API.

Usage::

    with HubServer() as hub:
        v1 = hub.add_repo("org/model", {"config.json": b"{}", "model.safetensors": weights})
        v2 = hub.add_repo("org/model", {"config.json": b'{"v": 2}'})  # a new commit on main
        snapshot_download("org/model", revision=v1, local_dir=dest, endpoint=hub.url, token=hub.token)
        hub.fail_after("model.safetensors", 11 * 2**20)  # the next GET of it is cut after 11 MiB
        [r for r in hub.requests if r.range is not None]  # what the client asked for

A repo's files are given per commit, whole (``add_repo`` sets a branch to a new commit holding exactly
those files); the revision a client names may be a branch or a full 40-hex commit sha.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote, unquote

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

DEFAULT_TOKEN = "hf_loraplane_test_token"
# Names a repo's .gitattributes sends to LFS by default on the hub (a subset), and its size rule.
DEFAULT_LFS_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "*.h5",
    "*.onnx",
    "*.msgpack",
)
DEFAULT_LFS_THRESHOLD = 10 * 1024 * 1024
_CHUNK = 1024 * 1024
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_START_DEADLINE_S = 10.0
_STOP_DEADLINE_S = 10.0

RepoType = Literal["model", "dataset"]
_API_PREFIX: dict[str, RepoType] = {"models": "model", "datasets": "dataset"}


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server answered (in arrival order; see ``HubServer.requests``)."""

    method: str
    path: str  # decoded, without the query
    query: str
    origin: Literal["hub", "cdn"]
    range: str | None  # the Range header, as sent
    authorization: str | None  # the Authorization header, as sent
    status: int
    cut_after: int | None = None  # body bytes sent before the connection was cut (a fault)


@dataclass(frozen=True)
class _Blob:
    data: bytes
    git_oid: str  # git blob id: of the content, or of the LFS pointer file for an LFS file
    sha256: str | None  # set for an LFS file
    pointer_size: int | None

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class _Commit:
    sha: str
    files: dict[str, _Blob]
    created: datetime


@dataclass
class _Repo:
    repo_id: str
    repo_type: RepoType
    gated: bool = False
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    created: datetime = field(default_factory=lambda: datetime.now(UTC))

    def resolve(self, revision: str) -> _Commit | None:
        sha = self.branches.get(revision)
        if sha is None and _COMMIT_RE.fullmatch(revision):
            sha = revision
        return self.commits.get(sha) if sha is not None else None


@dataclass(frozen=True)
class _Fault:
    cut_after: int | None = None  # cut the connection after this many body bytes
    status: int | None = None  # or answer with this status


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _read_dir(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".git" not in path.relative_to(root).parts
    }


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The one byte range ``[start, end)`` a ``Range`` header asks for; None: serve it all.

    Raises ``_HubError(416)`` for a range that starts past the end, as servers do.
    """
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if match is None or (not match.group(1) and not match.group(2)):
        return None  # not one bytes range (a multi-range or another unit): ignored, as many servers do
    first, last = match.group(1), match.group(2)
    if not first:  # a suffix: the last n bytes
        start, end = max(size - int(last), 0), size
    else:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    if start >= size or start >= end:
        raise _HubError(416, None, "Requested Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
    return start, end


class _BodyResponse(Response):
    """``data[start:end]`` sent in chunks; with ``cut_after`` the connection is dropped after that many bytes.

    Dropping it: the app returns without the final body message, so uvicorn closes the connection and
    the client sees fewer bytes than ``Content-Length`` (``RemoteProtocolError``), as on a network failure.
    """

    def __init__(
        self,
        data: bytes,
        start: int,
        end: int,
        status_code: int,
        headers: Mapping[str, str],
        cut_after: int | None,
    ) -> None:
        super().__init__(
            content=b"", status_code=status_code, headers={**headers, "Content-Length": str(end - start)}
        )
        self._view = memoryview(data)[start:end]
        self.cut_after = cut_after

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        limit = len(self._view) if self.cut_after is None else min(self.cut_after, len(self._view))
        for offset in range(0, limit, _CHUNK):
            chunk = bytes(self._view[offset : min(offset + _CHUNK, limit)])
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if self.cut_after is not None:
            return  # no final message: uvicorn drops the connection
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()


class HubServer:
    """A Hugging Face hub endpoint on 127.0.0.1, served by uvicorn in a background thread.

    ``tokens``: the valid tokens (``Authorization: Bearer <token>``), all with access to gated repos;
    ``add_token`` adds more, optionally without gated access. ``lfs_patterns`` / ``lfs_threshold``: which
    files are LFS files (served through the CDN origin), by name or by size.
    """

    def __init__(
        self,
        tokens: Iterable[str] = (DEFAULT_TOKEN,),
        *,
        lfs_patterns: Iterable[str] = DEFAULT_LFS_PATTERNS,
        lfs_threshold: int = DEFAULT_LFS_THRESHOLD,
        host: str = "127.0.0.1",
    ) -> None:
        self._host = host  # another local address (the real node's) makes it reachable from pods
        self._lock = threading.Lock()
        self._tokens: dict[str, bool] = {token: True for token in tokens}
        self._lfs_patterns = tuple(lfs_patterns)
        self._lfs_threshold = lfs_threshold
        self._repos: dict[tuple[RepoType, str], _Repo] = {}
        self._lfs_blobs: dict[str, bytes] = {}
        self._faults: dict[str, deque[_Fault]] = {}
        self._requests: list[RecordedRequest] = []
        self._commit_counter = itertools.count()
        self._signing_key = secrets.token_bytes(32)
        self._sockets: list[socket.socket] = []
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None
        self.url = ""  # the hub endpoint, http://127.0.0.1:<port> (set by start)
        self.cdn_url = ""  # where LFS files are downloaded from: another origin
        self.token = next(iter(self._tokens), DEFAULT_TOKEN)  # a valid token (the first given)

    # --- repos, tokens, faults ----------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | Path,
        revision: str = "main",
        *,
        gated: bool | None = None,
        private: bool | None = None,
        repo_type: RepoType = "model",
    ) -> str:
        """Commit ``files`` (a mapping path -> bytes, or a local directory) as branch ``revision``.

        Creates the repo if needed; each call makes a new commit holding exactly these files and
        points the branch at it (other branches and older commits stay reachable by sha). ``gated`` /
        ``private``: set the repo's flag (None: keep it; a new repo is neither). Returns the commit sha.
        """
        if _COMMIT_RE.fullmatch(revision):
            raise ValueError(f"{revision!r} looks like a commit sha: name a branch")
        contents = _read_dir(files) if isinstance(files, Path) else dict(files)
        blobs = {path.strip("/"): self._blob(path, data) for path, data in contents.items()}
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), _Repo(repo_id=repo_id, repo_type=repo_type))
            if gated is not None:
                repo.gated = gated
            if private is not None:
                repo.private = private
            seed = f"{repo_type}/{repo_id}\n{revision}\n{next(self._commit_counter)}\n{time.time_ns()}\n"
            listing = "".join(f"{path}\0{blob.git_oid}\n" for path, blob in sorted(blobs.items()))
            sha = hashlib.sha1((seed + listing).encode()).hexdigest()
            repo.commits[sha] = _Commit(sha=sha, files=blobs, created=datetime.now(UTC))
            repo.branches[revision] = sha
            for blob in blobs.values():
                if blob.sha256 is not None:
                    self._lfs_blobs[blob.sha256] = blob.data
        return sha

    def add_token(self, token: str, *, gated_access: bool = True) -> None:
        """Make ``token`` valid; ``gated_access=False``: a user who has not been granted gated repos."""
        with self._lock:
            self._tokens[token] = gated_access

    def fail_after(self, filename: str, nbytes: int) -> None:
        """Cut the connection of the next GET of ``filename`` (in any repo) after ``nbytes`` of its body.

        Faults queue up per file, one consumed per GET of its content (a HEAD consumes none).
        """
        self._add_fault(filename, _Fault(cut_after=nbytes))

    def fail_with_status(self, filename: str, status: int) -> None:
        """Answer the next GET of ``filename`` with HTTP ``status`` (queued like ``fail_after``)."""
        self._add_fault(filename, _Fault(status=status))

    def env(self, token: str | None = None) -> dict[str, str]:
        """Variables pointing another process's client here: ``HF_ENDPOINT`` and ``HF_TOKEN``.

        ``HF_TOKEN`` is ``token``, else ``self.token``. (In this process ``HF_ENDPOINT`` was read once, when
        huggingface_hub was imported: pass ``endpoint=`` instead.)
        """
        return {"HF_ENDPOINT": self.url, "HF_TOKEN": token or self.token}

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests answered so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _add_fault(self, filename: str, fault: _Fault) -> None:
        with self._lock:
            self._faults.setdefault(filename.strip("/"), deque()).append(fault)

    def _take_fault(self, filename: str) -> _Fault | None:
        with self._lock:
            queue = self._faults.get(filename)
            return queue.popleft() if queue else None

    def _blob(self, path: str, data: bytes) -> _Blob:
        name = path.rsplit("/", 1)[-1]
        if len(data) >= self._lfs_threshold or any(fnmatch(name, pattern) for pattern in self._lfs_patterns):
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = _lfs_pointer(sha256, len(data))
            return _Blob(data=data, git_oid=_git_blob_oid(pointer), sha256=sha256, pointer_size=len(pointer))
        return _Blob(data=data, git_oid=_git_blob_oid(data), sha256=None, pointer_size=None)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Bind two free ports (hub, CDN) on the host address and serve; returns once uvicorn has started."""
        for _ in range(2):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, 0))
            sock.listen(128)
            self._sockets.append(sock)
        self._hub_port = self._sockets[0].getsockname()[1]
        self.url = f"http://{self._host}:{self._hub_port}"
        self.cdn_url = f"http://{self._host}:{self._sockets[1].getsockname()[1]}"
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "HEAD"])])
        config = uvicorn.Config(
            app,
            http="h11",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._server = _Uvicorn(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": self._sockets}, name="hub-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _START_DEADLINE_S
        while not self._server.ready.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the hub server did not start")
        if not self._server.started:
            self.stop()
            raise RuntimeError("the hub server failed to start")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(_STOP_DEADLINE_S)
            if self._thread.is_alive():
                raise RuntimeError("the hub server did not stop")
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self._server = None
        self._thread = None

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- HTTP ---------------------------------------------------------------------------------

    async def _handle(self, request: Request) -> Response:
        origin: Literal["hub", "cdn"] = "hub" if request.scope["server"][1] == self._hub_port else "cdn"
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        segments = [unquote(part) for part in raw_path.decode("latin-1").split("?", 1)[0].split("/")[1:]]
        cut_after: int | None = None
        try:
            response = self._cdn(request, segments) if origin == "cdn" else self._hub(request, segments)
            if isinstance(response, _BodyResponse):
                cut_after = response.cut_after
        except _HubError as error:
            response = self._error_response(request, error)
        self._record(request, origin, response.status_code, cut_after)
        return response

    def _record(
        self, request: Request, origin: Literal["hub", "cdn"], status: int, cut_after: int | None
    ) -> None:
        entry = RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            origin=origin,
            range=request.headers.get("range"),
            authorization=request.headers.get("authorization"),
            status=status,
            cut_after=cut_after,
        )
        with self._lock:
            self._requests.append(entry)

    @staticmethod
    def _error_response(request: Request, error: _HubError) -> Response:
        headers = dict(error.headers)
        if error.code is not None:
            headers["X-Error-Code"] = error.code
        headers["X-Error-Message"] = error.message
        if request.method == "HEAD":
            return Response(status_code=error.status, headers=headers)
        return JSONResponse({"error": error.message}, status_code=error.status, headers=headers)

    def _hub(self, request: Request, segments: list[str]) -> Response:
        if len(segments) >= 3 and segments[0] == "api" and segments[1] in _API_PREFIX:
            return self._api(request, _API_PREFIX[segments[1]], segments[2:])
        repo_type: RepoType = "model"
        if segments and segments[0] == "datasets":
            repo_type, segments = "dataset", segments[1:]
        # {repo_id}/resolve/{revision}/{filename...}, repo_id one segment ("gpt2") or two ("org/name")
        for width in (2, 1):
            if len(segments) > width + 2 and segments[width] == "resolve":
                repo_id = "/".join(segments[:width])
                revision, filename = segments[width + 1], "/".join(segments[width + 2 :])
                return self._resolve(request, repo_type, repo_id, revision, filename)
        raise _HubError(404, None, "Sorry, we can't find the page you are looking for.")

    def _api(self, request: Request, repo_type: RepoType, rest: list[str]) -> Response:
        for width in (2, 1):
            repo_id = "/".join(rest[:width])
            tail = rest[width:]
            if len(rest) < width or (tail and tail[0] not in ("revision", "tree")):
                continue
            if len(rest) == width or (tail[0] == "revision" and len(tail) == 2):
                revision = tail[1] if tail else "main"
                repo = self._repo(request, repo_type, repo_id, for_content=False)
                return self._info(request, repo, self._commit(repo, revision))
            if tail[0] == "tree" and len(tail) >= 2:
                repo = self._repo(request, repo_type, repo_id, for_content=False)
                commit = self._commit(repo, tail[1])
                return self._tree(request, commit, "/".join(tail[2:]))
        raise _HubError(404, None, "Sorry, we can't find the page you are looking for.")

    def _repo(self, request: Request, repo_type: RepoType, repo_id: str, *, for_content: bool) -> _Repo:
        """The repo if this caller may see it (and, ``for_content``, read its files), else the hub's error."""
        header = request.headers.get("authorization")
        gated_access: bool | None = None  # None: anonymous
        if header is not None:
            scheme, _, token = header.partition(" ")
            with self._lock:
                gated_access = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
            if gated_access is None:
                raise _HubError(401, None, "Invalid credentials in Authorization header")
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and gated_access is None):
            status = 401 if gated_access is None else 404
            raise _HubError(status, "RepoNotFound", "Repository not found")
        if for_content and repo.gated and not gated_access:
            if gated_access is None:
                message = (
                    f"Access to {repo_type} {repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in."
                )
                raise _HubError(401, "GatedRepo", message)
            message = f"Access to {repo_type} {repo_id} is restricted and you are not in the authorized list."
            raise _HubError(403, "GatedRepo", message)
        return repo

    @staticmethod
    def _commit(repo: _Repo, revision: str) -> _Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    @staticmethod
    def _info(request: Request, repo: _Repo, commit: _Commit) -> Response:
        blobs = request.query_params.get("blobs", "").lower() in ("1", "true")
        siblings: list[dict[str, object]] = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, object] = {"rfilename": path}
            if blobs:
                sibling.update(size=blob.size, blobId=blob.git_oid)
                if blob.sha256 is not None:
                    sibling["lfs"] = {
                        "size": blob.size,
                        "sha256": blob.sha256,
                        "pointerSize": blob.pointer_size,
                    }
            siblings.append(sibling)
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        body: dict[str, object] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": author,
            "sha": commit.sha,
            "lastModified": _iso(commit.created),
            "createdAt": _iso(repo.created),
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        return JSONResponse(body)

    @staticmethod
    def _tree(request: Request, commit: _Commit, folder: str) -> Response:
        recursive = request.query_params.get("recursive", "").lower() in ("1", "true")
        folder = folder.strip("/")
        prefix = f"{folder}/" if folder else ""
        inside = {path: blob for path, blob in commit.files.items() if path.startswith(prefix)}
        if folder and not inside:
            raise _HubError(404, "EntryNotFound", f"{folder} does not exist on {commit.sha}")
        entries: dict[str, dict[str, object]] = {}
        for path, blob in sorted(inside.items()):
            relative = path[len(prefix) :].split("/")
            depth = len(relative) if recursive else 1
            for level in range(1, min(depth, len(relative) - 1) + 1):  # the folders on the way
                sub = prefix + "/".join(relative[:level])
                if sub not in entries:
                    oid = hashlib.sha1(f"tree {commit.sha} {sub}".encode()).hexdigest()
                    entries[sub] = {"type": "directory", "oid": oid, "size": 0, "path": sub}
            if recursive or len(relative) == 1:
                entry: dict[str, object] = {
                    "type": "file",
                    "oid": blob.git_oid,
                    "size": blob.size,
                    "path": path,
                }
                if blob.sha256 is not None:
                    entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
                entries[path] = entry
        return JSONResponse(list(entries.values()))

    def _resolve(
        self, request: Request, repo_type: RepoType, repo_id: str, revision: str, filename: str
    ) -> Response:
        repo = self._repo(request, repo_type, repo_id, for_content=True)
        commit = self._commit(repo, revision)
        blob = commit.files.get(filename)
        if blob is None:
            message = f"{filename} does not exist on {revision}"
            raise _HubError(404, "EntryNotFound", message, {"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.git_oid}"', "Accept-Ranges": "bytes"}
        if blob.sha256 is not None:  # LFS: a redirect to a signed CDN url
            expires = str(int(time.time()) + 3600)
            location = (
                f"{self.cdn_url}/lfs/{blob.sha256}/{quote(filename)}"
                f"?Expires={expires}&Signature={self._sign(blob.sha256, expires)}"
            )
            headers.update(
                {
                    "Location": location,
                    "X-Linked-Etag": f'"{blob.sha256}"',
                    "X-Linked-Size": str(blob.size),
                    "Content-Length": "0",
                }
            )
            return Response(status_code=302, headers=headers)
        return self._content(request, filename, blob.data, headers)

    def _cdn(self, request: Request, segments: list[str]) -> Response:
        if len(segments) < 3 or segments[0] != "lfs":
            raise _HubError(404, None, "Not Found")
        sha256, filename = segments[1], "/".join(segments[2:])
        expires = request.query_params.get("Expires", "")
        signature = request.query_params.get("Signature", "")
        valid = expires.isdigit() and hmac.compare_digest(signature, self._sign(sha256, expires))
        if not valid or int(expires) < time.time():
            raise _HubError(403, None, "Access Denied: bad or expired signature")
        with self._lock:
            data = self._lfs_blobs.get(sha256)
        if data is None:
            raise _HubError(404, None, "Not Found")
        return self._content(request, filename, data, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"})

    def _sign(self, sha256: str, expires: str) -> str:
        return hmac.new(self._signing_key, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()

    def _content(self, request: Request, filename: str, data: bytes, headers: dict[str, str]) -> Response:
        """A file's bytes for GET (honouring Range and this file's queued fault) or its headers for HEAD."""
        headers = {**headers, "Content-Type": "application/octet-stream"}
        if request.method == "HEAD":
            return Response(status_code=200, headers={**headers, "Content-Length": str(len(data))})
        fault = self._take_fault(filename)
        if fault is not None and fault.status is not None:
            raise _HubError(fault.status, None, f"injected fault for {filename}")
        start, end, status = 0, len(data), 200
        header = request.headers.get("range")
        if header is not None:
            span = _parse_range(header, len(data))
            if span is not None:
                (start, end), status = span, 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        cut_after = fault.cut_after if fault is not None else None
        return _BodyResponse(data, start, end, status, headers, cut_after)


__all__ = ["DEFAULT_TOKEN", "HubServer", "RecordedRequest"]
