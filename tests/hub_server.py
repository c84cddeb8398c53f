"""A stand-in for the Hugging Face Hub on 127.0.0.1: just the endpoints ``snapshot_download`` uses.

huggingface_hub 2.4 fetches a snapshot with

- ``GET /api/models/{repo}/revision/{rev}``: ``sha`` and ``siblings`` (skipped when rev is a sha),
  also asked by xorweights, as ``/api/models/{repo}`` for the default branch, to pick a weight format;
- ``GET /api/models/{repo}/tree/{sha}?recursive=True``: every file with its size and blob id;
- ``HEAD /{repo}/resolve/{sha}/{file}``: ``X-Repo-Commit``, ``ETag`` and ``Content-Length``;
- ``GET /{repo}/resolve/{sha}/{file}``: the bytes.

Errors carry ``X-Error-Code`` as the Hub sets it, so huggingface_hub raises
its real typed errors: RepoNotFound (404, or 401 for a private repo asked
without a token), GatedRepo (403), RevisionNotFound, EntryNotFound. Every
request is logged as ``"METHOD /path"`` in :attr:`FakeHub.requests`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> path -> bytes
    refs: dict[str, str] = field(default_factory=dict)  # branch -> sha
    access: str = "public"  # or "private" (401 without a token) or "gated" (403)


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every visible file below ``folder`` by its POSIX path, as a repo would hold it."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


class FakeHub:
    """Model repos served from memory; use :func:`serve` to run one."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.failures: dict[str, int] = {}  # file name -> GETs of it still to answer with HTTP 503
        self.url = ""
        self._lock = threading.Lock()

    def commit(self, repo_id: str, files: dict[str, bytes] | Path, branch: str = "main", access: str = "public") -> str:
        """Make ``files`` (or a folder's files) the new head of ``branch``; returns the commit sha."""
        if isinstance(files, Path):
            files = folder_files(files)
        repo = self.repos.setdefault(repo_id, Repo(access=access))
        digest = hashlib.sha1(f"{repo_id}:{len(repo.commits)}".encode())
        for name, data in sorted(files.items()):
            digest.update(name.encode() + hashlib.sha256(data).digest())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[branch] = sha
        return sha

    def fetched(self, repo_id: str) -> list[str]:
        """The file names downloaded (GET) from ``repo_id``, in request order."""
        prefix = f"GET /{repo_id}/resolve/"
        return [r[len(prefix) :].split("/", 1)[1] for r in self.requests if r.startswith(prefix)]

    def _find(self, repo_id: str, rev: str) -> tuple[Repo, str] | tuple[None, str]:
        """The repo and commit for ``rev``, or None and the X-Error-Code to answer."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, "RepoNotFound"
        sha = repo.refs.get(rev, rev)
        if sha not in repo.commits:
            return None, "RevisionNotFound"
        return repo, sha

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(h.path).path
        with self._lock:
            self.requests.append(f"{method} {path}")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) == 4:  # model_info without a revision
            self._api(h, f"{parts[2]}/{parts[3]}", "revision", "main")
        elif parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            self._api(h, f"{parts[2]}/{parts[3]}", parts[4], unquote(parts[5]))
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(h, method, f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:])))
        else:
            _error(h, 404, "", f"no such endpoint {path}")

    def _refuse(self, h: BaseHTTPRequestHandler, repo: Repo | None, code: str) -> bool:
        if repo is None:
            _error(h, 404, code, code)
            return True
        if repo.access == "private" and not h.headers.get("authorization"):
            _error(h, 401, "RepoNotFound", "Repository not found")
            return True
        if repo.access == "gated":
            _error(h, 403, "GatedRepo", "Access to this model is restricted")
            return True
        return False

    def _api(self, h: BaseHTTPRequestHandler, repo_id: str, what: str, rev: str) -> None:
        repo, sha = self._find(repo_id, rev)
        if self._refuse(h, repo, sha):
            return
        assert repo is not None
        files = repo.commits[sha]
        if what == "revision":
            doc: object = {"id": repo_id, "sha": sha, "siblings": [{"rfilename": n} for n in files]}
        else:
            doc = [
                {"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                for n, d in files.items()
            ]
        _send(h, 200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    def _resolve(self, h: BaseHTTPRequestHandler, method: str, repo_id: str, rev: str, name: str) -> None:
        repo, sha = self._find(repo_id, rev)
        if self._refuse(h, repo, sha):
            return
        assert repo is not None
        data = repo.commits[sha].get(name)
        if data is None:
            _error(h, 404, "EntryNotFound", f"{name} not found", {"X-Repo-Commit": sha})
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        with self._lock:
            fail = method == "GET" and self.failures.get(name, 0) > 0
            if fail:
                self.failures[name] -= 1
        if fail:
            _error(h, 503, "", "Service Unavailable", headers)
            return
        _send(h, 200, data if method == "GET" else b"", headers, len(data))


def _send(
    h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], length: int | None = None
) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    h.end_headers()
    if body:
        h.wfile.write(body)


def _error(
    h: BaseHTTPRequestHandler, status: int, code: str, message: str, extra: dict[str, str] | None = None
) -> None:
    headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
    if code:
        headers["X-Error-Code"] = code
    _send(h, status, json.dumps({"error": message}).encode(), headers)


@contextmanager
def serve(hub: FakeHub) -> Iterator[FakeHub]:
    """Run ``hub`` on a free port of 127.0.0.1 in a thread; ``hub.url`` is its HF_ENDPOINT."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hub.handle(self, "GET")

        def do_HEAD(self) -> None:
            hub.handle(self, "HEAD")

        def log_message(self, format: str, *args: object) -> None:
            pass  # the request log is hub.requests

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
