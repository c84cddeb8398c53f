"""A run stopped inside a weight file: the next one reads back and checks what was written, and rebuilds the rest.

CHECKPOINT_BYTES is set to one byte here, so every checked tensor is
recorded (the tiny fixtures hold no tensor of 4 MiB).
"""

from __future__ import annotations

import importlib
import json
import os

import pytest
from conftest import files_digest, partials

import xorweights
from xorweights.decode_state import STATE_NAME, parse_state
from xorweights.delta.manifest import load_manifest
from xorweights.delta.source import LocalFile
from xorweights.outdir import WORK_DIR, OutputDir

decode_module = importlib.import_module("xorweights.decode")
SHARD = "model-00002-of-00002.safetensors"


@pytest.fixture
def delta(pair, tmp_path):
    folder = tmp_path / "delta"
    xorweights.encode(pair.finetuned, pair.base, folder)
    return folder


@pytest.fixture
def reads(monkeypatch):
    """Every (offset, length) read from a local data file, in order."""
    seen: list[tuple[int, int]] = []
    original = LocalFile.read

    def read(self, offset, length):
        seen.append((offset, length))
        return original(self, offset, length)

    monkeypatch.setattr(LocalFile, "read", read)
    return seen


def stop_after(monkeypatch, tensors: int) -> None:
    """Raise KeyboardInterrupt once, at the ``tensors``+1-th tensor check, with every checked tensor recorded."""
    monkeypatch.setattr(decode_module, "CHECKPOINT_BYTES", 1)
    original = decode_module.check_tensor
    calls = 0

    def check(*args):
        nonlocal calls
        calls += 1
        if calls == tensors + 1:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(decode_module, "check_tensor", check)


def stopped_in_second_shard(pair, delta, out, monkeypatch, dtype=None) -> None:
    """A decode stopped three tensors into the second shard."""
    stop_after(monkeypatch, len(load_manifest(delta).weight_files[0].tensors) + 3)
    with pytest.raises(KeyboardInterrupt):
        xorweights.decode(delta, pair.base, out, dtype=dtype, jobs=1)
    assert len(recorded(out)[SHARD]) == 3


def recorded(out) -> dict[str, list[str]]:
    """The tensors each partial file holds whole, by their xxh3-128 as written."""
    _, _, progress, _ = parse_state((out / WORK_DIR / STATE_NAME).read_bytes(), "state")
    return {name: p.hashes for name, p in progress.items()}


def frames_of(delta, name: str) -> int:
    wf = next(wf for wf in load_manifest(delta).weight_files if wf.name == name)
    return sum(len(t.frames) for t in wf.tensors)


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_a_stopped_file_resumes_from_its_last_checked_tensor(pair, delta, tmp_path, monkeypatch, reads, dtype):
    out = tmp_path / "out"
    stopped_in_second_shard(pair, delta, out, monkeypatch, dtype)
    assert len(partials(out)) == 1, "the partial file is kept for the next run"
    reads.clear()
    result = xorweights.decode(delta, pair.base, out, dtype=dtype, jobs=1)
    assert SHARD in result.written
    shard = next(wf for wf in load_manifest(delta).weight_files if wf.name == SHARD)
    # The three checked tensors are not read again; nor, unconverted, the frames of the fourth, written
    # and recorded before its check was stopped (a converted tensor is taken up whole only).
    skipped_frames = sum(len(t.frames) for t in shard.tensors[: 3 if dtype else 4])
    assert len(reads) == frames_of(delta, SHARD) - skipped_frames
    if dtype is None:
        assert files_digest(out) == files_digest(pair.finetuned)
    else:
        fresh = tmp_path / "fresh"
        xorweights.decode(delta, pair.base, fresh, dtype=dtype)
        assert files_digest(out) == files_digest(fresh)
    assert partials(out) == [] and not (out / WORK_DIR).exists()


def partial_of(out) -> os.PathLike:
    return out / WORK_DIR / OutputDir.partial_name(SHARD)


