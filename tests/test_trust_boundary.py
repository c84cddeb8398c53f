"""The trust boundary, attacked: links, non-regular files, lying sizes, a changing OUT, overlaps.

A delta is a download, a checkpoint folder may hold anything, and another
process may plant links in OUT while a command runs. Each test builds the
attack on real files, runs the real command, and checks both the one-line
error (or the correct result) and that nothing outside the inputs and OUT
was read into the output or written.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import files_digest, partials, run, tree_digest
from test_errors import MANIFEST, SHARD1, assert_error, edit_manifest, encode, read_manifest, weight_files

import xorweights
from xorweights import decode_state
from xorweights.decode_state import STATE_NAME, parse_state
from xorweights.errors import NotEnoughMemoryError, OutputError
from xorweights.fixtures import Pair
from xorweights.inputs import MAX_MANIFEST_BYTES, MAX_MANIFEST_VALUES
from xorweights.outdir import OutputDir

SECRET = b"the releaser's private key\n"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside every input that an attacker would like published or copied."""
    path = tmp_path / "elsewhere" / "secret.txt"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def nothing_of(secret: bytes, folder: Path) -> bool:
    """No file below ``folder`` holds ``secret`` (compressed or not, it would be there as is here: it is tiny)."""
    return not any(secret in p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


# ---------------------------------------------------------------- links in inputs


def test_encode_never_publishes_a_file_linked_from_outside_the_fine_tune(
    pair: Pair, tmp_path: Path, secret: Path
) -> None:
    (pair.finetuned / "notes.txt").symlink_to(secret)
    out = tmp_path / "delta"
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", out)
    assert_error(r, 3, f"{pair.finetuned / 'notes.txt'}: a symbolic link to {secret}", "outside", hint="link")
    assert not (out / MANIFEST).exists()
    assert not out.exists() or nothing_of(SECRET, out)


def test_encode_follows_a_link_that_stays_inside_the_fine_tune(pair: Pair, tmp_path: Path) -> None:
    (pair.finetuned / "docs").mkdir()
    (pair.finetuned / "docs" / "card.md").write_text("# card\n")
    (pair.finetuned / "README.md").symlink_to("docs/card.md")
    out = encode(pair, tmp_path / "delta")
    assert (out / "files" / "README.md").read_text() == "# card\n"
    xorweights.decode(out, pair.base, tmp_path / "out")
    assert (tmp_path / "out" / "README.md").read_text() == "# card\n"


@pytest.mark.parametrize("target", ["a file", "a folder"])
def test_a_link_out_of_the_base_is_refused(pair: Pair, tmp_path: Path, secret: Path, target: str) -> None:
    if target == "a file":
        (pair.base / "tokenizer.model").unlink()
        (pair.base / "tokenizer.model").symlink_to(secret)
        link = pair.base / "tokenizer.model"
    else:
        link = pair.base / "extra"
        link.symlink_to(secret.parent)
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", tmp_path / "delta")
    assert_error(r, 3, f"{link}: a symbolic link to {secret if target == 'a file' else secret.parent}", hint="link")
    assert not (tmp_path / "delta" / MANIFEST).exists()


def test_a_weight_shard_linked_from_outside_the_base_is_refused(pair: Pair, delta: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere-shards"
    outside.mkdir()
    shutil.move(pair.base / SHARD1, outside / SHARD1)
    (pair.base / SHARD1).symlink_to(outside / SHARD1)
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, f"{pair.base / SHARD1}: a symbolic link to {outside / SHARD1}", hint="link")
    assert weight_files(tmp_path / "out") == []


def test_decode_never_copies_a_shipped_file_that_links_out_of_the_delta(
    pair: Pair, delta: Path, tmp_path: Path, secret: Path
) -> None:
    shipped = delta / "files" / "added_tokens.json"
    shipped.unlink()
    shipped.symlink_to(secret)
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out)
    line = assert_error(r, 3, f"{shipped}: a symbolic link to {secret}", hint="link")
    assert sha(SECRET) not in line
    assert not (out / "added_tokens.json").exists()
    assert not out.exists() or nothing_of(SECRET, out)


def test_a_link_to_a_proc_file_is_refused_before_it_is_read(pair: Pair, delta: Path, tmp_path: Path) -> None:
    shipped = delta / "files" / "added_tokens.json"
    shipped.unlink()
    shipped.symlink_to("/proc/self/environ")
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, f"{shipped}: a symbolic link to /proc/", hint="link")


