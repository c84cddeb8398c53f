"""The on-disk formats: golden fixtures, header bytes, frames and casts."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import files_digest

import xorweights
from xorweights.delta.coding import LITERAL_XOR, NO_BASE, decode_into
from xorweights.delta.kernel import FrameCodec, frame_spans, group_bytes
from xorweights.delta.manifest import load_checksums
from xorweights.errors import DeltaCorruptError
from xorweights.readers.dtypes import cast_bytes
from xorweights.readers.safetensors_io import SafetensorsFile, build_header

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_golden", ROOT / "tests" / "golden" / "make_golden.py")
assert _spec and _spec.loader
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)


def test_fixture_bytes_match_the_golden_checksums(tmp_path):
    pair = make_golden.golden_pair(tmp_path)
    for folder, name in ((pair.base, "golden-base.json"), (pair.finetuned, "golden-finetuned.json")):
        want = load_checksums(ROOT / "checksums" / "fixtures" / name)
        got = xorweights.checksum(folder)
        assert got.tensors == want.tensors
        assert got.files == want.files


@pytest.mark.parametrize("version", sorted(p.name for p in (ROOT / "tests" / "golden").glob("v*")))
def test_every_golden_delta_still_decodes(tmp_path, version):
    pair = make_golden.golden_pair(tmp_path / "pair")
    out = tmp_path / "out"
    xorweights.decode(ROOT / "tests" / "golden" / version, pair.base, out)
    assert files_digest(out) == files_digest(pair.finetuned)
    want = load_checksums(ROOT / "checksums" / "fixtures" / "golden-finetuned.json")
    assert {n: f.sha256 for n, f in want.files.items()} == files_digest(out)


@pytest.mark.parametrize("version", sorted(p.name for p in (ROOT / "tests" / "golden").glob("v*")))
def test_every_golden_delta_loads_verifies_and_inspects(tmp_path, version):
    from safetensors.torch import load_file

    pair = make_golden.golden_pair(tmp_path / "pair")
    delta = ROOT / "tests" / "golden" / version
    state = xorweights.load_state_dict(delta, pair.base)
    want = {k: v for f in sorted(pair.finetuned.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert state.keys() == want.keys()
    assert all(state[k].dtype == want[k].dtype and torch.equal(state[k], want[k]) for k in want)
    assert xorweights.verify(pair.finetuned, delta=delta).ok
    assert xorweights.inspect(delta).format_version == int(version[1:])


def test_the_golden_deltas_cover_every_format_version():
    from xorweights.delta.manifest import DELTA_VERSION

    assert sorted(p.name for p in (ROOT / "tests" / "golden").glob("v*")) == [
        f"v{n}" for n in range(1, DELTA_VERSION + 1)
    ]


def test_header_writer_golden_bytes():
    prefix, layout = build_header([("a", "F16", (2, 3)), ("b", "BF16", (1,))], {"format": "pt"})
    body = (
        b'{"__metadata__":{"format":"pt"},'
        b'"a":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},'
        b'"b":{"dtype":"BF16","shape":[1],"data_offsets":[12,14]}}'
    )
    body += b" " * (-len(body) % 8)
    assert prefix == struct.pack("<Q", len(body)) + body
    assert [(t.name, t.begin, t.end) for t in layout] == [("a", 0, 12), ("b", 12, 14)]


def test_header_writer_output_reads_back_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    values = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch.bfloat16)
    prefix, _ = build_header([("w", "BF16", (2, 3))])
    path = tmp_path / "x.safetensors"
    path.write_bytes(prefix + values.view(torch.int16).numpy().tobytes())
    assert torch.equal(load_file(path)["w"], values)
    f = SafetensorsFile(path)
    assert bytes(f.read(f.by_name["w"], 0, 12)) == values.view(torch.int16).numpy().tobytes()


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_group_bytes_round_trip_and_layout(width):
    data = np.arange(width * 5, dtype=np.uint8)
    grouped = group_bytes(data, width)
    assert list(grouped[:5]) == list(range(0, width * 5, width))  # all first bytes first
    out = np.empty_like(data)
    decode_into(LITERAL_XOR, grouped[: len(out)], out, NO_BASE, width)
    assert np.array_equal(out, data)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_frame_codec_round_trip(compression):
    codec = FrameCodec(compression)
    data = np.frombuffer(np.random.PCG64(5).random_raw(512).tobytes(), dtype=np.uint8)
    frame = codec.encode(data, 2)
    out = np.empty_like(data)
    codec.decode(frame, 2, out, "t")
    assert np.array_equal(out, data)


def test_frame_codec_refuses_a_frame_that_claims_more_than_the_manifest():
    codec = FrameCodec("zstd")
    frame = codec.encode(np.zeros(4096, dtype=np.uint8), 2)
    with pytest.raises(DeltaCorruptError, match="claims 4096 bytes, the manifest says 1024"):
        codec.decode(frame, 2, np.empty(1024, dtype=np.uint8), "t")
    bad = bytearray(frame)
    bad[-2] ^= 0xFF  # inside zstd's own checksum
    with pytest.raises(DeltaCorruptError, match="does not decompress"):
        codec.decode(bytes(bad), 2, np.empty(4096, dtype=np.uint8), "t")


def test_frame_spans_cut_whole_elements():
    assert frame_spans(10, 4, 2) == [(0, 4), (4, 8), (8, 10)]
    assert frame_spans(12, 5, 4) == [(0, 4), (4, 8), (8, 12)]
    assert frame_spans(0, 16, 2) == []


SPECIAL_F32 = np.array(
    [0.0, -0.0, 1.0, -1.5, 65504.0, 65520.0, 1e-8, 6e-5, 3.4e38, np.inf, -np.inf, np.nan, 1.00390625, 1.01171875],
    dtype=np.float32,
)

TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


@pytest.mark.parametrize("src", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("dst", ["F16", "BF16", "F32"])
def test_casts_match_torch_bit_for_bit(src, dst):
    rng = np.random.PCG64(11).random_raw(4096).astype(np.uint64)
    values = np.concatenate([SPECIAL_F32, ((rng >> np.uint64(32)).astype(np.uint32)).view(np.float32)])
    source = torch.from_numpy(values.copy()).to(TORCH[src])
    ours = cast_bytes(source.view(torch.uint8).numpy().reshape(-1), src, dst)
    theirs = source.to(TORCH[dst])
    # NaN payloads are not part of the contract (torch's own kernels disagree); NaN must stay NaN.
    nan = torch.isnan(theirs).numpy()
    width = {"F16": "<u2", "BF16": "<u2", "F32": "<u4"}[dst]
    assert np.array_equal(ours.view(width)[~nan], theirs.view(torch.uint8).numpy().reshape(-1).view(width)[~nan])
    assert torch.isnan(torch.from_numpy(ours.view(width).copy()).view(TORCH[dst])[torch.from_numpy(nan)]).all()
