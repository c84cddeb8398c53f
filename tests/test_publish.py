"""Publishing to the Hub: the model card, and the calls at the HfApi boundary (recorded, never sent)."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2
import pytest
from conftest import files_digest, run
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects

import xorweights
import xorweights.hub.publish
from xorweights.delta.manifest import load_manifest
from xorweights.errors import HubAuthError, HubError, XorWeightsError
from xorweights.fixtures import make_pair
from xorweights.hub.publish import model_card, push_to_hub

REVISION = "0123456789abcdef0123456789abcdef01234567"
COMMIT_URL = "https://huggingface.co/me/ft-delta/commit/feedbeef"


class FakeApi:
    """Records create_repo and upload_folder, and what the folder holds at upload time.

    ``model_info`` (a read, for the base card's license) answers ``base_license``,
    or raises ``base_error``; it is recorded in ``queried``, not in ``calls``.
    """

    def __init__(
        self,
        fail: BaseException | None = None,
        fail_at: str = "upload_folder",
        base_license: str | None = None,
        base_error: BaseException | None = None,
    ) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail
        self.fail_at = fail_at
        self.card = ""
        self.uploaded: list[str] = []
        self.base_license = base_license
        self.base_error = base_error
        self.queried: list[str] = []

    def model_info(self, repo_id: str, **kwargs: Any) -> SimpleNamespace:
        self.queried.append(repo_id)
        if self.base_error is not None:
            raise self.base_error
        return SimpleNamespace(card_data=SimpleNamespace(license=self.base_license))

    def _maybe_fail(self, name: str) -> None:
        if self.fail is not None and self.fail_at == name:
            raise self.fail

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        self._maybe_fail("create_repo")
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(("upload_folder", {**kwargs, "ignore_patterns": list(kwargs["ignore_patterns"])}))
        self._maybe_fail("upload_folder")
        folder = Path(kwargs["folder_path"])
        self.card = (folder / "README.md").read_text(encoding="utf-8")
        paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        allow = kwargs.get("allow_patterns")
        self.uploaded = list(
            filter_repo_objects(paths, allow_patterns=allow, ignore_patterns=kwargs["ignore_patterns"])
        )
        return SimpleNamespace(commit_url=COMMIT_URL, oid="feedbeef")


def http_error(cls: type[HfHubHTTPError], status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return cls(
        f"{status} Client Error for url: {request.url}\nmore detail", response=httpx2.Response(status, request=request)
    )


@pytest.fixture
def delta(tmp_path: Path) -> Path:
    pair = make_pair(tmp_path)
    out = tmp_path / "delta"
    xorweights.encode(
        pair.finetuned,
        pair.base,
        out,
        base_description="the org/base model, fp16 safetensors",
        base_repo_id="org/base",
        base_revision=REVISION,
    )
    return out


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    """What the CLI reaches when it builds an HfApi."""
    api = FakeApi()
    monkeypatch.setattr(xorweights.hub.publish, "HfApi", lambda: api)
    return api


def check_card(card: str, delta: Path, repo_id: str) -> None:
    manifest = load_manifest(delta)
    summary = xorweights.inspect(delta)
    assert card.startswith(
        '---\ntags:\n- xorweights\n- xor-delta\nlibrary_name: xorweights\nbase_model: "org/base"\n---\n'
    )
    assert "the org/base model, fp16 safetensors" in card
    assert "- Hub repository: [org/base](https://huggingface.co/org/base)" in card
    assert f"- Revision: `{REVISION}` (decode fetches this one when `--base` names the repo)" in card
    assert f"pip install xorweights\nxorweights decode {repo_id} --base org/base -o OUT\n" in card
    assert f"xorweights verify OUT --delta {repo_id}" in card
    for wf in manifest.weight_files:
        assert f"| {wf.name} | {wf.size} | `{wf.sha256}` | rebuilt from the delta |" in card
    assert f"{summary.exposure_line()}." in card
    assert summary.unprotected  # added-token rows and the value head
    for line in summary.unprotected:
        assert f"- {line}\n" in card
    assert "4 rows of model.embed_tokens.weight are stored unprotected (256 bytes)" in card
    assert "contains no weights of the base model beyond the unprotected bytes listed above" in card
    assert "requires the base model, and so a license to the base model" in card


def test_push_creates_the_repo_and_uploads_the_folder_once_with_the_card(delta):
    api = FakeApi()
    assert push_to_hub(delta, "me/ft-delta", private=True, api=api) == COMMIT_URL
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "me/ft-delta", "repo_type": "model", "private": True, "exist_ok": True}
    manifest = load_manifest(delta)
    shipped = [f"files/{f.name}" for f in manifest.other_files if f.mode == "ship"]
    data = [wf.data_file for wf in manifest.weight_files]
    assert api.calls[1][1] == {
        "folder_path": delta,
        "repo_id": "me/ft-delta",
        "repo_type": "model",
        "commit_message": "Upload xorweights delta (format 3)",
        "allow_patterns": ["xorweights-delta.json", "README.md", *data, *shipped],
        "ignore_patterns": [".xorweights/*", ".*", "*/.*"],
    }
    check_card(api.card, delta, "me/ft-delta")
    assert (delta / "README.md").read_text(encoding="utf-8") == api.card
    assert api.uploaded == sorted(["README.md", "xorweights-delta.json", *data, *shipped])


def test_the_card_leaves_decode_unchanged_and_hidden_files_are_not_uploaded(delta, tmp_path):
    (delta / ".xorweights").mkdir()
    (delta / ".xorweights" / "tensors-00001.xwd.json").write_text("{}")
    (delta / "files" / ".config.json.xorweights-partial").write_bytes(b"half")
    api = FakeApi()
    push_to_hub(delta, "me/ft-delta", api=api)
    assert api.calls[0][1]["private"] is False
    assert not [p for p in api.uploaded if "/." in f"/{p}"]
    xorweights.decode(delta, tmp_path / "base", tmp_path / "out")
    assert files_digest(tmp_path / "out") == files_digest(tmp_path / "finetuned")
    assert xorweights.verify(tmp_path / "out", delta=delta).ok


def test_a_card_already_in_the_delta_is_kept(delta):
    (delta / "README.md").write_text("my own card\n")
    api = FakeApi()
    push_to_hub(delta, "me/ft-delta", api=api)
    assert api.card == "my own card\n"


def test_the_card_without_a_hub_base_says_which_folder_to_pass(tmp_path):
    pair = make_pair(tmp_path)
    xorweights.encode(pair.finetuned, pair.base, tmp_path / "delta", base_description="the demo base")
    manifest = load_manifest(tmp_path / "delta")
    card = model_card(manifest, xorweights.inspect(tmp_path / "delta"), "me/ft-delta")
    assert "xorweights decode me/ft-delta --base PATH/TO/BASE -o OUT" in card
    assert "Hub repository" not in card and "Revision" not in card


def test_the_card_of_a_delta_with_nothing_unprotected_says_so(tmp_path):
    pair = make_pair(tmp_path, added_rows=0, extra=False)
    xorweights.encode(pair.finetuned, pair.base, tmp_path / "delta")
    card = model_card(load_manifest(tmp_path / "delta"), xorweights.inspect(tmp_path / "delta"), "me/x")
    assert "0 bytes (0.000% of tensor bytes) are stored unprotected" in card
    assert "Every tensor byte is XORed with the base: none is stored in the clear." in card


def test_encode_push_to_hub_encodes_then_pushes(tmp_path, fake_hub):
    pair = make_pair(tmp_path)
    out = tmp_path / "delta"
    r = run(
        "encode", pair.finetuned, "--base", pair.base, "-o", out, "-q",
        "--base-repo", "org/base", "--base-revision", REVISION,
        "--base-description", "the org/base model, fp16 safetensors",
        "--push-to-hub", "me/ft-delta", "--private",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert r.stdout == f"pushed {out} to me/ft-delta: {COMMIT_URL}\n"
    assert [name for name, _ in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert fake_hub.calls[0][1]["private"] is True
    assert fake_hub.calls[1][1]["folder_path"] == out
    check_card(fake_hub.card, out, "me/ft-delta")


def test_encode_dry_run_pushes_nothing(pair, tmp_path, fake_hub):
    r = run(
        "encode", pair.finetuned, "--base", pair.base, "-o", tmp_path / "delta", "--dry-run", "--push-to-hub", "me/x"
    )
    assert r.exit_code == 0, r.stderr
    assert "dry run: nothing was pushed to me/x" in r.stdout
    assert fake_hub.calls == [] and not (tmp_path / "delta").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--push-to-hub", "me/bad--name"), "'me/bad--name' is not a Hub repository id"),
        (("--push-to-hub", "ft-delta"), "'ft-delta' is not an org/name Hub repository id"),
        (("--private",), "--private applies to --push-to-hub REPO"),
    ],
)
def test_encode_refuses_bad_push_options_before_any_work(pair, tmp_path, fake_hub, args, expected):
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", tmp_path / "delta", *args)
    assert r.exit_code == 2
    assert expected in r.stderr
    assert fake_hub.calls == [] and not (tmp_path / "delta").exists()


def test_push_command_pushes_a_finished_delta(delta, fake_hub):
    r = run("push", delta, "me/ft-delta")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == f"pushed {delta} to me/ft-delta: {COMMIT_URL}\n"
    assert fake_hub.calls[0][1]["private"] is False
    check_card(fake_hub.card, delta, "me/ft-delta")


def test_push_command_refuses_a_folder_that_is_not_a_delta(tmp_path, fake_hub):
    (tmp_path / "half").mkdir()
    r = run("push", tmp_path / "half", "me/x")
    assert r.exit_code == 3
    assert "no xorweights-delta.json; this is not a complete delta" in r.stderr
    assert fake_hub.calls == [] and not (tmp_path / "half" / "README.md").exists()


AUTH = "set HF_TOKEN to a token with write access to me, or run `hf auth login`; then `xorweights push"
LATER = "is complete on disk; push it later with `xorweights push"


@pytest.mark.parametrize(
    ("error", "at", "kind", "words"),
    [
        (http_error(HfHubHTTPError, 401), "create_repo", HubAuthError, ["the Hub refused to let you write", AUTH]),
        (http_error(HfHubHTTPError, 403), "upload_folder", HubAuthError, ["403", AUTH]),
        (http_error(RepositoryNotFoundError, 404), "upload_folder", HubAuthError, [AUTH]),
        (http_error(HfHubHTTPError, 503), "upload_folder", HubError, ["could not take the upload", LATER]),
        (http_error(HfHubHTTPError, 413), "upload_folder", HubError, ["refused the upload", "fix the cause"]),
        (httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"), "create_repo", HubError, [LATER]),
        (
            ConnectionError("Connection refused"),
            "upload_folder",
            HubError,
            ["cannot reach the Hugging Face Hub", LATER],
        ),
        (OfflineModeIsEnabled("HF_HUB_OFFLINE=1 is set"), "create_repo", HubError, ["HF_HUB_OFFLINE=1", LATER]),
    ],
)
def test_hub_errors_become_one_line_with_a_retry_command(delta, monkeypatch, error, at, kind, words):
    with pytest.raises(kind) as info:
        push_to_hub(delta, "me/ft-delta", api=FakeApi(error, at))
    assert type(info.value) is kind
    # The CLI: one line, exit 1, and the delta still complete on disk.
    api = FakeApi(error, at)
    monkeypatch.setattr(xorweights.hub.publish, "HfApi", lambda: api)
    r = run("push", delta, "me/ft-delta", "--private")
    assert r.exit_code == 4
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("xorweights: error: ")
    for w in words:
        assert w in lines[0]
    assert "xorweights push" in lines[0] and "me/ft-delta --private`" in lines[0]
    assert xorweights.inspect(delta).tensors


def test_encode_then_a_failed_push_keeps_the_delta_and_says_how_to_push_it(tmp_path, monkeypatch):
    pair = make_pair(tmp_path)
    api = FakeApi(http_error(HfHubHTTPError, 401), "create_repo")
    monkeypatch.setattr(xorweights.hub.publish, "HfApi", lambda: api)
    out = tmp_path / "delta"
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", out, "--push-to-hub", "me/ft-delta")
    assert r.exit_code == 4
    assert r.stdout.startswith(f"wrote {out}: ")
    assert r.stderr.count("\n") == 1
    assert f"then `xorweights push {out} me/ft-delta`)" in r.stderr
    xorweights.decode(out, pair.base, tmp_path / "out")
    assert files_digest(tmp_path / "out") == files_digest(pair.finetuned)


def test_the_recorded_calls_fit_the_real_hfapi(delta):
    api = FakeApi()
    push_to_hub(delta, "me/ft-delta", api=api)
    real = {"create_repo": HfApi.create_repo, "upload_folder": HfApi.upload_folder}
    for name, kwargs in api.calls:
        args = dict(kwargs)
        positional = [args.pop("repo_id")] if name == "create_repo" else []
        inspect.signature(real[name]).bind(HfApi(), *positional, **args)  # raises on a wrong keyword


@pytest.mark.parametrize("attack", ["link out", "stray file", "wrong size"])
def test_push_uploads_only_the_delta_each_file_checked(delta, tmp_path, attack):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the internet")
    shipped = next((delta / "files").iterdir())
    if attack == "link out":
        shipped.unlink()
        shipped.symlink_to(secret)
    elif attack == "stray file":
        (delta / "notes.txt").symlink_to(secret)
        (delta / "files" / "extra.json").write_text("{}")
    else:
        shipped.write_bytes(shipped.read_bytes() + b" ")
    api = FakeApi()
    if attack == "stray file":
        push_to_hub(delta, "me/ft-delta", api=api)
        assert "notes.txt" not in api.uploaded and "files/extra.json" not in api.uploaded
        return
    with pytest.raises(XorWeightsError, match=str(shipped)):
        push_to_hub(delta, "me/ft-delta", api=api)
    assert api.calls == []  # refused before the Hub was asked anything
