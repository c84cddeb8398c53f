"""Check before writing (issue 11, section 3): every check runs before a byte is written, and none is skipped in silence.

Real fixtures throughout: a tiny LLaMA-shaped pair encoded with the CLI, and
a whole-file XOR release made by test_legacy's independent encoder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import files_digest, partials, run
from test_errors import assert_error
from test_legacy import make_release

from xorweights.checksums import verify
from xorweights.decode import decode
from xorweights.errors import EXIT_OS, EXIT_USAGE, EXIT_VERIFY_FAILED
from xorweights.fixtures import Pair
from xorweights.legacy import decode_legacy, read_md5_list

CHANGED = ("generation_config.json", "tokenizer_config.json")


def change_hub_files(base: Path) -> dict[str, bytes]:
    """What a Hub repo does to a base after the delta was made: its generation and tokenizer configs change."""
    new = {
        "generation_config.json": b'{"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.6}\n',
        "tokenizer_config.json": b'{"tokenizer_class": "LlamaTokenizer"}\n'.replace(b"Llama", b"LLaMA"),  # same size
    }
    for name, data in new.items():
        (base / name).write_bytes(data)
    return new


def weight_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.safetensors")) if out.exists() else []


# ---------------------------------------------------------------- referenced files: checked before any weight


def test_changed_referenced_files_fail_before_any_weight_is_written(pair: Pair, delta: Path, tmp_path: Path) -> None:
    change_hub_files(pair.base)
    out = tmp_path / "out"
    out.mkdir()  # the user made it: nothing may land in it
    r = run("decode", delta, "--base", pair.base, "-o", out)
    line = assert_error(
        r,
        EXIT_VERIFY_FAILED,
        "2 file(s) this delta takes from the base differ",
        str(pair.base / "generation_config.json"),
        "bytes, the base this delta was made from has",  # a size that differs is found before any hashing
        str(pair.base / "tokenizer_config.json"),
        "sha256",  # same size, other bytes
        hint="--skip-file GLOB",
    )
    assert "--take-from-base" in line
    assert weight_files(out) == [] and partials(out) == []
    assert list(out.iterdir()) == []


def test_skip_file_leaves_them_out_and_says_so(pair: Pair, delta: Path, tmp_path: Path) -> None:
    change_hub_files(pair.base)
    out = tmp_path / "out"
    r = run(
        "decode",
        delta,
        "--base",
        pair.base,
        "-o",
        out,
        "--skip-file",
        "generation_config.json",
        "--skip-file",
        "tok*_config.json",
    )
    assert r.exit_code == 0, r.output
    assert "left out (--skip-file): generation_config.json, tokenizer_config.json" in r.stdout
    got, want = files_digest(out), files_digest(pair.finetuned)
    assert set(want) - set(got) == set(CHANGED)
    assert all(got[name] == want[name] for name in got)


def test_take_from_base_keeps_the_users_version_unverified(pair: Pair, delta: Path, tmp_path: Path) -> None:
    new = change_hub_files(pair.base)
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out, "--take-from-base", "*_config.json")
    assert r.exit_code == 0, r.output
    assert "NOT verified (--take-from-base): generation_config.json, tokenizer_config.json" in r.stdout
    for name, data in new.items():
        assert (out / name).read_bytes() == data
    got, want = files_digest(out), files_digest(pair.finetuned)
    assert {n for n in want if got[n] != want[n]} == set(CHANGED)
    assert partials(out) == []


def test_decode_result_and_dtype_checksums_record_what_was_written(pair: Pair, delta: Path, tmp_path: Path) -> None:
    new = change_hub_files(pair.base)
    out = tmp_path / "out"
    result = decode(
        delta, pair.base, out, dtype="float32", skip_files=["generation_config.json"], take_from_base=["tokenizer_*"]
    )
    assert result.skipped_files == ["generation_config.json"]
    assert result.unverified == ["tokenizer_config.json"]
    assert not (out / "generation_config.json").exists()
    sums = json.loads((out / "xorweights-checksums.json").read_text())["files"]
    data = new["tokenizer_config.json"]
    assert sums["tokenizer_config.json"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert "generation_config.json" not in sums
    assert verify(out).ok  # the folder's own checksums describe what is there


@pytest.mark.parametrize("option", ["--skip-file", "--take-from-base"])
def test_a_glob_matching_nothing_is_a_usage_error(pair: Pair, delta: Path, tmp_path: Path, option: str) -> None:
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out, option, "chat_template*.jinja")
    assert_error(r, EXIT_USAGE, f"{option} chat_template*.jinja: matches none", hint="non-tensor files")
    assert not out.exists()


def test_globs_apply_only_to_non_tensor_files(pair: Pair, delta: Path, tmp_path: Path) -> None:
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out", "--skip-file", "*.safetensors")
    assert_error(r, EXIT_USAGE, "--skip-file *.safetensors: matches none")
    # config.json is shipped in the delta, not taken from the base: there is no copy of the user's to keep.
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out", "--take-from-base", "config.json")
    assert_error(r, EXIT_USAGE, "--take-from-base config.json: matches none", hint="takes from the base")


# ---------------------------------------------------------------- encode


def test_dry_run_prints_the_plan_when_out_holds_a_delta(pair: Pair, delta: Path) -> None:
    before = files_digest(delta)
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", delta, "--dry-run")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("plan: ")
    assert f"note: {delta} already holds a finished delta" in r.stdout
    assert files_digest(delta) == before
    # Without --dry-run it is still refused.
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", delta)
    assert_error(r, EXIT_OS, "already holds a finished delta")


def test_encode_summary_has_inspects_exposure_line(pair: Pair, tmp_path: Path) -> None:
    out = tmp_path / "delta"
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", out)
    assert r.exit_code == 0, r.output
    inspected = [line for line in run("inspect", out).stdout.splitlines() if line.startswith("exposure: ")]
    assert len(inspected) == 1
    assert inspected[0] in r.stdout.splitlines()


# ---------------------------------------------------------------- demo


def test_demo_keep_runs_twice_and_leaves_other_files_alone(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    first = run("demo", "--keep", keep)
    assert first.exit_code == 0, first.output
    second = run("demo", "--keep", keep)
    assert second.exit_code == 0, second.output
    assert (keep / "notes.txt").read_text() == "mine"
    assert files_digest(keep / "rebuilt") == files_digest(keep / "finetuned")


def test_demo_keep_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    keep = tmp_path / "demo"
    (keep / "base").mkdir(parents=True)
    (keep / "base" / "mine.txt").write_text("mine")
    r = run("demo", "--keep", keep)
    assert_error(r, EXIT_OS, f"{keep}: already holds base", hint="new folder")
    assert (keep / "base" / "mine.txt").read_text() == "mine"


# ---------------------------------------------------------------- legacy md5 lists


def dot_slash(src: Path, dest: Path) -> Path:
    """The list as `md5sum ./*` writes it."""
    dest.write_text("".join(f"{line[:34]}./{line[34:]}" for line in src.read_text().splitlines(keepends=True)))
    return dest


def test_dot_slash_md5_lists_work(tmp_path: Path) -> None:
    rel = make_release(tmp_path / "release")
    base_md5, out_md5 = dot_slash(rel.base_md5, tmp_path / "b.md5"), dot_slash(rel.out_md5, tmp_path / "o.md5")
    assert read_md5_list(base_md5).sums == read_md5_list(rel.base_md5).sums
    out = tmp_path / "out"
    result = decode_legacy(rel.payload, rel.base, out, base_md5, out_md5)
    assert result.unchecked == [] and len(result.base_checked) == 4
    assert files_digest(out) == files_digest(rel.finetuned)


def test_a_base_list_naming_nothing_needed_is_refused(tmp_path: Path) -> None:
    rel = make_release(tmp_path / "release")
    other = tmp_path / "other.md5"
    other.write_text(f"{'0' * 32}  consolidated.00.pth\n")
    (rel.base / "config.json").write_text("{}")  # a wrong base, which an unchecked decode would use
    out = tmp_path / "out"
    r = run("decode-legacy", rel.payload, "--base", rel.base, "-o", out, "--base-md5", other, "--out-md5", rel.out_md5)
    line = assert_error(r, EXIT_USAGE, f"{other}: does not name any of the 4 base files", hint="--no-check")
    for name in ("config.json", "tokenizer.model", "pytorch_model-00001-of-00002.bin"):
        assert name in line
    assert not out.exists()  # refused before anything was decoded


def test_a_base_list_missing_some_files_is_refused(tmp_path: Path) -> None:
    rel = make_release(tmp_path / "release")
    partial_list = tmp_path / "partial.md5"
    partial_list.write_text("".join(line for line in rel.base_md5.read_text().splitlines(True) if "config" not in line))
    r = run("decode-legacy", rel.payload, "--base", rel.base, "-o", tmp_path / "out", "--base-md5", partial_list)
    assert_error(r, EXIT_USAGE, "does not name 1 of the 4 base files", "config.json")


def test_check_base_leaves_out_what_decode_would(pair: Pair, delta: Path) -> None:
    change_hub_files(pair.base)
    r = run("decode", delta, "--base", pair.base, "--check-base")
    assert r.exit_code == EXIT_VERIFY_FAILED and "generation_config.json" in r.stdout, r.output
    r = run(
        "decode", delta, "--base", pair.base, "--check-base",
        "--skip-file", "generation_config.json", "--take-from-base", "tokenizer_config.json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "is the base this delta needs" in r.stdout
