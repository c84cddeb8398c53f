"""Hub repo ids for DELTA, --base and FINETUNED, with the real huggingface_hub client and no network.

Commands run in a subprocess so huggingface_hub reads HF_HUB_CACHE,
HF_HUB_OFFLINE and HF_ENDPOINT at import, as it does for users, and so each
run is bounded by a timeout. HF_ENDPOINT always points at 127.0.0.1: either
the stand-in Hub of ``hub_server.py`` or a closed port, never huggingface.co.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
from conftest import files_digest
from hub_server import FakeHub, folder_files, serve
from test_bases import write_bin_checkpoint

import xorweights
from xorweights.delta.manifest import load_manifest
from xorweights.fixtures import LlamaSpec, Pair, make_base, make_pair
from xorweights.hub.refs import parse_repo_ref
from xorweights.hub.resolve import is_repo_id

TIMEOUT = 120  # seconds, for any one command or test
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens: a request that should not happen fails fast
# huggingface_hub before 1.0 retries a 5xx five times itself, with waits of its
# own, before xorweights sees the error; from 1.0 it gives up at the first.
HUB_RETRIES_SERVER_ERRORS = int(huggingface_hub.__version__.split(".")[0]) < 1


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    """No test here may hang, whatever the HTTP client does."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"test took more than {TIMEOUT} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TIMEOUT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def released(tmp_path: Path) -> tuple[Pair, Path]:
    """A base, its fine-tune and the delta between them, as local folders."""
    pair = make_pair(tmp_path / "pair")
    delta = tmp_path / "delta"
    xorweights.encode(pair.finetuned, pair.base, delta, base_repo_id="org/base")
    return pair, delta


class Runner:
    """Runs the CLI against one Hugging Face cache folder, in an empty working folder."""

    def __init__(self, root: Path) -> None:
        self.cache = root / "hf-cache"
        self.cwd = root / "cwd"  # empty, so "org/name" is never a local path
        self.cwd.mkdir(parents=True)
        self.home = root / "hf-home"  # no token file

    def __call__(
        self, *args: object, endpoint: str = CLOSED_PORT, offline: bool = False
    ) -> subprocess.CompletedProcess:
        """``xorweights ARGS...``"""
        return self.python("-m", "xorweights", *args, endpoint=endpoint, offline=offline)

    def python(self, *args: object, endpoint: str = CLOSED_PORT, offline: bool = False) -> subprocess.CompletedProcess:
        """``python ARGS...`` with this cache, endpoint and offline mode."""
        return subprocess.run(
            [sys.executable, *map(str, args)],
            cwd=self.cwd,
            env=self.env(endpoint, offline),
            capture_output=True,
            text=True,
            timeout=TIMEOUT - 10,
        )

    def env(self, endpoint: str = CLOSED_PORT, offline: bool = False) -> dict[str, str]:
        """The environment of a command: this cache and endpoint, no token, no proxy."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HF_", "HUGGINGFACE_")) and "proxy" not in k.lower()
        }
        env.update(
            HF_HOME=str(self.home),
            HF_HUB_CACHE=str(self.cache),
            HF_ENDPOINT=endpoint,
            HF_HUB_OFFLINE="1" if offline else "0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_ETAG_TIMEOUT="10",
            HF_HUB_DOWNLOAD_TIMEOUT="10",
            NO_PROXY="127.0.0.1,localhost",
            XORWEIGHTS_DEBUG="0",
        )
        return env

    def put(self, repo_id: str, folder: Path, sha: str, tree: list[str] | None = None) -> Path:
        """Put ``folder`` in the cache as ``repo_id``'s main branch at ``sha``, in the layout huggingface_hub uses.

        ``tree`` lists every file of the repo at that commit, as snapshot_download
        records it after an online download; without it, the snapshot is taken as complete.
        """
        storage = self.cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = storage / "snapshots" / sha
        for name, data in folder_files(folder).items():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes(data)
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / "main").write_text(sha)
        if tree is not None:
            (storage / "trees").mkdir(exist_ok=True)
            doc = {"format_version": 1, "files": {n: {"size": 1, "blob_id": "0" * 40} for n in tree}}
            (storage / "trees" / f"{sha}.json").write_text(json.dumps(doc))
        return snapshot


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("xorweights: error: ")
    return lines[0]


SHA_DELTA = "d" * 40
SHA_BASE = "b" * 40


# ---------------------------------------------------------------- what is a repo id


def test_repo_ids_are_org_name_with_an_optional_revision_and_never_an_existing_path(tmp_path, monkeypatch):
    assert parse_repo_ref("org/name") == ("org/name", None)
    assert parse_repo_ref("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_repo_ref("meta-llama/Llama-2-7b-hf@" + SHA_BASE) == ("meta-llama/Llama-2-7b-hf", SHA_BASE)
    assert parse_repo_ref(Path("org/name")) == ("org/name", None)
    for local in ("name", "org/name@", "a/b/c", "./org/name", "/org/name", "org/na me", "org--x/name", "org/.name"):
        assert not is_repo_id(local), local
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_repo_id("org/name")  # an existing folder wins
    assert is_repo_id("org/other")


# ---------------------------------------------------------------- offline, from the cache


def test_offline_decode_from_the_cache_is_byte_identical(tmp_path, released):
    pair, delta = released
    run = Runner(tmp_path)
    run.put("org/delta", delta, SHA_DELTA)
    run.put("org/base", pair.base, SHA_BASE)
    r = run("decode", "org/delta", "--base", "org/base", "-o", tmp_path / "out", "-q", offline=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert files_digest(tmp_path / "out") == files_digest(pair.finetuned)
    r = run("verify", tmp_path / "out", "--delta", "org/delta", "-q", offline=True)
    assert r.returncode == 0, r.stderr
    r = run("decode", f"org/delta@{SHA_DELTA}", "--base", "org/base", "--check-base", offline=True)
    assert r.returncode == 0, r.stderr
    assert "is the base this delta needs" in r.stdout


LOAD_FROM_THE_HUB = """
import sys, warnings, torch, xorweights
from safetensors.torch import load_file
want = {}
for f in sys.argv[1:]:
    want.update(load_file(f))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = xorweights.load_state_dict("org/delta", "org/other-base")
