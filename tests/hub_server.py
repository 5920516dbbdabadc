"""A small Hugging Face Hub stand-in on 127.0.0.1, so that downloads and uploads are tested without internet.

It speaks the part of the Hub's HTTP API that `huggingface_hub` uses to download (`model_info`, the repo tree,
`HEAD`/`GET .../resolve/...` with `X-Repo-Commit`, `ETag`, `Content-Length` and `Range`) and to upload
(`create_repo`, `create_branch`, `preupload` answering "regular" for every file so nothing goes through LFS, the
NDJSON `commit`, `validate-yaml`, `whoami-v2`). Errors carry the Hub's `X-Error-Code` header, from which
`huggingface_hub` makes its RepositoryNotFoundError / RevisionNotFoundError / EntryNotFoundError / GatedRepoError.

Tests build repos from folders written by timm's and transformers' own save functions, then reach the server
through `HF_ENDPOINT`. Faults to simulate: `stop()` (the Hub is gone), a private or gated repo, several commits
(revisions), `truncate()` (fewer bytes sent than `Content-Length` says), `stall()` (a server that answers late).

Use the `hub` fixture (import it into a test module or conftest: `from tests.hub_server import hub`): a started
server, `huggingface_hub` pointed at it and at a cache under tmp_path, no token or offline flag of the machine's.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

TOKEN = "hf_vitkit_test_token"
USER = "vitkit-tester"
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_OPS = "revision|tree|preupload|commit|branch"
_API = re.compile(rf"^/api/models/{_REPO}(?:/(?P<op>{_OPS})/(?P<rev>[^/]+)(?P<rest>/.*)?)?$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    message: str = ""


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision)
        return next((c for c in self.commits if c.sha == sha), None)


@dataclass
class Truncation:
    keep_bytes: int  # the absolute offset in the file after which the connection drops
    times: int | None  # how many GETs are cut short; None: every one


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def read_folder(folder: str | Path) -> dict[str, bytes]:
    """Every file under `folder`, by its POSIX path relative to it (what a repo holds)."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class HubServer:
    """The Hub stand-in: a thread-per-request HTTP server over an in-memory set of repos."""

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.truncations: dict[tuple[str, str], Truncation] = {}
        self._stall = threading.Event()
        self._stall_seconds = 0.0
        self._lock = threading.Lock()
        self._commit_counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()  # open client connections, closed by stop()

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop answering: connections are refused from now on (the Hub is unreachable)."""
        if self._httpd is not None:
            self._stall.set()  # release stalled handlers so shutdown does not wait on them
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
            for conn in list(self._connections):  # kept-alive connections would otherwise go on being served
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    @property
    def url(self) -> str:
        assert self._httpd is not None, "the server is not running"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------------------------------------ repos
    def add_repo(
        self, repo_id: str, files: str | Path | dict[str, bytes], *, private: bool = False, gated: bool = False
    ) -> str:
        """Create `repo_id` (or add a commit to it) with `files` (a folder or {path: bytes}); returns the commit sha."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id, private=private, gated=gated))
        repo.private, repo.gated = private, gated
        return self.commit(repo_id, files if isinstance(files, dict) else read_folder(files))

    def commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", message: str = "") -> str:
        """A new commit on `branch` holding exactly `files` (a snapshot, not a diff); returns its sha."""
        with self._lock:
            self._commit_counter += 1
            digest = hashlib.sha1(f"{repo_id}:{self._commit_counter}".encode())
            for name in sorted(files):
                digest.update(name.encode() + files[name])
            repo = self.repos[repo_id]
            repo.commits.append(Commit(digest.hexdigest(), dict(files), message))
            repo.branches[branch] = repo.commits[-1].sha
            return repo.commits[-1].sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of `repo_id` at `revision` (what an upload left there)."""
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"{repo_id} has no revision {revision}"
        return commit.files

    # ------------------------------------------------------------------------------------------------ faults
    def truncate(self, repo_id: str, filename: str, keep_bytes: int, times: int | None = None) -> None:
        """GETs of the file end after byte `keep_bytes` although `Content-Length` announced the whole file."""
        self.truncations[(repo_id, filename)] = Truncation(keep_bytes, times)

    def stall(self, seconds: float) -> None:
        """Every request waits `seconds` before it is answered (a slow or black-holed server; 0 ends it)."""
        self._stall_seconds = seconds
        self._stall.clear()

    def downloads(self, filename: str | None = None) -> list[str]:
        """Paths of the GET .../resolve/... requests so far (optionally only those of `filename`)."""
        return [
            path
            for method, path in self.requests
            if method == "GET" and "/resolve/" in path and (filename is None or path.endswith("/" + filename))
        ]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall between them

    def log_message(self, format: str, *args: Any) -> None:  # the tests' output stays clean
        pass

    def setup(self) -> None:
        super().setup()
        self.hub._connections.add(self.connection)

    def finish(self) -> None:
        self.hub._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    # --------------------------------------------------------------------------------------------- helpers
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._json(status, {"error": message}, headers)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _body(self) -> bytes:
        """The request body, read once (read before any answer, so a kept-alive connection stays in step)."""
        if not hasattr(self, "_body_bytes"):
            self._body_bytes = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return self._body_bytes

    def _repo_for_read(self, repo_id: str) -> Repo | None:
        """The repo if this request may read it; otherwise the Hub's answer has been sent and None returned."""
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif repo.private and not self._authorized():
            # the Hub answers 401 with RepoNotFound for a private repo, so that its existence does not leak
            self._error(401, "RepoNotFound", "Invalid username or password.")
        elif repo.gated and not self._authorized():
            self._error(403, "GatedRepo", "Access to this model is restricted; you must be authenticated")
        else:
            return repo
        return None

    def _commit_for_read(self, repo: Repo, revision: str) -> Commit | None:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
        return commit

    # ---------------------------------------------------------------------------------------------- routing
    def _route(self) -> None:
        path = urlsplit(self.path).path
        self.hub.requests.append((self.command, path))
        if hasattr(self, "_body_bytes"):  # a new request on a kept-alive connection
            del self._body_bytes
        self._body()
        if self.hub._stall_seconds:
            self.hub._stall.wait(self.hub._stall_seconds)
        if m := _RESOLVE.match(path):
            return self._resolve(m["repo"], m["rev"], unquote(m["file"]))
        if self.command == "POST" and path == "/api/repos/create":
            return self._create_repo()
        if self.command == "POST" and path == "/api/validate-yaml":
            return self._json(200, {"errors": [], "warnings": []})
        if self.command == "GET" and path == "/api/whoami-v2":
            if not self._authorized():
                return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return self._json(200, {"type": "user", "name": USER, "auth": {"accessToken": {"role": "write"}}})
        if m := _API.match(path):
            op = m["op"]
            if self.command == "GET" and op in (None, "revision"):
                return self._model_info(m["repo"], m["rev"] or "main")
            if self.command == "GET" and op == "tree":
                return self._tree(m["repo"], m["rev"], (m["rest"] or "").strip("/"))
            if self.command == "POST" and op == "preupload":
                return self._preupload(m["repo"])
            if self.command == "POST" and op == "commit":
                return self._commit(m["repo"], unquote(m["rev"]))
            if self.command == "POST" and op == "branch":
                return self._create_branch(m["repo"], unquote(m["rev"]))
        self._error(404, "NotFound", f"no route for {self.command} {path}")

    do_GET = do_HEAD = do_POST = _route

    # ------------------------------------------------------------------------------------------- downloads
    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self._repo_for_read(repo_id)
        commit = repo and self._commit_for_read(repo, revision)
        if repo is None or commit is None:
            return
        siblings = [{"rfilename": n, "size": len(b), "blobId": git_blob_id(b)} for n, b in commit.files.items()]
        info = {"id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": repo.private, "gated": repo.gated}
        self._json(200, {**info, "disabled": False, "tags": [], "siblings": siblings})

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        repo = self._repo_for_read(repo_id)
        commit = repo and self._commit_for_read(repo, revision)
        if repo is None or commit is None:
            return
        prefix = f"{folder}/" if folder else ""
        entries = [
            {"type": "file", "oid": git_blob_id(b), "size": len(b), "path": n}
            for n, b in commit.files.items()
            if n.startswith(prefix)
        ]
        self._json(200, entries)

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo_for_read(repo_id)
        commit = repo and self._commit_for_read(repo, revision)
        if repo is None or commit is None:
            return
        data = commit.files.get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}", commit.sha)
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        start = 0
        rng = _RANGE.match(self.headers.get("Range", ""))
        if self.command == "GET" and rng:
            start = int(rng[1])
            end = int(rng[2]) if rng[2] else len(data) - 1
            if start >= len(data):
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            body, status = data[start : end + 1], 206
        else:
            body, status = data, 200
        if self.command == "GET" and self._truncated(repo_id, filename):
            cut = self.hub.truncations[(repo_id, filename)].keep_bytes
            return self._send_cut_short(status, body, headers, max(0, cut - start))
        self._send(status, body, headers)

    def _truncated(self, repo_id: str, filename: str) -> bool:
        with self.hub._lock:
            rule = self.hub.truncations.get((repo_id, filename))
            if rule is None or rule.times == 0:
                return False
            if rule.times is not None:
                rule.times -= 1
            return True

    def _send_cut_short(self, status: int, body: bytes, headers: dict[str, str], keep: int) -> None:
        """Announce the whole body, send `keep` bytes of it, and drop the connection (a dying download)."""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body[:keep])
        self.wfile.flush()
        self.close_connection = True

    # --------------------------------------------------------------------------------------------- uploads
    def _create_repo(self) -> None:
        if not self._authorized():
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        payload = json.loads(self._body() or b"{}")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id}
        if repo_id in self.hub.repos:
            return self._json(409, {"error": "You already created this model repo", **url})
        private = bool(payload.get("private")) or payload.get("visibility") == "private"  # old and new clients
        self.hub.repos[repo_id] = Repo(repo_id, private=private)
        self.hub.commit(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        self._json(200, url)

    def _preupload(self, repo_id: str) -> None:
        if not self._authorized():
            return self._error(401, "RepoNotFound", "Invalid username or password.")
        if repo_id not in self.hub.repos:
            return self._error(404, "RepoNotFound", "Repository not found")
        files = json.loads(self._body())["files"]
        modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
        self._json(200, {"files": modes})

    def _create_branch(self, repo_id: str, branch: str) -> None:
        """A new branch at `startingPoint` (default: main's head); 409 when it exists, as the Hub answers."""
        if not self._authorized():
            return self._error(401, "RepoNotFound", "Invalid username or password.")
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if branch in repo.branches:
            return self._error(409, "Conflict", f"Reference refs/heads/{branch} already exists")
        start = repo.resolve(json.loads(self._body() or b"{}").get("startingPoint") or "main")
        if start is None:
            return self._error(404, "RevisionNotFound", "Invalid starting point")
        repo.branches[branch] = start.sha
        self._json(200, {})

    def _commit(self, repo_id: str, branch: str) -> None:
        if not self._authorized():
            return self._error(401, "RepoNotFound", "Invalid username or password.")
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        head = repo.resolve(branch)
        files = dict(head.files) if head else {}
        message = ""
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {k: v for k, v in files.items() if not k.startswith(folder)}
            else:  # lfsFile: never asked for, since preupload answers "regular" for every file
                return self._error(400, "BadRequest", f"this test server does not take {key!r} operations")
        sha = self.hub.commit(repo_id, files, branch=branch, message=message)
        self._json(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})


