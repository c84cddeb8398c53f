"""Format 3's zigzag-diff coding: the transform as docs/format.md specifies it, and every path through the kernel."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import files_digest, run
from test_errors import read_manifest as _manifest

import xorweights
from xorweights.delta.coding import BLOCK_BYTES, LITERAL_XOR, decode_into, encode_into
from xorweights.delta.kernel import FrameCodec, group_bytes
from xorweights.delta.manifest import MANIFEST_NAME
from xorweights.errors import ManifestError

WIDTHS = [1, 2, 4, 8]


def _spec(f: int, b: int, width: int) -> int:
    """The stored element, written from docs/format.md alone: zigzag((f - b) mod 2^n), n = 8 * width."""
    n = 8 * width
    d = (f - b) % (1 << n)
    signed = d - (1 << n) if d >> (n - 1) else d
    return (signed << 1) % (1 << n) if signed >= 0 else (-2 * signed - 1)


def _elements(rng: np.random.Generator, count: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, count * width, dtype=np.uint8)


@pytest.mark.parametrize("width", WIDTHS)
def test_zigzag_diff_is_the_documented_formula(width: int) -> None:
    rng = np.random.default_rng(width)
    target, base = _elements(rng, 300, width), _elements(rng, 300, width)
    # Also the edges: equal, one apart either way, and the largest distances.
    top = (1 << (8 * width)) - 1
    edges = [(5, 5), (6, 5), (4, 5), (0, top), (top, 0), (0, 1 << (8 * width - 1))]
    t_words, b_words = target.view(f"<u{width}"), base.view(f"<u{width}")
    for i, (f, b) in enumerate(edges):
        t_words[i], b_words[i] = f, b
    out = np.empty_like(target)
    encode_into("zigzag-diff", target, base, out, width)
    got = out.view(f"<u{width}")
    want = [_spec(int(f), int(b), width) for f, b in zip(t_words, b_words, strict=True)]
    assert [int(v) for v in got] == want


def test_a_carry_is_a_small_number() -> None:
    """0x3BFF -> 0x3C00 flips 11 bits of the XOR; zigzag-diff stores 2 (the difference 1)."""
    target = np.array([0x3C00, 0x3BFE], dtype="<u2").view(np.uint8)
    base = np.array([0x3BFF, 0x3BFF], dtype="<u2").view(np.uint8)
    out = np.empty_like(target)
    encode_into("zigzag-diff", target, base, out, 2)
    assert list(out.view("<u2")) == [2, 1]
    encode_into(LITERAL_XOR, target, base, out, 2)
    assert list(out.view("<u2")) == [0x07FF, 0x0001]


@pytest.mark.parametrize("coding", ["xor", "zigzag-diff"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("grouped", [True, False])
def test_decode_inverts_encode_across_blocks_and_a_partial_base(coding: str, width: int, grouped: bool) -> None:
    rng = np.random.default_rng(7 * width)
    block = BLOCK_BYTES // width
    count = 2 * block + 123  # blocks and a ragged end
    target = _elements(rng, count, width)
    for covered in (0, 1, block - 1, block + 5, count):
        base = _elements(rng, covered, width)
        coded = np.empty_like(target)
        encode_into(coding, target, base, coded, width)
        assert coded[covered * width :].tobytes() == target[covered * width :].tobytes()  # past the base: as it is
        out = np.empty_like(target)
        if grouped:
            decode_into(coding, group_bytes(coded, width), out, base, width)
        else:
            out[:] = coded
            decode_into(coding, None, out, base, width)
        assert out.tobytes() == target.tobytes(), covered


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_frame_codec_decodes_zigzag_diff_frames(compression: str) -> None:
    rng = np.random.default_rng(3)
    base = rng.normal(0, 0.02, 5000).astype(np.float16)
    target = (base + rng.normal(0, 1e-4, 5000).astype(np.float16)).view(np.uint8)
    base = base.view(np.uint8)
    codec = FrameCodec(compression, 1)
    coded = np.empty_like(target)
    encode_into("zigzag-diff", target, base, coded, 2)
    frame = bytes(codec.encode(coded, 2))
    out = np.empty_like(target)
    codec.decode(frame, 2, out, "t", base, "zigzag-diff")
    assert out.tobytes() == target.tobytes()


def test_encode_writes_format_3_by_default_and_codec_xor_writes_format_2(tmp_path, pair) -> None:
    v3, v2 = tmp_path / "v3", tmp_path / "v2"
    xorweights.encode(pair.finetuned, pair.base, v3, allow_unprotected=True)
    xorweights.encode(pair.finetuned, pair.base, v2, allow_unprotected=True, codec="xor")
    m3, m2 = _manifest(v3), _manifest(v2)
    assert m3["format_version"] == 3 and m2["format_version"] == 2
    assert {t["coding"] for f in m3["weight_files"] for t in f["tensors"]} == {"zigzag-diff"}
    assert all("coding" not in t for f in m2["weight_files"] for t in f["tensors"])
    for delta in (v3, v2):
        out = tmp_path / f"out-{delta.name}"
        xorweights.decode(delta, pair.base, out)
        assert files_digest(out) == files_digest(pair.finetuned)
        assert xorweights.verify(out, delta=delta).ok


def test_the_v2_frames_are_the_literal_xor(tmp_path, pair) -> None:
    """--codec xor keeps the stored bytes the plain XOR: undo the grouping and XOR the base to get the fine-tune."""
    import zstandard

    from xorweights.readers.safetensors_io import SafetensorsFile

    delta = tmp_path / "v2"
    xorweights.encode(pair.finetuned, pair.base, delta, allow_unprotected=True, codec="xor")
    wf = _manifest(delta)["weight_files"][0]
    t = next(t for t in wf["tensors"] if t["method"] == "xor" and t["dtype"] == "F16")
    skip = 0
    for other in wf["tensors"]:
        if other is t:
            break
        skip += sum(s for s, _ in other["frames"])
    data = (delta / wf["data_file"]).read_bytes()
    stored, raw = t["frames"][0]
    grouped = np.frombuffer(zstandard.ZstdDecompressor().decompress(data[skip : skip + stored]), np.uint8)
    xor = grouped.reshape(2, -1).T.reshape(-1)
    ft = SafetensorsFile(next(pair.finetuned.glob("*.safetensors")))
    base = SafetensorsFile(next(pair.base.glob("*.safetensors")))
    want = np.bitwise_xor(ft.read(ft.by_name[t["name"]], 0, raw), base.read(base.by_name[t["name"]], 0, raw))
    assert xor.tobytes() == want.tobytes()


def test_zigzag_diff_is_smaller_than_the_literal_xor_on_a_fine_tune(tmp_path, pair) -> None:
    def data_bytes(delta) -> int:
        return sum(p.stat().st_size for p in delta.glob("*.xwd"))

    xorweights.encode(pair.finetuned, pair.base, tmp_path / "v3", allow_unprotected=True)
    xorweights.encode(pair.finetuned, pair.base, tmp_path / "v2", allow_unprotected=True, codec="xor")
    assert data_bytes(tmp_path / "v3") < data_bytes(tmp_path / "v2")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("coding"), "missing field 'coding'"),
        (lambda t: t.update(coding="zigzag"), "unknown coding 'zigzag'"),
        (lambda t: t.update(coding=3), "field 'coding' has the wrong type"),
    ],
)
def test_a_bad_coding_is_refused_naming_the_tensor(tmp_path, pair, edit, message) -> None:
    delta = tmp_path / "delta"
    xorweights.encode(pair.finetuned, pair.base, delta, allow_unprotected=True)
    m = _manifest(delta)
    tensor = m["weight_files"][0]["tensors"][0]
    edit(tensor)
    (delta / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=message):
        xorweights.decode(delta, pair.base, tmp_path / "out")
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out2")
    assert r.exit_code == 3
    assert tensor["name"] in r.stderr and message in r.stderr


def test_a_format_2_manifest_may_not_carry_a_coding(tmp_path, pair) -> None:
    """A v2 reader would refuse the unknown field, so a v2 manifest with one is not a v2 manifest."""
    delta = tmp_path / "delta"
    xorweights.encode(pair.finetuned, pair.base, delta, allow_unprotected=True, codec="xor")
    m = _manifest(delta)
    m["weight_files"][0]["tensors"][0]["coding"] = "xor"
    (delta / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="unexpected fields \\['coding'\\]"):
        xorweights.decode(delta, pair.base, tmp_path / "out")


def test_encode_refuses_an_unknown_codec(tmp_path, pair) -> None:
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", tmp_path / "d", "--codec", "gzip")
    assert r.exit_code == 2
    assert "gzip" in r.stderr
    with pytest.raises(xorweights.XorWeightsError, match="--codec gzip: not one of xor, zigzag-diff"):
        xorweights.encode(pair.finetuned, pair.base, tmp_path / "d2", codec="gzip")
