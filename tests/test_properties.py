"""Properties over generated inputs: exact round trips, and parsers that refuse with their own error.

The JSON and byte mutations are shared with the fuzz harness (``fuzz_parsers.py``);
hypothesis drives them through ``st.randoms`` so failures shrink and replay.
"""

from __future__ import annotations

import json
import random
import struct
import tempfile
from pathlib import Path

import fuzz_parsers
import numpy as np
import safetensors
from conftest import files_digest
from fuzz_parsers import (
    DEEP_JSON,
    HUGE_PCT_MANIFEST,
    mutate_bytes,
    mutate_json,
    sample_checksums,
    sample_manifest,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import xorweights
from xorweights.delta.coding import CODINGS, LITERAL_XOR, NO_BASE, decode_into, encode_into
from xorweights.delta.kernel import FrameCodec, group_bytes
from xorweights.delta.manifest import load_checksums, parse_manifest
from xorweights.errors import DeltaCorruptError, InputFileError, ManifestError
from xorweights.fixtures import Tensor, write_checkpoint
from xorweights.readers.dtypes import ITEMSIZE
from xorweights.readers.safetensors_io import SafetensorsFile, build_header, parse_header

# Drawing from the cached sample manifest is slow only the first time it is made.
SLOW_FIRST_DRAW = [HealthCheck.too_slow]

# ---------------------------------------------------------------- safetensors headers

tensor_names = st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__")
tensor_specs = st.lists(
    st.tuples(tensor_names, st.sampled_from(sorted(ITEMSIZE)), st.lists(st.integers(0, 4), max_size=3).map(tuple)),
    max_size=6,
    unique_by=lambda t: t[0],
)
string_metadata = st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=4)


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """A header as build_header writes it, without the 8-byte prefix, and its data size."""
    prefix, layout = build_header(draw(tensor_specs), draw(string_metadata))
    return prefix[8:], layout[-1].end if layout else 0


@settings(max_examples=200, deadline=None)
@given(tensors=tensor_specs, metadata=string_metadata)
def test_header_writer_and_parser_round_trip(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
) -> None:
    prefix, layout = build_header(tensors, metadata)
    (n,) = struct.unpack("<Q", prefix[:8])
    assert n == len(prefix) - 8
    assert n % 8 == 0
    data_size = layout[-1].end if layout else 0
    parsed, parsed_metadata = parse_header(prefix[8:], data_size, "x")
    assert parsed == layout
    assert [(t.name, t.dtype, t.shape) for t in parsed] == tensors
    assert [t.begin for t in parsed] == [0, *(t.end for t in parsed)][:-1]  # no gaps, no overlaps
    assert parsed_metadata == metadata
    # The official reader agrees on the layout.
    official = dict(safetensors.deserialize(prefix + bytes(data_size)))
    assert {k: (v["dtype"], tuple(v["shape"])) for k, v in official.items()} == {
        name: (dtype, shape) for name, dtype, shape in tensors
    }


def _parses_or_refuses(header: bytes, data_size: int) -> None:
    try:
        parse_header(header, data_size, "x")
    except InputFileError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    header=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
    data_size=st.integers(0, 2**40),
)
def test_header_parser_refuses_arbitrary_bytes_with_input_file_error(header: bytes, data_size: int) -> None:
    _parses_or_refuses(header, data_size)


@settings(max_examples=300, deadline=None)
@given(valid=valid_headers(), rng=st.randoms(use_true_random=False), size_change=st.sampled_from([0, 0, -1, 1, 8]))
def test_header_parser_refuses_damaged_bytes_with_input_file_error(
    valid: tuple[bytes, int], rng: random.Random, size_change: int
) -> None:
    header, data_size = valid
    _parses_or_refuses(mutate_bytes(header, rng), max(0, data_size + size_change))


