"""Sizes come from the file, not from its own claims.

Each input here is a few KB on disk that claims gigabytes: a pickled view
whose shape its storage cannot hold, a storage bigger than its zip record, a
deflated pickle, a params.json with a hundred million layers, a gzip payload
that inflates past any fine-tune of its base. Each must be refused with one
typed error before the memory or disk it claims is committed, and quickly.
"""

from __future__ import annotations

import itertools
import json
import resource
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import partials, run
from test_legacy import SHARD1, Release, legacy_encode, make_release, noise, one_error_line
from test_meta_llama import hf_tensors, spec, write_meta

from xorweights.errors import CheckpointError, InputFileError, XorWeightsError
from xorweights.legacy import GUNZIP_MARGIN_BYTES, LegacyFile, decode_legacy, gunzip_limit, xor_file
from xorweights.readers.meta_llama import PARAMS_MAX_BYTES, open_meta, parse_params
from xorweights.readers.torch_pickle import open_pickle

MB = 1 << 20


@contextmanager
def bounded(max_rss_growth: int, seconds: float) -> Iterator[None]:
    """Fail if the block raises the process's peak RSS by more than ``max_rss_growth`` bytes, or is slow.

    Peak RSS only grows, so this proves a bound only for claims far above the
    peak so far: every claim below is gigabytes, the test process a few hundred MB.
    """
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.monotonic()
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < max_rss_growth, f"peak RSS grew by {grown / MB:.0f} MB"
    assert time.monotonic() - start < seconds


def assert_one_line(exc: pytest.ExceptionInfo[XorWeightsError]) -> str:
    assert "\n" not in exc.value.message and exc.value.hint
    return str(exc.value)


# ---------------------------------------------------------------- .bin pickles


def rewrite_archive(src: Path, dst: Path, edit: Callable[[str, bytes], tuple[Iterable[bytes], int]]) -> Path:
    """Copy a torch.save zip record by record; ``edit(name, data)`` gives each record's blocks and zip method."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            blocks, method = edit(info.filename, zin.read(info))
            record_info = zipfile.ZipInfo(info.filename)
            record_info.compress_type = method
            # Streamed, so that a record of hundreds of MB never sits in this process's memory.
            with zout.open(record_info, "w") as record:
                for block in blocks:
                    record.write(block)
    return dst


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "pre-1.6"])
def test_a_stride0_view_claiming_6_gb_is_refused_before_any_copy(tmp_path: Path, zipped: bool) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(1).expand(40000, 40000)}, path, _use_new_zipfile_serialization=zipped)
    assert path.stat().st_size < 2000
    with bounded(256 * MB, seconds=5), pytest.raises(CheckpointError) as info:
        open_pickle(path)
    assert f"{path}: tensor 'w' [40000, 40000] needs 6400000000 bytes, but its storage holds 4 bytes" in (
        assert_one_line(info)
    )


def test_the_cli_refuses_it_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "bomb"
    folder.mkdir()
    torch.save({"w": torch.zeros(1).expand(40000, 40000)}, folder / "pytorch_model.bin")
    r = run("checksum", folder, "-o", tmp_path / "sums.json")
    assert r.exit_code == 3 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "tensor 'w' [40000, 40000] needs 6400000000 bytes" in r.stderr and "(hint: " in r.stderr


def test_a_view_whose_elements_share_bytes_is_refused(tmp_path: Path) -> None:
    # 16 elements on 7 distinct floats of a 100-float storage: it fits, but holds less than it claims.
    path = tmp_path / "pytorch_model.bin"
    torch.save({"o": torch.arange(100.0).as_strided((4, 4), (1, 1))}, path)
    with pytest.raises(CheckpointError) as info:
        open_pickle(path)
    assert "tensor 'o' [4, 4] has strides [1, 1]: its elements share storage bytes" in assert_one_line(info)


def test_views_that_fit_their_storage_still_load(tmp_path: Path) -> None:
    tensors = {
        "plain": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),
        "slice": torch.arange(100.0)[10:20],
        "permuted": torch.arange(24, dtype=torch.bfloat16).reshape(2, 3, 4).permute(2, 0, 1),
        "broadcast_row": torch.arange(3.0).expand(1, 3),  # stride 0 on a dimension of 1 repeats nothing
        "empty": torch.zeros(0, 5),
    }
    path = tmp_path / "pytorch_model.bin"
    torch.save(tensors, path)
    refs, close = open_pickle(path)
    try:
        assert [r.name for r in refs] == list(tensors)
        for ref in refs:
            want = tensors[ref.name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            assert ref.shape == tuple(tensors[ref.name].shape)
            assert ref.source.read(0, ref.nbytes).tobytes() == want, ref.name
    finally:
        close()


@pytest.mark.parametrize("truncated", ["data/0", "data/1"], ids=["middle-record", "last-record"])
def test_a_storage_bigger_than_its_record_is_refused(tmp_path: Path, truncated: str) -> None:
    # Before: torch mapped storage 0 over the records after it and read them as weights.
    src = tmp_path / "ok.bin"
    torch.save({"a": torch.arange(1000, dtype=torch.float32), "b": torch.full((1000,), 7.0)}, src)

    def cut(name: str, data: bytes) -> tuple[list[bytes], int]:
        return [data[:40] if name.endswith(truncated) else data], zipfile.ZIP_STORED

    path = rewrite_archive(src, tmp_path / "pytorch_model.bin", cut)
    with pytest.raises(CheckpointError) as info:
        open_pickle(path)
    key = truncated.split("/")[1]
    assert (
        f"{path}: the pickle declares storage {key} of 1000 float32 elements (4000 bytes), "
        f"but its record ok/{truncated} holds 40"
    ) in assert_one_line(info)


def test_a_deflated_pickle_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    # A 200 MB string in front of the real pickle, deflated to 200 KB; torch would inflate it whole.
    src = tmp_path / "ok.bin"
    torch.save({"a": torch.arange(10, dtype=torch.float32)}, src)
    size = 200 * MB

    def inflate(name: str, data: bytes) -> tuple[Iterable[bytes], int]:
        if not name.endswith("/data.pkl"):
            return [data], zipfile.ZIP_STORED
        assert data[:2] == b"\x80\x02"  # PROTO 2; a BINUNICODE pushed first is left on the stack, unread
        string = itertools.repeat(b"a" * MB, size // MB)
        return itertools.chain([data[:2] + b"X" + struct.pack("<I", size)], string, [data[2:]]), zipfile.ZIP_DEFLATED

    path = rewrite_archive(src, tmp_path / "pytorch_model.bin", inflate)
    assert path.stat().st_size < MB
    with bounded(64 * MB, seconds=5), pytest.raises(CheckpointError) as info:
        open_pickle(path)
    assert f"{path}: record ok/data.pkl is compressed" in assert_one_line(info)
    assert "torch.save stores every record as is" in str(info.value)


# ---------------------------------------------------------------- Meta's params.json


@pytest.fixture
def meta(tmp_path: Path) -> Path:
    """Meta's folder of a 2-layer model in 2 shards, as test_meta_llama builds it."""
    s = spec()
    return write_meta(tmp_path / "meta", hf_tensors(s, "F16", 4), s, kv_heads=4, shards=2)


