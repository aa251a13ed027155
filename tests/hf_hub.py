"""A local stand-in for the Hugging Face Hub's HTTP API: the world the model import cannot reach
in tests. huggingface_hub's own download code runs unchanged against it (`endpoint=hub.url`).

    with FakeHub() as hub:
        hub.add_repo("org/tiny", {"config.json": b"{}"}, private=True)
        hub.add_token("hf_test")
        snapshot_download("org/tiny", endpoint=hub.url, token="hf_test", local_dir=...)

It answers the way the Hub does for huggingface_hub 2.x: errors carry the X-Error-Code header
that `hf_raise_for_status` maps to RepositoryNotFoundError, GatedRepoError,
RevisionNotFoundError and EntryNotFoundError; no Xet headers, so the plain HTTP download path
(with its Range resume) is the one exercised. Only "main" and the repo's commit sha are
revisions. Nothing it serves or records ever contains a token.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# stored with Git LFS on the Hub (sha256 ETag, `lfs` metadata in listings), as .gitattributes does
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack")
LFS_MIN_SIZE = 10 * 1024 * 1024
_CHUNK = 1024 * 1024
_DATE = "2024-01-01T00:00:00.000Z"
_SHA = re.compile(r"[0-9a-f]{40}")
# the raw (still %-encoded) path: a revision arrives quoted with safe="", so it holds no "/"
_MODEL_API = re.compile(
    r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)"
    r"(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?P<sub>/.+)?)?$"
)
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_LINGER_0 = struct.pack("ii", 1, 0)


@dataclass(frozen=True)
class _File:
    """One repo file, in memory or read from disk on each request (a real model stays there)."""

    content: bytes | Path
    size: int
    blob_id: str  # the git blob sha1: the Hub's ETag of a regular file
    sha256: str  # the LFS oid: the Hub's ETag of an LFS file
    lfs: bool

    @classmethod
    def of(cls, name: str, content: bytes | Path) -> _File:
        size = len(content) if isinstance(content, bytes) else content.stat().st_size
        blob, sha256 = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256()
        for chunk in _read(content, 0, size):
            blob.update(chunk)
            sha256.update(chunk)
        lfs = name.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
        return cls(content, size, blob.hexdigest(), sha256.hexdigest(), lfs)


def _read(content: bytes | Path, start: int, end: int) -> Iterator[bytes]:
    """Bytes [start, end) of a file's content."""
    if isinstance(content, bytes):
        yield content[start:end]
        return
    with content.open("rb") as f:
        f.seek(start)
        while start < end and (chunk := f.read(min(_CHUNK, end - start))):
            start += len(chunk)
            yield chunk


@dataclass
class _Repo:
    repo_id: str
    files: dict[str, _File]
    private: bool
    gated: bool
    sha: str


@dataclass(frozen=True)
class _Token:
    user: str
    can_read: frozenset[str] | None  # None: every private and gated repo

    def may_read(self, repo_id: str) -> bool:
        return self.can_read is None or repo_id in self.can_read


class _HubError(Exception):
    """An answer the Hub gives instead of content: status, X-Error-Code and message."""

    def __init__(
        self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {})
        self.headers |= headers or {}


