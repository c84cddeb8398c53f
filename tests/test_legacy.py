"""Legacy whole-file XOR releases (OpenAssistant's xor_codec.py): decode-legacy and migrate.

The releases are made here by a small encoder written from the codec's
documented semantics, independent of the decoder: payload = fine-tune XOR base,
the base zero-padded when shorter and truncated when longer, optionally gzip
level 9, and files without a counterpart in the base copied as they are.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from conftest import partials, run

import xorweights
from xorweights import legacy
from xorweights.errors import BaseMismatchError, InputFileError, VerifyFailed
from xorweights.legacy import LegacyFile, decode_legacy, detect_release, published_lists, read_md5_list, xor_file

SHARD1 = "pytorch_model-00001-of-00002.bin"
SHARD2 = "pytorch_model-00002-of-00002.bin"


# ---------------------------------------------------------------- a legacy release, made here


def legacy_encode(finetuned: Path, base: Path, payload: Path, compress: bool = False) -> None:
    """What xor_codec.py --encode [--compress] does, file by file."""
    payload.mkdir(parents=True)
    for src in sorted(finetuned.iterdir()):
        counterpart = base / src.name
        if not counterpart.exists():
            shutil.copy(src, payload / src.name)  # like added_tokens.json
            continue
        ft = np.frombuffer(src.read_bytes(), dtype=np.uint8)
        key = np.frombuffer(counterpart.read_bytes(), dtype=np.uint8)[: len(ft)]
        key = np.pad(key, (0, len(ft) - len(key)))  # a shorter base counts as zeros
        xored = (ft ^ key).tobytes()
        (payload / src.name).write_bytes(gzip.compress(xored, compresslevel=9) if compress else xored)


def md5_list(folder: Path, dest: Path) -> Path:
    lines = [f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(folder.iterdir()) if p.is_file()]
    dest.write_text("".join(lines))
    return dest


def noise(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


@dataclass
class Release:
    base: Path
    finetuned: Path
    payload: Path
    base_md5: Path
    out_md5: Path
    root: Path

    def options(self) -> list[object]:
        return ["--base", self.base, "--base-md5", self.base_md5, "--out-md5", self.out_md5]


def make_release(root: Path, compress: bool = False, seed: int = 0) -> Release:
    """A base and fine-tune with every length case, the release made from them, and md5 lists of both."""
    rng = np.random.default_rng(seed)
    base, ft = root / "base", root / "finetuned"
    base.mkdir(parents=True)
    ft.mkdir()
    files = {  # name: (base bytes, fine-tune bytes)
        SHARD1: (5000, 7000),  # base shorter than the payload
        SHARD2: (9000, 4000),  # base longer than the payload
        "config.json": (1500, 1500),  # equal
    }
    for name, (nb, nf) in files.items():
        b = noise(rng, nb)
        (base / name).write_bytes(b)
        f = bytearray(b[:nf] + noise(rng, max(0, nf - nb)))
        for i in rng.integers(0, nf, 50):  # a fine-tune changes some bytes
            f[i] ^= 0x5A
        (ft / name).write_bytes(bytes(f))
    (base / "tokenizer.model").write_bytes(noise(rng, 800))
    shutil.copy(base / "tokenizer.model", ft / "tokenizer.model")  # unchanged: an all-zero payload
    (ft / "added_tokens.json").write_text('{"<|prompter|>": 32000, "<|assistant|>": 32001}')
    (base / "tokenizer.json").write_text("{}")  # a base file the release does not use
    payload = root / "payload"
    legacy_encode(ft, base, payload, compress)
    return Release(base, ft, payload, md5_list(base, root / "base.md5"), md5_list(ft, root / "out.md5"), root)


@pytest.fixture
def rel(tmp_path: Path) -> Release:
    return make_release(tmp_path / "release")


def assert_same_files(out: Path, expected: Path) -> None:
    got = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert got == sorted(p.name for p in expected.iterdir())
    for name in got:
        assert (out / name).read_bytes() == (expected / name).read_bytes(), name


def one_error_line(r: Result, code: int) -> str:
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("xorweights: error: ") and "(hint: " in lines[0]
    return lines[0]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_round_trip_is_bit_exact(tmp_path: Path, compress: bool) -> None:
    rel = make_release(tmp_path / "release", compress=compress)
    if compress:
        assert (rel.payload / SHARD1).read_bytes()[:2] == b"\x1f\x8b"
    out = tmp_path / "out"
    result = decode_legacy(rel.payload, rel.base, out, rel.base_md5, rel.out_md5, chunk_bytes=1000)
    assert_same_files(out, rel.finetuned)
    assert result.copied == ["added_tokens.json"]
    assert any("added_tokens.json: no counterpart in the base, copied as is" in w for w in result.warnings)
    assert sorted(result.written) == sorted(p.name for p in rel.finetuned.iterdir())
    assert sorted(result.base_checked) == sorted([SHARD1, SHARD2, "config.json", "tokenizer.model"])
    assert result.out_list == str(rel.out_md5) and result.unchecked == []
    assert partials(out) == []


@pytest.mark.parametrize(
    ("base_len", "ft_len"),
    [(3000, 5000), (5000, 3000), (4000, 4000), (0, 2000)],
    ids=["base-shorter", "base-longer", "equal", "base-empty"],
)
def test_lengths_follow_the_codec(tmp_path: Path, base_len: int, ft_len: int) -> None:
    rng = np.random.default_rng(base_len + ft_len)
    base, ft = tmp_path / "base", tmp_path / "ft"
    base.mkdir()
    ft.mkdir()
    (base / SHARD1).write_bytes(noise(rng, base_len))
    (ft / SHARD1).write_bytes(noise(rng, ft_len))
    legacy_encode(ft, base, tmp_path / "payload")
    xored = (tmp_path / "payload" / SHARD1).read_bytes()
    assert len(xored) == ft_len
    if base_len < ft_len:  # the codec's known weakness: past the base's end the fine-tune is in the clear
        assert xored[base_len:] == (ft / SHARD1).read_bytes()[base_len:]
    result = decode_legacy(tmp_path / "payload", base, tmp_path / "out", check=False, chunk_bytes=512)
    assert (tmp_path / "out" / SHARD1).read_bytes() == (ft / SHARD1).read_bytes()
    assert result.written == [SHARD1]


@pytest.mark.parametrize("chunk", [1, 7, 1000, 4096, 1 << 20])
def test_chunk_size_does_not_change_the_bytes(tmp_path: Path, chunk: int) -> None:
    rel = make_release(tmp_path / "release", compress=chunk == 7)
    decode_legacy(rel.payload, rel.base, tmp_path / "out", rel.base_md5, rel.out_md5, chunk_bytes=chunk)
    assert_same_files(tmp_path / "out", rel.finetuned)


def test_cli_decodes_and_reports(rel: Release, tmp_path: Path) -> None:
    r = run("decode-legacy", rel.payload, "-o", tmp_path / "out", *rel.options())
    assert r.exit_code == 0, r.output
    assert f"base checked: 4 files match {rel.base_md5}" in r.stdout
    assert f"5 files written, 0 already done; every file matches {rel.out_md5}" in r.stdout
    assert "warning: added_tokens.json: no counterpart in the base, copied as is" in r.stderr
    assert_same_files(tmp_path / "out", rel.finetuned)


def test_subfolders_of_the_payload_are_ignored(rel: Release, tmp_path: Path) -> None:
    (rel.payload / "extra").mkdir()
    (rel.payload / "extra" / "x.bin").write_bytes(b"x")
    result = decode_legacy(rel.payload, rel.base, tmp_path / "out", rel.base_md5, rel.out_md5)
    assert result.ignored == ["extra"]
    assert not (tmp_path / "out" / "extra").exists()


# ---------------------------------------------------------------- the base check


def test_wrong_base_is_refused_naming_every_file(rel: Release, tmp_path: Path) -> None:
    data = bytearray((rel.base / SHARD1).read_bytes())
    data[100] ^= 1
    (rel.base / SHARD1).write_bytes(bytes(data))
    (rel.base / "config.json").write_text("{}")
    (rel.base / "tokenizer.model").unlink()
    out = tmp_path / "out"
    line = one_error_line(run("decode-legacy", rel.payload, "-o", out, *rel.options()), 1)
    assert f"3 of 4 base files differ from the published list {rel.base_md5}" in line
    assert f"config.json, {SHARD1}, tokenizer.model (missing)" in line
    assert "a whole-file XOR release decodes only from these exact files, byte for byte" in line
    assert "(hint: a per-tensor delta made once with `xorweights migrate` by anyone who holds the exact files" in line
    assert SHARD2 not in line
    assert not out.exists()  # refused before writing anything


def test_no_check_decodes_a_base_that_differs_only_past_the_payload(rel: Release, tmp_path: Path) -> None:
    # SHARD2's base is longer than its payload: bytes past the payload's end are never used.
    with (rel.base / SHARD2).open("ab") as f:
        f.write(b"trailing bytes")
    one_error_line(run("decode-legacy", rel.payload, "-o", tmp_path / "refused", *rel.options()), 1)
    r = run("decode-legacy", rel.payload, "-o", tmp_path / "out", *rel.options(), "--no-check")
    assert r.exit_code == 0, r.output
    assert "warning: the base files were not checked (--no-check)" in r.stderr
    assert_same_files(tmp_path / "out", rel.finetuned)


def test_no_check_with_a_wrong_base_fails_the_output_check(rel: Release, tmp_path: Path) -> None:
    data = bytearray((rel.base / SHARD1).read_bytes())
    data[10] ^= 1
    (rel.base / SHARD1).write_bytes(bytes(data))
    out = tmp_path / "out"
    line = one_error_line(run("decode-legacy", rel.payload, "-o", out, *rel.options(), "--no-check"), 1)
    assert f"1 decoded file(s) differ from {rel.out_md5}: {SHARD1}; they were not kept" in line
    assert "your base files are not the exact ones the release was made from" in line
    assert not (out / SHARD1).exists()  # nothing that looks complete
    assert (out / SHARD2).read_bytes() == (rel.finetuned / SHARD2).read_bytes()


def test_damaged_payload_fails_the_output_check(rel: Release, tmp_path: Path) -> None:
    data = bytearray((rel.payload / SHARD2).read_bytes())
    data[-1] ^= 0xFF
    (rel.payload / SHARD2).write_bytes(bytes(data))
    with pytest.raises(VerifyFailed, match=f"differ from .*: {SHARD2}; they were not kept") as exc:
        decode_legacy(rel.payload, rel.base, tmp_path / "out", rel.base_md5, rel.out_md5)
    assert "these XOR files are damaged; re-download them" in exc.value.hint
    assert not (tmp_path / "out" / SHARD2).exists()


def test_a_check_needs_a_base_list(rel: Release, tmp_path: Path) -> None:
    line = one_error_line(run("decode-legacy", rel.payload, "--base", rel.base, "-o", tmp_path / "out"), 2)
    assert "no md5 list of the base files to check them against" in line
    assert "--checksums NAME or --base-md5 FILE" in line and "--no-check" in line
    r = run("decode-legacy", rel.payload, "--base", rel.base, "-o", tmp_path / "out", "--no-check")
    assert r.exit_code == 0, r.output
    assert "no md5 list of the output: the decoded files were not checked" in r.stderr
    assert_same_files(tmp_path / "out", rel.finetuned)


def test_checksums_and_md5_files_are_exclusive(rel: Release, tmp_path: Path) -> None:
    r = run("decode-legacy", rel.payload, "-o", tmp_path / "out", *rel.options(), "--checksums", "x")
    assert "--checksums cannot be combined with --base-md5 or --out-md5" in one_error_line(r, 2)


# ---------------------------------------------------------------- one pass: md5s on the stream, bounded buffers


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class Sink:
    """A write-only file in memory that also notes which buffer each chunk came from."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.data = bytearray()
        self.buffers: set[int] = set()
        self.writes = 0
        self.stop_at = stop_at

    def write(self, chunk: np.ndarray) -> int:
        self.writes += 1
        if self.writes == self.stop_at:
            raise KeyboardInterrupt
        self.buffers.add(chunk.__array_interface__["data"][0])
        self.data += chunk.tobytes()
        return chunk.nbytes


def decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("decode-legacy")]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    ("base_len", "ft_len"),
    [(3000, 5000), (5000, 3000), (4000, 4000), (0, 2000)],
    ids=["base-shorter", "base-longer", "equal", "base-empty"],
)
def test_one_read_gives_the_output_its_md5_and_the_whole_base_md5(
    tmp_path: Path, base_len: int, ft_len: int, compress: bool
) -> None:
    rng = np.random.default_rng(base_len * 7 + ft_len)
    base, ft = tmp_path / "base", tmp_path / "ft"
    base.mkdir()
    ft.mkdir()
    (base / SHARD1).write_bytes(noise(rng, base_len))
    (ft / SHARD1).write_bytes(noise(rng, ft_len))
    legacy_encode(ft, base, tmp_path / "payload", compress)
    job = LegacyFile(SHARD1, tmp_path / "payload" / SHARD1, base / SHARD1, compress, None, base_md5="0" * 32)
    sink = Sink()
    digests = xor_file(job, sink, 7)  # a chunk size that divides none of the lengths: every boundary is crossed
    assert bytes(sink.data) == (ft / SHARD1).read_bytes()
    assert digests.out == md5((ft / SHARD1).read_bytes())
    # The md5 of the whole base file, also of the bytes past the payload's end that the XOR never used.
    assert digests.base == md5((base / SHARD1).read_bytes())
    # Hundreds of chunks went through no more buffers than the pipeline holds: memory does not grow with the file.
    assert sink.writes > 250 and len(sink.buffers) <= legacy.SLOTS
    assert decode_threads() == []
    unchecked = LegacyFile(SHARD1, job.payload, job.base, compress, None)
    assert xor_file(unchecked, Sink(), 7).base is None  # --no-check: the base is not hashed


