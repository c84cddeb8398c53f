"""--json, --quiet, --revision and --token on the command line, and what a finished decode leaves in OUT."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from conftest import files_digest, run
from hub_server import FakeHub, serve
from test_hub import Runner, one_error_line
from test_legacy import _bin_pair, legacy_encode, md5_list

from xorweights.cli import main
from xorweights.delta.manifest import load_manifest
from xorweights.fixtures import Pair
from xorweights.outdir import WORK_DIR

SECRET = "hf_notarealtokenbutsecret0123456789"


def one_document(stdout: str) -> dict:
    """stdout parsed as exactly one JSON object (json.loads refuses anything after it)."""
    doc = json.loads(stdout)
    assert isinstance(doc, dict)
    return doc


# ---------------------------------------------------------------- --json


def test_encode_json_lists_tensors_files_and_exposure(pair: Pair, tmp_path: Path) -> None:
    out = tmp_path / "delta"
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", out, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = one_document(r.stdout)
    assert plan["dry_run"] is True and plan["summary"] is None and not out.exists()
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    doc = one_document(r.stdout)
    assert doc["dry_run"] is False and doc["out"] == str(out) and doc["url"] is None
    assert doc["tensors"] == plan["tensors"]
    names = {t["name"] for t in doc["tensors"]}
    assert names == {t.name for t in load_manifest(out).tensors()}
    assert all(isinstance(t["nbytes"], int) and t["method"] in ("xor", "partial_xor", "raw") for t in doc["tensors"])
    assert [f["name"] for f in doc["weight_files"]] == doc["summary"]["files_rebuilt"]
    assert all(f["size"] > 0 for f in doc["weight_files"])
    assert {f["mode"] for f in doc["other_files"]} <= {"reference", "ship"}
    unprotected = doc["exposure"]["unprotected"]
    assert unprotected and all({"name", "nbytes", "cause"} == set(u) for u in unprotected)
    assert doc["unprotected_bytes"] == sum(u["nbytes"] for u in unprotected) == doc["summary"]["unprotected_bytes"]


def test_encode_json_over_the_limit_prints_the_plan_then_one_error_line(pair: Pair, tmp_path: Path) -> None:
    out = tmp_path / "delta"
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", out, "--dry-run", "--json", "--max-unprotected", "0")
    assert r.exit_code == 6
    assert one_document(r.stdout)["unprotected_bytes"] > 0
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("xorweights: error: ")


def test_decode_json_then_a_rerun_reports_already_complete(pair: Pair, delta: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    doc = one_document(r.stdout)
    assert sorted(doc["written"]) == sorted(files_digest(pair.finetuned)) and doc["skipped"] == []
    assert doc["already_complete"] is False and doc["dtype"] is None and doc["out"] == str(out)
    assert doc["sizes"] == {n: (out / n).stat().st_size for n in doc["written"]}
    r = run("decode", delta, "--base", pair.base, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    again = one_document(r.stdout)
    assert again["written"] == [] and sorted(again["skipped"]) == sorted(doc["written"])
    assert again["already_complete"] is True


def test_check_base_json(pair: Pair, delta: Path, make) -> None:
    r = run("decode", delta, "--base", pair.base, "--check-base", "--json")
    assert r.exit_code == 0, r.output
    assert one_document(r.stdout) == {"base": str(pair.base), "ok": True, "problems": []}
    other = make(seed=7)
    r = run("decode", delta, "--base", other.base, "--check-base", "--json")
    assert r.exit_code == 1
    doc = one_document(r.stdout)
    assert doc["ok"] is False and any(p.startswith("base tensor ") for p in doc["problems"])
    assert "difference(s) from the base" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_checksum_json_holds_every_file_and_tensor(pair: Pair, tmp_path: Path) -> None:
    out = tmp_path / "sums.json"
    r = run("checksum", pair.finetuned, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    doc = one_document(r.stdout)
    written = json.loads(out.read_text())
    assert doc["files"] == written["files"] and doc["tensors"] == written["tensors"]
    assert doc["out"] == str(out)


def test_migrate_and_decode_legacy_json(tmp_path: Path) -> None:
    base, ft = _bin_pair(tmp_path)
    payload = tmp_path / "payload"
    legacy_encode(ft, base, payload)
    base_md5, out_md5 = md5_list(base, tmp_path / "base.md5"), md5_list(ft, tmp_path / "out.md5")
    lists = ["--base-md5", base_md5, "--out-md5", out_md5]
    r = run("decode-legacy", payload, "--base", base, "-o", tmp_path / "decoded", *lists, "--json")
    assert r.exit_code == 0, r.output
    doc = one_document(r.stdout)
    assert sorted(doc["written"]) == sorted(p.name for p in ft.iterdir()) and doc["out_list"]
    delta = tmp_path / "delta"
    r = run("migrate", payload, "--base", base, "-o", delta, *lists, "--json")
    assert r.exit_code == 0, r.output
    doc = one_document(r.stdout)
    assert doc["delta_bytes"] == doc["encoded"]["summary"]["delta_bytes"] > 0
    assert doc["saved_bytes"] == doc["legacy_bytes"] - doc["delta_bytes"]
    assert doc["legacy"]["payload_bytes"] == doc["legacy_bytes"]
    assert doc["encoded"]["tensors"]


def test_errors_under_json_are_one_line_on_stderr_with_the_documented_code(pair: Pair, tmp_path: Path) -> None:
    r = run("decode", tmp_path / "no-such-delta", "--base", pair.base, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 3
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("xorweights: error: ")


# ---------------------------------------------------------------- --quiet


def test_every_command_takes_quiet() -> None:
    for name, command in main.commands.items():
        assert any("--quiet" in p.opts for p in command.params if isinstance(p, click.Option)), name


def test_quiet_decode_prints_nothing(pair: Pair, delta: Path, tmp_path: Path) -> None:
    r = run("decode", delta, "--base", pair.base, "-o", tmp_path / "out", "--quiet")
    assert r.exit_code == 0 and r.stdout == "" and r.stderr == ""


# ---------------------------------------------------------------- a finished OUT holds no state of ours


def test_a_finished_decode_leaves_no_work_folder_and_a_rerun_adopts_the_files(
    pair: Pair, delta: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert r.exit_code == 0, r.output
    assert not (out / WORK_DIR).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(files_digest(pair.finetuned))
    r = run("decode", delta, "--base", pair.base, "-o", out)
    assert r.exit_code == 0, r.output
    assert f"{out}: already complete" in r.stdout
    assert not (out / WORK_DIR).exists()
    assert files_digest(out) == files_digest(pair.finetuned)


def test_a_finished_dtype_decode_leaves_no_state_and_a_rerun_adopts_the_files(
    pair: Pair, delta: Path, tmp_path: Path, make: Callable[..., Pair]
) -> None:
    out = tmp_path / "out"
    r = run("decode", delta, "--base", pair.base, "-o", out, "--dtype", "bf16")
    assert r.exit_code == 0, r.output
    assert not (out / WORK_DIR).exists()  # nothing of ours for `hf upload OUT` to pick up
    first = files_digest(out)
    r = run("decode", delta, "--base", pair.base, "-o", out, "--dtype", "bf16")
    assert r.exit_code == 0, r.output
    assert f"{out}: already complete" in r.stdout
    assert files_digest(out) == first
    assert run("verify", out).exit_code == 0
    # Another delta of the same base, same tensor names and shapes: its checksums' source differs.
    other = make(seed=7)
    other_delta = tmp_path / "other-delta"
    assert run("encode", other.finetuned, "--base", other.base, "-o", other_delta, "-q").exit_code == 0
    r = run("decode", other_delta, "--base", other.base, "-o", out, "--dtype", "bf16")
    assert r.exit_code == 5 and "already exists and is not the file this delta rebuilds" in r.stderr, r.output
    assert files_digest(out) == first
    # Another --dtype of the same delta: refused too, never adopted.
    r = run("decode", delta, "--base", pair.base, "-o", out, "--dtype", "fp32")
    assert r.exit_code == 5 and files_digest(out) == first, r.output


# ---------------------------------------------------------------- --revision and --token


def test_revision_conflicting_with_at_rev_or_on_a_local_path_is_a_usage_error(
    pair: Pair, delta: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    r = run("decode", "org/delta@v1", "--revision", "v2", "--base", pair.base, "-o", out)
    assert r.exit_code == 2
    assert "org/delta@v1 names revision v1, and --revision names v2" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run("decode", delta, "--revision", "v2", "--base", pair.base, "-o", out)
    assert r.exit_code == 2 and "is a local path, not a Hub repo" in r.stderr
    r = run("verify", pair.finetuned, "--revision", "v2")
    assert r.exit_code == 2 and "applies to the Hub repo --delta names" in r.stderr
    assert not out.exists()


@pytest.fixture
def hub() -> FakeHub:
    with serve(FakeHub()) as h:
        yield h


def test_revision_and_token_reach_the_hub(tmp_path: Path, pair: Pair, delta: Path, hub: FakeHub) -> None:
    sha = hub.commit("org/delta", delta, access="private")
    hub.commit("org/delta", {"README.md": b"main moved on"}, access="private")
    hub.commit("org/base", pair.base)
    run_hub = Runner(tmp_path)
    out = tmp_path / "out"
    r = run_hub("decode", "org/delta", "--revision", sha, "--base", "org/base", "-o", out, "-q", endpoint=hub.url)
    assert r.returncode == 4  # private: refused without a token
    assert "org/delta@" + sha in one_error_line(r)
    args = ("decode", "org/delta", "--revision", sha, "--token", SECRET, "--base", "org/base", "-o", out)
    r = run_hub(*args, "--json", endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert files_digest(out) == files_digest(pair.finetuned)
    assert one_document(r.stdout)["already_complete"] is False
    assert all(sha in q for q in hub.requests if "/org/delta/" in q)
    assert SECRET not in r.stdout + r.stderr
    r = run_hub("inspect", "org/delta", "--revision", sha, "--token", SECRET, "--json", endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert one_document(r.stdout)["tensors"] > 0
    r = run_hub("verify", out, "--delta", "org/delta", "--revision", sha, "--token", SECRET, endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    r = run_hub("decode", "org/nope", "--token", SECRET, "--base", "org/base", "-o", out, endpoint=hub.url)
    assert r.returncode == 4 and SECRET not in r.stdout + r.stderr


def test_encode_revision_applies_to_finetuned(tmp_path: Path, pair: Pair, hub: FakeHub) -> None:
    sha = hub.commit("org/ft", pair.finetuned, access="private")
    hub.commit("org/ft", {"README.md": b"main moved on"}, access="private")
    run_hub = Runner(tmp_path)
    out = tmp_path / "delta"
    args = ("encode", "org/ft", "--revision", sha, "--token", SECRET, "--base", pair.base, "-o", out, "--json")
    r = run_hub(*args, endpoint=hub.url)
    assert r.returncode == 0, r.stderr
    assert one_document(r.stdout)["summary"]["tensors"] > 0
    assert all(sha in q for q in hub.requests if "/org/ft/" in q and "/resolve/" in q)
    assert SECRET not in r.stdout + r.stderr
