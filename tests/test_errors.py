"""Bad input through the CLI: every failure is one line with a hint, the right exit code, and no traceback.

Each case builds real files (tiny fixtures, or real files with a few bytes
edited) and checks that the message names the file or tensor at fault and
what was expected or found.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import Result
from conftest import partials, run, tree_digest

from xorweights.fixtures import LlamaSpec, Pair, Tensor, make_base, side_files, write_checkpoint

MANIFEST = "xorweights-delta.json"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
HINT = re.compile(r"\(hint: (?P<hint>.+)\)$")


# ---------------------------------------------------------------- helpers


def assert_error(r: Result, code: int, *needles: str, hint: str | None = None) -> str:
    """The command failed with ``code`` and one stderr line naming every needle; return that line."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("xorweights: error: "), line
    assert "internal error" not in line, line
    m = HINT.search(line)
    assert m, f"no (hint: ...) in {line!r}"
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    if hint is not None:
        assert hint in m.group("hint"), f"{hint!r} not in hint {m.group('hint')!r}"
    return line


def encode(pair: Pair, out: Path, *options: str) -> Path:
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", out, "-q", *options)
    assert r.exit_code == 0, r.output
    return out


def read_manifest(delta: Path) -> dict[str, Any]:
    return json.loads((delta / MANIFEST).read_text())


