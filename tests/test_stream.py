"""Decoding a Hub delta as it downloads: range requests, flaky and lying servers, pins, and resume after a kill.

The stand-in Hub (``hub_server.py``) redirects data files to its CDN port as
the real Hub does for large files. Commands run in a subprocess, as in
test_hub.py; ``patched`` shortens the retry waits and, for resume tests,
makes fetch units and checkpoints small enough for the tiny fixtures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import files_digest
from hub_server import FakeHub, serve
from test_hub import HUB_RETRIES_SERVER_ERRORS, Runner, _bounded, one_error_line  # noqa: F401  (_bounded: no hang)

import xorweights
from xorweights.delta.manifest import load_manifest
from xorweights.errors import EXIT_BAD_INPUT, EXIT_HUB
from xorweights.fixtures import Pair, make_pair


@pytest.fixture
def released(tmp_path: Path) -> tuple[Pair, Path]:
    """A base, its fine-tune and the delta between them, as local folders."""
    pair = make_pair(tmp_path / "pair")
    xorweights.encode(pair.finetuned, pair.base, tmp_path / "delta")
    return pair, tmp_path / "delta"


@pytest.fixture
def hub():
    with serve(FakeHub()) as h:
        h.redirect_min_bytes = 1024  # data files go through the CDN, as large files do on the Hub
        yield h


def patched(*args: object, unit: int | None = None, checkpoint: bool = False) -> list[str]:
    """``python -c`` arguments running ``xorweights ARGS`` with 10 ms retry waits (and small units/checkpoints)."""
    lines = ["import importlib, sys", "import xorweights.hub.client as client", "client.RETRY_DELAYS_S = (0.01,) * 4"]
    if unit is not None:
        lines += ["import xorweights.delta.prefetch as prefetch", f"prefetch.UNIT_BYTES = {unit}"]
    if checkpoint:
        lines += ["importlib.import_module('xorweights.decode').CHECKPOINT_BYTES = 1"]
    lines += ["from xorweights.entry import main", f"sys.argv = ['xorweights', *{[str(a) for a in args]!r}]", "main()"]
    return ["-c", "\n".join(lines)]


def data_sizes(delta: Path) -> dict[str, int]:
    return {wf.data_file: (delta / wf.data_file).stat().st_size for wf in load_manifest(delta).weight_files}


def first_frame(delta: Path) -> tuple[str, str, int, int]:
    """The first data file, its first tensor's name, and that frame's start and stored size."""
    wf = load_manifest(delta).weight_files[0]
    return wf.data_file, wf.tensors[0].name, 0, wf.tensors[0].frames[0][0]


def decode_args(out: Path, *extra: object) -> tuple[object, ...]:
    return ("decode", "org/delta", "--base", "base", "-o", out, "-q", *extra)


def setup(tmp_path: Path, released, hub: FakeHub) -> tuple[Runner, Path, Path]:
    """The delta on the stand-in Hub; the base as a local folder in the runner's working folder."""
    pair, delta = released
    hub.commit("org/delta", delta)
    run = Runner(tmp_path)
    os.symlink(pair.base, run.cwd / "base")
    return run, delta, pair.finetuned


def test_data_files_are_read_by_range_once_each_and_never_stored(tmp_path, released, hub):
    run, delta, finetuned = setup(tmp_path, released, hub)
    r = run(*decode_args(tmp_path / "out"), endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert files_digest(tmp_path / "out") == files_digest(finetuned)
    sizes = data_sizes(delta)
    for name, size in sizes.items():
        ranges = sorted((a, b) for f, a, b in hub.served_ranges("org/delta") if f == name)
        assert ranges and ranges[0][0] == 0 and ranges[-1][1] == size
        assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False)), "each byte once"
    # The small files came through snapshot_download; the data files only by range, and none is in the cache.
    assert hub.served["org/delta"] == sum(f.stat().st_size for f in delta.rglob("*") if f.is_file())
    assert not list(run.cache.rglob("*.xwd"))
    assert not list(run.cache.rglob("*.incomplete"))