def set_params(folder: Path, **changes: object) -> None:
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps(params | changes))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"n_layers": 100_000_000}, "has no tensor 'layers.2.*', which params.json's n_layers 100000000 calls for"),
        ({"n_layers": 3}, "has no tensor 'layers.2.*', which params.json's n_layers 3 calls for"),
        ({"n_layers": 1}, "holds 2 layers (up to 'layers.1.*'), but params.json's n_layers is 1"),
        ({"dim": 2**40}, "tok_embeddings.weight is [96, 64] once joined; params.json calls for [vocab, 1099511627776]"),
        ({"n_heads": 2**40, "dim": 2**42}, "once joined; params.json calls for [vocab, 4398046511104]"),
    ],
    ids=["n_layers-huge", "n_layers-larger", "n_layers-smaller", "dim-huge", "heads-huge"],
)
def test_params_sizes_must_match_the_shards(meta: Path, changes: dict[str, object], words: str) -> None:
    set_params(meta, **changes)
    with bounded(64 * MB, seconds=5), pytest.raises(CheckpointError) as info:
        open_meta(meta)
    assert words in assert_one_line(info)


def test_a_gap_in_the_layers_is_refused(meta: Path) -> None:
    for shard in sorted(meta.glob("consolidated.*.pth")):
        state = torch.load(shard, weights_only=True)
        renamed = {
            n.replace("layers.1.", "layers.2.", 1) if n.startswith("layers.1.") else n: t for n, t in state.items()
        }
        torch.save(renamed, shard)
    with pytest.raises(CheckpointError) as info:
        open_meta(meta)
    assert "consolidated.00.pth: holds tensors of layer 2 but none of layer 1" in assert_one_line(info)