@pytest.mark.parametrize("slots", [1, 2])
def test_any_pipeline_depth_gives_the_same_bytes(rel: Release, tmp_path: Path, monkeypatch, slots: int) -> None:
    monkeypatch.setattr(legacy, "SLOTS", slots)
    decode_legacy(rel.payload, rel.base, tmp_path / "out", rel.base_md5, rel.out_md5, chunk_bytes=333)
    assert_same_files(tmp_path / "out", rel.finetuned)


def test_a_base_that_differs_is_caught_in_the_decode_and_nothing_made_from_it_is_kept(
    rel: Release, tmp_path: Path
) -> None:
    """No base file is missing, so no pass runs before the decode: the md5s are taken from the decode's own reads."""
    good = {name: (rel.base / name).read_bytes() for name in (SHARD2, "tokenizer.model")}
    data = bytearray(good[SHARD2])
    data[100] ^= 1
    (rel.base / SHARD2).write_bytes(bytes(data))
    (rel.base / "tokenizer.model").write_bytes(noise(np.random.default_rng(9), 800))
    out = tmp_path / "out"
    with pytest.raises(BaseMismatchError) as exc:
        decode_legacy(rel.payload, rel.base, out, rel.base_md5, rel.out_md5, chunk_bytes=1000)
    # Every differing file is named, the one after the first too, in the message a check before decoding gave.
    assert exc.value.message.startswith(
        f"{rel.base}: 2 of 4 base files differ from the published list {rel.base_md5}: {SHARD2}, tokenizer.model; "
        "a whole-file XOR release decodes only from these exact files, byte for byte"
    )
    assert "xorweights migrate" in exc.value.hint
    # The files before it had their base checked and their output too: they are kept, bit-exact.
    kept = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert kept == ["added_tokens.json", "config.json", SHARD1]
    for name in kept:
        assert (out / name).read_bytes() == (rel.finetuned / name).read_bytes()
    assert partials(out) == [] and decode_threads() == []
    line = one_error_line(run("decode-legacy", rel.payload, "-o", tmp_path / "cli", *rel.options()), 1)
    assert f"2 of 4 base files differ from the published list {rel.base_md5}: {SHARD2}, tokenizer.model;" in line
    for name, content in good.items():  # the right base: a second run decodes the rest
        (rel.base / name).write_bytes(content)
    result = decode_legacy(rel.payload, rel.base, out, rel.base_md5, rel.out_md5)
    assert sorted(result.skipped) == kept and sorted(result.written) == [SHARD2, "tokenizer.model"]
    assert_same_files(out, rel.finetuned)