class FakeHub:
    """Repos, tokens and scripted connection cuts, served over HTTP on `host` (a free port)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.requests: list[dict[str, Any]] = []  # method, path, query, range, auth, status
        self._repos: dict[str, _Repo] = {}
        self._tokens: dict[str, _Token] = {}
        # (repo_id, filename) -> (after_bytes, times left, reset)
        self._cuts: dict[tuple[str, str], tuple[int, int, bool]] = {}
        self._rates: dict[tuple[str, str], int] = {}  # (repo_id, filename) -> bytes a second
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- setup ---------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes] | Path,
        *,
        private: bool = False,
        gated: bool = False,
        revision_sha: str | None = None,
    ) -> str:
        """Add (or replace) a model repo; a folder's files (but .git/, .cache/) become its files.

        Returns the commit sha that "main" resolves to.
        """
        if isinstance(files, Path):
            contents: dict[str, bytes | Path] = {
                p.relative_to(files).as_posix(): p
                for p in sorted(files.rglob("*"))
                if p.is_file() and p.relative_to(files).parts[0] not in (".git", ".cache")
            }
        else:
            contents = dict(files)
        entries = {name: _File.of(name, content) for name, content in sorted(contents.items())}
        if revision_sha is None:
            digest = hashlib.sha1(repo_id.encode())
            for name, f in entries.items():
                digest.update(f"{name}\0{f.sha256}\0".encode())
            revision_sha = digest.hexdigest()
        if not _SHA.fullmatch(revision_sha):
            raise ValueError("revision_sha must be 40 lowercase hex digits, as a git commit id")
        self._repos[repo_id] = _Repo(repo_id, entries, private, gated, revision_sha)
        return revision_sha

    def add_token(self, token: str, user: str = "tester", can_read: set[str] | None = None) -> None:
        """A valid token of `user`; `can_read`: the private/gated repos it opens (None: all)."""
        self._tokens[token] = _Token(user, None if can_read is None else frozenset(can_read))

    def revoke_token(self, token: str) -> None:
        """The token stops authenticating, as one deleted on the Hub."""
        self._tokens.pop(token, None)

    def cut(
        self, repo_id: str, filename: str, after_bytes: int, times: int, *, reset: bool = False
    ) -> None:
        """The next `times` GETs of the file stop after `after_bytes` body bytes and close.

        The headers still promise the whole body (or the whole requested range), so the client
        sees the peer close mid-body (httpx2.RemoteProtocolError, which huggingface_hub resumes
        with a Range request); `reset=True` aborts with a TCP RST instead (httpx2.ReadError,
        which it does not retry). Later GETs are served whole.
        """
        with self._lock:
            self._cuts[(repo_id, filename)] = (after_bytes, times, reset)

    def throttle(self, repo_id: str, filename: str, bytes_per_s: int) -> None:
        """GETs of the file send its body at `bytes_per_s`; each request's record counts the
        body bytes it sent (`sent`) and says when the client went away (`gone`)."""
        with self._lock:
            self._rates[(repo_id, filename)] = bytes_per_s

    # -- server --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeHub is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        """Serve on a free port in a background thread; returns the base URL (the endpoint)."""
        assert self._server is None, "FakeHub already started"
        server = ThreadingHTTPServer((self.host, 0), _Handler)
        server.daemon_threads = True  # a client's idle keep-alive connection must not block stop()
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        poll = {"poll_interval": 0.05}  # stop() returns at once
        self._thread = threading.Thread(target=server.serve_forever, kwargs=poll, daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the Hub decides ------------------------------------------------------------------

    def _caller(self, authorization: str | None) -> _Token | None:
        """The token's owner, None when anonymous; the Hub refuses an unknown token outright."""
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        found = self._tokens.get(token) if scheme.lower() == "bearer" else None
        if found is None:
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        return found

    def _repo(self, repo_id: str, caller: _Token | None, *, download: bool = False) -> _Repo:
        """A repo the caller may see: a private one is 'not found' to others, as on the Hub.

        Gating only guards file downloads: a gated repo's info and listing are public.
        """
        repo = self._repos.get(repo_id)
        allowed = caller is not None and caller.may_read(repo_id)
        if repo is None or (repo.private and not allowed):
            raise _HubError(401 if caller is None else 404, "RepoNotFound", "Repository not found")
        if download and repo.gated and not allowed:
            why = "Please log in." if caller is None else "You are not in the authorized list."
            message = f"Access to model {repo_id} is restricted. {why}"
            raise _HubError(401 if caller is None else 403, "GatedRepo", message)
        return repo

    def _take_cut(self, repo_id: str, filename: str) -> tuple[int, bool] | None:
        """(after_bytes, reset) when this GET is to be cut."""
        with self._lock:
            after_bytes, times, reset = self._cuts.get((repo_id, filename), (0, 0, False))
            if times <= 0:
                return None
            self._cuts[(repo_id, filename)] = (after_bytes, times - 1, reset)
            return after_bytes, reset


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's pooled connections expect

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the test output stays clean, and nothing here could ever print a token."""

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        self._record = {
            "method": self.command,
            "path": unquote(url.path),
            "query": url.query,
            "range": self.headers.get("Range"),
            "auth": self.headers.get("Authorization") is not None,
            "status": None,
        }
        with hub._lock:
            hub.requests.append(self._record)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            caller = hub._caller(self.headers.get("Authorization"))
            if url.path == "/api/whoami-v2" and self.command == "GET":
                return self._whoami(caller)
            if self.command == "GET" and (m := _MODEL_API.match(url.path)):
                repo = hub._repo(unquote(m["repo"]), caller)
                sha = _commit(repo, m["rev"])
                if m["kind"] == "tree":
                    sub = unquote(m["sub"] or "").strip("/")
                    return self._json(200, _tree(repo, sub, query.get("recursive") == "true"))
                if m["sub"] is None:
                    return self._json(200, _model_info(repo, sha, query.get("blobs") == "true"))
            if m := _RESOLVE.match(url.path):
                repo = hub._repo(unquote(m["repo"]), caller, download=True)
                sha = _commit(repo, m["rev"])
                return self._resolve(hub, repo, sha, unquote(m["file"]))
            raise _HubError(404, None, "Sorry, we can't find the page you are looking for.")
        except _HubError as e:
            self._json(e.status, {"error": e.message}, e.headers)

    def _whoami(self, caller: _Token | None) -> None:
        if caller is None:
            raise _HubError(401, None, "Invalid credentials in Authorization header")
        name = caller.user
        body = {"type": "user", "id": hashlib.sha1(name.encode()).hexdigest()[:24], "name": name}
        body |= {"fullname": name, "email": None, "emailVerified": False, "isPro": False}
        body |= {"orgs": [], "auth": {"type": "access_token", "accessToken": {"role": "read"}}}
        self._json(200, body)

    def _resolve(self, hub: FakeHub, repo: _Repo, sha: str, filename: str) -> None:
        """The file metadata (HEAD) or content (GET, with Range) at /{repo}/resolve/{rev}/{file}."""
        f = repo.files.get(filename)
        if f is None:  # the commit lets the client cache "no such file at this commit"
            message = f'{filename} does not exist on "{sha}"'
            raise _HubError(404, "EntryNotFound", message, {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        headers["ETag"] = f'"{f.sha256 if f.lfs else f.blob_id}"'
        if f.lfs:  # on the Hub these come with the redirect to the CDN
            headers |= {"X-Linked-Etag": headers["ETag"], "X-Linked-Size": str(f.size)}
        start, end, status = 0, f.size, 200
        if self.command == "GET" and (span := _byte_range(self.headers.get("Range"), f.size)):
            start, end, status = *span, 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        self._start(status, "application/octet-stream", end - start, headers)
        if self.command == "HEAD":
            return
        rate = hub._rates.get((repo.repo_id, filename))
        if rate is not None:
            return self._trickle(f, start, end, rate)
        cut = hub._take_cut(repo.repo_id, filename)
        limit = end - start if cut is None else cut[0]
        for chunk in _read(f.content, start, end):
            self.wfile.write(chunk[:limit])
            limit -= min(len(chunk), limit)
            if limit == 0:
                break
        if cut is not None:
            self.close_connection = True
            if cut[1]:  # linger 0: close() sends RST, not FIN
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_WR)  # FIN mid-body: a truncated transfer

    def _trickle(self, f: _File, start: int, end: int, rate: int) -> None:
        self._record["sent"], self._record["gone"] = 0, False
        piece = max(1, rate // 10)
        for chunk in _read(f.content, start, end):
            for at in range(0, len(chunk), piece):
                try:
                    self.wfile.write(chunk[at : at + piece])
                    self.wfile.flush()
                except OSError:  # the client hung up (its process killed)
                    self._record["gone"] = True
                    self.close_connection = True
                    return
                self._record["sent"] += len(chunk[at : at + piece])
                time.sleep(0.1)

    def _start(self, status: int, ctype: str, length: int, headers: dict[str, str]) -> None:
        self._record["status"] = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self._start(status, "application/json; charset=utf-8", len(data), headers or {})
        if self.command != "HEAD":
            self.wfile.write(data)


def _commit(repo: _Repo, raw_revision: str | None) -> str:
    """The commit a revision names: only "main" (the default) and the commit sha itself exist."""
    revision = unquote(raw_revision or "main")
    if revision not in ("main", repo.sha):
        raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
    return repo.sha


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) of one `bytes=` range; None (the whole file) for none or a malformed one."""
    m = _RANGE.match(header.strip()) if header else None
    if m is None or not (m[1] or m[2]):
        return None
    start = int(m[1]) if m[1] else max(size - int(m[2]), 0)
    end = min(int(m[2]) + 1, size) if m[1] and m[2] else size
    if start >= size or start >= end:
        unsatisfiable = {"Content-Range": f"bytes */{size}"}
        raise _HubError(416, None, "Requested Range Not Satisfiable", unsatisfiable)
    return start, end


