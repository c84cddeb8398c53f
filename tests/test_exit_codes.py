"""Exit codes by class of failure, the one table that documents them, and the CLI's help.

Each class of failure gets one real failing run of the CLI, which must exit
with the code docs/decoding.md lists for it and print one error line. The
table itself is parsed and compared with the codes the error classes carry.
"""

from __future__ import annotations

import errno
import inspect
import re
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from conftest import run
from test_errors import assert_error, edit_manifest, flip, tensor_span
from test_hostile import Q_PROJ, original_frame, replace_frame
from test_hub import Runner, one_error_line
from test_legacy import SHARD1 as LEGACY_SHARD1
from test_legacy import make_release
from test_publish import FakeApi, http_error

import xorweights
import xorweights.cli
import xorweights.errors
import xorweights.hub.publish
from xorweights import progress
from xorweights.cli import main, translate_errors
from xorweights.errors import XorWeightsError
from xorweights.fixtures import LlamaSpec, Pair, make_base, make_finetune, make_pair, side_files, write_checkpoint
from xorweights.interrupts import INTERRUPTED_EXIT

DOC = Path(__file__).resolve().parents[1] / "docs" / "decoding.md"
SHARD1 = "model-00001-of-00002.safetensors"

# The documented codes, written out: the contract scripts rely on.
VERIFY_FAILED, USAGE, BAD_INPUT, HUB, OS_ERROR, UNPROTECTED, INTERNAL = 1, 2, 3, 4, 5, 6, 7


def only_line(r: Result, code: int) -> str:
    """The command exited with ``code`` and printed exactly one error line; return it."""
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xorweights: error: "), r.stderr
    return lines[0]


# ---------------------------------------------------------------- one real run per class


def test_verify_mismatch_exits_1(pair: Pair, tmp_path: Path) -> None:
    sums = tmp_path / "sums.json"
    assert run("checksum", pair.finetuned, "-o", sums, "-q").exit_code == 0
    flip(pair.finetuned / SHARD1, tensor_span(pair.finetuned / SHARD1, Q_PROJ)[0])
    assert_error(run("verify", pair.finetuned, "--manifest", sums), VERIFY_FAILED, "mismatches", hint="re-run decode")
    r = run("verify", pair.finetuned, "--manifest", sums, "--json")
    assert r.exit_code == VERIFY_FAILED and r.stderr == "", r.output


def test_check_base_finding_differences_exits_1(delta: Path, tmp_path: Path) -> None:
    other = make_pair(tmp_path / "other", seed=5)
    r = run("decode", delta, "--base", other.base, "--check-base")
    assert_error(r, VERIFY_FAILED, "difference(s) from the base this delta needs", hint="xorweights inspect DELTA")


def test_wrong_base_exits_1(pair: Pair, delta: Path, tmp_path: Path) -> None:
    """BaseMismatchError."""
    flip(pair.base / SHARD1, tensor_span(pair.base / SHARD1, Q_PROJ)[0])
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, VERIFY_FAILED, f"base tensor {Q_PROJ}: expected xxh3-128", hint="--check-base")


def test_decoded_files_failing_their_published_list_exit_1(tmp_path: Path) -> None:
    """VerifyFailed, from decode-legacy's check of what it decoded."""
    rel = make_release(tmp_path / "release")
    data = bytearray((rel.base / LEGACY_SHARD1).read_bytes())
    data[10] ^= 1
    (rel.base / LEGACY_SHARD1).write_bytes(bytes(data))
    r = run("decode-legacy", rel.payload, "-o", tmp_path / "out", *rel.options(), "--no-check")
    assert_error(r, VERIFY_FAILED, "1 decoded file(s) differ from", hint="not the exact ones")


def test_click_usage_error_exits_2(pair: Pair) -> None:
    r = run("decode", pair.finetuned, "--no-such-option")
    assert r.exit_code == USAGE and "Error: No such option '--no-such-option'" in r.stderr, r.output


def test_our_usage_error_exits_2(tmp_path: Path) -> None:
    """xorweights.errors.UsageError."""
    rel = make_release(tmp_path / "release")
    r = run("decode-legacy", rel.payload, "-o", tmp_path / "out", *rel.options(), "--checksums", "x")
    assert "--checksums cannot be combined" in only_line(r, USAGE)


def test_missing_input_exits_3(tmp_path: Path) -> None:
    """CheckpointError."""
    r = run("checksum", tmp_path / "nope", "-o", tmp_path / "sums.json")
    assert_error(r, BAD_INPUT, "no such file or folder", hint="check the path")