def edit_manifest(delta: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    m = read_manifest(delta)
    edit(m)
    (delta / MANIFEST).write_text(json.dumps(m, indent=1))


def entry(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    """A tensor's entry in a delta manifest."""
    return next(t for wf in manifest["weight_files"] for t in wf["tensors"] if t["name"] == name)


def tensor_span(path: Path, name: str) -> tuple[int, int]:
    """Absolute byte range of tensor ``name`` inside the safetensors file ``path``."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8 : 8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the JSON header of a safetensors file, keeping its data bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n :])


def write_base(folder: Path, tensors: dict[str, Tensor]) -> Path:
    """A base laid out like the ``pair`` fixture's, from edited tensors."""
    return write_checkpoint(folder, tensors, shards=2, files=side_files(LlamaSpec()))


def weight_files(out: Path) -> list[str]:
    """Every weight file in ``out``, finished or partial (partial files have hashed names in .xorweights/)."""
    if not out.exists():
        return []
    return sorted([p.name for p in out.rglob("*safetensors*")] + [p.name for p in partials(out)])


# ---------------------------------------------------------------- wrong base


def test_base_with_another_dtype(make: Callable[..., Pair], delta: Path, tmp_path: Path) -> None:
    f32 = make(base_dtype="F32")
    r = run("decode", delta, "--base", f32.base, "-o", tmp_path / "out")
    line = assert_error(
        r,
        1,
        "base tensor model.embed_tokens.weight: expected dtype F16, found F32",
        str(f32.base / SHARD1),
        hint="inspect DELTA",
    )
    assert "bf16" not in line
    assert not (tmp_path / "out").exists()


def test_bf16_base_for_an_f16_delta_says_how_to_get_the_right_one(
    make: Callable[..., Pair], delta: Path, tmp_path: Path
) -> None:
    bf16 = make(base_dtype="BF16")
    r = run("decode", delta, "--base", bf16.base, "-o", tmp_path / "out")
    line = assert_error(r, 1, "expected dtype F16, found BF16", hint="Meta's original files or an fp16 conversion")
    assert "bf16" in HINT.search(line).group("hint")  # type: ignore[union-attr]


def test_base_tensor_with_another_shape(delta: Path, tmp_path: Path) -> None:
    tensors = make_base(LlamaSpec())
    tensors["model.layers.0.mlp.up_proj.weight"] = Tensor("F16", np.zeros((88, 16), np.float32))
    base = write_base(tmp_path / "narrow", tensors)
    r = run("decode", delta, "--base", base, "-o", tmp_path / "out")
    assert_error(
        r,
        1,
        "base tensor model.layers.0.mlp.up_proj.weight: expected shape [88, 32], found [88, 16]",
        str(base / SHARD1),
    )
    assert weight_files(tmp_path / "out") == []


def test_base_missing_a_tensor(delta: Path, tmp_path: Path) -> None:
    tensors = make_base(LlamaSpec())
    del tensors["model.layers.1.mlp.down_proj.weight"]
    base = write_base(tmp_path / "short", tensors)
    r = run("decode", delta, "--base", base, "-o", tmp_path / "out")
    assert_error(
        r,
        1,
        "base tensor model.layers.1.mlp.down_proj.weight: expected F16[32, 88], found no such tensor",
        str(base),
    )
    assert weight_files(tmp_path / "out") == []


def test_base_with_one_value_changed_fails_on_that_tensor_and_leaves_no_weight_file(
    pair: Pair, delta: Path, tmp_path: Path
) -> None:
    name = "model.layers.0.self_attn.v_proj.weight"
    begin, _ = tensor_span(pair.base / SHARD1, name)
    flip(pair.base / SHARD1, begin + 7)
    want = entry(read_manifest(delta), name)["base"]["xxh3"]
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert_error(r, 1, f"base tensor {name}: expected xxh3-128 {want}, found ", hint="--check-base")
    # The shard holding it was half written when the mismatch showed up: neither name may remain.
    assert weight_files(out) == []


def test_a_totally_different_base(make: Callable[..., Pair], delta: Path, tmp_path: Path) -> None:
    other = make(seed=5)
    out = tmp_path / "out"
    r = run("decode", delta, "--base", other.base, "-o", out)
    assert_error(r, 1, "base tensor model.embed_tokens.weight: expected xxh3-128", hint="--check-base")
    assert weight_files(out) == []


def test_debug_env_shows_the_traceback(
    make: Callable[..., Pair], delta: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = make(seed=5)
    monkeypatch.setenv("XORWEIGHTS_DEBUG", "1")
    r = run("decode", delta, "--base", other.base, "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert "Traceback (most recent call last)" in r.stderr
    assert "BaseMismatchError" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("xorweights: error: base tensor model.embed_tokens.weight: expected xxh3-128")
    assert HINT.search(last)


def test_base_missing_a_referenced_file(pair: Pair, delta: Path, tmp_path: Path) -> None:
    (pair.base / "tokenizer.model").unlink()
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(
        r,
        1,
        f"{pair.base}: missing tokenizer.model, which this delta takes from the base",
        hint="copy tokenizer.model",
    )


def test_base_with_a_changed_referenced_file(pair: Pair, delta: Path, tmp_path: Path) -> None:
    (pair.base / "tokenizer.model").write_bytes(b"not the tokenizer")
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert_error(
        r,
        1,
        str(pair.base / "tokenizer.model"),
        "the base this delta was made from has",
        hint="restore tokenizer.model",
    )
    assert not (out / "tokenizer.model").exists()


# ---------------------------------------------------------------- decode --check-base


def test_check_base_lists_the_differing_tensor(pair: Pair, delta: Path) -> None:
    name = "model.layers.1.mlp.gate_proj.weight"
    begin, _ = tensor_span(pair.base / SHARD2, name)
    flip(pair.base / SHARD2, begin)
    want = entry(read_manifest(delta), name)["base"]["xxh3"]
    before = tree_digest(pair.base)
    r = run("decode", delta, "--base", pair.base, "--check-base")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    problems = r.stdout.strip().splitlines()
    assert len(problems) == 1, r.stdout
    assert problems[0].startswith(f"base tensor {name}: expected xxh3-128 {want}, found ")
    assert r.stderr.startswith(f"xorweights: error: {pair.base}: 1 difference(s) from the base this delta needs"), (
        r.stderr
    )
    assert tree_digest(pair.base) == before


def test_check_base_lists_every_kind_of_difference(delta: Path, tmp_path: Path) -> None:
    tensors = make_base(LlamaSpec())
    tensors["model.layers.0.mlp.up_proj.weight"] = Tensor("F16", np.zeros((88, 16), np.float32))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    tensors["model.norm.weight"] = Tensor("F16", tensors["model.norm.weight"].values + 1)
    base = write_base(tmp_path / "odd", tensors)
    (base / "tokenizer.model").unlink()
    r = run("decode", delta, "--base", base, "--check-base")
    assert r.exit_code == 1
    problems = r.stdout.strip().splitlines()
    assert len(problems) == 4, problems
    assert problems[0].startswith("base tensor model.layers.0.mlp.up_proj.weight: expected shape [88, 32]")
    assert problems[1].startswith(
        "base tensor model.layers.1.mlp.down_proj.weight: expected F16[32, 88], found no such"
    )
    assert problems[2] == f"{base}: missing tokenizer.model, which this delta takes from the base"
    assert problems[3].startswith("base tensor model.norm.weight: expected xxh3-128")
    assert_error(r, 1, f"{base}: 4 difference(s)", hint="xorweights inspect DELTA")


def test_check_base_failure_has_a_hint(pair: Pair, delta: Path) -> None:
    begin, _ = tensor_span(pair.base / SHARD2, "model.layers.1.mlp.gate_proj.weight")
    flip(pair.base / SHARD2, begin)
    r = run("decode", delta, "--base", pair.base, "--check-base")
    assert_error(r, 1, f"{pair.base}: 1 difference(s)", hint="xorweights inspect DELTA")


def test_check_base_against_the_right_base(pair: Pair, delta: Path) -> None:
    r = run("decode", delta, "--base", pair.base, "--check-base")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"{pair.base} is the base this delta needs: every tensor and referenced file matches"
    assert r.stderr == ""


# ---------------------------------------------------------------- corrupted delta


def test_flipped_byte_in_a_zstd_frame(pair: Pair, delta: Path, tmp_path: Path) -> None:
    first = read_manifest(delta)["weight_files"][0]["tensors"][0]
    assert first["name"] == "model.embed_tokens.weight"
    stored, _ = first["frames"][0]
    flip(delta / "tensors-00001.xwd", stored // 2)
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert_error(
        r,
        3,
        str(delta / "tensors-00001.xwd"),
        "tensor model.embed_tokens.weight frame 0",
        "does not decompress",
        hint="re-download",
    )
    assert weight_files(out) == []


def test_flipped_byte_in_an_uncompressed_delta_is_caught_by_the_tensor_checksum(pair: Pair, tmp_path: Path) -> None:
    delta = encode(pair, tmp_path / "plain", "--no-compress")
    first = read_manifest(delta)["weight_files"][0]["tensors"][0]
    assert first["name"] == "model.embed_tokens.weight"
    flip(delta / "tensors-00001.xwd", 10)
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert_error(
        r,
        3,
        "tensor model.embed_tokens.weight: rebuilt xxh3-128",
        f"differs from the manifest's {first['xxh3']}",
        hint="re-download",
    )
    assert weight_files(out) == []


def test_truncated_data_file(pair: Pair, delta: Path, tmp_path: Path) -> None:
    data = delta / "tensors-00002.xwd"
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[:-100])
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, f"{data}: expected {size} bytes, found {size - 100}", hint="truncated")


def test_missing_data_file(pair: Pair, delta: Path, tmp_path: Path) -> None:
    (delta / "tensors-00002.xwd").unlink()
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, f"{delta / 'tensors-00002.xwd'}: missing", hint="download the whole delta folder")


def test_missing_manifest(pair: Pair, delta: Path, tmp_path: Path) -> None:
    (delta / MANIFEST).unlink()
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, f"{delta}: no {MANIFEST}; this is not a complete delta", hint="xorweights encode")


def test_missing_delta_folder(pair: Pair, tmp_path: Path) -> None:
    r = run("decode", tmp_path / "nowhere", "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, f"{tmp_path / 'nowhere'}: no such delta folder", hint=MANIFEST)


def test_missing_shipped_file(pair: Pair, delta: Path, tmp_path: Path) -> None:
    (delta / "files" / "config.json").unlink()
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, f"{delta / 'files' / 'config.json'}: missing", hint="re-download")


# ---------------------------------------------------------------- hostile or damaged manifests


def test_manifest_from_a_newer_version(pair: Pair, delta: Path, tmp_path: Path) -> None:
    edit_manifest(delta, lambda m: m.update(format_version=99))
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, str(delta / MANIFEST), "format version 99", "newer xorweights", hint="upgrade")