def test_a_partial_file_changed_since_is_rebuilt_from_the_first_tensor_that_differs(
    pair, delta, tmp_path, monkeypatch, reads
):
    out = tmp_path / "out"
    stopped_in_second_shard(pair, delta, out, monkeypatch)
    shard = next(wf for wf in load_manifest(delta).weight_files if wf.name == SHARD)
    # Flip the last byte of the second tensor as written: the first one still holds.
    header = 8 + len(shard.header_bytes)
    end_of_second = header + sum(t.nbytes for t in shard.tensors[:2])
    with open(partial_of(out), "r+b") as f:
        f.seek(end_of_second - 1)
        byte = f.read(1)
        f.seek(end_of_second - 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    reads.clear()
    xorweights.decode(delta, pair.base, out, jobs=1)
    assert len(reads) == frames_of(delta, SHARD) - len(shard.tensors[0].frames)  # the second tensor and on
    assert files_digest(out) == files_digest(pair.finetuned)


@pytest.mark.parametrize("how", ["symlink", "hardlink", "missing"])
def test_a_partial_file_that_is_not_ours_is_never_reused_or_written_through(
    pair, delta, tmp_path, monkeypatch, reads, how
):
    out = tmp_path / "out"
    stopped_in_second_shard(pair, delta, out, monkeypatch)
    partial = partial_of(out)
    victim = tmp_path / "victim"
    victim.write_bytes(partial.read_bytes())
    before = victim.read_bytes()
    partial.unlink()
    if how == "symlink":
        partial.symlink_to(victim)
    elif how == "hardlink":
        os.link(victim, partial)
    reads.clear()
    xorweights.decode(delta, pair.base, out, jobs=1)
    assert len(reads) == frames_of(delta, SHARD)  # rebuilt whole
    assert files_digest(out) == files_digest(pair.finetuned)
    assert victim.read_bytes() == before


@pytest.fixture
def small_frames(pair, tmp_path):
    """A delta whose tensors span many 1 KiB frames."""
    folder = tmp_path / "delta-small-frames"
    xorweights.encode(pair.finetuned, pair.base, folder, frame_bytes=1024)
    return folder


def stop_at_read(monkeypatch, reads: int) -> None:
    """Raise KeyboardInterrupt at the ``reads``-th frame read, with every frame recorded."""
    monkeypatch.setattr(decode_module, "CHECKPOINT_BYTES", 1)
    original = LocalFile.read
    calls = 0

    def read(self, offset, length):
        nonlocal calls
        calls += 1
        if calls == reads:
            raise KeyboardInterrupt
        return original(self, offset, length)

    monkeypatch.setattr(LocalFile, "read", read)


@pytest.mark.parametrize("tamper", [False, True])
def test_a_file_stopped_inside_a_tensor_resumes_at_its_next_frame(pair, small_frames, tmp_path, monkeypatch, tamper):
    out, delta = tmp_path / "out", small_frames
    manifest = load_manifest(delta)
    first_file = manifest.weight_files[0]
    shard = next(wf for wf in manifest.weight_files if wf.name == SHARD)
    big = next(i for i, t in enumerate(shard.tensors) if len(t.frames) >= 4)  # a tensor of several frames
    before_big = sum(len(t.frames) for t in shard.tensors[:big])
    stop_at_read(monkeypatch, sum(len(t.frames) for t in first_file.tensors) + before_big + 3)
    with pytest.raises(KeyboardInterrupt):
        xorweights.decode(delta, pair.base, out, jobs=1)
    _, _, progress, _ = parse_state((out / WORK_DIR / STATE_NAME).read_bytes(), "state")
    assert len(progress[SHARD].hashes) == big and progress[SHARD].part[0] == 2  # two frames of it written
    if tamper:  # the second frame as written changed since: the tensor is taken up at its start
        at = 8 + len(shard.header_bytes) + sum(t.nbytes for t in shard.tensors[:big]) + 1024 + 5
        with open(partial_of(out), "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.undo()
    counted: list[int] = []
    original = LocalFile.read
    monkeypatch.setattr(LocalFile, "read", lambda self, o, n: counted.append(o) or original(self, o, n))
    xorweights.decode(delta, pair.base, out, jobs=1)
    assert len(counted) == frames_of(delta, SHARD) - before_big - (0 if tamper else 2)
    assert files_digest(out) == files_digest(pair.finetuned)


def test_state_progress_records_replace_what_they_overlap_and_a_gap_restarts_the_file():
    header = json.dumps({"delta": "a" * 64, "dtype": None})
    h = [f"{i:032x}" for i in range(6)]

    def progress(*records):
        lines = [header, *(json.dumps({"partial": "f", "from": a, "xxh3": hs}) for a, hs in records)]
        return {k: p.hashes for k, p in parse_state(("\n".join(lines) + "\n").encode(), "state")[2].items()}

    assert progress((0, h[:2]), (2, h[2:4])) == {"f": h[:4]}
    assert progress((0, h[:3]), (1, [h[5]])) == {"f": [h[0], h[5]]}  # a re-run that restarted at tensor 1
    assert progress((0, h[:2]), (3, [h[3]])) == {"f": []}  # a gap: nothing is trusted
    part = {"partial": "f", "from": 1, "xxh3": [h[1]], "part": [3, h[2]]}
    lines = [header, json.dumps({"partial": "f", "from": 0, "xxh3": h[:1]}), json.dumps(part)]
    parsed = parse_state(("\n".join(lines) + "\n").encode(), "state")[2]["f"]
    assert (parsed.hashes, parsed.part) == (h[:2], (3, h[2]))
    finished = {"file": "f", "stat": [1, 2], "sha256": "b" * 64}
    lines = [header, json.dumps({"partial": "f", "from": 0, "xxh3": h[:1]}), json.dumps(finished)]
    assert parse_state(("\n".join(lines) + "\n").encode(), "state")[2] == {}