def test_drops_short_bodies_and_server_errors_are_retried(tmp_path, released, hub):
    run, delta, finetuned = setup(tmp_path, released, hub)
    name = next(iter(data_sizes(delta)))
    hub.faults[name] = ["503", "drop", "truncate"]
    r = run.python(*patched(*decode_args(tmp_path / "out")), endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert files_digest(tmp_path / "out") == files_digest(finetuned)
    assert hub.faults[name] == []
    warnings = r.stderr.strip().splitlines()
    assert len(warnings) == 3, r.stderr
    assert "answered HTTP 503; trying again in 0.01 s (attempt 2 of 5)" in warnings[0]
    assert warnings[0].startswith("xorweights: warning: delta org/delta@")
    assert f"/{name}: bytes 0-" in warnings[0]
    assert any("the connection failed" in w or "the answer ended after" in w for w in warnings[1:])
    # After the drop, the request starts again at the first frame that had not arrived whole, not at byte 0.
    # (huggingface_hub 0.x's requests hands the body over in 1 MiB pieces: a drop within one starts over.)
    cdn = [r for r in hub.requests if r.startswith("GET /cdn/") and f"/{name} bytes=" in r]
    starts = [int(r.split(" bytes=")[1].split("-")[0]) for r in cdn]
    assert starts[:2] == [0, 0] and (starts[2] > 0 or HUB_RETRIES_SERVER_ERRORS), starts


def test_a_frame_that_arrives_damaged_is_fetched_once_more(tmp_path, released, hub):
    run, delta, finetuned = setup(tmp_path, released, hub)
    name, _, start, stored = first_frame(delta)
    hub.faults[f"{name}@{start + stored // 2}"] = ["corrupt"]
    r = run.python(*patched(*decode_args(tmp_path / "out")), endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert files_digest(tmp_path / "out") == files_digest(finetuned)
    assert (name, start, start + stored) in hub.served_ranges("org/delta")  # the frame alone, fetched again


def test_a_frame_damaged_twice_is_named_in_one_line(tmp_path, released, hub):
    run, delta, _ = setup(tmp_path, released, hub)
    name, tensor, start, stored = first_frame(delta)
    hub.faults[f"{name}@{start + stored // 2}"] = ["corrupt", "corrupt"]
    r = run.python(*patched(*decode_args(tmp_path / "out")), endpoint=hub.url)
    assert r.returncode == EXIT_BAD_INPUT
    line = one_error_line(r)
    assert f"/{name}: tensor {tensor} frame 0: frame does not decompress" in line
    assert "(downloaded twice)" in line and "the delta on the Hub is damaged" in line
    assert not [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]


def test_failures_past_the_last_retry_are_one_line(tmp_path, released, hub):
    run, delta, _ = setup(tmp_path, released, hub)
    name = next(iter(data_sizes(delta)))
    hub.faults[name] = ["503"] * 5
    r = run.python(*patched(*decode_args(tmp_path / "out")), endpoint=hub.url)
    assert r.returncode == EXIT_HUB
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("xorweights: error: delta org/delta@")
    assert "answered HTTP 503, 5 times in a row" in error
    assert "the same command resumes where it stopped; or pass --download-first" in error


def test_a_data_file_missing_from_the_repo_is_one_line(tmp_path, released, hub):
    pair, delta = released
    name = next(iter(data_sizes(delta)))
    files = {p.relative_to(delta).as_posix(): p.read_bytes() for p in delta.rglob("*") if p.is_file()}
    del files[name]
    hub.commit("org/delta", files)
    run = Runner(tmp_path)
    os.symlink(pair.base, run.cwd / "base")
    r = run(*decode_args(tmp_path / "out"), endpoint=hub.url)
    assert r.returncode == EXIT_HUB
    assert f"/{name}: not found on {hub.url}, although the delta's manifest lists it" in one_error_line(r)


def test_a_data_file_of_another_size_on_the_hub_is_refused(tmp_path, released, hub):
    pair, delta = released
    name = next(iter(data_sizes(delta)))
    files = {p.relative_to(delta).as_posix(): p.read_bytes() for p in delta.rglob("*") if p.is_file()}
    files[name] += b"\0" * 10
    hub.commit("org/delta", files)
    run = Runner(tmp_path)
    os.symlink(pair.base, run.cwd / "base")
    r = run(*decode_args(tmp_path / "out"), endpoint=hub.url)
    assert r.returncode == EXIT_BAD_INPUT
    size = data_sizes(delta)[name]
    assert f"/{name}: {size + 10} bytes on the Hub, its manifest declares {size}" in one_error_line(r)


def test_every_range_is_read_at_the_commit_the_manifest_came_from(tmp_path, released, hub):
    run, delta, finetuned = setup(tmp_path, released, hub)
    sha = hub.repos["org/delta"].refs["main"]
    r = run(*decode_args(tmp_path / "out"), endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    ranged = [r for r in hub.requests if " bytes=" in r]
    assert ranged and all(f"/{sha}/" in r for r in ranged)


def test_a_gated_delta_is_refused_before_any_data_is_read(tmp_path, released, hub):
    pair, delta = released
    hub.commit("org/delta", delta, access="gated")
    run = Runner(tmp_path)
    os.symlink(pair.base, run.cwd / "base")
    r = run(*decode_args(tmp_path / "out"), endpoint=hub.url)
    assert r.returncode == EXIT_HUB
    assert "a gated repo" in one_error_line(r)
    assert not [r for r in hub.requests if " bytes=" in r]


def test_a_killed_streaming_decode_fetches_only_what_it_had_not_checked(tmp_path, released, hub):
    run, delta, finetuned = setup(tmp_path, released, hub)
    sizes = data_sizes(delta)
    first, second = sizes
    # The second file's last bytes stall: the decode is killed there, with most of that file checked.
    hub.faults[f"{second}@{sizes[second] - 1}"] = ["stall"]
    args = patched(*decode_args(tmp_path / "out"), unit=4096, checkpoint=True)
    child = subprocess.Popen([sys.executable, *args], cwd=run.cwd, env=run.env(hub.url), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while hub.faults[f"{second}@{sizes[second] - 1}"] and time.monotonic() < deadline:
        time.sleep(0.02)  # until the fault is taken: the stalled request has begun
    time.sleep(0.5)  # the frames before the stall are checked and recorded meanwhile
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert not (tmp_path / "out" / "model-00002-of-00002.safetensors").exists()
    before = dict(hub.served)
    ranges_before = len(hub.served_ranges("org/delta"))
    r = run.python(*args, endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert files_digest(tmp_path / "out") == files_digest(finetuned)
    again = hub.served_ranges("org/delta")[ranges_before:]
    assert {f for f, _, _ in again} == {second}, "the finished file is not fetched again"
    refetched = hub.served["org/delta"] - before["org/delta"]
    # What was checked before the kill is read back from the partial file, not fetched again.
    assert refetched < sizes[second] // 2, f"fetched {refetched} of {sizes[second]} again"


def test_a_hub_base_is_fetched_into_the_cache_while_decoding_starts(tmp_path, released, hub):
    pair, delta = released
    hub.commit("org/delta", delta)
    hub.commit("org/base", pair.base)
    last = "model-00002-of-00002.safetensors"
    size = (pair.base / last).stat().st_size
    hub.stall_seconds = 4
    hub.faults[f"{last}@{size - 1}"] = ["stall"]  # its download, not the fetch of its header, waits
    run = Runner(tmp_path)
    out = tmp_path / "out"
    args = patched("decode", "org/delta", "--base", "org/base", "-o", out, "-q", checkpoint=True)
    child = subprocess.Popen([sys.executable, *args], cwd=run.cwd, env=run.env(hub.url))
    state = out / ".xorweights" / "decode-state.jsonl"
    while hub.faults[f"{last}@{size - 1}"] and child.poll() is None:
        time.sleep(0.02)
    stalled = time.monotonic()  # the last shard's download has begun, and waits
    while not (state.exists() and b'"partial"' in state.read_bytes()) and child.poll() is None:
        time.sleep(0.02)
    # Tensors of the first shard were rebuilt and checked while the last one was still on its way.
    assert time.monotonic() - stalled < hub.stall_seconds - 1, "decoding waited for the whole base"
    assert child.wait(timeout=60) == 0
    assert files_digest(out) == files_digest(pair.finetuned)
    snapshot = next((run.cache / "models--org--base" / "snapshots").iterdir())
    assert (snapshot / last).read_bytes() == (pair.base / last).read_bytes(), "the base is kept in the cache"


@pytest.mark.skipif(HUB_RETRIES_SERVER_ERRORS, reason="huggingface_hub 0.x retries these itself, for about a minute")
def test_a_base_shard_that_fails_to_download_is_one_line(tmp_path, released, hub):
    pair, delta = released
    hub.commit("org/delta", delta)
    hub.commit("org/base", pair.base)
    last = "model-00002-of-00002.safetensors"
    hub.faults[f"{last}@{(pair.base / last).stat().st_size - 1}"] = ["503"] * 5
    run = Runner(tmp_path)
    r = run.python(
        *patched("decode", "org/delta", "--base", "org/base", "-o", tmp_path / "out", "-q"), endpoint=hub.url
    )
    assert r.returncode == EXIT_HUB
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("xorweights: error: base org/base@") and "answered HTTP 503, 5 times in a row" in error
    assert not (tmp_path / "out" / "model-00002-of-00002.safetensors").exists()


def test_verify_against_a_hub_delta_fetches_its_manifest_only(tmp_path, released, hub):
    pair, delta = released
    hub.commit("org/delta", delta)
    r = Runner(tmp_path)("verify", pair.finetuned, "--delta", "org/delta", "-q", endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert hub.fetched("org/delta") == ["xorweights-delta.json"]


def test_load_state_dict_streams_a_hub_delta_into_memory(tmp_path, released, hub):
    pytest.importorskip("torch")
    run, delta, finetuned = setup(tmp_path, released, hub)
    script = (
        "import torch, xorweights\n"
        "from safetensors.torch import load_file\n"
        f"got = xorweights.load_state_dict('org/delta', 'base')\n"
        f"want = {{}}\n"
        f"for f in {sorted(str(p) for p in finetuned.glob('*.safetensors'))!r}: want.update(load_file(f))\n"
        "assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)\n"
    )
    r = run.python("-c", script, endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert {f for f, _, _ in hub.served_ranges("org/delta")} == set(data_sizes(delta))
    assert not list(run.cache.rglob("*.xwd")) and [p.name for p in run.cwd.iterdir()] == ["base"]


def test_progress_shows_rebuilt_and_downloaded_bytes_with_their_rates(tmp_path, released, hub):
    import fcntl
    import pty
    import struct
    import termios

    run, delta, finetuned = setup(tmp_path, released, hub)
    hub.rate = sum(data_sizes(delta).values()) / 1.5  # the data takes 1.5 s to arrive, in small requests
    leader, follower = pty.openpty()  # progress is drawn only on a terminal...
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # ...with columns to draw in
    args = patched("decode", "org/delta", "--base", "base", "-o", tmp_path / "out", unit=4096)
    child = subprocess.Popen(
        [sys.executable, *args], cwd=run.cwd, env=run.env(hub.url), stderr=follower, stdout=subprocess.PIPE
    )
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    assert child.wait(timeout=60) == 0
    text = drawn.decode("utf-8", "replace")
    assert "decode:" in text and "B/s" in text  # rebuilt bytes and their rate
    assert "downloaded " in text and "/s" in text.split("downloaded ", 1)[1]


class _Arrival:
    """A shard 'downloading': its header as fetched ahead, and what waiting for it gives."""

    def __init__(self, data: bytes, error: Exception | None = None) -> None:
        self.prefix = data[: 8 + int.from_bytes(data[:8], "little")]
        self.size = len(data)
        self.error = error

    def wait(self) -> None:
        if self.error is not None:
            raise self.error


def test_an_arriving_shard_is_read_only_as_the_file_whose_header_was_planned_from(tmp_path):
    from xorweights.errors import HubDownloadError, InputFileError
    from xorweights.readers.checkpoint import Checkpoint

    pair = make_pair(tmp_path / "pair")
    shard = pair.base / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()

    def first_bytes(arrival: _Arrival) -> tuple[bytes, str]:
        with Checkpoint(pair.base, {shard.name: arrival}) as ckpt:
            name = next(n for n, r in ckpt.tensors.items() if r.where == str(shard))
            return bytes(ckpt.tensors[name].source.read(0, 4)), name

    got, name = first_bytes(_Arrival(data))
    with Checkpoint(pair.base) as ckpt:
        assert got == bytes(ckpt.tensors[name].source.read(0, 4))
    # What arrived is not the file planned from: the same size, one header byte changed.
    changed = bytearray(data)
    changed[20] ^= 0x01
    shard.write_bytes(changed)
    with pytest.raises(InputFileError, match="downloaded, but not the file whose header was fetched ahead"):
        first_bytes(_Arrival(data))
    # The download failed: the read says why, instead of waiting for ever.
    failed = HubDownloadError("base org/base@abc: answered HTTP 503, 5 times in a row")
    with pytest.raises(HubDownloadError, match="5 times in a row"):
        first_bytes(_Arrival(data, failed))