def test_weight_file_name_escaping_out_is_refused(pair: Pair, delta: Path, tmp_path: Path) -> None:
    def evil(m: dict[str, Any]) -> None:
        m["weight_files"][0]["name"] = "../evil.safetensors"

    edit_manifest(delta, evil)
    before = tree_digest(tmp_path)
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert_error(r, 3, "'../evil.safetensors' escapes the output folder", str(delta / MANIFEST), hint="hostile")
    assert not (tmp_path / "evil.safetensors").exists()
    assert not out.exists()
    assert tree_digest(tmp_path) == before


def test_absolute_other_file_name_is_refused(pair: Pair, delta: Path, tmp_path: Path) -> None:
    passwd = Path("/etc/passwd")
    passwd_before = passwd.stat().st_mtime_ns if passwd.exists() else None

    def evil(m: dict[str, Any]) -> None:
        m["other_files"][0]["name"] = "/etc/passwd"

    edit_manifest(delta, evil)
    before = tree_digest(tmp_path)
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert_error(r, 3, "'/etc/passwd' escapes the output folder", "other_files[0]", hint="hostile")
    assert not out.exists()
    assert tree_digest(tmp_path) == before
    assert (passwd.stat().st_mtime_ns if passwd.exists() else None) == passwd_before


@pytest.mark.parametrize(
    ("drop", "needle"),
    [
        (lambda m: m.pop("compression"), "missing field 'compression'"),
        (
            lambda m: m["weight_files"][0]["tensors"][1].pop("xxh3"),
            "tensor model.layers.0.self_attn.q_proj.weight: missing field 'xxh3'",
        ),
    ],
    ids=["top-level", "tensor"],
)
def test_manifest_missing_a_field(
    pair: Pair, delta: Path, tmp_path: Path, drop: Callable[[dict[str, Any]], None], needle: str
) -> None:
    edit_manifest(delta, drop)
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, str(delta / MANIFEST), needle, hint="re-download the delta")


