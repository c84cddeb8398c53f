"""decode --dtype: config.json names the new dtype, the index keeps the release's metadata, verify passes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run

import xorweights
from xorweights.decode import DecodeResult, dump_json_like
from xorweights.errors import BaseMismatchError, DeltaCorruptError
from xorweights.fixtures import Pair

INDEX = "model.safetensors.index.json"


def hf_json(obj: object) -> bytes:
    """JSON as transformers writes config.json and the index."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def bf16_pair(make: Callable[..., Pair], config: dict[str, object], *, in_base: bool = False) -> Pair:
    """A bf16 pair whose fine-tune has ``config``; with ``in_base`` the base has the same file (so it is referenced)."""
    pair = make(base_dtype="BF16")
    for folder in (pair.finetuned, pair.base) if in_base else (pair.finetuned,):
        (folder / "config.json").write_bytes(hf_json(config))
    return pair


def decode16(pair: Pair, tmp_path: Path, name: str = "out16") -> tuple[Path, DecodeResult]:
    delta, out = tmp_path / f"{name}-delta", tmp_path / name
    if not delta.exists():
        xorweights.encode(pair.finetuned, pair.base, delta)
    return delta, xorweights.decode(delta, pair.base, out, dtype="float16")


def checksums_of(out: Path) -> dict[str, dict[str, object]]:
    return json.loads((out / "xorweights-checksums.json").read_text())["files"]


CONFIG_4X = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0}


@pytest.mark.parametrize(
    ("keys", "in_base"),
    [(("torch_dtype",), False), (("dtype",), True), (("torch_dtype", "dtype"), False)],
    ids=["transformers-4-shipped", "transformers-5-referenced", "both-keys"],
)
def test_config_names_the_new_dtype(make, tmp_path, keys, in_base):
    config = {**CONFIG_4X, **dict.fromkeys(keys, "bfloat16")}
    pair = bf16_pair(make, config, in_base=in_base)
    _, result = decode16(pair, tmp_path)
    out = result.out
    want = hf_json({**config, **dict.fromkeys(keys, "float16")})
    assert (out / "config.json").read_bytes() == want  # every other key, their order and the layout kept
    assert result.config_dtype == "float16"
    assert "config.json" in result.written
    sums = checksums_of(out)
    assert sums["config.json"] == {"size": len(want), "sha256": hashlib.sha256(want).hexdigest()}
    r = run("verify", out)
    assert r.exit_code == 0, r.output


def test_sub_configs_follow_and_other_dtype_keys_are_left(make, tmp_path):
    config = {
        "dtype": "bfloat16",
        "text_config": {"dtype": "bfloat16", "hidden_size": 32},
        "quantization_config": {"dtype": "int8"},
        "pad_token_dtype": "bfloat16",
    }
    pair = bf16_pair(make, config)
    _, result = decode16(pair, tmp_path)
    written = json.loads((result.out / "config.json").read_text())
    assert written == {
        "dtype": "float16",
        "text_config": {"dtype": "float16", "hidden_size": 32},
        "quantization_config": {"dtype": "int8"},
        "pad_token_dtype": "bfloat16",
    }


@pytest.mark.parametrize(
    "config",
    [{**CONFIG_4X, "torch_dtype": "float16"}, CONFIG_4X, {**CONFIG_4X, "torch_dtype": None}],
    ids=["already-float16", "no-dtype-key", "null"],
)
def test_config_that_needs_no_change_is_copied_as_it_is(make, tmp_path, config):
    pair = bf16_pair(make, config)
    _, result = decode16(pair, tmp_path)
    assert (result.out / "config.json").read_bytes() == (pair.finetuned / "config.json").read_bytes()
    assert result.config_dtype is None
    assert run("verify", result.out).exit_code == 0