def test_without_an_output_list_the_base_check_alone_keeps_a_wrong_file_out(rel: Release, tmp_path: Path) -> None:
    # SHARD2's base is longer than its payload: bytes past the payload's end change no output byte,
    # yet the whole file is not the listed one, and only the md5 of the whole file is published.
    with (rel.base / SHARD2).open("ab") as f:
        f.write(b"trailing bytes")
    out = tmp_path / "out"
    with pytest.raises(BaseMismatchError, match=f"1 of 4 base files differ from the published list .*: {SHARD2};"):
        decode_legacy(rel.payload, rel.base, out, base_md5=rel.base_md5, chunk_bytes=4096)
    assert not (out / SHARD2).exists() and partials(out) == []


def test_a_payload_that_breaks_midway_is_refused_and_the_reader_stops(tmp_path: Path) -> None:
    rel = make_release(tmp_path / "release", compress=True)
    data = (rel.payload / SHARD1).read_bytes()
    (rel.payload / SHARD1).write_bytes(data[: len(data) // 2])  # gzip that ends before its end-of-stream marker
    out = tmp_path / "out"
    line = one_error_line(run("decode-legacy", rel.payload, "-o", out, *rel.options()), 3)
    assert f"{rel.payload / SHARD1}: starts like gzip but does not decompress" in line
    assert "(hint: re-download this XOR file)" in line
    assert not (out / SHARD1).exists() and partials(out) == []
    assert decode_threads() == []


def test_an_interrupt_while_writing_stops_the_reader(rel: Release) -> None:
    job = LegacyFile(SHARD1, rel.payload / SHARD1, rel.base / SHARD1, False, None, base_md5="0" * 32)
    sink = Sink(stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        xor_file(job, sink, 100)
    assert len(sink.data) == 200  # the chunks before it were written, in order
    assert bytes(sink.data) == (rel.finetuned / SHARD1).read_bytes()[:200]
    assert decode_threads() == []


@pytest.mark.parametrize("side", ["payload", "base"])
def test_the_decode_reads_through_the_input_gate(rel: Release, tmp_path: Path, side: str) -> None:
    """xor_file opens what it reads itself, as the plan did: a link out of its folder is refused there too."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * 100)
    (rel.payload / "x.bin").write_bytes(b"x" * 100)
    (rel.base / "x.bin").write_bytes(b"b" * 100)
    folder = rel.payload if side == "payload" else rel.base
    (folder / "x.bin").unlink()
    (folder / "x.bin").symlink_to(secret)
    job = LegacyFile("x.bin", rel.payload / "x.bin", rel.base / "x.bin", False, None)
    sink = Sink()
    with pytest.raises(InputFileError, match=f"a symbolic link to {secret}, outside {folder}; refused"):
        xor_file(job, sink, 16)
    assert sink.data == b""


def test_whole_chunks_go_to_the_disk_direct_and_the_last_through_the_page_cache(
    rel: Release, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, direct = fcntl.fcntl, []

    def spy(fd: int, cmd: int, arg: int = 0) -> int:
        done = real(fd, cmd, arg)
        if cmd == fcntl.F_SETFL:
            direct.append(bool(arg & os.O_DIRECT))
        return done

    monkeypatch.setattr(fcntl, "fcntl", spy)
    out = tmp_path / "out"
    decode_legacy(rel.payload, rel.base, out, rel.base_md5, rel.out_md5, chunk_bytes=legacy.DIRECT_ALIGN)
    assert_same_files(out, rel.finetuned)  # SHARD1: one whole chunk of 4096 bytes, then 2904
    if not direct:
        pytest.skip(f"{tmp_path}: this file system takes no O_DIRECT")
    assert direct.count(True) == 5 and direct.count(False) == 5  # on for each file, and back off once it is written
    direct.clear()
    decode_legacy(rel.payload, rel.base, tmp_path / "odd", rel.base_md5, rel.out_md5, chunk_bytes=4000)
    assert direct == []  # chunks that are not whole blocks never ask for it


@pytest.mark.parametrize("refused", ["flag", "write"])
def test_a_file_system_that_refuses_direct_writes_gets_the_same_bytes(
    rel: Release, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refused: str
) -> None:
    real_fcntl, real_write = fcntl.fcntl, os.write

    def no_direct_flag(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    def no_direct_write(fd: int, data: memoryview) -> int:
        if real_fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    if refused == "flag":
        monkeypatch.setattr(fcntl, "fcntl", no_direct_flag)
    else:
        monkeypatch.setattr(os, "write", no_direct_write)
    decode_legacy(rel.payload, rel.base, tmp_path / "out", rel.base_md5, rel.out_md5, chunk_bytes=4096)
    monkeypatch.undo()
    assert_same_files(tmp_path / "out", rel.finetuned)


def test_a_file_given_to_xor_file_keeps_its_bytes_and_its_flags(rel: Release, tmp_path: Path) -> None:
    job = LegacyFile(SHARD1, rel.payload / SHARD1, rel.base / SHARD1, False, None)
    with (tmp_path / "dst").open("wb") as dst:
        dst.write(b"head")  # still in the file object's buffer, and it leaves every later offset unaligned
        digests = xor_file(job, dst, 4096)
        assert not fcntl.fcntl(dst.fileno(), fcntl.F_GETFL) & os.O_DIRECT
    want = (rel.finetuned / SHARD1).read_bytes()
    assert (tmp_path / "dst").read_bytes() == b"head" + want and digests.out == md5(want)


def test_the_bench_encoder_agrees_with_this_one(rel: Release, tmp_path: Path, monkeypatch) -> None:
    """bench/legacy.py builds its release with its own streamed encoder: a wrong one would time the wrong work."""
    spec = importlib.util.spec_from_file_location("bench_legacy", Path(__file__).parents[1] / "bench" / "legacy.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_legacy", bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    payload = tmp_path / "payload"
    bench.legacy_encode(rel.finetuned, rel.base, payload)
    assert_same_files(payload, rel.payload)
    assert read_md5_list(bench.md5_list(rel.base, tmp_path / "b.md5")).sums == read_md5_list(rel.base_md5).sums


# ---------------------------------------------------------------- published lists under checksums/


def test_the_oasst_lists_are_found(tmp_path: Path) -> None:
    base_list, out_list = published_lists("oasst-sft-6-llama-30b")
    assert base_list.path.name == "llama30b_hf.md5"
    assert out_list.path.name == "oasst-sft-6-llama-30b.md5"
    assert out_list.sums["added_tokens.json"] == "27b0dc092f99aa2efaf467b2d8026c3f"
    assert detect_release(list(out_list.sums) + ["README.md"]) == "oasst-sft-6-llama-30b"
    assert detect_release(list(out_list.sums)[1:]) is None


def test_an_oasst_payload_is_detected_and_a_wrong_base_refused(tmp_path: Path) -> None:
    """Fake files under the real names: the published lists are found, and every base file named."""
    _, out_list = published_lists("oasst-sft-6-llama-30b")
    payload, base = tmp_path / "oasst-sft-6-llama-30b-xor", tmp_path / "llama30b_hf"
    payload.mkdir()
    base.mkdir()
    for name in out_list.sums:
        (payload / name).write_bytes(b"payload " + name.encode())
        if name != "added_tokens.json":
            (base / name).write_bytes(b"not the real base")
    line = one_error_line(run("decode-legacy", payload, "--base", base, "-o", tmp_path / "out"), 1)
    assert "13 of 13 base files differ from the published list checksums/oasst-sft-6-llama-30b/llama30b_hf.md5" in line
    assert "pytorch_model-00001-of-00007.bin" in line and "tokenizer_config.json" in line
    assert "xorweights migrate" in line


def test_a_release_folder_is_chosen_by_name_or_detected(rel: Release, tmp_path: Path, monkeypatch) -> None:
    sums = tmp_path / "checksums"
    (sums / "tiny").mkdir(parents=True)
    shutil.copy(rel.out_md5, sums / "tiny" / "tiny.md5")
    shutil.copy(rel.base_md5, sums / "tiny" / "tiny_base.md5")
    (sums / "tiny" / "meta.md5").write_text(f"{'0' * 32}  consolidated.00.pth\n")  # shares no names: not the base
    (sums / "fixtures").mkdir()  # not a release: no fixtures/fixtures.md5
    monkeypatch.setattr(legacy, "CHECKSUMS_DIR", sums)
    result = decode_legacy(rel.payload, rel.base, tmp_path / "out1")
    labels = (result.release, result.base_list, result.out_list)
    assert labels == ("tiny", "checksums/tiny/tiny_base.md5", "checksums/tiny/tiny.md5")
    r = run("decode-legacy", rel.payload, "--base", rel.base, "-o", tmp_path / "out2", "--checksums", "tiny")
    assert r.exit_code == 0, r.output
    assert "every file matches checksums/tiny/tiny.md5" in r.stdout
    assert_same_files(tmp_path / "out2", rel.finetuned)
    r = run("decode-legacy", rel.payload, "--base", rel.base, "-o", tmp_path / "o3", "--checksums", "nope")
    line = one_error_line(r, 2)
    assert "--checksums nope: no such release" in line and "use one of: tiny" in line


def test_md5_lists_are_parsed_strictly(tmp_path: Path) -> None:
    good = tmp_path / "good.md5"
    good.write_text(f"# comment\n{'A' * 32}  a.bin\n{'b' * 32} *b b.json\n\n")
    assert read_md5_list(good).sums == {"a.bin": "a" * 32, "b b.json": "b" * 32}
    bad = tmp_path / "bad.md5"
    bad.write_text(f"{'a' * 32}  a.bin\nnot a line\n")
    with pytest.raises(xorweights.XorWeightsError, match="line 2 is not"):
        read_md5_list(bad)


# ---------------------------------------------------------------- resume and foreign files


def test_second_run_skips_finished_files(rel: Release, tmp_path: Path) -> None:
    out = tmp_path / "out"
    decode_legacy(rel.payload, rel.base, out, rel.base_md5, rel.out_md5)
    again = decode_legacy(rel.payload, rel.base, out, rel.base_md5, rel.out_md5)
    assert again.written == [] and len(again.skipped) == 5
    r = run("decode-legacy", rel.payload, "-o", out, *rel.options())
    assert "0 files written, 5 already done" in r.stdout


def test_interrupted_run_leaves_nothing_half_written_and_resumes(
    rel: Release, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, calls = legacy.xor_file, 0

    def stop_in_the_third_file(job, dst, chunk_bytes, bar=None):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 3:
            dst.write(b"half")
            raise KeyboardInterrupt
        return original(job, dst, chunk_bytes, bar)

    monkeypatch.setattr(legacy, "xor_file", stop_in_the_third_file)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        decode_legacy(rel.payload, rel.base, out, rel.base_md5, rel.out_md5)
    finished = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert len(finished) == 2 and partials(out) == []
    monkeypatch.setattr(legacy, "xor_file", original)
    result = decode_legacy(rel.payload, rel.base, out, rel.base_md5, rel.out_md5)
    assert sorted(result.skipped) == finished and len(result.written) == 3
    assert_same_files(out, rel.finetuned)


def test_a_foreign_file_in_out_is_refused(rel: Release, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("mine")
    line = one_error_line(run("decode-legacy", rel.payload, "-o", out, *rel.options()), 5)
    assert f"{out / 'config.json'}: already exists and is not the published decoded file" in line
    assert (out / "config.json").read_text() == "mine"


def test_out_inside_an_input_is_refused(rel: Release) -> None:
    line = one_error_line(run("decode-legacy", rel.payload, "-o", rel.payload / "out", *rel.options()), 5)
    assert "lies inside the payload" in line


# ---------------------------------------------------------------- migrate


def _bin_pair(root: Path) -> tuple[Path, Path]:
    """A tiny fp16 base and fine-tune as HF .bin shards, the fine-tune with added_tokens.json."""
    import torch

    gen = torch.Generator().manual_seed(0)
    base, ft = root / "base", root / "finetuned"
    shards = {SHARD1: ["embed.weight", "layer0.weight"], SHARD2: ["layer1.weight", "lm_head.weight"]}
    weight_map = {}
    for folder, scale in ((base, 0.0), (ft, 1e-3)):
        folder.mkdir(parents=True)
        for shard, names in shards.items():
            tensors = {}
            for i, n in enumerate(names):
                gen.manual_seed(len(shard) * 10 + i)
                w = torch.randn(64, 32, generator=gen)
                tensors[n] = (w + scale * torch.randn(64, 32, generator=gen)).to(torch.float16)
                weight_map[n] = shard
            torch.save(tensors, folder / shard)
        index = {"metadata": {"total_size": 4 * 64 * 32 * 2}, "weight_map": weight_map}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        (folder / "config.json").write_text('{"model_type": "llama"}')
    (ft / "added_tokens.json").write_text('{"<|prompter|>": 32000}')
    return base, ft


def test_migrate_makes_a_per_tensor_delta(tmp_path: Path) -> None:
    from xorweights.readers.checkpoint import Checkpoint

    base, ft = _bin_pair(tmp_path)
    payload = tmp_path / "payload"
    legacy_encode(ft, base, payload)
    base_md5, out_md5 = md5_list(base, tmp_path / "base.md5"), md5_list(ft, tmp_path / "out.md5")
    delta = tmp_path / "delta"
    r = run("migrate", payload, "--base", base, "-o", delta, "--base-md5", base_md5, "--out-md5", out_md5)
    assert r.exit_code == 0, r.output
    assert f"wrote {delta}: per-tensor delta of" in r.stdout and "against the legacy payload's" in r.stdout
    assert not legacy.decoded_folder(delta).exists()
    scratch = legacy.decoded_folder(delta).name  # an implementation detail: never printed
    assert scratch == ".delta.legacy-decoded" and scratch not in r.stdout and scratch not in r.stderr
    out = tmp_path / "out"
    xorweights.decode(delta, base, out)
    with Checkpoint(ft) as want, Checkpoint(out) as got:
        assert sorted(got.tensors) == sorted(want.tensors)
        for name, ref in want.tensors.items():
            nbytes = ref.itemsize * int(np.prod(ref.shape))
            assert got.tensors[name].source.read(0, nbytes).tobytes() == ref.source.read(0, nbytes).tobytes()
    assert (out / "added_tokens.json").read_bytes() == (ft / "added_tokens.json").read_bytes()


def test_migrate_refuses_a_wrong_base_before_decoding(rel: Release, tmp_path: Path) -> None:
    (rel.base / "config.json").write_text("{}")
    line = one_error_line(run("migrate", rel.payload, "-o", tmp_path / "delta", *rel.options()), 1)
    assert "differ from the published list" in line and "config.json" in line
    assert not (tmp_path / "delta").exists()


def test_base_mismatch_is_a_typed_error(rel: Release, tmp_path: Path) -> None:
    (rel.base / SHARD2).write_bytes(b"short")
    with pytest.raises(BaseMismatchError, match=SHARD2):
        decode_legacy(rel.payload, rel.base, tmp_path / "out", rel.base_md5, rel.out_md5)