# ------------------------------------------------------------------------------------------------ fixtures
def point_huggingface_hub_at(endpoint: str, cache: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Send huggingface_hub to `endpoint` with an empty cache and no token or offline flag of this machine's.

    huggingface_hub reads its environment once, at import, into `huggingface_hub.constants`: the variables are
    set for code that reads them later (and for subprocesses), and the constants are patched for this process.
    """
    from huggingface_hub import constants

    env = {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache), "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(home),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),  # newer versions only
        "HF_HUB_OFFLINE": False,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    # huggingface_hub before 0.25 also copied some constants into its modules at import: patch those copies too
    for module in ("hf_api", "file_download", "_snapshot_download", "_commit_api", "utils._http"):
        copy = sys.modules.get(f"huggingface_hub.{module}")
        for name, value in patched.items():
            if copy is not None and hasattr(copy, name):
                monkeypatch.setattr(copy, name, value)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running HubServer with huggingface_hub pointed at it and at an empty cache under tmp_path."""
    server = HubServer().start()
    point_huggingface_hub_at(server.url, tmp_path / "hf-cache", tmp_path / "hf-home", monkeypatch)
    try:
        yield server
    finally:
        server.stop()


__all__ = ["HubServer", "Repo", "Commit", "TOKEN", "USER", "hub", "point_huggingface_hub_at", "read_folder"]