def test_without_dtype_config_is_the_releasers(make, tmp_path):
    pair = bf16_pair(make, {**CONFIG_4X, "torch_dtype": "bfloat16"})
    delta = tmp_path / "delta"
    xorweights.encode(pair.finetuned, pair.base, delta)
    result = xorweights.decode(delta, pair.base, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_bytes() == (pair.finetuned / "config.json").read_bytes()
    assert result.config_dtype is None


def test_second_run_keeps_the_rewritten_files_and_still_says_so(make, tmp_path):
    pair = bf16_pair(make, {**CONFIG_4X, "torch_dtype": "bfloat16"})
    delta, first = decode16(pair, tmp_path)
    before = {p.name: p.read_bytes() for p in first.out.iterdir() if p.is_file()}
    second = xorweights.decode(delta, pair.base, first.out, dtype="float16")
    assert second.written == []
    assert {"config.json", INDEX, "xorweights-checksums.json"} <= set(second.skipped)
    assert second.config_dtype == "float16"
    assert {p.name: p.read_bytes() for p in first.out.iterdir() if p.is_file()} == before


def test_cli_decode_with_dtype_rewrites_config(make, tmp_path):
    pair = bf16_pair(make, {**CONFIG_4X, "torch_dtype": "bfloat16"})
    delta, out = tmp_path / "delta", tmp_path / "out"
    assert run("encode", pair.finetuned, "--base", pair.base, "-o", delta).exit_code == 0
    r = run("decode", delta, "--base", pair.base, "-o", out, "--dtype", "float16")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert run("verify", out).exit_code == 0


# ---------------------------------------------------------------- the original config is checked first


def test_referenced_config_that_differs_is_refused_before_any_weight(make, tmp_path):
    pair = bf16_pair(make, {**CONFIG_4X, "torch_dtype": "bfloat16"}, in_base=True)
    delta, out = tmp_path / "delta", tmp_path / "out"
    xorweights.encode(pair.finetuned, pair.base, delta)
    original = (pair.base / "config.json").read_bytes()
    (pair.base / "config.json").write_bytes(original.replace(b"10000.0", b"20000.0"))
    with pytest.raises(BaseMismatchError) as exc:
        xorweights.decode(delta, pair.base, out, dtype="float16")
    assert f"{pair.base / 'config.json'}: sha256 " in exc.value.message
    assert "differs from the" in exc.value.message
    assert not list(out.glob("*.safetensors"))
    # The same message as without --dtype, where the file is copied at the end.
    with pytest.raises(BaseMismatchError) as plain:
        xorweights.decode(delta, pair.base, tmp_path / "plain")
    assert plain.value.message == exc.value.message


def test_shipped_config_that_was_edited_is_refused(make, tmp_path):
    pair = bf16_pair(make, {**CONFIG_4X, "torch_dtype": "bfloat16"})
    delta, out = tmp_path / "delta", tmp_path / "out"
    xorweights.encode(pair.finetuned, pair.base, delta)
    shipped = delta / "files" / "config.json"
    shipped.write_bytes(shipped.read_bytes().replace(b"bfloat16", b"float32!"))
    with pytest.raises(DeltaCorruptError, match="config.json: sha256 differs from the manifest's"):
        xorweights.decode(delta, pair.base, out, dtype="float16")
    assert not (out / "config.json").exists()


def test_config_that_is_no_json_object_is_copied_as_it_is(make, tmp_path):
    pair = make(base_dtype="BF16")
    (pair.finetuned / "config.json").write_bytes(b'["not", "an", "object"]\n')
    _, result = decode16(pair, tmp_path)
    assert (result.out / "config.json").read_bytes() == b'["not", "an", "object"]\n'
    assert result.config_dtype is None


# ---------------------------------------------------------------- the index


def test_converted_index_keeps_the_releases_metadata_and_layout(make, tmp_path):
    pair = bf16_pair(make, {**CONFIG_4X, "torch_dtype": "bfloat16"})
    index = json.loads((pair.finetuned / INDEX).read_text())
    params = sum(1 for _ in index["weight_map"])
    original = {
        "metadata": {"format": "pt", "total_parameters": params, "total_size": index["metadata"]["total_size"]},
        "weight_map": index["weight_map"],
    }
    (pair.finetuned / INDEX).write_bytes(hf_json(original))
    _, result = decode16(pair, tmp_path)
    data = (result.out / INDEX).read_bytes()
    # Only total_size changes: the value head goes from F32 to F16, the bf16 tensors keep their size.
    total = index["metadata"]["total_size"] - 32 * 2
    assert data == hf_json({**original, "metadata": {**original["metadata"], "total_size": total}})
    assert checksums_of(result.out)[INDEX]["sha256"] == hashlib.sha256(data).hexdigest()


def test_converted_index_updates_total_size_and_keeps_order_and_other_keys(make, tmp_path):
    pair = make(base_dtype="F32")
    index = json.loads((pair.finetuned / INDEX).read_text())
    names = list(reversed(index["weight_map"]))  # not sorted: the release's own order is kept
    original = {
        "weight_map": {n: index["weight_map"][n] for n in names},
        "metadata": {"total_parameters": 123, "total_size": index["metadata"]["total_size"]},
        "extra": [1, 2],
    }
    (pair.finetuned / INDEX).write_text(json.dumps(original, indent=4))
    _, result = decode16(pair, tmp_path)
    text = (result.out / INDEX).read_text()
    written = json.loads(text)
    assert list(written) == ["weight_map", "metadata", "extra"]
    assert list(written["weight_map"]) == names
    assert written["metadata"] == {"total_parameters": 123, "total_size": index["metadata"]["total_size"] // 2}
    assert written["extra"] == [1, 2]
    assert text == json.dumps(written, indent=4)  # four spaces, no trailing newline, as the release had it
    assert run("verify", result.out).exit_code == 0


def test_release_without_index_gets_a_plain_one(make, tmp_path):
    pair = make(base_dtype="F32", shards=1, index=False)
    _, result = decode16(pair, tmp_path)
    written = json.loads((result.out / INDEX).read_text())
    assert list(written) == ["metadata", "weight_map"]
    assert list(written["metadata"]) == ["total_size"]
    assert set(written["weight_map"].values()) == {"model.safetensors"}


# ---------------------------------------------------------------- layout detection


@pytest.mark.parametrize(
    "dump",
    [
        lambda o: json.dumps(o, indent=2, sort_keys=True) + "\n",
        lambda o: json.dumps(o, indent=4),
        lambda o: json.dumps(o, indent="\t") + "\n",
        lambda o: json.dumps(o),
        lambda o: json.dumps(o, separators=(",", ":")),
        lambda o: json.dumps(o, indent=2, ensure_ascii=False) + "\n",
    ],
    ids=["transformers", "indent-4", "tabs", "one-line", "compact", "raw-unicode"],
)
def test_dump_json_like_gives_back_the_same_bytes(dump):
    obj = {"b": {"x": [1, 2.5, None], "y": "ünï"}, "a": 1e-05, "rope_theta": 10000.0, "empty": {}}
    text = dump(obj)
    assert dump_json_like(json.loads(text), text) == text.encode()
