"""The stand-in Hub of ``hub_server.py``: ranges, CDN redirects, the bandwidth limit, faults and counters.

HTTP is checked with the stdlib client; the redirect also with the real
huggingface_hub, in a subprocess so it reads HF_ENDPOINT at import as it does for users.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import hub_server
import pytest
from hub_server import FakeHub, folder_files, parse_range, serve

REPO = "org/model"
BIG = "model.safetensors"
SMALL = "config.json"
DATA = (bytes(range(251)) * 4200)[: 1 << 20]  # 1 MiB; 251 is prime, so no two 64 KiB chunks are alike
CONFIG = b'{"model_type": "llama"}'


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with serve(FakeHub()) as h:
        h.commit(REPO, {BIG: DATA, SMALL: CONFIG})
        yield h


def head_sha(hub: FakeHub, repo_id: str = REPO) -> str:
    return hub.repos[repo_id].refs["main"]


def connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)


def request(
    url: str, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a new connection: status, headers and the whole body."""
    conn = connect(url)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def resolve(name: str, rev: str = "main") -> str:
    return f"/{REPO}/resolve/{rev}/{name}"


# ---------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("value", "span"),
    [
        (None, None),
        ("bytes=0-9", (0, 10)),
        ("bytes=90-", (90, 100)),
        ("bytes=90-1000", (90, 100)),  # the end is clipped to the file
        ("bytes=-4", (96, 100)),
        ("bytes=-1000", (0, 100)),
        ("bytes=0-1,5-6", None),  # several ranges: ignored, the whole file is sent
        ("items=0-9", None),
        ("bytes=-", None),
    ],
)
def test_parse_range(value: str | None, span: tuple[int, int] | None) -> None:
    assert parse_range(value, 100) == span


@pytest.mark.parametrize("value", ["bytes=100-", "bytes=100-200", "bytes=5-4", "bytes=-0"])
def test_parse_range_outside_the_file(value: str) -> None:
    with pytest.raises(ValueError, match="outside the 100 bytes"):
        parse_range(value, 100)


def test_ranges_answer_206_with_exact_bytes_on_one_kept_alive_connection(hub: FakeHub) -> None:
    total = len(DATA)
    conn = connect(hub.url)
    sockets = []
    answers = []
    for span in ("bytes=10-19", f"bytes={total - 6}-", "bytes=-4", None):
        conn.request("GET", resolve(BIG), headers={"Range": span} if span else {})
        response = conn.getresponse()
        answers.append((response.status, response.headers, response.read()))
        sockets.append(conn.sock)
    conn.close()
    assert len({id(s) for s in sockets}) == 1  # HTTP/1.1 keep-alive: the client never reconnected
    (s1, h1, b1), (s2, h2, b2), (s3, h3, b3), (s4, h4, b4) = answers
    assert (s1, h1["Content-Range"], h1["Content-Length"], b1) == (206, f"bytes 10-19/{total}", "10", DATA[10:20])
    assert (s2, h2["Content-Range"], b2) == (206, f"bytes {total - 6}-{total - 1}/{total}", DATA[-6:])
    assert (s3, h3["Content-Range"], b3) == (206, f"bytes {total - 4}-{total - 1}/{total}", DATA[-4:])
    assert (s4, h4["Content-Length"], "Content-Range" in h4, b4) == (200, str(total), False, DATA)
    assert {h["Accept-Ranges"] for h in (h1, h2, h3, h4)} == {"bytes"}
    assert hub.requests == [
        f"GET {resolve(BIG)} bytes=10-19",
        f"GET {resolve(BIG)} bytes={total - 6}-",
        f"GET {resolve(BIG)} bytes=-4",
        f"GET {resolve(BIG)}",
    ]
    assert hub.fetched(REPO) == [BIG] * 4
    assert hub.served_ranges(REPO) == [(BIG, 10, 20), (BIG, total - 6, total), (BIG, total - 4, total)]
    assert hub.served == {REPO: 10 + 6 + 4 + total}


def test_a_range_outside_the_file_is_416_and_the_connection_goes_on(hub: FakeHub) -> None:
    total = len(DATA)
    conn = connect(hub.url)
    conn.request("GET", resolve(BIG), headers={"Range": f"bytes={total}-"})
    response = conn.getresponse()
    response.read()
    assert (response.status, response.headers["Content-Range"]) == (416, f"bytes */{total}")
    conn.request("GET", resolve(SMALL))
    response = conn.getresponse()
    assert (response.status, response.read()) == (200, CONFIG)
    conn.close()
    assert hub.served_ranges(REPO) == []
    assert hub.served == {REPO: len(CONFIG)}