def _model_info(repo: _Repo, sha: str, blobs: bool) -> dict[str, Any]:
    """GET /api/models/{repo}[/revision/{rev}]; sizes and LFS data only with ?blobs=true."""
    siblings = []
    for name, f in repo.files.items():
        sibling: dict[str, Any] = {"rfilename": name}
        if blobs:
            sibling |= {"size": f.size, "blobId": f.blob_id}
            if f.lfs:
                sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
        siblings.append(sibling)
    author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
    return {
        "_id": sha[:24],
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": author,
        "sha": sha,
        "lastModified": _DATE,
        "createdAt": _DATE,
        "private": repo.private,
        "gated": "auto" if repo.gated else False,
        "disabled": False,
        "tags": [],
        "siblings": siblings,
    }


def _tree(repo: _Repo, sub: str, recursive: bool) -> list[dict[str, Any]]:
    """GET /api/models/{repo}/tree/{rev}[/{path}]: files and folders under `sub`, one page."""
    prefix = f"{sub}/" if sub else ""
    entries: dict[str, dict[str, Any]] = {}
    for name, f in repo.files.items():
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split("/")
        depth = len(parts) if recursive else 1
        for i in range(1, min(depth, len(parts) - 1) + 1):  # the folders on the way
            folder = prefix + "/".join(parts[:i])
            oid = hashlib.sha1(folder.encode()).hexdigest()
            entries.setdefault(folder, {"type": "directory", "oid": oid, "size": 0, "path": folder})
        if recursive or len(parts) == 1:
            entry = {"type": "file", "oid": f.blob_id, "size": f.size, "path": name}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries[name] = entry
    if sub and not entries:
        message = f'{sub} does not exist on "{repo.sha}"'
        raise _HubError(404, "EntryNotFound", message, {"X-Repo-Commit": repo.sha})
    return sorted(entries.values(), key=lambda e: (e["type"] != "directory", e["path"]))