def test_damaged_safetensors_exits_3(pair: Pair, tmp_path: Path) -> None:
    """InputFileError."""
    (pair.finetuned / SHARD1).write_bytes(b"\x08\x00\x00\x00")
    r = run("checksum", pair.finetuned, "-o", tmp_path / "sums.json")
    assert_error(r, BAD_INPUT, str(pair.finetuned / SHARD1), "truncated", hint="re-download")


def test_damaged_manifest_exits_3(pair: Pair, delta: Path, tmp_path: Path) -> None:
    """ManifestError."""
    edit_manifest(delta, lambda m: m.update(format_version=99))
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, BAD_INPUT, "format version 99", hint="upgrade")


def test_damaged_delta_data_exits_3(pair: Pair, tmp_path: Path) -> None:
    """DeltaCorruptError: a frame that does not decompress."""
    delta = tmp_path / "framed"
    xorweights.encode(pair.finetuned, pair.base, delta, frame_bytes=64)
    replace_frame(delta, Q_PROJ, 1, original_frame(delta, Q_PROJ, 1)[:-1])
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out")
    assert_error(r, BAD_INPUT, f"tensor {Q_PROJ} frame 1", "does not decompress", hint="re-download")


def test_hub_download_failure_exits_4(tmp_path: Path) -> None:
    """HubDownloadError, through the installed entry point (a subprocess, as users run it)."""
    r = Runner(tmp_path)("decode", "org/delta", "--base", "org/base", "-o", tmp_path / "out", offline=True)
    assert r.returncode == HUB, r.stderr
    assert "delta org/delta: not in the local Hugging Face cache" in one_error_line(r)


@pytest.mark.parametrize(("status", "words"), [(401, "the Hub refused to let you write"), (503, "could not take")])
def test_hub_push_failure_exits_4(delta: Path, monkeypatch: pytest.MonkeyPatch, status: int, words: str) -> None:
    """HubAuthError (401) and HubError (503)."""
    from huggingface_hub.errors import HfHubHTTPError

    api = FakeApi(http_error(HfHubHTTPError, status), "create_repo" if status == 401 else "upload_folder")
    monkeypatch.setattr(xorweights.hub.publish, "HfApi", lambda: api)
    assert words in only_line(run("push", delta, "me/ft-delta"), HUB)


def test_unusable_output_exits_5(pair: Pair, delta: Path) -> None:
    """OutputError."""
    r = run("decode", delta, "--base", pair.base, "-o", delta / "out")
    assert_error(r, OS_ERROR, "the output folder lies inside the delta", hint="outside every input")


