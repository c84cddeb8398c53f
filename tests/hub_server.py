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
request is logged as ``"METHOD /path"`` in :attr:`FakeHub.requests`, with the
``Range`` header appended after a space when there is one
(``"GET /org/m/resolve/main/f bytes=0-99"``).

For streaming decodes and benchmarks it also does what the Hub does for large files:

- single byte ranges (``Range: bytes=a-b``, ``bytes=a-``, ``bytes=-n``): 206, or 416 when no byte is in the file;
- with :attr:`FakeHub.redirect_min_bytes` set, ``/resolve/`` of a file at least that big answers 302 to
  ``{cdn_url}/cdn/{repo}/{sha}/{file}``, carrying the metadata headers the Hub puts on that 302;
- a bandwidth limit shared by all connections (:attr:`FakeHub.rate`);
- scripted faults per file (:attr:`FakeHub.faults`): ``"503"``, ``"drop"``, ``"truncate"``, ``"corrupt"``, ``"stall"``;
- counters of the bytes served (:attr:`FakeHub.served`, :meth:`FakeHub.served_ranges`).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

CHUNK = 64 * 1024  # body bytes per socket write, and per step of the bandwidth limit
# Folder files this big are mapped rather than read: benchmarks commit GB checkpoints,
# and the page cache then holds them once. Such files must not be rewritten in place while served.
MMAP_MIN_BYTES = 64 * 1024 * 1024
# How far behind its schedule the shared bandwidth limit may fall before it forgets the lag.
# Without it every oversleep would be lost for good and the rate would undershoot; it also
# caps the burst after an idle spell at RATE_SLACK_S * rate bytes.
RATE_SLACK_S = 0.01
RATE_MIN_SLEEP_S = 0.001  # shorter debts are carried to the next chunk: time.sleep is too coarse below this
FAULTS = ("503", "drop", "truncate", "corrupt", "stall")

Data = bytes | mmap.mmap  # a file's bytes, in memory or mapped from disk
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class Digest:
    """A file's hashes, computed once at commit: GB files cannot be hashed per request."""

    sha256: str  # the LFS oid; the ETag huggingface_hub keeps (as X-Linked-Etag when redirected)
    sha1: str  # stands for the git blob id: tree listings, and the ETag of a 302


@dataclass
class Repo:
    commits: dict[str, dict[str, Data]] = field(default_factory=dict)  # sha -> path -> bytes
    refs: dict[str, str] = field(default_factory=dict)  # branch -> sha
    access: str = "public"  # or "private" (401 without a token) or "gated" (403)
    digests: dict[str, dict[str, Digest]] = field(default_factory=dict)  # sha -> path -> digests of its bytes


class _Redirected(str):
    """A request log line answered with a 302: :meth:`FakeHub.fetched` counts that download at the CDN.

    It equals the plain line, so tests comparing ``requests`` see no difference.
    """