def test_head_answers_the_whole_file_metadata_and_serves_no_bytes(hub: FakeHub) -> None:
    status, headers, body = request(hub.url, resolve(BIG), {"Range": "bytes=0-9"}, method="HEAD")
    assert (status, headers["Content-Length"], headers["Accept-Ranges"], body) == (200, str(len(DATA)), "bytes", b"")
    assert headers["ETag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
    assert headers["X-Repo-Commit"] == head_sha(hub)
    assert hub.fetched(REPO) == []
    assert hub.served == {}


# ---------------------------------------------------------------- CDN redirects


def test_big_files_redirect_to_the_cdn_with_the_hubs_metadata_headers(hub: FakeHub) -> None:
    hub.redirect_min_bytes = 1000
    sha = head_sha(hub)
    for method in ("HEAD", "GET"):
        status, headers, body = request(hub.url, resolve(BIG), method=method)
        assert (status, body) == (302, b"")
        assert headers["Location"] == f"{hub.cdn_url}/cdn/{REPO}/{sha}/{BIG}"
        assert headers["X-Repo-Commit"] == sha
        assert headers["X-Linked-Etag"] == f'"{hashlib.sha256(DATA).hexdigest()}"'
        assert headers["X-Linked-Size"] == str(len(DATA))
        assert headers["ETag"] == f'"{hashlib.sha1(DATA).hexdigest()}"'  # the pointer's, as on the Hub
    assert hub.cdn_url != hub.url  # another origin: huggingface_hub stops at the 302 and reads it
    assert request(hub.url, resolve(SMALL))[::2] == (200, CONFIG)  # small files are served directly
    assert hub.fetched(REPO) == [SMALL]  # the redirected GET is counted where the bytes come from

    status, headers, body = request(hub.cdn_url, f"/cdn/{REPO}/{sha}/{BIG}", {"Range": "bytes=100-199"})
    assert (status, headers["Content-Range"], headers["Accept-Ranges"], body) == (
        206,
        f"bytes 100-199/{len(DATA)}",
        "bytes",
        DATA[100:200],
    )
    assert hub.fetched(REPO) == [SMALL, BIG]
    assert hub.served_ranges(REPO) == [(BIG, 100, 200)]
    assert hub.served == {REPO: len(CONFIG) + 100}
    tree = json.loads(request(hub.url, f"/api/models/{REPO}/tree/{sha}")[2])
    lfs = {entry["path"]: entry.get("lfs") for entry in tree}
    assert lfs == {SMALL: None, BIG: {"oid": hashlib.sha256(DATA).hexdigest(), "size": len(DATA), "pointerSize": 134}}


def test_the_cdn_needs_no_token_where_the_hub_does(hub: FakeHub) -> None:
    hub.redirect_min_bytes = 1000
    sha = hub.commit("org/private", {BIG: DATA}, access="private")
    assert request(hub.url, f"/org/private/resolve/{sha}/{BIG}", method="HEAD")[0] == 401
    status, headers, _ = request(hub.url, f"/org/private/resolve/{sha}/{BIG}", {"authorization": "Bearer x"}, "HEAD")
    assert (status, headers["Location"]) == (302, f"{hub.cdn_url}/cdn/org/private/{sha}/{BIG}")
    assert request(hub.cdn_url, f"/cdn/org/private/{sha}/{BIG}")[::2] == (200, DATA)
    assert request(hub.cdn_url, f"/cdn/org/private/{'0' * 40}/{BIG}")[0] == 404


def run_hub_client(hub: FakeHub, tmp_path: Path, script: str, *args: str) -> str:
    """Run ``script`` with huggingface_hub pointed at ``hub``; its stdout."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and "proxy" not in k.lower()
    }
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_CACHE=str(tmp_path / "hf-cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    result = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


DOWNLOAD = """
import sys
from huggingface_hub import hf_hub_download, snapshot_download
print(hf_hub_download(sys.argv[1], "model.safetensors"))
print(snapshot_download(sys.argv[2]))
"""


def test_huggingface_hub_downloads_through_the_redirect(hub: FakeHub, tmp_path: Path) -> None:
    hub.redirect_min_bytes = 1000
    sha = head_sha(hub)
    other = hub.commit("org/other", {BIG: DATA, SMALL: CONFIG})
    file, snapshot = run_hub_client(hub, tmp_path, DOWNLOAD, REPO, "org/other").split()
    assert Path(file).read_bytes() == DATA
    assert folder_files(Path(snapshot)) == {BIG: DATA, SMALL: CONFIG}
    assert f"HEAD {resolve(BIG)}" in hub.requests
    assert f"GET /cdn/{REPO}/{sha}/{BIG}" in hub.requests
    assert f"GET /cdn/org/other/{other}/{BIG}" in hub.requests
    assert not [r for r in hub.requests if r.startswith("GET") and "/resolve/" in r and BIG in r]
    assert hub.fetched(REPO) == [BIG]
    assert sorted(hub.fetched("org/other")) == [SMALL, BIG]
    assert hub.served == {REPO: len(DATA), "org/other": len(DATA) + len(CONFIG)}


RANGED_GET = """
import sys
from huggingface_hub import hf_hub_url
from huggingface_hub.utils import build_hf_headers, get_session
url = hf_hub_url(sys.argv[1], "model.safetensors", revision=sys.argv[2])
response = get_session().get(url, headers={**build_hf_headers(), "Range": "bytes=10-19"})
print(response.status_code, response.content.hex())
"""


def test_a_ranged_get_through_the_redirect_is_206(hub: FakeHub, tmp_path: Path) -> None:
    hub.redirect_min_bytes = 1000
    sha = head_sha(hub)
    status, body = run_hub_client(hub, tmp_path, RANGED_GET, REPO, sha).split()
    assert (status, bytes.fromhex(body)) == ("206", DATA[10:20])
    assert hub.requests == [f"GET {resolve(BIG, sha)} bytes=10-19", f"GET /cdn/{REPO}/{sha}/{BIG} bytes=10-19"]
    assert hub.fetched(REPO) == [BIG]
    assert hub.served_ranges(REPO) == [(BIG, 10, 20)]


# ---------------------------------------------------------------- bandwidth


def test_the_rate_limits_a_download(hub: FakeHub) -> None:
    hub.commit("org/big", {"w.bin": bytes(20_000_000)})
    hub.rate = 40e6
    start = time.monotonic()
    status, _, body = request(hub.url, "/org/big/resolve/main/w.bin")
    elapsed = time.monotonic() - start
    assert (status, len(body)) == (200, 20_000_000)
    assert 0.4 < elapsed < 0.7, elapsed  # 0.5 s


def test_the_rate_is_shared_by_all_connections(hub: FakeHub) -> None:
    hub.commit("org/big", {"a.bin": bytes(10_000_000), "b.bin": bytes(10_000_000)})
    hub.rate = 40e6
    sizes: list[int] = []

    def fetch(name: str) -> None:
        sizes.append(len(request(hub.url, f"/org/big/resolve/main/{name}")[2]))

    threads = [threading.Thread(target=fetch, args=(n,)) for n in ("a.bin", "b.bin")]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    assert sizes == [10_000_000] * 2
    assert 0.4 < elapsed < 0.7, elapsed  # 20 MB at 40 MB/s, whatever the number of connections
    assert hub.served == {"org/big": 20_000_000}


# ---------------------------------------------------------------- faults


def fetch_partial(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, int, bytes]:
    """Status, announced length and the bytes that came before the server hung up."""
    conn = connect(url)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    with pytest.raises(http.client.IncompleteRead) as cut:
        response.read()
    conn.close()
    return response.status, int(response.headers["Content-Length"]), cut.value.partial


@pytest.mark.parametrize(("fault", "kept"), [("drop", len(DATA) // 2), ("truncate", len(DATA) - 1)])
def test_drop_and_truncate_hang_up_mid_body_once(hub: FakeHub, fault: str, kept: int) -> None:
    hub.faults[BIG] = [fault]
    assert fetch_partial(hub.url, resolve(BIG)) == (200, len(DATA), DATA[:kept])
    assert hub.faults[BIG] == []
    assert request(hub.url, resolve(BIG))[::2] == (200, DATA)  # the next GET is clean
    assert hub.served == {REPO: kept + len(DATA)}


def test_a_dropped_range_keeps_its_206_headers(hub: FakeHub) -> None:
    hub.faults[BIG] = ["drop"]
    status, length, partial = fetch_partial(hub.url, resolve(BIG), {"Range": "bytes=1000-1999"})
    assert (status, length, partial) == (206, 1000, DATA[1000:1500])
    assert hub.served_ranges(REPO) == [(BIG, 1000, 2000)]


def test_corrupt_flips_one_byte_in_the_middle(hub: FakeHub) -> None:
    hub.faults[BIG] = ["corrupt"]
    status, _, body = request(hub.url, resolve(BIG))
    assert status == 200 and len(body) == len(DATA)
    assert [i for i in range(len(DATA)) if body[i] != DATA[i]] == [len(DATA) // 2]
    assert body[len(DATA) // 2] == DATA[len(DATA) // 2] ^ 0xFF


def test_503_faults_and_failures_apply_to_the_bytes_wherever_they_are_served(hub: FakeHub) -> None:
    hub.redirect_min_bytes = 1000
    location = f"/cdn/{REPO}/{head_sha(hub)}/{BIG}"
    hub.failures[BIG] = 1
    hub.faults[BIG] = ["503"]
    assert request(hub.url, resolve(BIG))[0] == 302  # the redirect itself never fails
    assert request(hub.cdn_url, location)[0] == 503
    assert request(hub.cdn_url, location)[0] == 503
    assert request(hub.cdn_url, location)[::2] == (200, DATA)
    assert (hub.failures[BIG], hub.faults[BIG]) == (0, [])
    hub.faults[SMALL] = ["503"]
    assert request(hub.url, resolve(SMALL), method="HEAD")[0] == 200  # HEAD fetches no bytes
    status, headers, _ = request(hub.url, resolve(SMALL))
    assert (status, headers["X-Repo-Commit"]) == (503, head_sha(hub))


def test_a_fault_keyed_by_offset_hits_only_ranges_holding_that_byte(hub: FakeHub) -> None:
    hub.faults[f"{BIG}@5000"] = ["corrupt", "drop"]
    assert request(hub.url, resolve(BIG), {"Range": "bytes=0-4999"})[2] == DATA[:5000]
    assert request(hub.url, resolve(BIG), {"Range": "bytes=5001-"})[2] == DATA[5001:]
    body = request(hub.url, resolve(BIG), {"Range": "bytes=4096-8191"})[2]
    assert [i for i in range(len(body)) if body[i] != DATA[4096 + i]] == [5000 - 4096]  # the byte itself
    assert fetch_partial(hub.url, resolve(BIG))[2] == DATA[: len(DATA) // 2]  # a whole-file GET holds it too
    assert hub.faults[f"{BIG}@5000"] == []
    assert request(hub.url, resolve(BIG), {"Range": "bytes=4096-8191"})[2] == DATA[4096:8192]


def test_stall_sends_the_headers_then_waits(hub: FakeHub) -> None:
    hub.faults[SMALL] = ["stall"]
    hub.stall_seconds = 0.3
    conn = connect(hub.url)
    start = time.monotonic()
    conn.request("GET", resolve(SMALL))
    response = conn.getresponse()
    headers_at = time.monotonic() - start
    body = response.read()
    body_at = time.monotonic() - start
    conn.close()
    assert (response.status, body) == (200, CONFIG)
    assert headers_at < 0.2 < 0.3 <= body_at < 1, (headers_at, body_at)


def test_a_stall_ends_when_the_server_stops() -> None:
    with serve(FakeHub()) as hub:
        hub.commit(REPO, {SMALL: CONFIG})
        hub.faults[SMALL] = ["stall"]  # for the default 30 s
        conn = connect(hub.url)
        conn.timeout = 0.2
        conn.request("GET", resolve(SMALL))
        response = conn.getresponse()
        with pytest.raises(TimeoutError):
            response.read()
        conn.close()
        start = time.monotonic()
    assert time.monotonic() - start < 2


def test_an_unknown_fault_is_an_error_naming_the_known_ones(hub: FakeHub) -> None:
    hub.faults[SMALL] = ["slow"]
    status, headers, _ = request(hub.url, resolve(SMALL))
    assert status == 500
    assert headers["X-Error-Message"] == (
        f"unknown fault 'slow' for {SMALL}; known: 503, drop, truncate, corrupt, stall"
    )


# ---------------------------------------------------------------- folders


def test_a_folders_big_files_are_mapped_not_read(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_server, "MMAP_MIN_BYTES", 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / BIG).write_bytes(DATA)
    (tmp_path / "sub" / SMALL).write_bytes(CONFIG)
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / ".hidden").write_bytes(b"not in the repo")
    sha = hub.commit("org/folder", tmp_path)
    files = hub.repos["org/folder"].commits[sha]
    assert sorted(files) == ["empty", BIG, f"sub/{SMALL}"]
    assert isinstance(files[BIG], mmap.mmap)
    assert files[f"sub/{SMALL}"] == CONFIG and files["empty"] == b""
    assert request(hub.url, f"/org/folder/resolve/main/{BIG}")[::2] == (200, DATA)
    assert request(hub.url, f"/org/folder/resolve/main/{BIG}", {"Range": "bytes=-3"})[2] == DATA[-3:]
    assert request(hub.url, f"/org/folder/resolve/main/sub/{SMALL}")[::2] == (200, CONFIG)
    assert sha == FakeHub().commit("org/folder", folder_files(tmp_path))  # the same commit as from bytes