def test_os_error_exits_5(pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain OSError reaching the CLI (the library wraps the ones it expects in OutputError): a failing disk."""

    def failing_disk(path: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error", str(path / SHARD1))

    monkeypatch.setattr(xorweights.cli, "checksum_api", failing_disk)
    r = run("checksum", pair.finetuned, "-o", tmp_path / "sums.json")
    assert_error(
        r, OS_ERROR, f"{pair.finetuned / SHARD1}: Input/output error", hint="check the path and its permissions"
    )


def test_not_enough_memory_exits_5(pair: Pair, delta: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NotEnoughMemoryError comes only from the library (load_state_dict); the CLI's translation is what is tested."""
    pytest.importorskip("torch")
    import xorweights.load

    monkeypatch.setattr(xorweights.load, "available_memory", lambda: 1024)

    @click.command()
    @translate_errors
    def load() -> None:
        xorweights.load_state_dict(delta, pair.base)

    r = CliRunner().invoke(load, [], catch_exceptions=False)
    assert_error(r, OS_ERROR, "in memory, and only 1.0 KiB is available", hint="iter_state_dict")


def test_unprotected_refusal_exits_6(tmp_path: Path) -> None:
    """UnprotectedError: the base lacks a tensor, whose bytes the delta would then publish in the clear."""
    spec = LlamaSpec()
    base_tensors = make_base(spec)
    finetuned = write_checkpoint(tmp_path / "ft", make_finetune(base_tensors), files=side_files(spec))
    del base_tensors["model.layers.1.mlp.gate_proj.weight"]
    base = write_checkpoint(tmp_path / "base", base_tensors, files=side_files(spec))
    line = only_line(run("encode", finetuned, "--base", base, "-o", tmp_path / "delta", "-q"), UNPROTECTED)
    assert "encode refused: " in line and "model.layers.1.mlp.gate_proj.weight" in line
    assert not (tmp_path / "delta").exists()


def test_internal_error_exits_7(pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(xorweights.cli, "checksum_api", bug)
    line = only_line(run("checksum", pair.finetuned, "-o", tmp_path / "sums.json"), INTERNAL)
    assert "internal error: ZeroDivisionError: division by zero" in line and "report it" in line


def test_interrupt_exits_130(pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(xorweights.cli, "checksum_api", interrupted)
    assert "interrupted" in only_line(run("checksum", pair.finetuned, "-o", tmp_path / "sums.json"), INTERRUPTED_EXIT)


# ---------------------------------------------------------------- the table


def documented_codes() -> dict[int, set[str]]:
    """docs/decoding.md's "Exit codes" table: code -> the class names in its last column."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[int, set[str]] = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|[^|]*\|([^|]*)\|\s*$", line)
        if m:
            code = int(m.group(1))
            assert code not in rows, f"code {code} listed twice"
            rows[code] = set(re.findall(r"`(\w+)`", m.group(2)))
    return rows


def error_classes() -> list[type[XorWeightsError]]:
    return [
        cls
        for _, cls in inspect.getmembers(xorweights.errors, inspect.isclass)
        if issubclass(cls, XorWeightsError) and cls is not XorWeightsError
    ]


def test_the_table_lists_exactly_the_codes_the_error_classes_carry() -> None:
    rows = documented_codes()
    for cls in error_classes():
        listed = [code for code, names in rows.items() if cls.__name__ in names]
        assert listed == [cls.exit_code], f"{cls.__name__} carries {cls.exit_code}; the table lists it under {listed}"
    module_codes = {
        value for name, value in vars(xorweights.errors).items() if name.startswith("EXIT_") and isinstance(value, int)
    }
    assert {cls.exit_code for cls in error_classes()} <= module_codes
    assert set(rows) == {0, INTERRUPTED_EXIT} | module_codes
    assert "OSError" in rows[xorweights.errors.EXIT_OS] and "KeyboardInterrupt" in rows[INTERRUPTED_EXIT]
    assert rows[xorweights.errors.EXIT_INTERNAL] == set()  # "any other exception"
    assert click.UsageError.exit_code == xorweights.errors.EXIT_USAGE == USAGE
    documented = (VERIFY_FAILED, USAGE, BAD_INPUT, HUB, OS_ERROR, UNPROTECTED, INTERNAL)
    assert sorted(module_codes) == list(documented)


def test_every_code_is_distinct_small_and_clear_of_the_shells() -> None:
    codes = [v for k, v in vars(xorweights.errors).items() if k.startswith("EXIT_")]
    assert len(codes) == len(set(codes))
    assert all(0 < code < 126 for code in codes)


# ---------------------------------------------------------------- help


assert isinstance(main, click.Group)
COMMANDS = ["", *sorted(main.commands)]  # "" is the group itself


def command(name: str) -> click.Command:
    return main.commands[name] if name else main


@pytest.mark.parametrize("name", COMMANDS, ids=lambda name: name or "xorweights")
def test_dash_h_is_help(name: str) -> None:
    args = [name] if name else []
    short, long = run(*args, "-h"), run(*args, "--help")
    assert short.exit_code == long.exit_code == 0, short.output
    assert short.stdout == long.stdout and short.stdout.startswith("Usage: ")
    assert "-h, --help" in short.stdout


@pytest.mark.parametrize("name", COMMANDS, ids=lambda name: name or "xorweights")
def test_every_option_has_help(name: str) -> None:
    for param in command(name).params:
        if isinstance(param, click.Option):
            assert param.help and param.help.strip(), f"{name or 'xorweights'} {param.opts[0]} has no help text"


@pytest.mark.parametrize("name", COMMANDS, ids=lambda name: name or "xorweights")
def test_help_ends_with_examples(name: str) -> None:
    text = run(*([name] if name else []), "-h").stdout
    body = text.split("\nOptions:", 1)[0]
    examples = body.split("\n  Examples:\n", 1)
    assert len(examples) == 2, f"no Examples: block in {name or 'xorweights'} -h"
    lines = [line.strip() for line in examples[1].strip().splitlines()]
    assert 1 <= len(lines) <= 2 and all(line.startswith("xorweights ") for line in lines), lines
    for line in lines:
        if name and not line.endswith(" -h"):
            assert f"{line} ".startswith(f"xorweights {name} "), line


# ---------------------------------------------------------------- progress bars


@pytest.mark.parametrize(
    ("value", "disabled"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("", False), ("no", False)],
)
def test_hf_hub_disable_progress_bars_silences_our_bars(
    monkeypatch: pytest.MonkeyPatch, value: str, disabled: bool
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", value)
    bar = progress.byte_bar(1000, "decode", enabled=True)
    try:
        assert bar.disable is disabled
    finally:
        bar.close()
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    bar = progress.byte_bar(1000, "decode", enabled=True)
    try:
        assert bar.disable is False
    finally:
        bar.close()


def test_our_truthy_values_are_huggingface_hubs() -> None:
    from huggingface_hub import constants

    assert progress._TRUE_VALUES == constants.ENV_VARS_TRUE_VALUES
