"""Interrupted runs leave nothing that looks complete, and a second run resumes."""

from __future__ import annotations

import importlib

import pytest
from conftest import files_digest, partials, run

import xorweights
from xorweights.delta.manifest import MANIFEST_NAME, load_manifest
from xorweights.encode import _Encoder
from xorweights.outdir import OutputDir

# The module itself: ``xorweights.decode`` is the function.
decode_module = importlib.import_module("xorweights.decode")


def interrupt_on_call(monkeypatch, cls, method: str, call: int) -> None:
    """Make ``cls.method`` (or a module's function) raise KeyboardInterrupt on its ``call``-th call."""
    original = getattr(cls, method)
    calls = 0

    def wrapper(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapper)


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_decode_interrupted_midway_then_resumed(pair, tmp_path, monkeypatch):
    delta, out = tmp_path / "delta", tmp_path / "out"
    xorweights.encode(pair.finetuned, pair.base, delta)
    # Stop inside the second shard, after some of its tensors were written.
    first_shard_tensors = len(load_manifest(delta).weight_files[0].tensors)
    interrupt_on_call(monkeypatch, decode_module, "check_tensor", first_shard_tensors + 3)
    with pytest.raises(KeyboardInterrupt):
        xorweights.decode(delta, pair.base, out)
    assert visible(out) == ["model-00001-of-00002.safetensors"]
    assert partials(out) == [], "the half-written shard must be removed"
    mtime = (out / "model-00001-of-00002.safetensors").stat().st_mtime_ns
    monkeypatch.undo()
    result = xorweights.decode(delta, pair.base, out)
    assert result.skipped == ["model-00001-of-00002.safetensors"]
    assert "model-00002-of-00002.safetensors" in result.written
    assert (out / "model-00001-of-00002.safetensors").stat().st_mtime_ns == mtime
    assert files_digest(out) == files_digest(pair.finetuned)
    # A third run has nothing left to do.
    again = xorweights.decode(delta, pair.base, out)
    assert again.written == []


def test_killed_run_leaves_only_partial_names_which_the_next_run_replaces(pair, tmp_path):
    delta, out = tmp_path / "delta", tmp_path / "out"
    xorweights.encode(pair.finetuned, pair.base, delta)
    # What kill -9 leaves behind: a partial file in our work folder, under its exact name...
    ours = out / ".xorweights" / OutputDir.partial_name("model-00001-of-00002.safetensors")
    ours.parent.mkdir(parents=True)
    ours.write_bytes(b"half")
    # ...and a user's file that merely looks like a partial, which is not ours to delete.
    mine = out / ".model-00001-of-00002.safetensors.xorweights-partial"
    mine.write_bytes(b"mine")
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert files_digest(out) == files_digest(pair.finetuned)
    assert partials(out) == [mine] and mine.read_bytes() == b"mine"


def test_decode_refuses_to_overwrite_a_foreign_file_in_out(pair, tmp_path):
    delta, out = tmp_path / "delta", tmp_path / "out"
    xorweights.encode(pair.finetuned, pair.base, delta)
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"someone else's file")
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert r.exit_code == 5
    assert "model-00001-of-00002.safetensors: already exists and is not the file this delta rebuilds" in r.stderr
    assert (out / "model-00001-of-00002.safetensors").read_bytes() == b"someone else's file"


def test_decode_adopts_an_identical_file_already_in_out(pair, tmp_path):
    delta, out = tmp_path / "delta", tmp_path / "out"
    xorweights.encode(pair.finetuned, pair.base, delta)
    out.mkdir()
    name = "model-00002-of-00002.safetensors"
    (out / name).write_bytes((pair.finetuned / name).read_bytes())
    result = xorweights.decode(delta, pair.base, out)
    assert name in result.skipped
    assert files_digest(out) == files_digest(pair.finetuned)


def test_decode_into_out_of_another_dtype_is_refused(pair, tmp_path):
    delta, out = tmp_path / "delta", tmp_path / "out"
    xorweights.encode(pair.finetuned, pair.base, delta)
    xorweights.decode(delta, pair.base, out)
    r = run("decode", delta, "--base", pair.base, "-o", out, "--dtype", "bfloat16")
    assert r.exit_code == 5
    assert "holds files decoded from another delta or with another --dtype" in r.stderr


def test_encode_interrupted_then_resumed_reuses_finished_data_files(pair, tmp_path, monkeypatch):
    delta = tmp_path / "delta"
    interrupt_on_call(monkeypatch, _Encoder, "encode_file", 2)
    with pytest.raises(KeyboardInterrupt):
        xorweights.encode(pair.finetuned, pair.base, delta)
    assert not (delta / MANIFEST_NAME).exists(), "an unfinished delta must not look complete"
    assert (delta / "tensors-00001.xwd").is_file()
    assert not (delta / "tensors-00002.xwd").exists()
    mtime = (delta / "tensors-00001.xwd").stat().st_mtime_ns
    monkeypatch.undo()
    xorweights.encode(pair.finetuned, pair.base, delta)
    assert (delta / "tensors-00001.xwd").stat().st_mtime_ns == mtime
    out = tmp_path / "out"
    xorweights.decode(delta, pair.base, out)
    assert files_digest(out) == files_digest(pair.finetuned)


def test_encode_does_not_reuse_data_made_from_other_inputs(pair, tmp_path, monkeypatch):
    delta = tmp_path / "delta"
    interrupt_on_call(monkeypatch, _Encoder, "encode_file", 2)
    with pytest.raises(KeyboardInterrupt):
        xorweights.encode(pair.finetuned, pair.base, delta)
    monkeypatch.undo()
    xorweights.encode(pair.finetuned, pair.base, delta, compress=False)  # other settings: start over
    out = tmp_path / "out"
    xorweights.decode(delta, pair.base, out)
    assert files_digest(out) == files_digest(pair.finetuned)


def test_encode_into_a_finished_delta_is_refused(pair, tmp_path):
    delta = tmp_path / "delta"
    xorweights.encode(pair.finetuned, pair.base, delta)
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", delta)
    assert r.exit_code == 5
    assert "already holds a finished delta" in r.stderr


def test_decode_refuses_a_foreign_side_file_in_out(pair, tmp_path):
    delta, out = tmp_path / "delta", tmp_path / "out"
    xorweights.encode(pair.finetuned, pair.base, delta)
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert r.exit_code == 5
    assert "config.json: already exists and is not the file this delta rebuilds" in r.stderr
    assert (out / "config.json").read_text() == '{"mine": true}'