def test_manifest_listing_a_tensor_twice(pair: Pair, delta: Path, tmp_path: Path) -> None:
    def twice(m: dict[str, Any]) -> None:
        m["weight_files"][1]["tensors"].append(m["weight_files"][0]["tensors"][1])

    edit_manifest(delta, twice)
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(
        r,
        3,
        str(delta / MANIFEST),
        "tensor 'model.layers.0.self_attn.q_proj.weight' is listed twice",
        hint="re-download",
    )


def test_manifest_xoring_more_bytes_than_the_base_holds(pair: Pair, delta: Path, tmp_path: Path) -> None:
    # lm_head.weight has 4 added rows: the base covers 4096 of its 4352 bytes.
    edit_manifest(delta, lambda m: entry(m, "lm_head.weight").update(xor_bytes=4352))
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, "lm_head.weight", str(delta / MANIFEST), hint="re-download")


def test_manifest_xoring_against_a_base_dtype_that_cannot_be_cast(pair: Pair, delta: Path, tmp_path: Path) -> None:
    # Same bytes, relabelled I16 in both the base and the manifest: only the cast check can refuse it.
    rewrite_header(pair.base / SHARD2, lambda h: h["lm_head.weight"].update(dtype="I16"))
    edit_manifest(delta, lambda m: entry(m, "lm_head.weight")["base"].update(dtype="I16"))
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, "lm_head.weight", "I16", "F16", hint="re-download")


