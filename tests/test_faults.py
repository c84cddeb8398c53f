"""Faults during a run: kill -9, a full disk, two writers, a read-only output."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import files_digest, run

import xorweights
from xorweights.errors import OutputError
from xorweights.fixtures import LlamaSpec, make_pair
from xorweights.locks import FolderLock

# Big enough that decode takes a moment, small enough for CI: about 2.6 MB of tensors.
MEDIUM = LlamaSpec(vocab=2048, hidden=128, intermediate=344, layers=4, heads=4)


def visible(folder: Path) -> dict[str, str]:
    return files_digest(folder) if folder.exists() else {}


@pytest.fixture
def medium(tmp_path):
    pair = make_pair(tmp_path / "pair", MEDIUM, shards=3)
    delta = tmp_path / "delta"
    xorweights.encode(pair.finetuned, pair.base, delta, frame_bytes=4096)
    return pair, delta


def decode_cmd(delta: Path, base: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "xorweights.cli", "decode", str(delta), "--base", str(base), "-o", str(out), "-q"]


def test_kill_9_at_random_points_then_rerun_gives_identical_output(medium, tmp_path):
    pair, delta = medium
    want = files_digest(pair.finetuned)
    out = tmp_path / "out"
    rng = random.Random(1234)
    for _ in range(8):
        proc = subprocess.Popen(decode_cmd(delta, pair.base, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.05, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # Whatever is in OUT under a final name is complete and correct.
        for name, digest in visible(out).items():
            assert digest == want[name], f"{name} looks complete but is not"
    r = subprocess.run(decode_cmd(delta, pair.base, out), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert visible(out) == want
    assert not list(out.glob(".*xorweights-partial"))


def test_a_second_decode_into_the_same_out_refuses_while_the_first_holds_the_lock(pair, tmp_path):
    delta, out = tmp_path / "delta", tmp_path / "out"
    xorweights.encode(pair.finetuned, pair.base, delta)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from xorweights.locks import FolderLock\n"
            "with FolderLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = run("decode", delta, "--base", pair.base, "-o", out)
        assert r.exit_code == 1
        assert f"{out}: another xorweights (pid {holder.pid} on " in r.stderr
        assert "wait for it to finish, or use another output folder" in r.stderr
        assert visible(out) == {}
    finally:
        holder.kill()
        holder.wait()
    # The holder died without cleaning up: its lock is stale and is taken over.
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert visible(out) == files_digest(pair.finetuned)


def test_a_stale_lock_names_the_dead_holder(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / ".xorweights" / "lock"
    lock.parent.mkdir(parents=True)
    import socket

    lock.write_text(f"{dead.pid} {socket.gethostname()}\n")
    with FolderLock(tmp_path) as held:
        assert held.took_over_from == dead.pid
        assert lock.read_text().split()[0] == str(os.getpid())
    assert lock.read_text() == ""


def test_disk_full_midway_names_the_space_needed_and_a_rerun_resumes(medium, tmp_path, monkeypatch):
    pair, delta = medium
    out = tmp_path / "out"
    real_pwrite = os.pwrite
    budget = {"bytes": 1_500_000}  # the disk "fills" after 1.5 MB

    def pwrite(fd, data, offset):
        budget["bytes"] -= len(data)
        if budget["bytes"] < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OutputError) as caught:
        xorweights.decode(delta, pair.base, out)
    assert "the disk filled up; this decode needs about" in caught.value.message
    assert "run the same command again" in caught.value.hint
    want = files_digest(pair.finetuned)
    for name, digest in visible(out).items():  # nothing partial under a final name
        assert digest == want[name]
    assert not list(out.glob(".*xorweights-partial"))
    monkeypatch.undo()
    result = xorweights.decode(delta, pair.base, out)
    assert result.skipped  # the shards finished before the disk filled were kept
    assert visible(out) == want


def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


def test_free_space_is_checked_before_starting(medium, tmp_path):
    pair, delta = medium
    disk = tmp_path / "small"
    mount_tmpfs(disk, "size=2m")
    try:
        r = run("decode", delta, "--base", pair.base, "-o", disk / "out")
        assert r.exit_code == 1
        assert "this decode needs about 2.5 MiB more, and only 2.0 MiB is free" in r.stderr
        assert visible(disk / "out") == {}
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_read_only_output_is_refused(pair, tmp_path):
    delta = tmp_path / "delta"
    xorweights.encode(pair.finetuned, pair.base, delta)
    ro = tmp_path / "ro"
    mount_tmpfs(ro, "ro,size=1m")
    try:
        r = run("decode", delta, "--base", pair.base, "-o", ro / "out")
        assert r.exit_code == 1
        assert f"{ro / 'out'}: cannot create the output folder (Read-only file system)" in r.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)