def test_a_params_json_over_the_cap_is_not_read(meta: Path) -> None:
    text = (meta / "params.json").read_text()
    (meta / "params.json").write_text(text + " " * (2 * MB - len(text)))
    with bounded(64 * MB, seconds=5), pytest.raises(CheckpointError) as info:
        open_meta(meta)
    assert f"{meta / 'params.json'}: is {2 * MB} bytes; a params.json is at most {PARAMS_MAX_BYTES}" in (
        assert_one_line(info)
    )


def test_a_long_value_is_cut_in_the_message() -> None:
    with pytest.raises(CheckpointError) as info:
        parse_params(json.dumps({"dim": "x" * 100_000, "n_heads": 4, "n_layers": 2}).encode(), "params.json")
    assert len(assert_one_line(info)) < 300


# ---------------------------------------------------------------- decode-legacy gzip bombs


def gzip_zeros(path: Path, size: int) -> Path:
    """A gzip file of ``size`` zero bytes, compressed a block at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    block = bytes(MB)
    with path.open("wb") as f:
        for _ in range(size // MB):
            f.write(packer.compress(block))
        f.write(packer.flush())
    return path


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def gzip_bomb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """200 MB of zeros, gzipped to about 200 KB; made once, it takes a second."""
    return gzip_zeros(tmp_path_factory.mktemp("bomb") / "bomb.gz", 200 * MB).read_bytes()


@pytest.fixture
def bombed(tmp_path: Path, gzip_bomb: bytes) -> Release:
    """A gzip release whose first shard's payload is the bomb, against a 5000-byte base."""
    rel = make_release(tmp_path / "release", compress=True)
    (rel.payload / SHARD1).write_bytes(gzip_bomb)
    assert (rel.payload / SHARD1).stat().st_size < MB and (rel.base / SHARD1).stat().st_size == 5000
    return rel


def test_a_gzip_bomb_is_refused_before_it_fills_the_disk(bombed: Release, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(InputFileError) as info:
        decode_legacy(bombed.payload, bombed.base, out, bombed.base_md5, bombed.out_md5)
    limit = gunzip_limit(5000)
    assert str(info.value) == (
        f"{bombed.payload / SHARD1}: decompresses past {limit} bytes, more than its base file "
        f"{bombed.base / SHARD1} of 5000 bytes allows (hint: re-download this XOR file)"
    )
    assert not (out / SHARD1).exists()
    assert partials(out) == []
    assert folder_bytes(out) < MB  # only the small files decoded before it


def test_the_cli_refuses_a_gzip_bomb_in_one_line(bombed: Release, tmp_path: Path) -> None:
    line = one_error_line(run("decode-legacy", bombed.payload, "-o", tmp_path / "out", *bombed.options()), 3)
    assert f"decompresses past {gunzip_limit(5000)} bytes" in line and "re-download this XOR file" in line


class CountingSink:
    """A write-only file that keeps no bytes, only their count."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: np.ndarray) -> int:
        self.written += data.nbytes
        return data.nbytes


@pytest.mark.parametrize("chunk", [1 << 16, 16 * MB])
def test_a_gzip_bomb_writes_no_more_than_its_base_allows(bombed: Release, chunk: int) -> None:
    job = LegacyFile(SHARD1, bombed.payload / SHARD1, bombed.base / SHARD1, gzip=True, expected_md5=None)
    sink = CountingSink()
    with bounded(3 * chunk + 64 * MB, seconds=10), pytest.raises(InputFileError, match="decompresses past"):
        xor_file(job, sink, chunk)
    assert gunzip_limit(5000) - chunk < sink.written <= gunzip_limit(5000)


def test_the_gunzip_limit_follows_the_base_size() -> None:
    assert gunzip_limit(0) == GUNZIP_MARGIN_BYTES == 64 * MB
    assert gunzip_limit(8 << 30) == 9 << 30  # a shard may grow by an eighth
    assert gunzip_limit(5000) == 5000 + 64 * MB


def test_a_payload_that_grows_within_the_limit_decodes(tmp_path: Path) -> None:
    # An empty base: the whole 2 MiB fine-tune is payload, and may be, within the 64 MiB margin.
    base, ft = tmp_path / "base", tmp_path / "ft"
    base.mkdir()
    ft.mkdir()
    (base / SHARD1).write_bytes(b"")
    (ft / SHARD1).write_bytes(noise(np.random.default_rng(0), 2 * MB))
    legacy_encode(ft, base, tmp_path / "payload", compress=True)
    decode_legacy(tmp_path / "payload", base, tmp_path / "out", check=False)
    assert (tmp_path / "out" / SHARD1).read_bytes() == (ft / SHARD1).read_bytes()