def test_manifest_header_that_is_not_utf8(pair: Pair, delta: Path, tmp_path: Path) -> None:
    edit_manifest(delta, lambda m: m["weight_files"][0].update(header="\ud800"))
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, 3, str(delta / MANIFEST), SHARD1, hint="re-download")


# ---------------------------------------------------------------- bad safetensors given to encode


def _truncate_to_prefix(path: Path) -> str:
    path.write_bytes(path.read_bytes()[:4])
    return "truncated, only 4 bytes"


def _truncate_data(path: Path) -> str:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:-100])
    return f"outside the {len(data) - 8 - n - 100} data bytes"


def _header_longer_than_file(path: Path) -> str:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    return f"header claims {len(data)} bytes, but only {len(data) - 8} follow its length"


def _invalid_json(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[8] = ord("x")
    path.write_bytes(bytes(data))
    return "header is not valid JSON"


def _unknown_dtype(path: Path) -> str:
    rewrite_header(path, lambda h: h["model.layers.0.mlp.up_proj.weight"].update(dtype="F17"))
    return "tensor 'model.layers.0.mlp.up_proj.weight' has unknown dtype 'F17'"


def _trailing_bytes(path: Path) -> str:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data + bytes(16))
    return f"tensors cover {len(data) - 8 - n} of {len(data) - 8 - n + 16} data bytes"


def _gap(path: Path) -> str:
    def shift(h: dict[str, Any]) -> None:
        lo, hi = h["model.embed_tokens.weight"]["data_offsets"]
        h["model.embed_tokens.weight"]["data_offsets"] = [lo + 2, hi + 2]

    rewrite_header(path, shift)
    return "tensor 'model.embed_tokens.weight' at offset 2 leaves a gap before it"


ENCODE_DAMAGES = [
    _truncate_to_prefix,
    _truncate_data,
    _header_longer_than_file,
    _invalid_json,
    _unknown_dtype,
    _trailing_bytes,
    _gap,
]


@pytest.mark.parametrize("damage", ENCODE_DAMAGES)
def test_encode_refuses_a_damaged_safetensors_file(pair: Pair, tmp_path: Path, damage: Callable[[Path], str]) -> None:
    shard = pair.finetuned / SHARD1
    needle = damage(shard)
    out = tmp_path / "delta"
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", out)
    assert_error(r, 3, str(shard), needle, hint="re-download")
    assert not (out / MANIFEST).exists()


def test_encode_folder_without_safetensors(pair: Pair, tmp_path: Path) -> None:
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02")
    r = run("encode", folder, "--base", pair.base, "-o", tmp_path / "delta")
    assert_error(r, 3, f"{folder / 'pytorch_model.bin'}: not a readable PyTorch weights file", hint="re-download")
    (folder / "pytorch_model.bin").rename(folder / "model.gguf")
    r = run("encode", folder, "--base", pair.base, "-o", tmp_path / "delta")
    assert_error(r, 3, f"{folder}: no weights xorweights can read (found model.gguf)", hint="params.json")


def test_encode_path_that_does_not_exist(pair: Pair, tmp_path: Path) -> None:
    r = run("encode", tmp_path / "nope", "--base", pair.base, "-o", tmp_path / "delta")
    assert_error(r, 3, f"{tmp_path / 'nope'}: no such file or folder", hint="check the path")


def test_decode_base_that_does_not_exist(delta: Path, tmp_path: Path) -> None:
    r = run("decode", delta, "--base", tmp_path / "nope", "-o", tmp_path / "out")
    assert_error(r, 3, f"{tmp_path / 'nope'}: no such file or folder", hint="check the path")