@st.composite
def edited_headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid header after JSON edits: wrong offsets, dtypes, shapes, types, duplicate keys, deep nesting."""
    header, data_size = draw(valid_headers())
    text = mutate_json(header.decode(), draw(st.randoms(use_true_random=False)))
    return text.encode("utf-8", "surrogatepass"), draw(st.sampled_from([data_size, data_size, 0, data_size + 2]))


@settings(max_examples=300, deadline=None)
# Each example once escaped as the wrong exception: TypeError (unhashable dtype), RecursionError.
@example(edited=(b'{"w":{"dtype":[],"shape":[],"data_offsets":[0,0]}}', 0))
@example(edited=(DEEP_JSON.encode(), 0))
@given(edited=edited_headers())
def test_header_parser_refuses_edited_json_with_input_file_error(edited: tuple[bytes, int]) -> None:
    _parses_or_refuses(*edited)


@st.composite
def damaged_files(draw: st.DrawFn) -> bytes:
    """A whole safetensors file (prefix, header, data) with bytes flipped, cut or inserted anywhere."""
    header, data_size = draw(valid_headers())
    whole = struct.pack("<Q", len(header)) + header + bytes(data_size)
    return mutate_bytes(whole, draw(st.randoms(use_true_random=False)))


@settings(max_examples=150, deadline=None)
@given(contents=st.binary(max_size=64) | damaged_files())
def test_safetensors_file_refuses_bad_files_with_input_file_error(contents: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(contents)
        try:
            SafetensorsFile(path).close()
        except InputFileError:
            pass


# ---------------------------------------------------------------- frames

widths = st.sampled_from([1, 2, 4, 8])
compressions = st.sampled_from(["zstd", "none"])


def _whole_elements(raw: bytes, width: int) -> np.ndarray:
    return np.frombuffer(raw[: len(raw) - len(raw) % width], dtype=np.uint8).copy()


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=512), width=widths, compression=compressions, slack=st.integers(0, 16))
def test_frame_codec_and_byte_grouping_round_trip(raw: bytes, width: int, compression: str, slack: int) -> None:
    data = _whole_elements(raw, width)
    grouped = group_bytes(data, width, np.empty(len(data) + slack, dtype=np.uint8))
    # Byte k of every little-endian element, for k = 0, 1, ...
    assert grouped.tobytes() == data.reshape(-1, width).T.tobytes()
    back = np.empty_like(data)
    decode_into(LITERAL_XOR, grouped[: len(back)], back, NO_BASE, width)
    assert back.tobytes() == data.tobytes()

    codec = FrameCodec(compression)
    frame = bytes(codec.encode(data.copy(), width))
    out = np.empty_like(data)
    codec.decode(frame, width, out, "x")
    assert out.tobytes() == data.tobytes()


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(max_size=512),
    base_raw=st.binary(max_size=512),
    width=widths,
    compression=compressions,
    coding=st.sampled_from(CODINGS),
)
def test_every_coding_round_trips_against_any_base_prefix(
    raw: bytes, base_raw: bytes, width: int, compression: str, coding: str
) -> None:
    """Encode then decode a frame against a base covering any whole-element prefix of it: the target comes back."""
    target = _whole_elements(raw, width)
    base = _whole_elements(base_raw, width)[: len(target)]
    coded = np.empty_like(target)
    encode_into(coding, target, base, coded, width)
    codec = FrameCodec(compression)
    frame = bytes(codec.encode(coded, width))
    out = np.empty_like(target)
    codec.decode(frame, width, out, "x", base, coding)
    assert out.tobytes() == target.tobytes()


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(max_size=256),
    width=widths,
    compression=compressions,
    damage=st.sampled_from(["flip", "truncate", "extend"]),
    position=st.integers(0, 2**16),
    xor=st.integers(1, 255),
    extra=st.binary(min_size=1, max_size=8),
)
def test_damaged_frame_raises_delta_corrupt_error_or_decodes_unchanged(
    raw: bytes, width: int, compression: str, damage: str, position: int, xor: int, extra: bytes
) -> None:
    data = _whole_elements(raw, width)
    codec = FrameCodec(compression)
    frame = bytearray(codec.encode(data.copy(), width))
    if damage == "flip" and frame:
        frame[position % len(frame)] ^= xor
    elif damage == "truncate" and frame:
        del frame[position % len(frame) :]
    else:
        frame += extra
    out = np.empty_like(data)
    try:
        codec.decode(bytes(frame), width, out, "x")
    except DeltaCorruptError:
        return
    if compression == "zstd":
        # zstd's own checksum guards the content; uncompressed frames rely on the tensor hash.
        assert out.tobytes() == data.tobytes()


# ---------------------------------------------------------------- manifests


@st.composite
def edited_manifests(draw: st.DrawFn) -> str:
    """A real delta's manifest after JSON edits: keys deleted or added, types and numbers changed."""
    return mutate_json(sample_manifest(), draw(st.randoms(use_true_random=False)))