def hf_snapshot(cache: Path, repo: str, source: Path) -> Path:
    """``source`` laid out as huggingface_hub does: snapshot files are relative links into ``blobs/``."""
    root = cache / f"models--org--{repo}"
    snapshot = root / "snapshots" / ("0" * 40)
    for p in sorted(source.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        blob = root / "blobs" / sha(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / p.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def test_hugging_face_cache_snapshots_are_read_through_their_links(pair: Pair, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    ft, base = hf_snapshot(cache, "ft", pair.finetuned), hf_snapshot(cache, "base", pair.base)
    assert (ft / SHARD1).is_symlink()
    delta = tmp_path / "delta"
    xorweights.encode(ft, base, delta)
    xorweights.decode(delta, base, tmp_path / "out")
    assert files_digest(tmp_path / "out") == files_digest(pair.finetuned)
    assert xorweights.verify(base, delta=delta, side="base").ok


def test_a_snapshot_link_into_another_repos_blobs_is_refused(pair: Pair, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    base = hf_snapshot(cache, "base", pair.base)
    other = hf_snapshot(cache, "other", pair.finetuned)
    (base / "config.json").unlink()
    (base / "config.json").symlink_to(os.path.relpath((other / "config.json").resolve(), base))
    r = run("encode", pair.finetuned, "--base", base, "-o", tmp_path / "delta")
    assert_error(r, 3, f"{base / 'config.json'}: a symbolic link to", "models--org--other", hint="link")


# ---------------------------------------------------------------- non-regular files, lying sizes


def test_a_fifo_in_the_delta_is_refused_without_blocking(pair: Pair, delta: Path, tmp_path: Path) -> None:
    shipped = delta / "files" / "added_tokens.json"
    shipped.unlink()
    os.mkfifo(shipped)
    start = time.monotonic()
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert time.monotonic() - start < 30
    assert_error(r, 3, f"{shipped}: is a FIFO; xorweights reads only regular files", hint="regular")


def test_a_fifo_in_the_fine_tune_is_refused(pair: Pair, tmp_path: Path) -> None:
    os.mkfifo(pair.finetuned / "notes.txt")
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", tmp_path / "delta")
    assert_error(r, 3, f"{pair.finetuned / 'notes.txt'}: is a FIFO", hint="regular")


@pytest.mark.parametrize("change", [+1, -1])
def test_a_shipped_file_of_another_size_is_refused_before_copying(
    pair: Pair, delta: Path, tmp_path: Path, change: int
) -> None:
    shipped = delta / "files" / "added_tokens.json"
    data = shipped.read_bytes()
    shipped.write_bytes(data + b" " if change > 0 else data[:-1])
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, f"{shipped}: expected {len(data)} bytes, found {len(data) + change}", hint="re-download")
    assert not (tmp_path / "out" / "added_tokens.json").exists()


def test_a_referenced_base_file_of_another_size_is_refused_before_copying(
    pair: Pair, delta: Path, tmp_path: Path
) -> None:
    referenced = [of["name"] for of in read_manifest(delta)["other_files"] if of["mode"] == "reference"]
    assert "tokenizer.model" in referenced
    (pair.base / "tokenizer.model").write_bytes((pair.base / "tokenizer.model").read_bytes() + b"\n")
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert_error(r, 1, f"{pair.base / 'tokenizer.model'}: ", "the base this delta was made from has", hint="restore")
    assert not (out / "tokenizer.model").exists() and partials(out) == []


# ---------------------------------------------------------------- never claim what was not checked


def test_an_edited_header_of_the_same_length_is_caught_by_the_whole_file_hash(
    pair: Pair, delta: Path, tmp_path: Path
) -> None:
    def edit(m: dict) -> None:
        header = m["weight_files"][0]["header"]
        assert '"pt"' in header
        m["weight_files"][0]["header"] = header.replace('"pt"', '"px"', 1)  # same length, tensors untouched

    edit_manifest(delta, edit)
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out)
    want = read_manifest(delta)["weight_files"][0]["sha256"]
    assert_error(
        r, 3, f"{out / SHARD1}: rebuilt file's sha256", f"differs from the manifest's {want}", hint="re-download"
    )
    assert weight_files(out) == []
    assert "byte-identical" not in r.stdout


# ---------------------------------------------------------------- sizes a hostile file declares


def test_a_manifest_over_the_cap_is_refused_before_it_is_read(pair: Pair, delta: Path, tmp_path: Path) -> None:
    with (delta / MANIFEST).open("r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: the refusal must come from fstat, not from reading it
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, f"{delta / MANIFEST}: {MAX_MANIFEST_BYTES + 1} bytes, more than the {MAX_MANIFEST_BYTES}")


@pytest.mark.parametrize("indent", [None, 1])
def test_a_manifest_of_millions_of_tiny_values_is_refused_before_parsing(
    pair: Pair, delta: Path, tmp_path: Path, indent: int | None
) -> None:
    m = read_manifest(delta)
    m["padding"] = [[] for _ in range(MAX_MANIFEST_VALUES)]  # 24-48 MB of text, ~0.6 GB as Python lists
    (delta / MANIFEST).write_text(json.dumps(m, indent=indent, separators=(",", ":") if indent is None else None))
    import tracemalloc

    tracemalloc.start()
    try:
        r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_error(
        r, 3, f"{delta / MANIFEST}: about", f"JSON values, more than the {MAX_MANIFEST_VALUES}", hint="hostile"
    )
    assert peak < 256 << 20, f"refusing took {peak} bytes"


def test_an_index_over_the_cap_is_refused(pair: Pair, delta: Path, tmp_path: Path) -> None:
    index = pair.base / "model.safetensors.index.json"
    with index.open("r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, f"{index}: {MAX_MANIFEST_BYTES + 1} bytes, more than the")


def test_a_checksum_manifest_over_the_cap_is_refused(pair: Pair, tmp_path: Path) -> None:
    sums = tmp_path / "sums.json"
    sums.write_bytes(b"{}")
    os.truncate(sums, MAX_MANIFEST_BYTES + 1)
    r = run("verify", pair.finetuned, "--manifest", sums)
    assert_error(r, 3, f"{sums}: {MAX_MANIFEST_BYTES + 1} bytes, more than the", hint="re-download")


def test_load_state_dict_refuses_more_than_the_memory_available(
    pair: Pair, delta: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xorweights import load

    monkeypatch.setattr(load, "available_memory", lambda: 1000)
    with pytest.raises(NotEnoughMemoryError, match=r"the fine-tune in .* needs .* in memory, and only 1000 B"):
        xorweights.load_state_dict(delta, pair.base)
    with pytest.raises(NotEnoughMemoryError, match=r"tensor model\.embed_tokens\.weight needs"):
        xorweights.iter_state_dict(delta, pair.base)


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


def test_a_full_disk_promises_a_resume_only_where_there_is_one(pair: Pair, tmp_path: Path) -> None:
    disk = tmp_path / "full"
    mount_tmpfs(disk, "64k")
    try:
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        r = run("checksum", pair.finetuned, "-o", disk / "sums.json")
        line = assert_error(r, 5, f"{disk / 'sums.json'}: the disk is full", hint="free some space")
        assert "resumes" not in line
        assert [p.name for p in disk.iterdir()] == ["filler"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---------------------------------------------------------------- the output folder changes under us


PLANTER = """
import os, sys, time
out, target, names = sys.argv[1], sys.argv[2], sys.argv[3:]
stop = time.monotonic() + 20
while time.monotonic() < stop and not os.path.exists(os.path.join(out, ".stop")):
    for name in names:
        path = os.path.join(out, name)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.symlink(target, path)
        except OSError:
            pass
"""


def test_links_planted_in_out_during_a_decode_are_never_written_through(
    pair: Pair, delta: Path, tmp_path: Path, secret: Path
) -> None:
    victim = secret.parent
    before = tree_digest(victim)
    out = tmp_path / "out"
    out.mkdir()
    names = [wf["name"] for wf in read_manifest(delta)["weight_files"]]
    names += [of["name"] for of in read_manifest(delta)["other_files"]] + [".xorweights/decode-state.jsonl"]
    planter = subprocess.Popen([sys.executable, "-c", PLANTER, str(out), str(secret), *names])
    try:
        for _ in range(5):
            r = run("decode", delta, "--base", pair.base, "-o", out, "-q")
            if r.exit_code:
                assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        (out / ".stop").write_text("")
        planter.wait()
    assert tree_digest(victim) == before
    for p in out.iterdir():  # whatever is under a final name is either a planted link or the right file
        if p.name in names and not p.is_symlink():
            assert p.read_bytes() == (pair.finetuned / p.name).read_bytes(), p.name


def test_a_file_that_appears_at_a_final_name_meanwhile_is_left_alone(
    pair: Pair, delta: Path, tmp_path: Path, secret: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decode_module = importlib.import_module("xorweights.decode")
    out = tmp_path / "out"
    original = decode_module.check_tensor

    def plant_then_check(*args: object) -> None:
        if not (out / "config.json").is_symlink():
            (out / "config.json").symlink_to(secret)
            (out / SHARD1).write_bytes(b"someone else's")
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(decode_module, "check_tensor", plant_then_check)
    with pytest.raises(OutputError, match="appeared while xorweights was writing it; it was left alone"):
        xorweights.decode(delta, pair.base, out)
    assert (out / SHARD1).read_bytes() == b"someone else's"
    assert secret.read_bytes() == SECRET
    assert partials(out) == []


# ---------------------------------------------------------------- the sweep of partial files


def test_a_decode_into_x_leaves_a_decode_into_x_inner_alone(pair: Pair, delta: Path, tmp_path: Path) -> None:
    x = tmp_path / "x"
    inner = x / "inner"
    ours_inner = inner / ".xorweights" / OutputDir.partial_name(SHARD1)
    ours_inner.parent.mkdir(parents=True)
    ours_inner.write_bytes(b"inner decode's half-written shard")
    lookalike = x / f".{SHARD1}.xorweights-partial"
    lookalike.write_bytes(b"a user's file")
    xorweights.decode(delta, pair.base, x)
    assert ours_inner.read_bytes() == b"inner decode's half-written shard"
    assert lookalike.read_bytes() == b"a user's file"
    assert files_digest(x) == files_digest(pair.finetuned)


# ---------------------------------------------------------------- the decode state


def decode_until_first_file(delta: Path, base: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode that stops (as if killed) right after its first file was recorded."""
    original = decode_state.DecodeState.add

    def add_then_stop(self: decode_state.DecodeState, *args: object) -> object:
        original(self, *args)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(decode_state.DecodeState, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        xorweights.decode(delta, base, out)
    monkeypatch.undo()


@pytest.mark.parametrize(
    "damage",
    [b"\x00\xff garbage\n", b'{"delta": 1}\n', b"[" * 5000 + b"\n", b'{"file": "x", "stat": [1], "sha256": "0"}\n'],
    ids=["binary", "wrong-type", "deep", "short-stat"],
)
def test_a_damaged_decode_state_is_a_typed_error(
    pair: Pair, delta: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: bytes
) -> None:
    out = tmp_path / "out"
    decode_until_first_file(delta, pair.base, out, monkeypatch)
    state = out / ".xorweights" / STATE_NAME
    lines = state.read_bytes().splitlines(keepends=True)
    state.write_bytes((damage + b"".join(lines[1:])) if damage.startswith(b'{"delta"') else b"".join(lines) + damage)
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert_error(r, 5, f"{state}: damaged at line", hint=f"delete {state}")


def test_a_torn_last_line_of_the_state_is_dropped_and_the_decode_resumes(
    pair: Pair, delta: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    decode_until_first_file(delta, pair.base, out, monkeypatch)
    state = out / ".xorweights" / STATE_NAME
    with state.open("ab") as f:
        f.write(b'{"file": "model-00002-of-00002.safe')  # a crash in the middle of a line
    monkeypatch.setattr(OutputDir, "remove_work", lambda self, names: None)  # a finished decode removes its state
    result = xorweights.decode(delta, pair.base, out)
    assert result.skipped[:1] == [SHARD1] and "model-00002-of-00002.safetensors" in result.written
    assert files_digest(out) == files_digest(pair.finetuned)
    header, files, _, end = parse_state(state.read_bytes(), str(state))
    assert header is not None and end == state.stat().st_size
    assert sorted(files) == [SHARD1, "model-00002-of-00002.safetensors"]


def test_the_state_is_appended_once_per_file_never_rewritten(
    make: Callable[..., Pair], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = make(shards=6)
    delta = tmp_path / "delta"
    xorweights.encode(pair.finetuned, pair.base, delta)
    written: list[int] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(STATE_NAME):
            written.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(OutputDir, "remove_work", lambda self, names: None)  # a finished decode removes its state
    out = tmp_path / "out"
    xorweights.decode(delta, pair.base, out)
    state = out / ".xorweights" / STATE_NAME
    assert len(written) == 1 + 6  # the header, then one line per weight file
    assert sum(written) == state.stat().st_size  # nothing was ever written twice


# ---------------------------------------------------------------- outputs that overlap inputs, every command


def overlap_cases(pair: Pair, delta: Path, tmp_path: Path) -> list[tuple[list[object], str]]:
    from test_legacy import make_release

    rel = make_release(tmp_path / "release")
    sums = tmp_path / "sums.json"
    sums.write_text("{}")
    return [
        (["decode", delta, "--base", pair.base, "-o", delta], "is the delta"),
        (["decode", delta, "--base", pair.base, "-o", pair.base / "sub"], "lies inside the base"),
        (["decode", delta, "--base", pair.base, "-o", delta.parent], "contains the delta"),
        (["encode", pair.finetuned, "--base", pair.base, "-o", pair.finetuned], "is the fine-tune"),
        (["encode", pair.finetuned, "--base", pair.base, "-o", pair.base / "d"], "lies inside the base"),
        (["decode-legacy", rel.payload, "-o", rel.payload, *rel.options()], "is the payload"),
        (["decode-legacy", rel.payload, "-o", rel.base / "o", *rel.options()], "lies inside the base"),
        (["migrate", rel.payload, "-o", rel.payload, *rel.options()], "is the payload"),
        (["migrate", rel.payload, "-o", rel.payload / "d", *rel.options()], "lies inside the payload"),
        (["checksum", pair.finetuned, "-o", pair.finetuned / "sums.json"], "lies inside the checkpoint"),
        (["checksum", pair.finetuned / SHARD1, "-o", pair.finetuned / SHARD1], "is the checkpoint"),
    ]


def test_every_command_refuses_an_output_overlapping_an_input(pair: Pair, delta: Path, tmp_path: Path) -> None:
    before = {p: tree_digest(p) for p in (pair.finetuned, pair.base, delta)}
    for args, said in overlap_cases(pair, delta, tmp_path):
        r = run(*args)
        assert_error(r, 5, said, hint="xorweights never writes into its inputs" if "contains" not in said else "new")
    assert {p: tree_digest(p) for p in before} == before


def test_an_output_reached_through_a_link_into_an_input_is_refused(pair: Pair, delta: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(pair.base)
    before = tree_digest(pair.base)
    r = run("decode", delta, "--base", pair.base, "-o", alias / "out")
    assert_error(r, 5, "lies inside the base", hint="outside every input")
    assert tree_digest(pair.base) == before


# ---------------------------------------------------------------- encode into a folder that is not ours


def test_encode_refuses_a_folder_of_someone_elses_files(pair: Pair, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", out)
    assert_error(r, 5, f"{out}: holds thesis.tex, which is not part of an xorweights delta in progress", hint="new")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


# ---------------------------------------------------------------- migrate's scratch folder


def test_migrate_refuses_a_link_planted_at_its_scratch_folder(tmp_path: Path, secret: Path) -> None:
    from test_legacy import make_release

    rel = make_release(tmp_path / "release")
    delta = tmp_path / "delta"
    (tmp_path / ".delta.legacy-decoded").symlink_to(secret.parent)
    r = run("migrate", rel.payload, "-o", delta, *rel.options())
    assert_error(r, 5, "scratch folder already exists and was not made by xorweights", hint="remove it")
    assert sorted(p.name for p in secret.parent.iterdir()) == ["secret.txt"]


def test_a_payload_file_named_like_a_partial_is_data(tmp_path: Path) -> None:
    from test_legacy import make_release

    rel = make_release(tmp_path / "release")
    (rel.payload / ".a.xorweights-partial").write_bytes(b"data, not a leftover")
    out = tmp_path / "out"
    r = run("decode-legacy", rel.payload, "-o", out, "--base", rel.base, "--base-md5", rel.base_md5, "-q")
    assert r.exit_code == 0, r.output
    assert (out / ".a.xorweights-partial").read_bytes() == b"data, not a leftover"


@pytest.mark.parametrize("side", ["payload", "base"])
def test_decode_legacy_refuses_a_link_out_of_its_folders(tmp_path: Path, secret: Path, side: str) -> None:
    from test_legacy import make_release

    rel = make_release(tmp_path / "release")
    folder = rel.payload if side == "payload" else rel.base
    link = folder / "config.json"
    link.unlink()
    link.symlink_to(secret)
    out = tmp_path / "out"
    r = run("decode-legacy", rel.payload, "-o", out, *rel.options(), "--no-check")
    assert_error(r, 3, f"{link}: a symbolic link to {secret}", hint="link")
    assert not out.exists() or nothing_of(SECRET, out)