# ---------------------------------------------------------------- usage errors


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_missing_base_is_a_usage_error(pair: Pair, delta: Path, tmp_path: Path, command: str) -> None:
    source = pair.finetuned if command == "encode" else delta
    r = run(command, source, "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert "Error: Missing option '--base'." in r.stderr
    assert not (tmp_path / "out").exists()


def test_decode_without_out_or_check_base_is_a_usage_error(pair: Pair, delta: Path) -> None:
    r = run("decode", delta, "--base", pair.base)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert "internal error" not in r.stderr
    assert "--out" in r.stderr
    assert "--check-base" in r.stderr


@pytest.mark.parametrize("inside", ["delta", "base"])
def test_decode_refuses_out_inside_an_input(pair: Pair, delta: Path, inside: str) -> None:
    folder = delta if inside == "delta" else pair.base
    before = tree_digest(folder)
    out = folder / "rebuilt"
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert_error(r, 5, f"{out}: the output folder lies inside the {inside} {folder}", hint="outside every input")
    assert tree_digest(folder) == before
    assert not out.exists()


@pytest.mark.parametrize("inside", ["fine-tune", "base"])
def test_encode_refuses_out_inside_an_input(pair: Pair, inside: str) -> None:
    folder = pair.finetuned if inside == "fine-tune" else pair.base
    before = tree_digest(folder)
    out = folder / "delta"
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", out)
    assert_error(r, 5, f"{out}: the output folder lies inside the {inside} {folder}", hint="outside every input")
    assert tree_digest(folder) == before
    assert not out.exists()


# ---------------------------------------------------------------- verify


@pytest.fixture
def tampered(pair: Pair, delta: Path, tmp_path: Path) -> Path:
    """A rebuilt fine-tune with one byte of lm_head.weight flipped."""
    out = tmp_path / "rebuilt"
    r = run("decode", delta, "--base", pair.base, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    begin, _ = tensor_span(out / SHARD2, "lm_head.weight")
    flip(out / SHARD2, begin + 3)
    return out


def test_verify_reports_a_tampered_file(tampered: Path, delta: Path) -> None:
    want = read_manifest(delta)
    r = run("verify", tampered, "--delta", delta)
    assert_error(r, 1, f"{tampered}: 2 mismatches", hint="re-run decode")
    problems = r.stdout.strip().splitlines()
    assert len(problems) == 2, r.stdout
    assert problems[0].startswith(f"tensor lm_head.weight: expected xxh3-128 {entry(want, 'lm_head.weight')['xxh3']}")
    assert problems[1].startswith(f"file {SHARD2}: expected sha256 {want['weight_files'][1]['sha256']}")


def test_verify_json_reports_a_tampered_file(tampered: Path, delta: Path) -> None:
    r = run("verify", tampered, "--delta", delta, "--json")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    report = json.loads(r.stdout)
    assert report["ok"] is False
    assert report["checked_tensors"] == 22
    assert [p.split(":")[0] for p in report["problems"]] == ["tensor lm_head.weight", f"file {SHARD2}"]
    # stdout stays pure JSON; the mismatch count is in the report, not on stderr.
    assert "xorweights: error" not in r.stdout


def test_verify_against_a_bad_checksum_manifest(tampered: Path, tmp_path: Path) -> None:
    bad = tmp_path / "sums.json"
    bad.write_text('{"format": "something-else"}')
    r = run("verify", tampered, "--manifest", bad)
    assert_error(r, 3, f"{bad}: not an xorweights checksum manifest", hint="xorweights checksum")


def test_inspect_a_folder_that_is_not_a_delta(pair: Pair) -> None:
    r = run("inspect", pair.base)
    assert_error(r, 3, f"{pair.base}: no {MANIFEST}; this is not a complete delta", hint="xorweights encode")