def test_sample_manifest_parses() -> None:
    manifest = parse_manifest(sample_manifest(), "x")
    assert manifest.tensors()
    assert parse_manifest(manifest.to_json(), "x") == manifest


@settings(max_examples=150, deadline=None, suppress_health_check=SLOW_FIRST_DRAW)
# Each example once escaped as the wrong exception: OverflowError, RecursionError.
@example(text=HUGE_PCT_MANIFEST)
@example(text=DEEP_JSON)
@given(text=edited_manifests())
def test_manifest_parser_refuses_edits_with_manifest_error(text: str) -> None:
    try:
        manifest = parse_manifest(text, "x")
    except ManifestError:
        return
    # Whatever it accepts, it writes back as a manifest it accepts again, unchanged.
    assert parse_manifest(manifest.to_json(), "x").to_json() == manifest.to_json()


@settings(max_examples=100, deadline=None, suppress_health_check=SLOW_FIRST_DRAW)
@example(text=DEEP_JSON)  # once a RecursionError
@given(text=st.builds(lambda rng: mutate_json(sample_checksums(), rng), st.randoms(use_true_random=False)))
def test_checksum_manifest_loader_refuses_edits_with_manifest_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "xorweights-checksums.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_checksums(path)
        except ManifestError:
            pass


def test_fuzz_parsers_for_a_few_seconds() -> None:
    assert fuzz_parsers.fuzz(seconds=10) > 100


# ---------------------------------------------------------------- XOR deltas

FLOAT_DTYPES = ["F16", "BF16", "F32"]
moderate = st.floats(-4, 4, width=32)
FIXED = Tensor("F32", np.arange(3, dtype=np.float32))  # identical on both sides


@st.composite
def fine_tunes(draw: st.DrawFn) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A base and a fine-tune whose "w" may change dtype and gain or lose rows along dim 0."""
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    ft_rows = max(0, rows + draw(st.integers(-2, 3)))
    base_w = draw(arrays(np.float32, (rows, cols), elements=moderate))
    ft_w = draw(arrays(np.float32, (ft_rows, cols), elements=moderate))
    if draw(st.booleans()):  # untouched rows: their XOR is all zeros
        common = min(rows, ft_rows)
        ft_w[:common] = base_w[:common]
    base = {"w": Tensor(draw(st.sampled_from(FLOAT_DTYPES)), base_w)}
    ft = {"w": Tensor(draw(st.sampled_from(FLOAT_DTYPES)), ft_w)}
    if draw(st.booleans()):
        base["b"] = ft["b"] = FIXED
    return base, ft


@settings(max_examples=50, deadline=None)
@given(pair=fine_tunes(), compress=st.booleans(), jobs=st.sampled_from([1, 2]))
def test_delta_rebuilds_the_fine_tune_bit_for_bit(
    pair: tuple[dict[str, Tensor], dict[str, Tensor]], compress: bool, jobs: int
) -> None:
    base_tensors, ft_tensors = pair
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = write_checkpoint(root / "base", base_tensors)
        ft = write_checkpoint(root / "ft", ft_tensors)
        xorweights.encode(ft, base, root / "delta", allow_unprotected=True, frame_bytes=8, compress=compress, jobs=jobs)
        xorweights.decode(root / "delta", base, root / "out", jobs=jobs)
        assert (root / "out" / "model.safetensors").read_bytes() == (ft / "model.safetensors").read_bytes()
        assert files_digest(root / "out") == files_digest(ft)
