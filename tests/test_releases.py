"""Releases that say the right thing: no training leftovers, a card for the repo pushed to, Hub URLs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import files_digest, run
from huggingface_hub.errors import HfHubHTTPError
from test_hub import SHA_DELTA, Runner, _bounded, released  # noqa: F401  (fixtures, used by name)
from test_publish import REVISION, FakeApi, http_error

import xorweights
import xorweights.hub.publish
from xorweights.delta.manifest import load_manifest
from xorweights.encode_plan import NEVER_SHIPPED, never_shipped
from xorweights.errors import HubAuthError, UsageError
from xorweights.fixtures import make_pair
from xorweights.hub.publish import push_to_hub
from xorweights.hub.refs import parse_repo_ref

# What a Trainer run (with TensorBoard, W&B and DeepSpeed) leaves in an output folder.
LEFTOVERS = {
    "training_args.bin": "training arguments, a pickle",
    "optimizer.pt": "optimizer state",
    "scheduler.pt": "learning-rate scheduler state",
    "scaler.pt": "mixed-precision scaler state",
    "rng_state_0.pth": "random number generator state",
    "trainer_state.json": "the trainer's progress log",
    "last.ckpt": "a training checkpoint",
    "adapter_extra.bin": "a pickle, which may hold weights and runs code when loaded",
    "checkpoint-500/": "an intermediate training checkpoint",
    "runs/": "TensorBoard logs",
    "wandb/": "Weights & Biases run files",
    "global_step500/": "DeepSpeed training state",
}


def plant_leftovers(finetuned: Path) -> None:
    for name in LEFTOVERS:
        if not name.endswith("/"):
            (finetuned / name).write_bytes(b"leftover " + name.encode())
    for rel in (
        "checkpoint-500/config.json",
        "checkpoint-500/optimizer.pt",
        "runs/Nov30_12-00-00/events.out.tfevents.1700000000.host",
        "wandb/run-1/files/config.yaml",
        "global_step500/mp_rank_00_model_states.pt",
    ):
        (finetuned / rel).parent.mkdir(parents=True, exist_ok=True)
        (finetuned / rel).write_bytes(b"leftover")


# ---------------------------------------------------------------- training leftovers


def test_training_leftovers_are_not_shipped_and_each_is_listed_with_its_reason(tmp_path):
    pair = make_pair(tmp_path)
    plant_leftovers(pair.finetuned)
    result = xorweights.encode(pair.finetuned, pair.base, tmp_path / "delta")
    expected = [f"{name} ({reason})" for name, reason in LEFTOVERS.items()]
    assert sorted(result.plan.not_shipped) == sorted(expected)
    manifest = load_manifest(tmp_path / "delta")
    names = {of.name for of in manifest.other_files}
    assert not [n for n in names if never_shipped(n)]
    assert {"config.json", "added_tokens.json", "tokenizer.model"} <= names  # the real side files still go along
    shipped = {p.relative_to(tmp_path / "delta" / "files").as_posix() for p in (tmp_path / "delta").rglob("files/**/*")}
    assert not [n for n in shipped if "leftover" in n or never_shipped(n)]
    # Decoding rebuilds the fine-tune's real files, not the leftovers.
    xorweights.decode(tmp_path / "delta", pair.base, tmp_path / "out")
    assert not (tmp_path / "out" / "optimizer.pt").exists() and not (tmp_path / "out" / "runs").exists()


def test_the_dry_run_prints_every_leftover_as_not_shipped(tmp_path):
    pair = make_pair(tmp_path)
    plant_leftovers(pair.finetuned)
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", tmp_path / "delta", "--dry-run")
    assert r.exit_code == 0, r.stderr
    for name, reason in LEFTOVERS.items():
        assert f"  not shipped: {name} ({reason})\n" in r.stdout
    assert r.stdout.count("not shipped: runs/") == 1  # a folder is one line, not one per file


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("optimizer_0.bin", ("optimizer_0.bin", "optimizer state")),
        ("sub/rng_state.pth", ("sub/rng_state.pth", "random number generator state")),
        ("a/checkpoint-10/b/c.json", ("a/checkpoint-10/", "an intermediate training checkpoint")),
        ("custom_head.bin", ("custom_head.bin", "a pickle, which may hold weights and runs code when loaded")),
        ("config.json", None),
        ("tokenizer.model", None),
        ("checkpoint-notes.md", None),  # a file, not a checkpoint-*/ folder
        ("pytorch_model.bin.index.json", None),  # an index, handled as before
    ],
)
def test_the_never_shipped_table(rel, expected):
    assert never_shipped(rel) == expected
    assert all(reason for _, reason in NEVER_SHIPPED)


# ---------------------------------------------------------------- the card, per push


@pytest.fixture
def delta(tmp_path: Path) -> Path:
    pair = make_pair(tmp_path)
    out = tmp_path / "delta"
    xorweights.encode(
        pair.finetuned, pair.base, out, base_description="the base", base_repo_id="org/base", base_revision=REVISION
    )
    return out


def front_matter(card: str) -> dict[str, object]:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def test_the_card_names_the_pushed_repo_and_links_the_base(delta):
    api = FakeApi()
    push_to_hub(delta, "me/ft-delta", api=api, license_id="apache-2.0")
    meta = front_matter(api.card)
    assert meta == {
        "tags": ["xorweights", "xor-delta"],
        "library_name": "xorweights",
        "base_model": "org/base",
        "license": "apache-2.0",
    }
    assert "\n# me/ft-delta\n" in api.card
    assert "xorweights decode me/ft-delta --base org/base -o OUT" in api.card
    assert "under the license `apache-2.0`" in api.card


def test_without_a_license_or_a_hub_base_the_keys_are_left_out(tmp_path):
    pair = make_pair(tmp_path)
    xorweights.encode(pair.finetuned, pair.base, tmp_path / "delta")
    api = FakeApi()
    push_to_hub(tmp_path / "delta", "me/x", api=api)
    assert front_matter(api.card) == {"tags": ["xorweights", "xor-delta"], "library_name": "xorweights"}


def test_a_failed_push_leaves_no_card_naming_that_repo(delta):
    before = files_digest(delta)
    for at in ("create_repo", "upload_folder"):
        with pytest.raises(HubAuthError):
            push_to_hub(delta, "me/wrong", api=FakeApi(http_error(HfHubHTTPError, 403), at))
        assert not (delta / "README.md").exists()
        assert files_digest(delta) == before
    api = FakeApi()
    push_to_hub(delta, "me/right", api=api)
    assert "me/wrong" not in api.card and "\n# me/right\n" in api.card


def test_a_second_push_to_another_repo_gets_its_own_card(delta):
    first, second = FakeApi(), FakeApi()
    push_to_hub(delta, "me/first", api=first)
    assert (delta / "README.md").read_text(encoding="utf-8") == first.card
    push_to_hub(delta, "other/second", api=second, license_id="mit")
    assert "me/first" not in second.card
    assert "\n# other/second\n" in second.card and front_matter(second.card)["license"] == "mit"
    # A failed third push removes the second card too: nothing names a repo the push did not reach.
    with pytest.raises(HubAuthError):
        push_to_hub(delta, "me/third", api=FakeApi(http_error(HfHubHTTPError, 401), "create_repo"))
    assert not (delta / "README.md").exists()


def test_a_card_the_releaser_edited_is_kept_for_every_push(delta):
    push_to_hub(delta, "me/first", api=FakeApi())
    card = delta / "README.md"
    card.write_text(card.read_text(encoding="utf-8").replace("# me/first", "# My fine-tune"), encoding="utf-8")
    edited = card.read_text(encoding="utf-8")
    api = FakeApi()
    push_to_hub(delta, "other/second", api=api)
    assert api.card == edited
    with pytest.raises(HubAuthError):  # and a failed push leaves the releaser's card alone
        push_to_hub(delta, "me/third", api=FakeApi(http_error(HfHubHTTPError, 401), "create_repo"))
    assert card.read_text(encoding="utf-8") == edited


def test_license_reaches_the_card_from_push_and_encode(delta, tmp_path, monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(xorweights.hub.publish, "HfApi", lambda: api)
    r = run("push", delta, "me/ft-delta", "--license", "llama3.1")
    assert r.exit_code == 0, r.stderr
    assert front_matter(api.card)["license"] == "llama3.1"
    pair = make_pair(tmp_path / "second")
    out = tmp_path / "second-delta"
    r = run(
        "encode", pair.finetuned, "--base", pair.base, "-o", out, "-q", "--base-repo", "org/base",
        "--push-to-hub", "me/other", "--license", "cc-by-nc-4.0",
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert front_matter(api.card) == {
        "tags": ["xorweights", "xor-delta"],
        "library_name": "xorweights",
        "base_model": "org/base",
        "license": "cc-by-nc-4.0",
    }


@pytest.mark.parametrize("bad", ["apache 2.0", "mit\nbase_model: evil/x", '"x"', "-x", ""])
def test_a_license_that_is_not_an_id_is_refused_before_any_work(pair, tmp_path, monkeypatch, bad):
    api = FakeApi()
    monkeypatch.setattr(xorweights.hub.publish, "HfApi", lambda: api)
    r = run(
        "encode", pair.finetuned, "--base", pair.base, "-o", tmp_path / "d", "--push-to-hub", "me/x", "--license", bad
    )
    assert r.exit_code == 2
    assert "is not a Hub license id" in r.stderr and r.stderr.count("\n") == 1
    assert api.calls == [] and not (tmp_path / "d").exists()
    with pytest.raises(UsageError):
        xorweights.hub.publish.check_license(bad)


def test_license_without_push_to_hub_is_refused(pair, tmp_path):
    r = run("encode", pair.finetuned, "--base", pair.base, "-o", tmp_path / "d", "--license", "mit")
    assert r.exit_code == 2
    assert "--license applies to --push-to-hub REPO" in r.stderr


# ---------------------------------------------------------------- repo ids and Hub URLs


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("https://huggingface.co/org/name", ("org/name", None)),
        ("https://huggingface.co/org/name/", ("org/name", None)),
        ("http://www.huggingface.co/org/name", ("org/name", None)),
        ("https://hf.co/org/name", ("org/name", None)),
        ("https://huggingface.co/org/name/tree/v1.0", ("org/name", "v1.0")),
        (f"https://huggingface.co/org/name/tree/{SHA_DELTA}", ("org/name", SHA_DELTA)),
        ("https://huggingface.co/org/name/tree/refs%2Fpr%2F1", ("org/name", "refs/pr/1")),
        (Path("https://huggingface.co/org/name"), ("org/name", None)),  # pathlib folds "//": click.Path does
        ("https://huggingface.co/datasets/org/name", None),
        ("https://huggingface.co/org/name/blob/main/config.json", None),
        ("https://huggingface.co/org", None),
        ("https://huggingface.co/org/na me", None),
        ("https://example.com/org/name", None),
        ("ftp://huggingface.co/org/name", None),
    ],
)
def test_hub_urls_parse_like_repo_ids(ref, expected):
    assert parse_repo_ref(ref) == expected


def test_inspect_takes_a_repo_id_or_url_and_fetches_only_the_manifest(tmp_path, released):  # noqa: F811
    _, delta = released
    local = xorweights.inspect(delta).to_dict()
    run_hub = Runner(tmp_path)
    snapshot = run_hub.put("org/delta", delta, SHA_DELTA)
    for data in snapshot.rglob("*.xwd"):  # inspect must not need the data
        data.unlink()
    for ref in (
        "org/delta",
        f"org/delta@{SHA_DELTA}",
        "https://huggingface.co/org/delta",
        f"https://huggingface.co/org/delta/tree/{SHA_DELTA}",
    ):
        r = run_hub("inspect", ref, "--json", offline=True)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == local
    r = run_hub("inspect", "https://huggingface.co/org/delta", offline=True)
    assert r.returncode == 0, r.stderr
    assert "repo org/base at revision (unpinned)" in r.stdout


def test_decode_and_verify_take_a_hub_url(tmp_path, released):  # noqa: F811
    pair, delta = released
    run_hub = Runner(tmp_path)
    run_hub.put("org/delta", delta, SHA_DELTA)
    url = "https://huggingface.co/org/delta"
    r = run_hub("decode", url, "--base", pair.base, "-o", tmp_path / "out", "-q", offline=True)
    assert r.returncode == 0, r.stderr
    assert files_digest(tmp_path / "out") == files_digest(pair.finetuned)
    r = run_hub("verify", tmp_path / "out", "--delta", f"{url}/tree/{SHA_DELTA}", "-q", offline=True)
    assert r.returncode == 0, r.stderr


def test_push_accepts_the_repos_page_url(delta: Path) -> None:
    api = FakeApi()
    push_to_hub(delta, "https://huggingface.co/me/ft-delta", api=api)
    assert api.calls[0][1]["repo_id"] == "me/ft-delta"
    assert "me/ft-delta" in (delta / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("given", "base_card", "error", "expected"),
    [
        (None, "llama2", None, "llama2"),  # the base card's license, when the Hub tells it
        ("apache-2.0", "llama2", None, "apache-2.0"),  # --license wins
        (None, None, None, None),  # the base card declares none
        (None, "not a license id", None, None),  # nothing that is not a license id reaches the card
        (None, "llama2", OSError("unreachable"), None),  # best effort: the push goes on without it
    ],
    ids=["from-base", "given-wins", "base-has-none", "base-garbage", "base-unreachable"],
)
def test_the_license_falls_back_to_the_base_cards(delta, given, base_card, error, expected):
    api = FakeApi(base_license=base_card, base_error=error)
    push_to_hub(delta, "me/ft-delta", api=api, license_id=given)
    assert front_matter(api.card).get("license") == expected
    assert api.queried == ([] if given else ["org/base"])