assert sorted(got) == sorted(want), (sorted(got), sorted(want))
assert all(torch.equal(got[k], want[k]) for k in want)
for w in caught:
    print(f"{w.category.__name__}: {w.message}")
"""


def test_the_python_api_takes_repo_ids_too(tmp_path, released):
    """load_state_dict fetches like decode; a base other than the recorded one is a Python warning."""
    pair, delta = released
    run = Runner(tmp_path)
    run.put("org/delta", delta, SHA_DELTA)
    run.put("org/other-base", pair.base, SHA_BASE)
    r = run.python("-c", LOAD_FROM_THE_HUB, *sorted(pair.finetuned.glob("*.safetensors")), offline=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        "XorWeightsWarning: base org/other-base: this delta was made from org/base; "
        "decoding goes on and checks every base tensor"
    )


def test_offline_with_nothing_cached_says_so_in_one_line(tmp_path):
    run = Runner(tmp_path)
    r = run("decode", "org/delta", "--base", "org/base", "-o", tmp_path / "out", offline=True)
    assert r.returncode == 4
    line = one_error_line(r)
    assert "delta org/delta: not in the local Hugging Face cache" in line
    assert "HF_HUB_OFFLINE=1" in line
    assert "(hint: run once online, or set HF_HUB_OFFLINE=0, or pass a local folder)" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("listed", [True, False], ids=["tree-listing-cached", "no-tree-listing"])
def test_offline_base_cached_as_bin(tmp_path, released, listed):
    """Offline the repo's formats are unknown: safetensors is tried first, then the cached .bin.

    With a cached tree listing naming both formats, huggingface_hub refuses the
    snapshot as incomplete for the safetensors patterns; without one, it serves
    the folder, which holds no safetensors.
    """
    pair, delta = released
    bin_base = write_bin_checkpoint(tmp_path / "bin-base", make_base(LlamaSpec()), shards=2)
    run = Runner(tmp_path)
    run.put("org/delta", delta, SHA_DELTA)
    tree = [*folder_files(bin_base), "model.safetensors.index.json", "model-00001-of-00002.safetensors"]
    run.put("org/base", bin_base, SHA_BASE, tree=tree if listed else None)
    r = run("decode", "org/delta", "--base", "org/base", "-o", tmp_path / "out", "-q", offline=True)
    assert r.returncode == 0, r.stderr
    assert files_digest(tmp_path / "out") == files_digest(pair.finetuned)


# ---------------------------------------------------------------- over HTTP


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with serve(FakeHub()) as h:
        yield h


def test_decode_over_http_fetches_only_what_it_needs_then_works_offline(tmp_path, released, hub):
    pair, delta = released
    base_files = folder_files(pair.base)
    base_files["pytorch_model.bin"] = b"a second copy of the weights that must not be fetched"
    base_files["README.md"] = b"not referenced by the delta"
    hub.commit("org/delta", delta)
    hub.commit("org/base", base_files)
    run = Runner(tmp_path)
    r = run("decode", "org/delta", "--base", "org/base", "-o", tmp_path / "out", "-q", endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert files_digest(tmp_path / "out") == files_digest(pair.finetuned)
    data_files = {wf.data_file for wf in load_manifest(delta).weight_files}
    assert set(hub.fetched("org/delta")) == set(folder_files(delta))
    assert sorted(n for n in hub.fetched("org/delta") if n not in data_files) == sorted(
        set(folder_files(delta)) - data_files
    )
    referenced = {of.name for of in load_manifest(delta).other_files if of.mode == "reference"}
    weights = {n for n in base_files if n.endswith((".safetensors", ".safetensors.index.json"))}
    assert set(hub.fetched("org/base")) == weights | referenced
    whole = [
        line.split(" ")[1].split("/resolve/")[1].split("/", 1)[1]
        for line in hub.requests
        if line.startswith("GET /org/base/resolve/") and " bytes=" not in line
    ]
    assert sorted(whole) == sorted(weights | referenced)  # each file downloaded once, into the cache
    # The shards still missing were planned from their headers, fetched by range while decoding began.
    shards = sorted(n for n in weights if n.endswith(".safetensors"))
    assert sorted(hub.served_ranges("org/base")) == sorted(
        [(s, 0, 8) for s in shards] + [(s, 8, 8 + int.from_bytes(base_files[s][:8], "little")) for s in shards]
    )
    assert not [r for r in hub.requests if ".bin" in r or "README" in r]
    # The delta was streamed: none of its data files is in the cache, so offline it cannot be decoded again.
    assert not [p for p in run.cache.rglob("*.xwd")]
    r = run("decode", "org/delta", "--base", "org/base", "-o", tmp_path / "again", "-q", offline=True)
    assert r.returncode == 4
    assert "its data files are not in the local Hugging Face cache" in one_error_line(r)
    assert "HF_HUB_OFFLINE=1 forbids downloading them" in one_error_line(r)
    # --download-first keeps it in the cache, which then answers on its own, branch names included.
    args = ("decode", "org/delta", "--base", "org/base", "-o", tmp_path / "first", "-q", "--download-first")
    assert run(*args, endpoint=hub.url).returncode == 0
    assert files_digest(tmp_path / "first") == files_digest(pair.finetuned)
    r = run("decode", "org/delta", "--base", "org/base", "-o", tmp_path / "again", "-q", offline=True)
    assert r.returncode == 0, r.stderr
    assert files_digest(tmp_path / "again") == files_digest(pair.finetuned)


def test_decode_over_http_pinned_to_commits(tmp_path, released, hub):
    pair, delta = released
    delta_sha = hub.commit("org/delta", delta)
    base_sha = hub.commit("org/base", pair.base)
    hub.commit("org/delta", {"README.md": b"main moved on"})  # neither head is what we pin
    hub.commit("org/base", {"README.md": b"main moved on"})
    run = Runner(tmp_path)
    r = run(
        "decode", f"org/delta@{delta_sha}", "--base", f"org/base@{base_sha}", "-o", tmp_path / "out", "-q",
        endpoint=hub.url,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert files_digest(tmp_path / "out") == files_digest(pair.finetuned)
    assert all(delta_sha in r for r in hub.requests if "/org/delta/" in r)
    assert all(base_sha in r for r in hub.requests if "/org/base/" in r)


def test_a_bin_only_base_repo_fetches_the_bin_files(tmp_path, released, hub):
    pair, delta = released
    bin_base = write_bin_checkpoint(tmp_path / "bin-base", make_base(LlamaSpec()), shards=2)
    hub.commit("org/delta", delta)
    hub.commit("org/base-bin", bin_base)
    run = Runner(tmp_path)
    r = run("decode", "org/delta", "--base", "org/base-bin", "-o", tmp_path / "out", "-q", endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert files_digest(tmp_path / "out") == files_digest(pair.finetuned)
    assert {n for n in hub.fetched("org/base-bin") if "pytorch_model" in n} == {
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
    }


def test_encode_from_the_hub_records_the_base_commit_and_decode_fetches_it(tmp_path, hub):
    pair = make_pair(tmp_path / "pair")
    base_files = folder_files(pair.base)
    base_files["pytorch_model.bin"] = b"a second copy of the weights that must not be fetched"
    base_sha = hub.commit("org/base", base_files)
    hub.commit("org/ft", pair.finetuned)
    run = Runner(tmp_path)
    delta = tmp_path / "delta"
    r = run("encode", "org/ft", "--base", "org/base", "-o", delta, "-q", endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert not [r for r in hub.requests if ".bin" in r]
    base = load_manifest(delta).base
    assert (base.repo_id, base.revision) == ("org/base", base_sha)
    assert base.description == f"the base checkpoint used at encode time (org/base@{base_sha})"

    # main moves to another base: decode still fetches the commit the delta records, silently.
    other = make_pair(tmp_path / "other", seed=7)
    hub.commit("org/base", other.base)
    hub.requests.clear()
    r = run("decode", delta, "--base", "org/base", "-o", tmp_path / "out", "-q", endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert files_digest(tmp_path / "out") == files_digest(pair.finetuned)
    assert all(base_sha in r for r in hub.requests if "/org/base/" in r)

    # Asking for main on purpose warns on one line, then the base check refuses it.
    r = run("decode", delta, "--base", "org/base@main", "-o", tmp_path / "out2", "-q", endpoint=hub.url)
    assert r.returncode == 1
    warning, error = r.stderr.strip().splitlines()
    assert warning.startswith("xorweights: warning: base org/base@main is commit ")
    assert f"but this delta was made from revision {base_sha}" in warning
    assert error.startswith("xorweights: error: base tensor ")

    # Another repo than the recorded one warns too.
    hub.commit("org/base-copy", pair.base)
    r = run("decode", delta, "--base", "org/base-copy", "-o", tmp_path / "out3", "-q", endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == (
        f"xorweights: warning: base org/base-copy: this delta was made from org/base@{base_sha}; "
        "decoding goes on and checks every base tensor"
    )


def test_a_missing_repo_is_one_line_naming_it(tmp_path, released, hub):
    _, delta = released
    run = Runner(tmp_path)
    r = run("decode", "org/nothing", "--base", "org/base", "-o", tmp_path / "out", endpoint=hub.url)
    assert r.returncode == 4
    line = one_error_line(r)
    assert f"delta org/nothing: no such local folder, and no such repo on {hub.url} (or it is private)" in line
    assert "HF_TOKEN" in line and "hf auth login" in line
    assert not (tmp_path / "out").exists()


def test_private_gated_and_unknown_revision_errors(tmp_path, released, hub):
    pair, delta = released
    hub.commit("org/delta", delta)
    hub.commit("org/private", pair.base, access="private")
    hub.commit("org/gated", pair.base, access="gated")
    hub.commit("org/base", pair.base)
    run = Runner(tmp_path)
    out = tmp_path / "out"
    r = run("decode", "org/delta", "--base", "org/private", "-o", out, "-q", endpoint=hub.url)
    assert r.returncode == 4
    assert "base org/private: no such local folder, and no such repo" in one_error_line(r)
    r = run("decode", "org/delta", "--base", "org/gated", "-o", out, "-q", endpoint=hub.url)
    assert r.returncode == 4
    line = one_error_line(r)
    assert "base org/gated: a gated repo" in line and "HF_TOKEN" in line
    r = run("decode", "org/delta", "--base", "org/base@v9", "-o", out, "-q", endpoint=hub.url)
    assert r.returncode == 4
    assert "base org/base@v9: org/base has no revision v9" in one_error_line(r)
    r = run("decode", "org/delta@nope", "--base", "org/base", "-o", out, "-q", endpoint=hub.url)
    assert r.returncode == 4
    assert "delta org/delta@nope: org/delta has no revision nope" in one_error_line(r)


def test_an_unreachable_hub_with_nothing_cached(tmp_path):
    run = Runner(tmp_path)
    r = run("verify", tmp_path, "--delta", "org/delta", endpoint=CLOSED_PORT)
    assert r.returncode == 4
    line = one_error_line(r)
    assert f"delta org/delta: could not reach {CLOSED_PORT}" in line
    assert "not in the local Hugging Face cache" in line


def test_local_folders_still_win_over_repo_ids(tmp_path, released):
    """A relative folder shaped like org/name is read from disk; nothing is fetched."""
    pair, delta = released
    run = Runner(tmp_path)
    shutil.copytree(delta, run.cwd / "org" / "delta")
    shutil.copytree(pair.base, run.cwd / "org" / "base")
    r = run("decode", "org/delta", "--base", "org/base", "-o", tmp_path / "out", "-q", offline=True)
    assert r.returncode == 0, r.stderr
    assert files_digest(tmp_path / "out") == files_digest(pair.finetuned)
    assert not run.cache.exists()


def test_a_server_error_on_a_file_is_retried_and_the_decode_completes(tmp_path, released, hub):
    pair, delta = released
    hub.commit("org/delta", delta)
    hub.commit("org/base", pair.base)
    data_file = load_manifest(delta).weight_files[0].data_file
    hub.failures[data_file] = 2  # snapshot_download alone gives up at the first 503
    run = Runner(tmp_path)
    args = ("decode", "org/delta", "--base", "org/base", "-o", tmp_path / "out", "--download-first")
    r = run(*args, endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert files_digest(tmp_path / "out") == files_digest(pair.finetuned)
    assert hub.failures[data_file] == 0
    if HUB_RETRIES_SERVER_ERRORS:
        return  # huggingface_hub 0.x retried them itself, with lines of its own
    assert f"delta org/delta: {hub.url} answered HTTP 503; trying again in 1 s (attempt 2 of 5)" in r.stderr
    assert "trying again in 2 s (attempt 3 of 5)" in r.stderr
    assert "attempt 4" not in r.stderr


@pytest.mark.skipif(HUB_RETRIES_SERVER_ERRORS, reason="huggingface_hub 0.x waits about a minute in its own retries")
def test_server_errors_past_the_last_retry_are_one_line(tmp_path, released, hub):
    pair, delta = released
    hub.commit("org/delta", delta)
    data_file = load_manifest(delta).weight_files[0].data_file
    hub.failures[data_file] = 99
    run = Runner(tmp_path)
    script = (
        "import sys, xorweights.hub.client as client\n"
        "client.RETRY_DELAYS_S = (0.01, 0.01)\n"  # the same path, without 15 s of waiting
        "from xorweights.entry import main\n"
        "sys.argv = ['xorweights', 'decode', 'org/delta', '--base', 'base', '-o', 'out', '-q', '--download-first']\n"
        "main()\n"
    )
    r = run.python("-c", script, endpoint=hub.url)
    assert r.returncode == 4, r.stderr
    *retries, error = r.stderr.strip().splitlines()
    assert retries == [
        f"xorweights: warning: delta org/delta: {hub.url} answered HTTP 503; trying again in 0.01 s (attempt {n} of 3)"
        for n in (2, 3)
    ]
    assert error == (
        f"xorweights: error: delta org/delta: {hub.url} answered HTTP 503, 3 times in a row "
        "(hint: try again later, or pass a local folder)"
    )
    assert hub.fetched("org/delta").count(data_file) == 3  # the first try and two retries
    assert not (run.cwd / "out").exists()