def _visible_files(folder: Path) -> list[Path]:
    return [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every visible file below ``folder`` by its POSIX path, as a repo would hold it."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in _visible_files(folder)}


def _load(path: Path) -> Data:
    """A file's bytes: read if small, mapped read-only if big."""
    size = path.stat().st_size
    if size < max(MMAP_MIN_BYTES, 1):  # an empty file cannot be mapped
        return path.read_bytes()
    with path.open("rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the map outlives the descriptor


def parse_range(value: str | None, total: int) -> tuple[int, int] | None:
    """The half-open span ``[start, end)`` that a ``Range`` header asks of a ``total``-byte file.

    None means "send the whole file": no header, or one this server does not
    understand (several ranges, another unit), which HTTP lets a server ignore.
    Raises ValueError when the range holds no byte of the file (HTTP 416).
    """
    match = _RANGE.fullmatch(value.strip()) if value else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # bytes=-n: the last n bytes
        start, end = max(total - int(last), 0), total
    else:
        start, end = int(first), total if last == "" else min(int(last) + 1, total)
    if start >= end:
        raise ValueError(f"range {value} is outside the {total} bytes of the file")
    return start, end


class FakeHub:
    """Model repos served from memory; use :func:`serve` to run one."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.failures: dict[str, int] = {}  # file name -> GETs of it still to answer with HTTP 503
        # file name, or "name@OFFSET" for GETs whose span holds byte OFFSET -> faults still to apply, first first
        self.faults: dict[str, list[str]] = {}
        self.stall_seconds: float = 30.0  # how long a "stall" fault waits between headers and body
        self.redirect_min_bytes: int | None = None  # files this big are redirected to the CDN, as LFS files are
        self.rate: float | None = None  # bytes per second of file bodies, all connections together
        self.served: dict[str, int] = {}  # repo id -> file body bytes sent
        self.url = ""
        self.cdn_url = ""  # another origin, as the Hub's CDN is: huggingface_hub then stops at the 302
        self._ranges: list[tuple[str, str, int, int]] = []  # repo id, file, start, end of each 206
        self._lock = threading.Lock()
        self._next_send = 0.0  # time.monotonic() at which the bandwidth limit lets the next byte out
        self._stop = threading.Event()  # set when serve() ends, to cut stalls short
        self._connections: set[socket.socket] = set()

    def commit(
        self, repo_id: str, files: Mapping[str, Data] | Path, branch: str = "main", access: str = "public"
    ) -> str:
        """Make ``files`` (or a folder's files) the new head of ``branch``; returns the commit sha.

        A folder's big files are mapped, not read, so a GB checkpoint costs no memory of its own.
        """
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): _load(p) for p in _visible_files(files)}
        repo = self.repos.setdefault(repo_id, Repo(access=access))
        digests = {
            name: Digest(hashlib.sha256(data).hexdigest(), hashlib.sha1(data).hexdigest())
            for name, data in files.items()
        }
        commit = hashlib.sha1(f"{repo_id}:{len(repo.commits)}".encode())
        for name in sorted(files):
            commit.update(name.encode() + bytes.fromhex(digests[name].sha256))
        sha = commit.hexdigest()
        repo.commits[sha] = dict(files)
        repo.digests[sha] = digests
        repo.refs[branch] = sha
        return sha

    def fetched(self, repo_id: str) -> list[str]:
        """The file names downloaded (GET) from ``repo_id``, in request order.

        One name per download: a GET of ``/resolve/`` redirected to the CDN counts at the CDN.
        """
        prefixes = (f"/{repo_id}/resolve/", f"/cdn/{repo_id}/")
        names = []
        for line in list(self.requests):
            method, path = line.split(" ")[:2]
            if method != "GET" or isinstance(line, _Redirected):
                continue
            for prefix in prefixes:
                if path.startswith(prefix):
                    names.append(unquote(path[len(prefix) :].split("/", 1)[1]))
        return names

    def served_ranges(self, repo_id: str) -> list[tuple[str, int, int]]:
        """``(file, start, end)`` of every ranged GET of ``repo_id`` answered with 206; ``end`` is exclusive."""
        with self._lock:
            return [(name, start, end) for repo, name, start, end in self._ranges if repo == repo_id]

    def _log(self, line: str) -> None:
        with self._lock:
            self.requests.append(line)

    def _find(self, repo_id: str, rev: str) -> tuple[Repo, str] | tuple[None, str]:
        """The repo and commit for ``rev``, or None and the X-Error-Code to answer."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, "RepoNotFound"
        sha = repo.refs.get(rev, rev)
        if sha not in repo.commits:
            return None, "RevisionNotFound"
        return repo, sha

    def _is_lfs(self, data: Data) -> bool:
        return self.redirect_min_bytes is not None and len(data) >= self.redirect_min_bytes

    def handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(h.path).path
        span = h.headers.get("Range")
        line = f"{method} {path} {span}" if span else f"{method} {path}"
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            # logs the line itself: whether it redirects is known only once the file is found
            self._resolve(h, method, line, f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:])))
            return
        self._log(line)
        if parts[:2] == ["api", "models"] and len(parts) == 4:  # model_info without a revision
            self._api(h, f"{parts[2]}/{parts[3]}", "revision", "main")
        elif parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            self._api(h, f"{parts[2]}/{parts[3]}", parts[4], unquote(parts[5]))
        elif parts[0] == "cdn" and len(parts) >= 5:
            self._cdn(h, method, f"{parts[1]}/{parts[2]}", parts[3], unquote("/".join(parts[4:])))
        else:
            _error(h, 404, "", f"no such endpoint {path}")

    def _refusal(self, h: BaseHTTPRequestHandler, repo: Repo | None, code: str) -> tuple[int, str, str] | None:
        """The status, X-Error-Code and message to refuse with, or None to go on."""
        if repo is None:
            return 404, code, code
        if repo.access == "private" and not h.headers.get("authorization"):
            return 401, "RepoNotFound", "Repository not found"
        if repo.access == "gated":
            return 403, "GatedRepo", "Access to this model is restricted"
        return None

    def _refuse(self, h: BaseHTTPRequestHandler, repo: Repo | None, code: str) -> bool:
        refusal = self._refusal(h, repo, code)
        if refusal is not None:
            _error(h, *refusal)
        return refusal is not None

    def _api(self, h: BaseHTTPRequestHandler, repo_id: str, what: str, rev: str) -> None:
        repo, sha = self._find(repo_id, rev)
        if self._refuse(h, repo, sha):
            return
        assert repo is not None
        files = repo.commits[sha]
        if what == "revision":
            doc: object = {"id": repo_id, "sha": sha, "siblings": [{"rfilename": n} for n in files]}
        else:
            doc = [self._tree_entry(n, d, repo.digests[sha][n]) for n, d in files.items()]
        _send(h, 200, json.dumps(doc).encode(), {"Content-Type": "application/json"})

    def _tree_entry(self, name: str, data: Data, digest: Digest) -> dict[str, object]:
        entry: dict[str, object] = {"type": "file", "path": name, "size": len(data), "oid": digest.sha1}
        if self._is_lfs(data):
            entry["lfs"] = {"oid": digest.sha256, "size": len(data), "pointerSize": 134}
        return entry

    def _resolve(self, h: BaseHTTPRequestHandler, method: str, line: str, repo_id: str, rev: str, name: str) -> None:
        repo, sha = self._find(repo_id, rev)
        refusal = self._refusal(h, repo, sha)
        data = None if refusal or repo is None else repo.commits[sha].get(name)
        redirect = data is not None and self._is_lfs(data)
        self._log(_Redirected(line) if redirect and method == "GET" else line)
        if refusal is not None:
            _error(h, *refusal)
            return
        assert repo is not None
        if data is None:
            _error(h, 404, "EntryNotFound", f"{name} not found", {"X-Repo-Commit": sha})
            return
        digest = repo.digests[sha][name]
        if redirect:
            # What huggingface_hub reads off the Hub's 302 to its CDN: the commit, the LFS
            # sha256 and size (X-Linked-*), and Location, which it then downloads from without auth.
            headers = {
                "Location": f"{self.cdn_url or self.url}/cdn/{repo_id}/{sha}/{quote(name)}",
                "X-Repo-Commit": sha,
                "X-Linked-Etag": f'"{digest.sha256}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{digest.sha1}"',
            }
            _send(h, 302, b"", headers)
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{digest.sha256}"'}
        self._send_file(h, method, repo_id, name, data, headers)

    def _cdn(self, h: BaseHTTPRequestHandler, method: str, repo_id: str, sha: str, name: str) -> None:
        """The CDN's copy of a file at a commit: no auth, as its URLs are signed on the real Hub."""
        repo = self.repos.get(repo_id)
        data = repo.commits.get(sha, {}).get(name) if repo else None
        if repo is None or data is None:
            _error(h, 404, "", f"no {name} at {repo_id}@{sha} on the CDN")
            return
        headers = {"ETag": f'"{repo.digests[sha][name].sha256}"'}
        self._send_file(h, method, repo_id, name, data, headers)

    def _send_file(
        self, h: BaseHTTPRequestHandler, method: str, repo_id: str, name: str, data: Data, headers: dict[str, str]
    ) -> None:
        """Answer a HEAD or GET of a file's bytes: whole or one range, with any fault scripted for it."""
        total = len(data)
        headers = {**headers, "Accept-Ranges": "bytes"}
        if method == "HEAD":
            _send(h, 200, b"", headers, total)
            return
        try:
            span = parse_range(h.headers.get("Range"), total)
        except ValueError as e:
            _error(h, 416, "", str(e), {"Content-Range": f"bytes */{total}"})
            return
        start, end = span or (0, total)
        fault, at = self._take_fault(name, start, end)
        if fault == "503":
            _error(h, 503, "", "Service Unavailable", headers)
            return
        if fault not in (None, *FAULTS):
            _error(h, 500, "", f"unknown fault {fault!r} for {name}; known: {', '.join(FAULTS)}")
            return
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
            with self._lock:
                self._ranges.append((repo_id, name, start, end))
        _send(h, 206 if span else 200, b"", headers, end - start)
        body = memoryview(data)[start:end]  # a view: GB files are never copied per request
        if fault == "stall":
            self._stop.wait(self.stall_seconds)
        if fault in ("drop", "truncate"):
            sent = len(body) // 2 if fault == "drop" else max(len(body) - 1, 0)
            self._write_body(h, repo_id, body[:sent])
            _hang_up(h)
            return
        flip = None
        if fault == "corrupt":
            flip = (at if at is not None else start + len(body) // 2) - start
        self._write_body(h, repo_id, body, flip)

    def _take_fault(self, name: str, start: int, end: int) -> tuple[str | None, int | None]:
        """Pop the fault for this GET of ``name``'s bytes ``[start, end)``, and the offset it targets, if any.

        ``failures`` come first, then faults keyed ``name@OFFSET`` whose offset is in the span, then ``name``.
        """
        with self._lock:
            if self.failures.get(name, 0) > 0:
                self.failures[name] -= 1
                return "503", None
            for key, queue in self.faults.items():
                file, _, offset = key.rpartition("@")
                if queue and file == name and offset.isdigit() and start <= int(offset) < end:
                    return queue.pop(0), int(offset)
            faults = self.faults.get(name)
            return (faults.pop(0), None) if faults else (None, None)

    def _write_body(self, h: BaseHTTPRequestHandler, repo_id: str, body: memoryview, flip: int | None = None) -> None:
        """Send ``body`` in chunks under the bandwidth limit; ``flip`` is the index of a byte to send inverted."""
        for offset in range(0, len(body), CHUNK):
            chunk: memoryview | bytearray = body[offset : offset + CHUNK]
            if flip is not None and offset <= flip < offset + len(chunk):
                chunk = bytearray(chunk)  # copy just this chunk, to corrupt it
                chunk[flip - offset] ^= 0xFF
            self._throttle(len(chunk))
            # Counted before it leaves, so a client that has the bytes never sees a smaller count.
            self._count(repo_id, len(chunk))
            try:
                h.wfile.write(chunk)
            except OSError:  # the client hung up (timeouts, a test giving up on a stall): nothing to answer
                self._count(repo_id, -len(chunk))
                h.close_connection = True
                return

    def _count(self, repo_id: str, size: int) -> None:
        with self._lock:
            self.served[repo_id] = self.served.get(repo_id, 0) + size

    def _throttle(self, size: int) -> None:
        """Wait until ``size`` more bytes fit in :attr:`rate`, counted over all connections.

        One shared schedule: each chunk books ``size / rate`` seconds after the
        previous one, and the sender sleeps only while it is ahead of the schedule.
        """
        rate = self.rate
        if not rate:
            return
        with self._lock:
            now = time.monotonic()
            self._next_send = max(self._next_send, now - RATE_SLACK_S) + size / rate
            debt = self._next_send - now
        if debt >= RATE_MIN_SLEEP_S:
            time.sleep(debt)


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


def _hang_up(h: BaseHTTPRequestHandler) -> None:
    """Close the connection mid-body, as a failing server or network does: the client sees a short read."""
    h.wfile.flush()
    h.close_connection = True
    try:
        h.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


@contextmanager
def serve(hub: FakeHub) -> Iterator[FakeHub]:
    """Run ``hub`` on free ports of 127.0.0.1 in threads; ``hub.url`` is its HF_ENDPOINT.

    The CDN that redirects point to listens on a port of its own (``hub.cdn_url``): another
    origin, as on the real Hub, so huggingface_hub reads the file metadata off the 302.
    """

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections, as they do with the Hub

        def setup(self) -> None:
            super().setup()
            with hub._lock:
                hub._connections.add(self.connection)

        def finish(self) -> None:
            with hub._lock:
                hub._connections.discard(self.connection)
            super().finish()

        def do_GET(self) -> None:
            hub.handle(self, "GET")

        def do_HEAD(self) -> None:
            hub.handle(self, "HEAD")

        def log_message(self, format: str, *args: object) -> None:
            pass  # the request log is hub.requests

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in ("hub", "cdn")]
    threads = []
    for server in servers:
        server.daemon_threads = True
        # a short poll, so that leaving serve() takes milliseconds rather than half a second per server
        threads.append(threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True))
        threads[-1].start()
    hub.url, hub.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    hub._stop.clear()
    try:
        yield hub
    finally:
        hub._stop.set()
        for server in servers:
            server.shutdown()
            server.server_close()
        _close_all(hub)
        for thread in threads:
            thread.join(timeout=10)


def _close_all(hub: FakeHub) -> None:
    """End the kept-alive connections, whose threads would otherwise wait for a next request forever."""
    with hub._lock:
        connections = list(hub._connections)
    for connection in connections:
        try:
            connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
