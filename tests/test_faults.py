"""Faults during a run: kill -9, a full disk, two writers, a read-only output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import files_digest, run

import xorweights
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
    return [sys.executable, "-m", "xorweights", "decode", str(delta), "--base", str(base), "-o", str(out), "-q"]


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
        assert r.exit_code == 5
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
        assert r.exit_code == 5
        assert f"{ro / 'out'}: cannot create the output folder (Read-only file system)" in r.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)
